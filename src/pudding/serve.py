"""Stage 9 of the pipeline: an OpenAI-compatible HTTP server that routes every request.

``create_app(pudding, settings)`` builds a FastAPI app with ``/v1/completions``, ``/v1/chat/completions``
(server-sent events when ``stream`` is true), ``/v1/models``, ``/health`` and ``/metrics`` (Prometheus).

Each request is routed once, on its prompt (for chat, on the text of the user's messages, which is what the
router was trained on; the LLM gets the chat template applied). The chosen set is returned in the body as
``"pudding": {"set": ..., "blocks": [...]}`` and in the ``X-Pudding-Set`` and ``X-Pudding-Omitted-Blocks``
headers. Generation goes through :class:`~pudding.engine.SetBatchingEngine`, which batches concurrent
requests that chose the same set.

Safe defaults: the CLI binds to 127.0.0.1; the body size, prompt tokens, ``max_tokens`` and concurrent
requests are limited; every error (malformed JSON, unknown fields, limits) is an OpenAI-style error body
with a 4xx status, never a traceback. A streaming client that disconnects cancels its row and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request  # at module level: FastAPI resolves the (postponed) handler annotations here

from pudding.engine import Job, Sampling, SetBatchingEngine
from pudding.load import context_length
from pudding.routed import PuddingModel, Route

SET_HEADER = "X-Pudding-Set"
BLOCKS_HEADER = "X-Pudding-Omitted-Blocks"


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching (every limit answers with an OpenAI-style error, not a crash)."""

    model_name: str = "pudding"
    batch_window_ms: float = 10.0
    max_batch_size: int = 16
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the model's context minus max_tokens
    max_tokens_limit: int = 1024
    max_concurrency: int = 64
    force_set: int | None = None  # serve one fixed set (a gateway backend), no routing


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _schemas():
    from pydantic import BaseModel, ConfigDict, Field

    class Strict(BaseModel):
        model_config = ConfigDict(extra="forbid")

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


