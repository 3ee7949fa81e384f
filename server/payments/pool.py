"""The bounded thread pool every payment SDK call runs in (the SDKs block: requests, urllib).

One per provider, made by `open_payments` (entered by the app's cleanup_ctx) and shut down with it. At most
`max_pending` calls may be running or queued; one more answers BUSY at once instead of
queueing without bound. `asyncio.timeout` bounds a whole call at `timeout` seconds; the
thread cannot be stopped when that fires, which is safe because every call we make is
idempotent per out_trade_no / out_refund_no.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from loguru import logger

from server.errors import AppError, Busy, ErrorCode
from server.metrics import Metrics

_T = TypeVar("_T")


class SdkPool:
    def __init__(
        self, provider: str, label: str, *, threads: int, max_pending: int, timeout: float, metrics: Metrics
    ) -> None:
        self.provider = provider
        self.label = label  # "WeChat Pay", "Alipay": for messages
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=provider)
        self._slots = threading.BoundedSemaphore(max_pending)
        self._timeout = timeout
        self._metrics = metrics

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def call(self, op: str, fn: Callable[[], _T]) -> _T:
        """Run `fn` in the pool: its result, or AppError (UPSTREAM_FAILED; BUSY when saturated)."""
        if not self._slots.acquire(blocking=False):
            raise Busy(f"{self.label} calls are saturated, retry shortly")
        try:
            future: Future[_T] = self._executor.submit(fn)
        except RuntimeError:
            self._slots.release()
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"{self.label} client is closed") from None
        future.add_done_callback(lambda _: self._slots.release())
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._timeout):  # cancels the wrapper, and so the future
                result = await asyncio.wrap_future(future)
            outcome = "ok"
            return result
        except TimeoutError:
            outcome = "timeout"
            raise AppError(
                ErrorCode.UPSTREAM_FAILED, f"{self.label} {op} took longer than {self._timeout:g} s"
            ) from None
        except AppError:
            raise
        except OSError as exc:  # network: requests' and urllib's errors are OSErrors
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"{self.label} {op} failed: {exc}") from None
        except Exception as exc:  # the SDKs' own: e.g. a bad answer signature
            logger.warning("{} {} failed: {!r}", self.label, op, exc)
            raise AppError(ErrorCode.UPSTREAM_FAILED, f"{self.label} {op} failed: {exc!r}"[:300]) from None
        finally:
            self._metrics.provider_called(self.provider, op, outcome, time.perf_counter() - started)
