"""An in-process fake AI vendor, in both shapes the adapters speak.

DashScope (server/vendors/dashscope.py), checked like the real service:

- POST /api/v1/services/aigc/image2image/image-synthesis: `Authorization: Bearer <key>`
  (else 401 InvalidApiKey), `X-DashScope-Async: enable` (else 403 AccessDenied), model
  aitryon / aitryon-plus and input.person_image_url plus top_ or bottom_garment_url
  (else 400 InvalidParameter); answers `{"output": {"task_id", "task_status": "PENDING"},
  "request_id"}`. The task then fetches its input URLs (a URL it cannot fetch fails the
  task with InvalidURL), takes `latency` seconds and SUCCEEDS with an `image_url` under
  /results/ (the person image, unchanged).
- GET /api/v1/tasks/{id}: `{"output": {"task_id", "task_status", "image_url" | "code",
  "message"}, "request_id"}`; an unknown id is UNKNOWN.

Generic HTTP (HttpAdapter): POST /http/{operation} with a bearer key and JSON
`{"operation", "params", "inputs"}`, answering by `reply`: "image" (the first input image
as the body), "json" (`{"image": base64}`) or "task" (`{"task_id"}`, then GET
/http/tasks/{id} answers pending `task_polls` times, then `{"status": "succeeded", "image"}`).

Knobs: `latency`; `fail_next(*failures)` — each of the next calls (generic POSTs and
DashScope submits) fails one way: an HTTP status (500, 429, 400, 401…), "timeout" (hangs
until the client gives up), "task_failed"; `hold` (an Event: calls wait for it after
entering). Counters: `in_flight` and `max_in_flight` (the fake's own view of concurrency:
generic calls while their request runs, DashScope tasks from submit to end), `calls`,
`completed`, `cancelled` (requests whose client went away), `requests`. `until(pred)`
waits for a counter condition. `publish(data, type)` serves bytes at /inputs/ (an
in-test publisher for DashScope inputs).
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

SUBMIT = "/api/v1/services/aigc/image2image/image-synthesis"
MODELS = ("aitryon", "aitryon-plus")
Failure = int | str


@dataclass
class _Task:
    status: str = "PENDING"
    image: bytes = b""
    code: str = ""
    message: str = ""
    polls: int = 0


@dataclass
class FakeVendor:
    api_key: str = "sk-fake-vendor-key"
    latency: float = 0.0
    reply: str = "image"  # generic shape: image | json | task
    task_polls: int = 1  # generic "task" replies: pending answers before success
    hold: asyncio.Event | None = None
    base_url: str = ""  # set by start()
    in_flight: int = 0
    max_in_flight: int = 0
    calls: int = 0
    completed: int = 0
    cancelled: int = 0
    requests: list[str] = field(default_factory=list)
    failures: deque[Failure] = field(default_factory=deque)
    tasks: dict[str, _Task] = field(default_factory=dict)
    published: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _jobs: set[asyncio.Task[None]] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ setup

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(SUBMIT, self.submit)
        app.router.add_post(SUBMIT + "/", self.submit)
        app.router.add_get("/api/v1/tasks/{task_id}", self.task)
        app.router.add_get("/results/{task_id}", self.result)
        app.router.add_get("/inputs/{key}", self.input)
        app.router.add_post("/http/{operation}", self.generic)
        app.router.add_get("/http/tasks/{task_id}", self.generic_task)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, _: web.Application) -> None:
        self._released.set()
        for job in self._jobs:
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def fail_next(self, *failures: Failure) -> None:
        self.failures.extend(failures)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait (on events, not sleeps) until `predicate()` holds."""
        while not predicate():
            changed = self._changed
            await changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def publish(self, data: bytes, content_type: str) -> str:
        key = uuid.uuid4().hex
        self.published[key] = (data, content_type)
        return f"{self.base_url}/inputs/{key}"

    # ------------------------------------------------------------------ helpers

    def _authorised(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _ds_error(status: int, code: str, message: str) -> web.Response:
        return web.json_response(
            {"code": code, "message": message, "request_id": str(uuid.uuid4())}, status=status
        )

    def _enter(self) -> None:
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._touch()

    def _leave(self, *, completed: bool) -> None:
        self.in_flight -= 1
        self.completed += completed
        self._touch()

    async def _injected(self, failure: Failure) -> web.Response:
        """The answer of an injected failure ("timeout" hangs until the client leaves)."""
        if failure == "timeout":
            await self._released.wait()
            return web.Response(status=504)
        status = int(failure)
        headers = {"Retry-After": "0"} if status == 429 else None
        return web.json_response(
            {"code": "Injected", "message": f"injected {status}", "error": f"injected {status}"},
            status=status,
            headers=headers,
        )

    # ------------------------------------------------------------------ DashScope

    async def submit(self, request: web.Request) -> web.Response:
        self.requests.append(f"POST {request.path}")
        if not self._authorised(request):
            return self._ds_error(401, "InvalidApiKey", "Invalid API-key provided.")
        if request.headers.get("X-DashScope-Async") != "enable":
            return self._ds_error(403, "AccessDenied", "current user api does not support synchronous calls")
        body = await request.json()
        inputs = body.get("input") or {}
        person = inputs.get("person_image_url")
        garment = inputs.get("top_garment_url") or inputs.get("bottom_garment_url")
        if body.get("model") not in MODELS:
            return self._ds_error(400, "InvalidParameter", f"Model not exist: {body.get('model')}")
        if not person or not garment:
            return self._ds_error(400, "InvalidParameter", "person_image_url and a garment url are required")
        failure = self.failures.popleft() if self.failures else None
        if failure is not None and failure != "task_failed":
            return await self._injected(failure)
        task_id = str(uuid.uuid4())
        self.tasks[task_id] = _Task()
        job = asyncio.get_running_loop().create_task(self._run_task(task_id, person, garment, failure))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)
        return web.json_response(
            {"output": {"task_id": task_id, "task_status": "PENDING"}, "request_id": str(uuid.uuid4())}
        )

    async def _run_task(
        self, task_id: str, person_url: str, garment_url: str, failure: Failure | None
    ) -> None:
        task = self.tasks[task_id]
        self._enter()
        try:
            task.status = "RUNNING"
            if self._session is None:
                self._session = aiohttp.ClientSession()
            images = []
            for url in (person_url, garment_url):
                async with self._session.get(url) as resp:
                    if resp.status != 200:
                        task.status, task.code = "FAILED", "InvalidURL"
                        task.message = f"cannot download {url}: HTTP {resp.status}"
                        return
                    images.append(await resp.read())
            if self.hold is not None:
                await self.hold.wait()
            await asyncio.sleep(self.latency)
            if failure == "task_failed":
                task.status, task.code, task.message = "FAILED", "InternalError.Algo", "injected task failure"
                return
            task.image = images[0]
            task.status = "SUCCEEDED"
        finally:
            self._leave(completed=task.status == "SUCCEEDED")

    async def task(self, request: web.Request) -> web.Response:
        self.requests.append(f"GET {request.path}")
        if not self._authorised(request):
            return self._ds_error(401, "InvalidApiKey", "Invalid API-key provided.")
        task_id = request.match_info["task_id"]
        task = self.tasks.get(task_id)
        output: dict[str, Any] = {"task_id": task_id, "task_status": task.status if task else "UNKNOWN"}
        if task is not None and task.status == "SUCCEEDED":
            output["image_url"] = f"{self.base_url}/results/{task_id}"
        elif task is not None and task.status == "FAILED":
            output.update(code=task.code, message=task.message)
        return web.json_response({"output": output, "request_id": str(uuid.uuid4())})

    async def result(self, request: web.Request) -> web.Response:
        if "Authorization" in request.headers:  # a signed OSS URL: the key must not travel there
            return web.Response(status=400, text="Authorization header sent to the result URL")
        task = self.tasks.get(request.match_info["task_id"])
        if task is None or task.status != "SUCCEEDED":
            return web.Response(status=404)
        return web.Response(body=task.image, content_type="image/png")

    async def input(self, request: web.Request) -> web.Response:
        item = self.published.get(request.match_info["key"])
        if item is None:
            return web.Response(status=404)
        return web.Response(body=item[0], content_type=item[1])

    # ------------------------------------------------------------------ generic HTTP

    async def generic(self, request: web.Request) -> web.Response:
        self.requests.append(f"POST {request.path}")
        if not self._authorised(request):
            return web.json_response({"error": "invalid api key"}, status=401)
        body = await request.json()
        self._enter()
        completed = False
        try:
            failure = self.failures.popleft() if self.failures else None
            if failure == "task_failed":
                return web.json_response({"status": "failed", "error": "injected task failure"})
            if failure is not None:
                return await self._injected(failure)
            if self.hold is not None:
                await self.hold.wait()
            if self.latency:
                await asyncio.sleep(self.latency)
            first = next(iter(body["inputs"].values()))
            image = base64.b64decode(first[0] if isinstance(first, list) else first)
            completed = True
            if self.reply == "json":
                return web.json_response({"image": base64.b64encode(image).decode()})
            if self.reply == "task":
                task_id = str(uuid.uuid4())
                self.tasks[task_id] = _Task(status="SUCCEEDED", image=image)
                return web.json_response({"task_id": task_id, "status": "pending"}, status=202)
            return web.Response(body=image, content_type="image/png")
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self._leave(completed=completed)

    async def generic_task(self, request: web.Request) -> web.Response:
        self.requests.append(f"GET {request.path}")
        if not self._authorised(request):
            return web.json_response({"error": "invalid api key"}, status=401)
        task = self.tasks.get(request.match_info["task_id"])
        if task is None:
            return web.json_response({"error": "no such task"}, status=404)
        task.polls += 1
        if task.polls <= self.task_polls:
            return web.json_response({"status": "running"})
        return web.json_response({"status": "succeeded", "image": base64.b64encode(task.image).decode()})
