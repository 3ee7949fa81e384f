"""loguru set-up: JSON lines in prod, readable lines elsewhere; stdlib logging routed in."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

# The id of the request being handled (set by the envelope middleware). Each log record
# takes it as `extra["request_id"]` when it is written: setting a ContextVar per request
# costs ~0.1 µs, against ~4 µs for `logger.contextualize` (a copy of loguru's context).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

_DEV_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> <cyan>{extra[request_id]}</cyan> {message}"
)


class _InterceptHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _with_request_id(record: Record) -> None:
    rid = REQUEST_ID.get()
    if rid is not None:
        record["extra"]["request_id"] = rid


def setup_logging(level: str = "INFO", *, json: bool = False) -> None:
    logger.remove()
    logger.configure(extra={"request_id": "-"}, patcher=_with_request_id)
    if json:
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_DEV_FORMAT, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
