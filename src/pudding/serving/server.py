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
from dataclasses import dataclass, field
from typing import Any, Literal

from pudding.core.errors import ConfigError
from pudding.core.extras import require
from pudding.routing.adaptive import TOLERANCE_HEADER
from pudding.routing.model import PromptError, PuddingModel, Route, check_prompts
from pudding.serving.engine import Job, Sampling, SetBatchingEngine

# At module level: FastAPI resolves the (postponed) handler annotations here. This module is the server, so without
# the serve extra importing it is the one-line error naming the install (pudding.core.extras).
Request = require("fastapi", "serve").Request
APIRouter = require("fastapi", "serve").APIRouter
RequestValidationError = require("fastapi.exceptions", "serve").RequestValidationError
JSONResponse = require("fastapi.responses", "serve").JSONResponse
Response = require("fastapi.responses", "serve").Response
StarletteHTTPException = require("starlette.exceptions", "serve").HTTPException
ClientDisconnect = require("starlette.requests", "serve").ClientDisconnect
StreamingResponse = require("starlette.responses", "serve").StreamingResponse

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
    """Server limits and batching (every limit answers with an OpenAI-style error, not a crash); each field's
    help text is its documentation (its ``pudding serve`` flag's, pudding.cli_config)."""

    model_name: str = field(default="pudding", metadata={
        "flag": "--served-model-name", "help": "the model id in /v1/models and in every response"})
    batch_window_ms: float = field(default=10.0, metadata={"help": "wait for same-set peers this long"})
    max_batch_size: int = field(default=16, metadata={
        "type": "positive_int", "help": "prompts generated together in one batch"})
    max_body_bytes: int = field(default=1_000_000, metadata={
        "type": "positive_int", "help": "largest request body; larger gets 413"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "type": "positive_int", "help": "longest prompt in tokens (default: the model's context minus max_tokens)"})
    max_tokens_limit: int = field(default=1024, metadata={
        "type": "positive_int", "help": "largest max_tokens accepted"})
    max_concurrency: int = field(default=64, metadata={
        "type": "positive_int", "help": "prompts in flight (a list of n prompts takes n); more get 429"})
    max_prompts_per_request: int = field(default=64, metadata={
        "type": "positive_int", "help": "longest prompt list accepted; longer gets 400"})
    force_set: int | None = field(default=None, metadata={
        "help": "serve one fixed set, no routing (a gateway backend)"})

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
    require("prometheus_client", "serve")
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


