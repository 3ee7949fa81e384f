"""loguru set-up: JSON lines in prod, readable lines elsewhere; stdlib logging routed in."""

from __future__ import annotations

import json as jsonlib
import logging
import re
import sys
import traceback
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


# Personal data never reaches a log line (issue 13): mainland ID numbers (17 digits and a
# digit or X) and mobile numbers (11 digits from 13–19) not inside a longer number are
# masked in the message and in the exception's text.
_ID_CARD = re.compile(r"(?<![0-9A-Za-z])(\d{4})\d{10}(\d{3}[\dXx])(?![0-9A-Za-z])")
_PHONE = re.compile(r"(?<!\d)(1[3-9]\d)\d{4}(\d{4})(?!\d)")


_ELEVEN_DIGITS = re.compile(r"\d{11}")  # in both: most text has none, and is returned as it is


def mask_personal(text: str) -> str:
    """`110101199001011234` → `1101**********1234`, `13912345678` → `139****5678`."""
    if not _ELEVEN_DIGITS.search(text):
        return text
    return _PHONE.sub(r"\1****\2", _ID_CARD.sub(r"\1**********\2", text))


def _mask(record: Record) -> None:
    record["message"] = mask_personal(record["message"])
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        # The traceback's text is written here, masked, instead of by the sink.
        text = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
        record["message"] += "\n" + mask_personal(text.rstrip("\n"))
        record["exception"] = None


def patch_record(record: Record) -> None:
    """The patcher of every log record: the request id, then the personal-data mask."""
    _with_request_id(record)
    _mask(record)


def _json_line(record: Record) -> None:
    """The record as one flat JSON object, for `APP_ENV=prod`: `time` (ISO 8601 with its
    offset, milliseconds), `level`, `message` (masked, a traceback included), the bound
    values (`request_id`; `route` and `status` on the access line; `actor` …), and where
    it was logged (`logger`, `function`, `line`). It goes in `extra["json"]`, which the
    sink's format writes. loguru's own `serialize=True` writes every field of the record
    and the formatted text besides: 57 µs a line against 41.5 µs for this, and the access
    line is written for every request (bench/RESULTS.md, "Ninth sitting")."""
    extra = record["extra"]
    line = {  # the values bound or passed as keywords: masked like the message
        key: mask_personal(value) if isinstance(value, str) else value
        for key, value in extra.items()
        if key != "json"
    }
    line.update(
        time=record["time"].isoformat(timespec="milliseconds"),
        level=record["level"].name,
        message=record["message"],
        logger=record["name"],
        function=record["function"],
        line=record["line"],
    )
    extra["json"] = jsonlib.dumps(line, ensure_ascii=False, default=str)


def _patch_record_json(record: Record) -> None:
    patch_record(record)
    _json_line(record)


def setup_logging(level: str = "INFO", *, json: bool = False) -> None:
    logger.remove()
    logger.configure(extra={"request_id": "-"}, patcher=_patch_record_json if json else patch_record)
    if json:
        logger.add(sys.stderr, level=level, format="{extra[json]}", backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_DEV_FORMAT, backtrace=False, diagnose=False)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)
