"""Tencent Cloud COS through cos-python-sdk-v5 (sync, requests).

Every SDK network call runs in a `ThreadPoolExecutor` of COS_THREADS workers owned by
the storage object, never on the event loop. At most COS_MAX_PENDING calls may be
running or queued; one more answers Busy (503) at once instead of growing a queue.

Time limits come in two layers. The SDK's `Timeout` (COS_TIMEOUT) bounds each socket
connect/read of one HTTP attempt; `asyncio.wait_for` bounds the whole call, retries
and the SDK's back-off sleeps included, at COS_TIMEOUT × (COS_RETRIES + 1) plus the
sleeps. When the outer limit fires the thread cannot be stopped: it finishes on its
own and keeps its pending slot until then, so stuck calls still count against the bound.
Every operation is idempotent (put of the same bytes, delete), so a call that timed out
here and then succeeded there leaves nothing inconsistent.

`url()` is `get_presigned_url`: pure CPU (≈0.07 ms), called on the loop.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Final, TypeVar

import requests
from loguru import logger
from qcloud_cos import CosConfig, CosS3Client
from qcloud_cos.cos_exception import CosClientError, CosServiceError

from server.config import ConfigError, Settings
from server.errors import AppError, Busy, ErrorCode, NotFound
from server.media.storage.base import DELETE_BATCH, LIST_PAGE, StoredObject, validate_key

CLOSE_TIMEOUT: Final = 5.0
_T = TypeVar("_T")


def _upstream(op: str, exc: BaseException) -> AppError:
    if isinstance(exc, CosServiceError):
        code, message = exc.get_error_code(), exc.get_error_msg()
        return AppError(
            ErrorCode.UPSTREAM_FAILED,
            f"Object storage refused {op}: {code} {message}",
            details={
                "cos_code": code,
                "cos_status": exc.get_status_code(),
                "cos_request_id": exc.get_request_id(),
            },
        )
    return AppError(ErrorCode.UPSTREAM_FAILED, f"Object storage {op} failed: {exc}"[:300])


class CosStorage:
    """The `Storage` protocol on one COS bucket."""

    name = "cos"

    def __init__(
        self,
        config: CosConfig,
        bucket: str,
        *,
        timeout: float,
        threads: int,
        retries: int = 1,
        max_pending: int = 64,
    ) -> None:
        self.bucket = bucket
        self._session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=threads)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._client = CosS3Client(config, retry=retries, session=self._session)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cos")
        self._slots = threading.BoundedSemaphore(max_pending)
        # Each attempt may take `timeout`; the SDK sleeps j seconds before retry j.
        self.call_timeout = timeout * (retries + 1) + retries * (retries + 1) / 2

    @classmethod
    def from_settings(cls, settings: Settings) -> CosStorage:
        missing = [
            name
            for name, value in (
                ("COS_BUCKET", settings.storage.cos_bucket),
                ("COS_SECRET_ID", settings.storage.cos_secret_id),
                ("COS_SECRET_KEY", settings.storage.cos_secret_key),
            )
            if not value
        ]
        if not settings.storage.cos_region and not settings.storage.cos_domain:
            missing.append("COS_REGION (or COS_DOMAIN)")
        if missing or settings.storage.cos_secret_id is None or settings.storage.cos_secret_key is None:
            raise ConfigError("STORAGE_BACKEND=cos needs " + ", ".join(missing))
        config = CosConfig(
            Region=settings.storage.cos_region,
            SecretId=settings.storage.cos_secret_id,
            SecretKey=settings.storage.cos_secret_key.get_secret_value(),
            Scheme=settings.storage.cos_scheme,
            Timeout=settings.storage.cos_timeout,
            Domain=settings.storage.cos_domain,
        )
        return cls(
            config,
            str(settings.storage.cos_bucket),
            timeout=settings.storage.cos_timeout,
            threads=settings.storage.cos_threads,
            retries=settings.storage.cos_retries,
            max_pending=settings.storage.cos_max_pending,
        )

    async def _call(self, op: str, fn: Callable[[], _T], *, missing_is_not_found: bool = False) -> _T:
        """Run one blocking SDK call in the pool, bounded in count and in time."""
        if not self._slots.acquire(blocking=False):
            raise Busy("Object storage is saturated, retry shortly")
        try:
            future: Future[_T] = self._executor.submit(fn)
        except RuntimeError:  # the pool is shut down
            self._slots.release()
            raise AppError(ErrorCode.UPSTREAM_FAILED, "Object storage is closed") from None
        # Released when the thread finishes (or the queued call is cancelled), not when we stop waiting.
        future.add_done_callback(lambda _: self._slots.release())
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.call_timeout)
        except TimeoutError:
            raise AppError(
                ErrorCode.UPSTREAM_FAILED, f"Object storage {op} took longer than {self.call_timeout:g} s"
            ) from None
        except CosServiceError as exc:
            if missing_is_not_found and exc.get_status_code() == 404:
                raise NotFound(f"No stored object for {op}") from None
            raise _upstream(op, exc) from None
        except (CosClientError, requests.RequestException, OSError) as exc:
            raise _upstream(op, exc) from None

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        validate_key(key)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        await self._call(
            f"put {key}",
            lambda: self._client.put_object(
                Bucket=self.bucket, Body=data, Key=key, ContentType=content_type, ContentMD5=md5
            ),
        )

    async def get(self, key: str) -> bytes:
        validate_key(key)

        def read() -> bytes:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body = response["Body"]
            data = b"".join(body.get_stream(1024 * 1024))
            if len(body) and len(data) != len(body):
                raise OSError(f"short read: {len(data)} of {len(body)} bytes")
            return data

        return await self._call(f"get {key}", read, missing_is_not_found=True)

    async def exists(self, key: str) -> bool:
        validate_key(key)
        found: bool = await self._call(
            f"exists {key}", lambda: self._client.object_exists(Bucket=self.bucket, Key=key)
        )
        return found

    async def delete(self, keys: Iterable[str]) -> None:
        wanted = [validate_key(k) for k in keys]
        for start in range(0, len(wanted), DELETE_BATCH):
            failed = await self._multi_delete(wanted[start : start + DELETE_BATCH])
            if failed:
                first = failed[0]
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED,
                    f"Object storage could not delete {len(failed)} object(s), "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}",
                    details={"failed_keys": [e.get("Key") for e in failed][:20]},
                )

    async def delete_batch(self, keys: Sequence[str]) -> list[str]:
        """One multi-delete request (`delete_objects`, Quiet): the keys COS reported as not deleted."""
        if len(keys) > DELETE_BATCH:
            raise ValueError(f"delete_batch takes at most {DELETE_BATCH} keys")
        if not keys:
            return []
        return [str(e.get("Key")) for e in await self._multi_delete([validate_key(k) for k in keys])]

    async def _multi_delete(self, batch: list[str]) -> list[dict[str, Any]]:
        """The `<Error>` entries of one multi-delete, NoSuchKey left out (already gone)."""
        request = {"Quiet": "true", "Object": [{"Key": k} for k in batch]}
        call = partial(self._client.delete_objects, Bucket=self.bucket, Delete=request)
        result: dict[str, Any] = await self._call(f"delete of {len(batch)} object(s)", call)
        return [e for e in result.get("Error") or [] if e.get("Code") != "NoSuchKey"]

    async def get_lifecycle(self) -> list[dict[str, Any]]:
        """The bucket's lifecycle rules as the SDK parses them ([] when it has none)."""

        def read() -> list[dict[str, Any]]:
            try:
                result: dict[str, Any] = self._client.get_bucket_lifecycle(Bucket=self.bucket)
            except CosServiceError as exc:
                if exc.get_error_code() == "NoSuchLifecycleConfiguration":
                    return []
                raise
            return list(result.get("Rule") or [])

        return await self._call("get of the lifecycle rules", read)

    async def put_lifecycle(self, rules: list[dict[str, Any]]) -> None:
        """Replace the bucket's lifecycle configuration with `rules` (put_bucket_lifecycle)."""
        call = partial(
            self._client.put_bucket_lifecycle, Bucket=self.bucket, LifecycleConfiguration={"Rule": rules}
        )
        await self._call("put of the lifecycle rules", call)

    async def objects(self, prefix: str, page_size: int = LIST_PAGE) -> AsyncIterator[list[StoredObject]]:
        """GET Bucket (list_objects) page by page, each request starting after the last key."""
        marker = ""
        while True:
            call = partial(
                self._client.list_objects,
                Bucket=self.bucket,
                Prefix=prefix,
                Marker=marker,
                MaxKeys=min(page_size, LIST_PAGE),
            )
            result: dict[str, Any] = await self._call(f"list of {prefix!r}", call)
            page = [
                StoredObject(
                    str(c["Key"]),
                    int(c.get("Size") or 0),
                    datetime.datetime.fromisoformat(str(c["LastModified"])).timestamp(),
                )
                for c in result.get("Contents") or []
            ]
            if page:
                yield page
            if str(result.get("IsTruncated", "false")).lower() != "true":
                return
            following = str(result.get("NextMarker") or (page[-1].key if page else ""))
            if not following or following <= marker:
                raise AppError(
                    ErrorCode.UPSTREAM_FAILED, f"Object storage listing of {prefix!r} did not advance"
                )
            marker = following

    def url(self, key: str, expires_in: int) -> str:
        if expires_in <= 0:
            raise ValueError("expires_in must be positive")
        url: str = self._client.get_presigned_url(
            Bucket=self.bucket, Key=validate_key(key), Method="GET", Expired=int(expires_in)
        )
        return url

    async def clear_partial_writes(
        self, before: float, *, dry_run: bool = False
    ) -> tuple[list[StoredObject], list[str]]:
        """None here: `put_object` is one request, and COS stores its object whole or not at
        all (no multipart uploads are started, so none can be left unfinished)."""
        return [], []

    async def close(self) -> None:
        """Stop taking calls, let running ones finish for a bounded time, close the sockets."""
        shutdown = asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        try:
            await asyncio.wait_for(shutdown, CLOSE_TIMEOUT)
        except TimeoutError:
            logger.warning("COS calls still running after {} s at shutdown; closing anyway", CLOSE_TIMEOUT)
        self._session.close()