class _Server:
    """What the handlers share, as ``app.state.pudding``: the model, the settings, the metrics, the concurrency
    slots and, while the app runs, the engine and the prep thread."""

    def __init__(self, pudding: PuddingModel, settings: ServeSettings):
        sets = len(pudding.pool.sets)
        if settings.force_set is not None and not 0 <= settings.force_set < sets:  # else a 500 on every request
            raise ConfigError(f"force_set {settings.force_set} is out of range: the pool has sets 0..{sets - 1}")
        self.pudding, self.settings = pudding, settings
        self.registry, self.metric = _metrics()
        self.slots = _Slots(settings.max_concurrency)
        self.engine: SetBatchingEngine | None = None
        self.prep: ThreadPoolExecutor | None = None

    def count(self, endpoint: str, status: int | str) -> None:
        # "other" for unknown paths: any path a client makes up would otherwise become a series of its own
        self.metric["requests"].labels(endpoint if endpoint in ENDPOINTS else "other", str(status)).inc()

    def error_response(self, error: OpenAIError, endpoint: str = "other") -> JSONResponse:
        self.count(endpoint, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    def too_large(self, endpoint: str) -> JSONResponse:
        return self.error_response(OpenAIError(413, f"request body over {self.settings.max_body_bytes} bytes"),
                                   endpoint)

    def client_gone(self, endpoint: str) -> None:
        self.count(endpoint, CLIENT_CLOSED)


def _server(request: Request) -> _Server:
    return request.app.state.pudding


@asynccontextmanager
async def _lifespan(app):
    server: _Server = app.state.pudding
    pudding, settings = server.pudding, server.settings
    server.engine = SetBatchingEngine(pudding.model, pudding.tokenizer, batch_window=settings.batch_window_ms / 1000,
                                      max_batch_size=settings.max_batch_size,
                                      on_batch=lambda blocks, size: server.metric["batch"].observe(size),
                                      runner=pudding.running)  # omits the set and applies its healing adapter
    server.engine.start()
    # One thread tokenizes and routes every request, off the event loop: the tokenizers are not
    # thread-safe, and the router is a torch model. The engine decodes on its own thread.
    server.prep = ThreadPoolExecutor(1, thread_name_prefix="pudding-prep")
    yield
    await server.engine.stop()
    server.prep.shutdown(wait=False, cancel_futures=True)


def create_app(pudding: PuddingModel, settings: ServeSettings | None = None):
    """The FastAPI application serving ``pudding``: this module's handlers, sharing one :class:`_Server`."""
    require("prometheus_client", "serve")  # /metrics
    from fastapi import FastAPI

    settings = settings or ServeSettings()
    server = _Server(pudding, settings)
    app = FastAPI(title="pudding", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.settings, app.state.pudding = settings, server
    for error, handler in _ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    app.add_middleware(_RequestGuard, max_bytes=settings.max_body_bytes, too_large=server.too_large,
                       client_gone=server.client_gone)
    app.include_router(_routes)
    return app


# --- errors: every one an OpenAI-style body, counted in /metrics -----------------------------------------------


async def _on_openai_error(request: Request, error: OpenAIError):
    return _server(request).error_response(error, request.url.path)


async def _on_client_gone(request: Request, error: _ClientGone):
    _server(request).client_gone(request.url.path)
    return Response(status_code=CLIENT_CLOSED)  # sent to nobody: the connection is closed


async def _on_invalid(request: Request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return _server(request).error_response(OpenAIError(400, "the request body is not valid JSON"),
                                               request.url.path)
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return _server(request).error_response(
        OpenAIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where), request.url.path)


async def _on_http_error(request: Request, error: StarletteHTTPException):
    type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _server(request).error_response(OpenAIError(error.status_code, str(error.detail), type_), request.url.path)


async def _on_unexpected(request: Request, error: Exception):
    return _server(request).error_response(OpenAIError(500, f"internal error: {type(error).__name__}", "server_error"),
                                           request.url.path)


_ERROR_HANDLERS = {OpenAIError: _on_openai_error, _ClientGone: _on_client_gone, RequestValidationError: _on_invalid,
                   StarletteHTTPException: _on_http_error, Exception: _on_unexpected}


# --- the endpoints ---------------------------------------------------------------------------------------------

@dataclass
class _Call:
    """One completion request, as its endpoint parsed it."""

    endpoint: str
    body: Any  # a CompletionRequest or a ChatRequest
    prompts: int
    texts: Callable[[], list[tuple[str, str]]]  # the (LLM prompt, router text) pairs; run on the prep thread
    chat: bool = False


_routes = APIRouter()


@_routes.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    return await _complete(request, _Call("/v1/completions", body, len(prompts), lambda: [(p, p) for p in prompts]))


@_routes.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    tokenizer = _server(request).pudding.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
    messages = [{"role": m.role, "content": m.content} for m in body.messages]

    def texts() -> list[tuple[str, str]]:  # on the prep thread: the template may be long to render
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [(prompt, chat_router_text(messages))]

    return await _complete(request, _Call("/v1/chat/completions", body, 1, texts, chat=True))


@_routes.get("/v1/models")
async def models(request: Request):
    server = _server(request)
    return {"object": "list", "data": [{"id": server.settings.model_name, "object": "model", "created": 0,
                                        "owned_by": "pudding", "sets": [e.name for e in server.pudding.pool.sets]}]}


@_routes.get("/health")
async def health(request: Request):
    engine = _server(request).engine
    return {"status": "ok", "batches": engine.stats.batches if engine else 0}


@_routes.get("/metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(_server(request).registry), media_type=CONTENT_TYPE_LATEST)


# --- a completion: check, route, generate, answer -------------------------------------------------------------


async def _complete(request: Request, call: _Call):
    """Route, generate and answer. Holds one concurrency slot per prompt (a stream hands its slot on)."""
    server, body = _server(request), call.body
    _check_request(server, body, call.prompts)
    max_tokens = _max_tokens(server, body)
    server.slots.take(call.prompts)
    handed_on = False
    try:
        started = time.perf_counter()
        prepared, routes = await asyncio.get_running_loop().run_in_executor(server.prep, _prepare, server, call,
                                                                            max_tokens)
        for route in routes:
            server.metric["sets"].labels(route.name).inc()
        server.metric["tokens"].labels("prompt").inc(sum(p.prompt_tokens for p in prepared))
        request_id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        jobs = [Job(p.prompt, r.blocks, max_tokens, Sampling(body.temperature, body.top_p), _stops(body))
                for p, r in zip(prepared, routes)]
        if body.stream:
            response = _stream_response(server, call, prepared[0], routes[0], jobs[0], request_id, started)
            handed_on = True
            return response
        results = await _run_jobs(server, jobs, request)
    finally:
        if not handed_on:
            server.slots.give(call.prompts)
    server.count(call.endpoint, 200)
    server.metric["latency"].labels(call.endpoint).observe(time.perf_counter() - started)
    return JSONResponse(_answer(server, call, results, prepared, routes, request_id), headers=_headers(routes[0]))


def _check_request(server: _Server, body, prompts: int) -> None:
    """The checks that need no tokenizer, made before the request takes any slot."""
    settings = server.settings
    where = lone_surrogate(body.model_dump(exclude_none=True))
    if where:
        raise OpenAIError(400, f"{where} contains a lone UTF-16 surrogate, which is not valid Unicode", param=where)
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
            server.pudding.check_tolerance(body.tolerance)
        except ConfigError as error:
            raise OpenAIError(400, str(error), param="tolerance") from None


def _max_tokens(server: _Server, body) -> int:
    value = body.max_completion_tokens or body.max_tokens or 16
    if value > server.settings.max_tokens_limit:
        raise OpenAIError(400, f"max_tokens is {value}; this server allows at most {server.settings.max_tokens_limit}",
                          param="max_tokens")
    return value


def _prepare(server: _Server, call: _Call, max_tokens: int) -> tuple[list[_Prepared], list[Route]]:
    """On the prep thread: build the (prompt, router text) pairs, check and count their tokens, route them.

    The prompt checks are the library's own (:meth:`PuddingModel.check_length`), so ``generate`` and the
    server refuse the same prompts with the same message.
    """
    pairs = call.texts()
    router_texts = [text for _, text in pairs]
    try:
        check_prompts(router_texts)  # a chat whose user messages are empty has nothing to route on
        lengths = server.pudding.check_length([prompt for prompt, _ in pairs], max_tokens, name="max_tokens",
                                              max_prompt_tokens=server.settings.max_prompt_tokens)
        routes = _choose(server, router_texts, call.body.tolerance)
    except PromptError as error:
        raise OpenAIError(400, str(error), param=error.param, code=error.code) from None
    return [_Prepared(prompt, text, n) for (prompt, text), n in zip(pairs, lengths)], routes


def _choose(server: _Server, router_texts: list[str], tolerance: float | None = None) -> list[Route]:
    force = server.settings.force_set
    if force is not None:
        entry = server.pudding.pool.sets[force]
        return [Route(force, entry.blocks, entry.name, []) for _ in router_texts]
    return server.pudding.route(router_texts, tolerance=tolerance)


def _stops(body) -> tuple[str, ...]:
    stop = body.stop
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)


async def _run_jobs(server: _Server, jobs: list[Job], request: Request) -> list[dict]:
    for job in jobs:
        server.engine.submit(job)
    results = await _finals(jobs, request.receive)
    failed = next((r["error"] for r in results if r.get("error")), None)
    if failed:
        raise OpenAIError(500, f"generation failed: {failed}", "server_error")
    return results


def _route_info(route: Route) -> dict:
    info = {"set": route.name, "set_index": route.set_index, "blocks": list(route.blocks)}
    return info if route.tolerance is None else {**info, "k": len(route.blocks), "tolerance": route.tolerance}


def _headers(route: Route) -> dict:
    found = {SET_HEADER: route.name, BLOCKS_HEADER: ",".join(map(str, route.blocks))}
    return found if route.tolerance is None else {**found, TOLERANCE_HEADER: repr(route.tolerance)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _answer(server: _Server, call: _Call, results: list[dict], prepared: list[_Prepared], routes: list[Route],
            request_id: str) -> dict:
    completion = sum(r["completion_tokens"] for r in results)
    server.metric["tokens"].labels("completion").inc(completion)
    if call.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                    "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
    else:
        choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                   for i, r in enumerate(results)]
    return {"id": request_id, "object": "chat.completion" if call.chat else "text_completion",
            "created": int(time.time()), "model": server.settings.model_name, "choices": choices,
            "usage": _usage(sum(p.prompt_tokens for p in prepared), completion),
            "pudding": _route_info(routes[0]) if len(routes) == 1 else [_route_info(r) for r in routes]}


# --- streaming -------------------------------------------------------------------------------------------------


def _stream_response(server: _Server, call: _Call, prepared: _Prepared, route: Route, job: Job, request_id: str,
                     started: float) -> _Stream:
    outcome: dict[str, int] = {}  # the status to count; none set means the client left first

    def close() -> None:
        job.cancelled.set()  # a no-op when the job is done; stops its row when the client left
        server.slots.give(1)
        server.count(call.endpoint, outcome.get("status", CLIENT_CLOSED))
        if outcome.get("status") == 200:
            server.metric["latency"].labels(call.endpoint).observe(time.perf_counter() - started)

    return _Stream(_stream_events(server, call, prepared, route, job, request_id, outcome), close,
                   media_type="text/event-stream", headers=_headers(route))


async def _stream_events(server: _Server, call: _Call, prepared: _Prepared, route: Route, job: Job,
                         request_id: str, outcome: dict) -> AsyncIterator[str]:
    server.engine.submit(job)
    head = {"id": request_id, "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": int(time.time()), "model": server.settings.model_name}
    if call.chat:
        yield _chunk(head, route, None, None, chat=True, first=True)
    kind, info = await job.events.get()
    while kind == "token":
        yield _chunk(head, route, info, None, call.chat)
        kind, info = await job.events.get()
    if info.get("error"):
        outcome["status"] = 500
        yield _event(OpenAIError(500, f"generation failed: {info['error']}", "server_error").body())
        return
    server.metric["tokens"].labels("completion").inc(info["completion_tokens"])
    yield _chunk(head, route, None, info["finish_reason"], call.chat)
    if call.body.stream_options and call.body.stream_options.include_usage:
        yield _event({**head, "choices": [], "usage": _usage(prepared.prompt_tokens, info["completion_tokens"])})
    outcome["status"] = 200
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return "data: " + json.dumps(payload) + "\n\n"


def _chunk(head: dict, route: Route, delta: str | None, finish: str | None, chat: bool, first: bool = False) -> str:
    if chat:
        content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
        choice = {"index": 0, "delta": content, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
    return _event({**head, "choices": [choice], "pudding": _route_info(route)})


def run_server(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    uvicorn = require("uvicorn", "serve")
    uvicorn.run(app, host=host, port=port, log_level="info")
