"""Alibaba DashScope (百炼) virtual try-on, through its asynchronous task API.

One attempt of `tryon`:

1. publish the person and garment images as URLs DashScope can fetch (it takes URLs,
   never bytes): the injected `publish(data, content_type) -> url`;
2. submit: POST {base}/api/v1/services/aigc/image2image/image-synthesis with
   `Authorization: Bearer <key>`, `X-DashScope-Async: enable` and
   `{"model": "aitryon", "input": {"person_image_url", "top_garment_url" |
   "bottom_garment_url"}, "parameters": {"resolution", "restore_face"}}`;
   it answers `{"output": {"task_id", "task_status": "PENDING"}, "request_id"}`;
3. poll GET {base}/api/v1/tasks/{task_id} every `poll_interval` until `task_status` is
   SUCCEEDED (`output.image_url`), or FAILED / CANCELED / UNKNOWN (`output.code`,
   `output.message`);
4. download `image_url` (a signed OSS URL: no Authorization header goes there).

Errors answer `{"code", "message", "request_id"}` with an HTTP status: 401 InvalidApiKey,
400 InvalidParameter, 429 Throttling, 5xx. The account's quota for aitryon is 10
submits a second and 5 tasks in progress, hence the vendor's default limits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Final

import aiohttp

from server.errors import AppError
from server.vendors import ImageInput, OperationSpec, ParamSpec
from server.vendors.adapters import (
    POLL_ERRORS,
    Inputs,
    Publish,
    VendorError,
    VendorResult,
    classify,
    image_type,
    raise_for_status,
    read_json,
    read_limited,
)
from server.vendors.config import DASHSCOPE_BASE_URL

SUBMIT_PATH: Final = "/api/v1/services/aigc/image2image/image-synthesis"
TASK_PATH: Final = "/api/v1/tasks/"
RESOLUTIONS: Final = {"original": -1, "1024": 1024, "1280": 1280}
_DONE_BAD: Final = frozenset({"FAILED", "CANCELED", "UNKNOWN"})
_JSON_MAX: Final = 256 * 1024


def _remote(*_: Any, **__: Any) -> bytes:
    raise RuntimeError("dashscope operations run through their VendorActor")


OPERATIONS: Final[dict[str, OperationSpec]] = {
    "tryon": OperationSpec(
        "tryon",
        "Virtual try-on (DashScope aitryon): the person, wearing the garment",
        (
            ImageInput("person", description="a front, full-body photo of one person"),
            ImageInput("garment", description="a flat photo of one garment"),
        ),
        {
            "garment_type": ParamSpec(
                "choice", "top", choices=("top", "bottom"), description="top (or dress) / bottom"
            ),
            "resolution": ParamSpec(
                "choice",
                "original",
                choices=tuple(RESOLUTIONS),
                description="output height: the person photo's size, 1024 (576×1024) or 1280 (720×1280)",
            ),
            "restore_face": ParamSpec("bool", True, description="keep the person's face"),
        },
        _remote,
    )
}


class DashScopeAdapter:
    kind = "dashscope"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_key: str,
        publish: Publish,
        *,
        base_url: str | None = None,
        model: str | None = None,
        poll_interval: float = 2.0,
        max_result_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.operations: Mapping[str, OperationSpec] = OPERATIONS
        self._session = session
        self._publish = publish
        self._base = (base_url or DASHSCOPE_BASE_URL).rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._model = model or "aitryon"
        self._poll_interval = poll_interval
        self._max = max_result_bytes

    async def call(
        self,
        operation: str,
        inputs: Inputs,
        params: Mapping[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> VendorResult:
        if operation != "tryon":
            raise VendorError("invalid", f"dashscope has no operation {operation!r}")
        person, garment = inputs["person"], inputs["garment"]
        assert isinstance(person, bytes) and isinstance(garment, bytes)  # checked by the actor
        # One after the other: a failed publish must not leave its sibling running.
        person_url = await self._url(person)
        garment_url = await self._url(garment)
        garment_field = "bottom_garment_url" if params.get("garment_type") == "bottom" else "top_garment_url"
        task_id = await self._submit(
            {
                "model": self._model,
                "input": {"person_image_url": person_url, garment_field: garment_url},
                "parameters": {
                    "resolution": RESOLUTIONS[str(params.get("resolution", "original"))],
                    "restore_face": bool(params.get("restore_face", True)),
                },
            }
        )
        image_url = await self._wait(task_id)
        return await self._download(image_url)

    async def close(self) -> None:
        """Nothing to close: the session belongs to vendors_ctx."""

    async def _url(self, data: bytes) -> str:
        try:
            return await self._publish(data, image_type(data))
        except VendorError as exc:
            raise VendorError("invalid", f"dashscope takes JPEG, PNG or WebP inputs: {exc.message}") from exc
        except AppError as exc:  # the storage behind `publish`: BUSY or UPSTREAM_FAILED
            raise VendorError("publish", f"Could not publish an input for dashscope: {exc.message}") from exc

    async def _submit(self, body: dict[str, Any]) -> str:
        headers = {**self._auth, "X-DashScope-Async": "enable"}
        async with self._session.post(f"{self._base}{SUBMIT_PATH}", json=body, headers=headers) as resp:
            await raise_for_status(resp)
            answer = await read_json(resp, _JSON_MAX)
        output = answer.get("output")
        task_id = output.get("task_id") if isinstance(output, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise VendorError("bad_response", f"dashscope answered no task_id: {str(answer)[:200]}")
        return task_id

    async def _wait(self, task_id: str) -> str:
        """Poll until the task ends: its image_url, or task_failed. Bounded by the
        attempt's timeout; a passing poll failure is tolerated POLL_ERRORS times in a row."""
        errors = 0
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                async with self._session.get(f"{self._base}{TASK_PATH}{task_id}", headers=self._auth) as resp:
                    await raise_for_status(resp)
                    answer = await read_json(resp, _JSON_MAX)
            except (aiohttp.ClientError, VendorError) as exc:
                error = classify(exc)
                errors += 1
                if not error.retryable or errors > POLL_ERRORS:
                    raise error from exc
                continue
            errors = 0
            output = answer.get("output")
            if not isinstance(output, dict):
                raise VendorError("bad_response", f"dashscope task answer has no output: {str(answer)[:200]}")
            status = output.get("task_status")
            if status == "SUCCEEDED":
                url = output.get("image_url")
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise VendorError("bad_response", "dashscope task succeeded without an image_url")
                return url
            if status in _DONE_BAD:
                code, message = output.get("code") or status, output.get("message") or "no reason given"
                raise VendorError(
                    "task_failed",
                    f"dashscope task {task_id} {status}: {code}: {message}",
                    details={"code": code},
                )

    async def _download(self, url: str) -> VendorResult:
        async with self._session.get(url) as resp:
            try:
                await raise_for_status(resp)
            except VendorError as exc:
                if exc.retryable:
                    raise
                # A 4xx here is the result link (expired, say), not our credentials.
                raise VendorError("bad_response", f"dashscope result download failed: {exc.message}") from exc
            data = await read_limited(resp, self._max)
        return VendorResult(data, image_type(data, resp.content_type))
