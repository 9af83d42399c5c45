"""An OpenAI-compatible HTTP server that routes every request.

``create_app(pudding, settings)`` builds a FastAPI app with ``/v1/completions``, ``/v1/chat/completions``
(server-sent events when ``stream`` is true), ``/v1/models``, ``/health`` and ``/metrics`` (Prometheus).

Each request is routed once, on its prompt (for chat, on the text of the user's messages, which is what the
router was trained on; the LLM gets the chat template applied). The chosen set is returned in the body as
``"pudding": {"set": ..., "blocks": [...]}`` and in the ``X-Pudding-Set`` and ``X-Pudding-Omitted-Blocks``
headers. Generation goes through :class:`~pudding.serving.engine.SetBatchingEngine`, which batches concurrent
requests that chose the same set.

Safe defaults: the CLI binds to 127.0.0.1; the body size (counted as it arrives, so chunked uploads too),
the prompts per request, prompt tokens, ``max_tokens`` and concurrent prompts are limited; every error
(malformed JSON, unknown fields, wrong types, invalid Unicode, limits) is an OpenAI-style error body with a 4xx
status, never a traceback. Tokenizing and routing run on one worker thread and generation on the engine's, so
the event loop stays free (``/health`` answers during a long batch). A client that disconnects, streaming or
not, cancels its rows and frees its slots; it is counted as status 499 in ``/metrics``, not as an error.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request  # at module level: FastAPI resolves the (postponed) handler annotations here
from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse

from pudding.core.errors import ConfigError
from pudding.core.load import context_length
from pudding.routing.adaptive import TOLERANCE_HEADER
from pudding.routing.model import PuddingModel, Route
from pudding.serving.engine import Job, Sampling, SetBatchingEngine

SET_HEADER = "X-Pudding-Set"
BLOCKS_HEADER = "X-Pudding-Omitted-Blocks"
# The smallest positive temperature accepted (0 means greedy). Far below it, logits / temperature overflow
# float32 and sampling meets NaN probabilities (a tiny llama fails at 1e-40); 1e-5 leaves room for logits up
# to ~1e33 and is where vLLM already switches to greedy.
MIN_TEMPERATURE = 1e-5
# The status counted in /metrics when the client left before its answer (nginx's "client closed request").
# Nobody receives it; it keeps disconnects apart from the server's own failures (500).
CLIENT_CLOSED = 499
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching (every limit answers with an OpenAI-style error, not a crash)."""

    model_name: str = "pudding"
    batch_window_ms: float = 10.0
    max_batch_size: int = 16
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the model's context minus max_tokens
    max_tokens_limit: int = 1024
    max_concurrency: int = 64  # prompts in flight: a request with a list of n prompts takes n
    max_prompts_per_request: int = 64  # a longer prompt list gets a 400
    force_set: int | None = None  # serve one fixed set (a gateway backend), no routing

    def __post_init__(self):
        for name in ("max_batch_size", "max_body_bytes", "max_tokens_limit", "max_concurrency",
                     "max_prompts_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ServeSettings.{name} must be a positive integer, not {value!r}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"ServeSettings.max_prompt_tokens must be positive, not {self.max_prompt_tokens}")
        if self.batch_window_ms < 0:
            raise ConfigError(f"ServeSettings.batch_window_ms must be >= 0, not {self.batch_window_ms}")


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        message, param = _encodable(message), None if param is None else _encodable(param)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    # A message may quote the request (an unknown field named "\ud800"); a lone surrogate cannot be encoded
    # as UTF-8, so rendering the error body would itself fail. Show it escaped instead.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def lone_surrogate(value: Any, where: str = "") -> str | None:
    r"""The path (``messages.0.content``) of the first string in ``value`` that is not valid Unicode, or None.

    JSON may carry a lone UTF-16 surrogate (``"\ud800"``); Python keeps it in the ``str``, and the tokenizer
    then fails on it. ``lone_surrogate({"prompt": ["ok", "\ud800"]}) == "prompt.1"``.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def _schemas():
    from pydantic import BaseModel, ConfigDict, Field, field_validator

    class Strict(BaseModel):
        # strict: "max_tokens": "2" or true, "temperature": "0.5", "stream": "yes" are errors, not coerced
        model_config = ConfigDict(extra="forbid", strict=True)

    class StreamOptions(Strict):
        include_usage: bool = False

    class Common(Strict):
        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        n: int = Field(default=1, ge=1, le=1)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        user: str | None = None
        # adaptive depth: the largest predicted drop accepted (a depth-ladder artifact only; pudding.routing.adaptive)
        tolerance: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)

        @field_validator("temperature")
        @classmethod
        def _sampleable(cls, value: float) -> float:
            if 0 < value < MIN_TEMPERATURE:
                raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}; {value:g} "
                                 "overflows the sampling probabilities")
            return value

    class CompletionRequest(Common):
        prompt: str | list[str]

    class Message(Strict):
        role: Literal["system", "user", "assistant", "developer"]
        content: str
        name: str | None = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)

    return CompletionRequest, ChatRequest


CompletionRequest, ChatRequest = _schemas()


def chat_router_text(messages: list[dict]) -> str:
    """What the router reads for a chat: the user messages' text (the router was trained on prompts)."""
    return "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict) and m.get("role") == "user")


@dataclass
class _Prepared:
    prompt: str  # what the LLM reads
    router_text: str  # what the router reads
    prompt_tokens: int


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    return registry, {
        "requests": Counter("pudding_requests", "HTTP requests", ["endpoint", "status"], registry=registry),
        "tokens": Counter("pudding_tokens", "tokens processed", ["kind"], registry=registry),
        "latency": Histogram("pudding_request_latency_seconds", "request latency", ["endpoint"], registry=registry,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)),
        "sets": Counter("pudding_set_chosen", "how often each omission set was chosen", ["set"], registry=registry),
        "batch": Histogram("pudding_batch_size", "rows per generate batch", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64)),
    }