def create_app(pudding: PuddingModel, settings: ServeSettings | None = None):
    """The FastAPI application serving ``pudding``."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = settings or ServeSettings()
    registry, metric = _metrics()
    slots = asyncio.Semaphore(settings.max_concurrency)
    names = [e.name for e in pudding.pool.sets]
    context = context_length(pudding.model)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app):
        engine = SetBatchingEngine(pudding.model, pudding.tokenizer, batch_window=settings.batch_window_ms / 1000,
                                   max_batch_size=settings.max_batch_size,
                                   on_batch=lambda blocks, size: metric["batch"].observe(size))
        engine.start()
        state["engine"] = engine
        yield
        await engine.stop()

    app = FastAPI(title="pudding", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings

    def error_response(error: OpenAIError, endpoint: str = "other") -> JSONResponse:
        metric["requests"].labels(endpoint, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, error: OpenAIError):
        return error_response(error, request.url.path)

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

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            return error_response(OpenAIError(413, f"request body over {settings.max_body_bytes} bytes"))
        if request.method == "POST" and len(await request.body()) > settings.max_body_bytes:
            return error_response(OpenAIError(413, f"request body over {settings.max_body_bytes} bytes"))
        return await call_next(request)

    def choose(router_texts: list[str]) -> list[Route]:
        if settings.force_set is not None:
            entry = pudding.pool.sets[settings.force_set]
            return [Route(settings.force_set, entry.blocks, entry.name, []) for _ in router_texts]
        return pudding.route(router_texts)

    def max_tokens_of(body) -> int:
        value = body.max_completion_tokens or body.max_tokens or 16
        if value > settings.max_tokens_limit:
            raise OpenAIError(400, f"max_tokens is {value}; this server allows at most {settings.max_tokens_limit}",
                              param="max_tokens")
        return value

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

    def stops(body) -> tuple[str, ...]:
        stop = body.stop
        return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)

    async def acquire_slot() -> None:
        if slots.locked():
            raise OpenAIError(429, f"the server is at its limit of {settings.max_concurrency} concurrent requests; "
                                   "retry later", "rate_limit_error", code="rate_limit_exceeded")
        await slots.acquire()

    def route_info(route: Route) -> dict:
        return {"set": route.name, "set_index": route.set_index, "blocks": list(route.blocks)}

    def headers(route: Route) -> dict:
        return {SET_HEADER: route.name, BLOCKS_HEADER: ",".join(map(str, route.blocks))}

    async def run_jobs(prepared: list[_Prepared], routes: list[Route], max_tokens: int, body) -> list[dict]:
        jobs = [Job(p.prompt, r.blocks, max_tokens, Sampling(body.temperature, body.top_p), stops(body))
                for p, r in zip(prepared, routes)]
        for job in jobs:
            state["engine"].submit(job)
        results = []
        for job in jobs:
            while True:
                kind, info = await job.events.get()
                if kind == "done":
                    if info.get("error"):
                        raise OpenAIError(500, f"generation failed: {info['error']}", "server_error")
                    results.append(info)
                    break
        return results

    async def handle(body, endpoint: str, prepared: list[_Prepared], chat: bool):
        """Route, generate and answer; owns the request's concurrency slot (a stream takes it over)."""
        await acquire_slot()
        handed_to_stream = False
        try:
            started = time.perf_counter()
            routes = choose([p.router_text for p in prepared])
            for route in routes:
                metric["sets"].labels(route.name).inc()
            metric["tokens"].labels("prompt").inc(sum(p.prompt_tokens for p in prepared))
            max_tokens = max_tokens_of(body)
            request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            created = int(time.time())
            if body.stream:
                if len(prepared) != 1:
                    raise OpenAIError(400, "streaming supports one prompt per request", param="prompt")
                response = StreamingResponse(stream(body, endpoint, prepared[0], routes[0], max_tokens, request_id,
                                                    created, chat, started),
                                             media_type="text/event-stream", headers=headers(routes[0]))
                handed_to_stream = True
                return response
            results = await run_jobs(prepared, routes, max_tokens, body)
        finally:
            if not handed_to_stream:
                slots.release()
        completion = sum(r["completion_tokens"] for r in results)
        metric["tokens"].labels("completion").inc(completion)
        usage = {"prompt_tokens": sum(p.prompt_tokens for p in prepared), "completion_tokens": completion,
                 "total_tokens": sum(p.prompt_tokens for p in prepared) + completion}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]},
                        "finish_reason": r["finish_reason"]} for i, r in enumerate(results)]
        else:
            choices = [{"index": i, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
                       for i, r in enumerate(results)]
        metric["requests"].labels(endpoint, "200").inc()
        metric["latency"].labels(endpoint).observe(time.perf_counter() - started)
        payload = {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": settings.model_name, "choices": choices, "usage": usage,
                   "pudding": route_info(routes[0]) if len(routes) == 1 else [route_info(r) for r in routes]}
        return JSONResponse(payload, headers=headers(routes[0]))

    async def stream(body, endpoint, prepared, route, max_tokens, request_id, created, chat,
                     started) -> AsyncIterator[str]:
        job = Job(prepared.prompt, route.blocks, max_tokens, Sampling(body.temperature, body.top_p), stops(body))
        state["engine"].submit(job)
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                content = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": content, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": request_id, "object": kind_name, "created": created,
                                          "model": settings.model_name, "choices": [choice],
                                          "pudding": route_info(route)}) + "\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                kind, info = await job.events.get()
                if kind == "token":
                    yield chunk(info, None)
                    continue
                if info.get("error"):
                    yield "data: " + json.dumps(OpenAIError(500, f"generation failed: {info['error']}",
                                                            "server_error").body()) + "\n\n"
                    break
                metric["tokens"].labels("completion").inc(info["completion_tokens"])
                yield chunk(None, info["finish_reason"])
                if body.stream_options and body.stream_options.include_usage:
                    usage = {"prompt_tokens": prepared.prompt_tokens, "completion_tokens": info["completion_tokens"],
                             "total_tokens": prepared.prompt_tokens + info["completion_tokens"]}
                    yield "data: " + json.dumps({"id": request_id, "object": kind_name, "created": created,
                                                 "model": settings.model_name, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
                metric["requests"].labels(endpoint, "200").inc()
                metric["latency"].labels(endpoint).observe(time.perf_counter() - started)
                break
        finally:  # normal end, or the client went away (the generator is closed): free the row and the slot
            job.cancelled.set()
            slots.release()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "the prompt list is empty", param="prompt")
        max_tokens = max_tokens_of(body)
        prepared = [prepare(p, p, max_tokens) for p in prompts]
        return await handle(body, "/v1/completions", prepared, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        if getattr(pudding.tokenizer, "chat_template", None) is None:
            raise OpenAIError(400, "this model's tokenizer has no chat template; use /v1/completions")
        prompt = pudding.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        router_text = chat_router_text(messages)
        prepared = [prepare(prompt, router_text, max_tokens_of(body))]
        return await handle(body, "/v1/chat/completions", prepared, chat=True)

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