class _ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class _Slots:
    """Concurrency slots, one per prompt in flight. A request takes all it needs at once, or gets a 429.

    Used only on the event loop's thread, so a plain counter is enough.
    """

    def __init__(self, total: int):
        self.total = self.free = total

    def take(self, n: int) -> None:
        if n > self.free:
            raise OpenAIError(429, f"the server is at its limit of {self.total} concurrent prompts ({self.free} "
                                   f"free, this request needs {n}); retry later", "rate_limit_error",
                              code="rate_limit_exceeded")
        self.free -= n

    def give(self, n: int) -> None:
        self.free += n


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None as soon as it passes ``limit`` bytes (the rest is never read)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` as one message, then passes on (to hear of a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


class _RequestGuard:
    """ASGI middleware at the edge of the app: the body size limit, and clients that leave.

    The body is counted as it arrives, so a chunked upload (no Content-Length) is refused as soon as it
    passes the limit instead of being buffered whole. It is read here, before the app (every endpoint parses
    the whole JSON anyway), which keeps the refusal independent of how the framework treats an error raised
    mid-read. A client that leaves before an answer started is counted by ``client_gone``; Starlette's
    ``ClientDisconnect`` would otherwise reach the catch-all handler and be counted as a 500.
    """

    def __init__(self, app, max_bytes: int, too_large: Callable[[str], Any], client_gone: Callable[[str], None]):
        self.app, self.max_bytes, self.too_large, self.client_gone = app, max_bytes, too_large, client_gone

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            body = None if _declared_length(scope) > self.max_bytes else await _read_body(receive, self.max_bytes)
            if body is None:
                return await self.too_large(scope["path"])(scope, receive, send)
            await self.app(scope, _replay(body, receive), tracked)
        except ClientDisconnect:
            if not started:  # a started answer (a stream) counts its own end
                self.client_gone(scope["path"])


def _declared_length(scope) -> int:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.isdigit():
            return int(value)
    return 0


async def _until_disconnected(receive) -> None:
    """Returns once the client has gone (after the body, the server's next message is http.disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _final(job: Job) -> dict:
    """The job's closing info, once it is done (its token events are skipped)."""
    while True:
        kind, info = await job.events.get()
        if kind == "done":
            return info


async def _finals(jobs: list[Job], receive) -> list[dict]:
    """Each job's closing info, in order; if the client leaves first, cancel the jobs and raise _ClientGone.

    A cancelled job still queued is dropped; a running one stops at the next decode step, and only its own
    row does: the other rows of its batch belong to other requests and go on.
    """
    finished = asyncio.ensure_future(asyncio.gather(*(_final(job) for job in jobs)))
    gone = asyncio.ensure_future(_until_disconnected(receive))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
        if finished.done():
            return finished.result()
        raise _ClientGone()
    finally:
        gone.cancel()
        if not finished.done():  # the client left, or this request was cancelled (the server is stopping)
            for job in jobs:
                job.cancelled.set()
            finished.cancel()
            # mark its outcome as seen, or asyncio logs "_GatheringFuture exception was never retrieved"
            finished.add_done_callback(lambda future: future.cancelled() or future.exception())


class _Stream(StreamingResponse):
    """A server-sent-event stream that runs ``close`` however it ends: finished, client gone, never started.

    The body generator's own ``finally`` is not enough: Starlette may cancel the response before the generator
    first runs (a client that left at once), and then that ``finally`` never runs and the slot would leak.
    """

    def __init__(self, content, close: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.close = close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.close()


def create_app(pudding: PuddingModel, settings: ServeSettings | None = None):
    """The FastAPI application serving ``pudding``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    registry, metric = _metrics()
    slots = _Slots(settings.max_concurrency)
    names = [e.name for e in pudding.pool.sets]
    context = context_length(pudding.model)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine = SetBatchingEngine(pudding.model, pudding.tokenizer, batch_window=settings.batch_window_ms / 1000,
                                   max_batch_size=settings.max_batch_size,
                                   on_batch=lambda blocks, size: metric["batch"].observe(size),
                                   runner=pudding.running)  # omits the set and applies its healing adapter
        engine.start()
        # One thread tokenizes and routes every request, off the event loop: the tokenizers are not
        # thread-safe, and the router is a torch model. The engine decodes on its own thread.
        state["engine"], state["prep"] = engine, ThreadPoolExecutor(1, thread_name_prefix="pudding-prep")
        yield
        await engine.stop()
        state["prep"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pudding", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings

    def count(endpoint: str, status: int | str) -> None:
        # "other" for unknown paths: any path a client makes up would otherwise become a series of its own
        metric["requests"].labels(endpoint if endpoint in ENDPOINTS else "other", str(status)).inc()

    def error_response(error: OpenAIError, endpoint: str = "other") -> JSONResponse:
        count(endpoint, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    def client_gone(endpoint: str) -> None:
        count(endpoint, CLIENT_CLOSED)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, error: OpenAIError):
        return error_response(error, request.url.path)

    @app.exception_handler(_ClientGone)
    async def _gone(request, error):
        client_gone(request.url.path)
        return Response(status_code=CLIENT_CLOSED)  # sent to nobody: the connection is closed

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(OpenAIError(400, "the request body is not valid JSON"), request.url.path)
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(OpenAIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                                          param=where), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, error):
        return error_response(OpenAIError(error.status_code, str(error.detail),
                                          "not_found_error" if error.status_code == 404 else "invalid_request_error"),
                              request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request, error):
        return error_response(OpenAIError(500, f"internal error: {type(error).__name__}", "server_error"),
                              request.url.path)

    def too_large(endpoint: str) -> JSONResponse:
        return error_response(OpenAIError(413, f"request body over {settings.max_body_bytes} bytes"), endpoint)

    app.add_middleware(_RequestGuard, max_bytes=settings.max_body_bytes, too_large=too_large,
                       client_gone=client_gone)

    def choose(router_texts: list[str], tolerance: float | None = None) -> list[Route]:
        if settings.force_set is not None:
            entry = pudding.pool.sets[settings.force_set]
            return [Route(settings.force_set, entry.blocks, entry.name, []) for _ in router_texts]
        return pudding.route(router_texts, tolerance=tolerance)

    def max_tokens_of(body) -> int:
        value = body.max_completion_tokens or body.max_tokens or 16
        if value > settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens is {value}; this server allows at most {settings.max_tokens_limit}",
                              param="max_tokens")
        return value

    def check_request(body, prompts: int) -> None:
        """The checks that need no tokenizer, made before the request takes any slot."""
        where = lone_surrogate(body.model_dump(exclude_none=True))
        if where:
            raise OpenAIError(400, f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode",
                              param=where)
        if prompts == 0:
            raise OpenAIError(400, "the prompt list is empty", param="prompt")
        # A list can never need more slots than exist: cap it there too, or it would get a 429 forever.
        cap = min(settings.max_prompts_per_request, settings.max_concurrency)
        if prompts > cap:
            raise OpenAIError(400, f"the prompt list has {prompts} prompts; this server takes at most {cap} per "
                                   "request", param="prompt")
        if body.stream and prompts != 1:
            raise OpenAIError(400, "streaming supports one prompt per request", param="prompt")
        if body.tolerance is not None:
            if settings.force_set is not None:
                raise OpenAIError(400, "this server serves one fixed set; tolerance needs routing", param="tolerance")
            try:
                pudding.check_tolerance(body.tolerance)
            except ConfigError as error:
                raise OpenAIError(400, str(error), param="tolerance") from None

    def prepare(prompt: str, router_text: str, max_tokens: int) -> _Prepared:
        if not prompt.strip() or not router_text.strip():
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        n = len(pudding.tokenizer(prompt)["input_ids"])
        limit = settings.max_prompt_tokens or (context - max_tokens if context else None)
        if limit is not None and n > limit:
            raise OpenAIError(400, f"the prompt has {n} tokens; with max_tokens={max_tokens} at most {limit} are "
                                   "allowed", param="prompt", code="context_length_exceeded")
        if context and n + max_tokens > context:
            raise OpenAIError(400, f"prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's "
                                   f"context of {context}", param="max_tokens", code="context_length_exceeded")
        return _Prepared(prompt, router_text, n)

    async def prepare_all(texts: Callable[[], list[tuple[str, str]]], max_tokens: int,
                          tolerance: float | None = None) -> tuple[list[_Prepared], list[Route]]:
        """On the prep thread: build the (prompt, router text) pairs, count and check their tokens, route."""
        def work():
            prepared = [prepare(prompt, router_text, max_tokens) for prompt, router_text in texts()]
            return prepared, choose([p.router_text for p in prepared], tolerance)

        return await asyncio.get_running_loop().run_in_executor(state["prep"], work)

    def stops(body) -> tuple[str, ...]:
        stop = body.stop
        return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)

    def route_info(route: Route) -> dict:
        info = {"set": route.name, "set_index": route.set_index, "blocks": list(route.blocks)}
        return info if route.tolerance is None else {**info, "k": len(route.blocks), "tolerance": route.tolerance}

    def headers(route: Route) -> dict:
        found = {SET_HEADER: route.name, BLOCKS_HEADER: ",".join(map(str, route.blocks))}
        return found if route.tolerance is None else {**found, TOLERANCE_HEADER: repr(route.tolerance)}

    def job_of(prepared: _Prepared, route: Route, max_tokens: int, body) -> Job:
        return Job(prepared.prompt, route.blocks, max_tokens, Sampling(body.temperature, body.top_p), stops(body))

    async def run_jobs(jobs: list[Job], request: Request) -> list[dict]:
        for job in jobs:
            state["engine"].submit(job)
        results = await _finals(jobs, request.receive)
        failed = next((r["error"] for r in results if r.get("error")), None)
        if failed:
            raise OpenAIError(500, f"generation failed: {failed}", "server_error")
        return results

    async def handle(request: Request, body, endpoint: str, texts: Callable[[], list[tuple[str, str]]],
                     prompts: int, chat: bool):
        """Route, generate and answer. Holds one concurrency slot per prompt (a stream hands its slot on)."""
        check_request(body, prompts)
        max_tokens = max_tokens_of(body)
        slots.take(prompts)
        handed_on = False
        try:
            started = time.perf_counter()
            prepared, routes = await prepare_all(texts, max_tokens, body.tolerance)
            for route in routes:
                metric["sets"].labels(route.name).inc()
            metric["tokens"].labels("prompt").inc(sum(p.prompt_tokens for p in prepared))
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            jobs = [job_of(p, r, max_tokens, body) for p, r in zip(prepared, routes)]
            if body.stream:
                response = stream_response(body, endpoint, prepared[0], routes[0], jobs[0], request_id, chat, started)
                handed_on = True
                return response
            results = await run_jobs(jobs, request)
        finally:
            if not handed_on:
                slots.give(prompts)
        count(endpoint, 200)
        metric["latency"].labels(endpoint).observe(time.perf_counter() - started)
        return JSONResponse(answer(results, prepared, routes, request_id, chat), headers=headers(routes[0]))

    def answer(results: list[dict], prepared: list[_Prepared], routes: list[Route], request_id: str,
               chat: bool) -> dict:
        completion = sum(r["completion_tokens"] for r in results)
        metric["tokens"].labels("completion").inc(completion)
        prompt_tokens = sum(p.prompt_tokens for p in prepared)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                        "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
        else:
            choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                       for i, r in enumerate(results)]
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": settings.model_name, "choices": choices, "usage": usage,
                "pudding": route_info(routes[0]) if len(routes) == 1 else [route_info(r) for r in routes]}

    def stream_response(body, endpoint, prepared, route, job, request_id, chat, started) -> _Stream:
        outcome: dict[str, int] = {}  # the status to count; none set means the client left first

        def close() -> None:
            job.cancelled.set()  # a no-op when the job is done; stops its row when the client left
            slots.give(1)
            count(endpoint, outcome.get("status", CLIENT_CLOSED))
            if outcome.get("status") == 200:
                metric["latency"].labels(endpoint).observe(time.perf_counter() - started)

        return _Stream(stream(body, prepared, route, job, request_id, chat, outcome), close,
                       media_type="text/event-stream", headers=headers(route))

    async def stream(body, prepared, route, job, request_id, chat, outcome: dict) -> AsyncIterator[str]:
        state["engine"].submit(job)
        kind_name = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def event(payload: dict) -> str:
            return "data: " + json.dumps(payload) + "\n\n"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return event({"id": request_id, "object": kind_name, "created": created, "model": settings.model_name,
                          "choices": [choice], "pudding": route_info(route)})

        if chat:
            yield chunk(None, None, first=True)
        while True:
            kind, info = await job.events.get()
            if kind == "token":
                yield chunk(info, None)
                continue
            if info.get("error"):
                outcome["status"] = 500
                yield event(OpenAIError(500, f"generation failed: {info['error']}", "server_error").body())
                return
            metric["tokens"].labels("completion").inc(info["completion_tokens"])
            yield chunk(None, info["finish_reason"])
            if body.stream_options and body.stream_options.include_usage:
                usage = {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": info["completion_tokens"],
                         "total_tokens": prepared.prompt_tokens + info["completion_tokens"]}
                yield event({"id": request_id, "object": kind_name, "created": created,
                             "model": settings.model_name, "choices": [], "usage": usage})
            outcome["status"] = 200
            yield "data: [DONE]\n\n"
            return

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await handle(request, body, "/v1/completions", lambda: [(p, p) for p in prompts], len(prompts),
                            chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if getattr(pudding.tokenizer, "chat_template", None) is None:
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        messages = [{"role": m.role, "content": m.content} for m in body.messages]

        def texts() -> list[tuple[str, str]]:  # on the prep thread: the template may be long to render
            prompt = pudding.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return [(prompt, chat_router_text(messages))]

        return await handle(request, body, "/v1/chat/completions", texts, 1, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "pudding", "sets": names}]}

    @app.get("/health")
    async def health():
        engine = state.get("engine")
        return {"status": "ok", "batches": engine.stats.batches if engine else 0}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
