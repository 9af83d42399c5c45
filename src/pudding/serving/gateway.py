"""Gateway mode: run only the router, and forward each request to a backend serving the chosen set.

Each backend is any OpenAI-compatible server holding the statically pruned model of one set: another
``pudding serve --force-set I``, or an engine such as vLLM serving ``pudding export --all-sets`` output.
The router picks the best set *among those that have a backend*, so a deployment may serve a subset of
the pool. Requests and responses pass through unchanged (streams included), except that a non-streaming
JSON answer gains the ``pudding`` field and every answer the ``X-Pudding-*`` headers, as from ``pudding serve``.

With a depth-ladder artifact a request may carry ``tolerance`` (adaptive depth, as in ``pudding serve``): the
deepest *served* set whose predicted drop from the reference is within it. The reference is the dense (or
shallowest) prediction over the whole ladder, served or not, so a tolerance means the same drop behind the
gateway as from ``pudding serve``. The field is removed before forwarding: a backend serves one fixed set.
"""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import torch

from pudding.core.errors import ConfigError
from pudding.core.extras import require
from pudding.core.omit import require_whole_blocks
from pudding.routing.adaptive import TOLERANCE_HEADER, choose_by_tolerance
from pudding.routing.model import PromptError, PuddingModel
from pudding.serving.server import (
    BLOCKS_HEADER,
    SET_HEADER,
    OpenAIError,
    ServeSettings,
    _RequestGuard,
    chat_router_text,
)

# At module level: FastAPI resolves the (postponed) handler annotations here.
Request = require("fastapi", "serve").Request


def parse_backends(specs: list[str], pudding: PuddingModel) -> dict[int, str]:
    """``["3=http://host:8001", "arc_easy-tl=http://..."]`` as {set index: base url}; ConfigError if bad."""
    names = {e.name: i for i, e in enumerate(pudding.pool.sets)}
    for entry in pudding.pool.sets:  # every backend is an exported checkpoint, which only whole-block sets have
        require_whole_blocks(entry.blocks, None, f"pudding gateway (set {entry.name})")
    backends = {}
    for spec in specs:
        key, sep, url = spec.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ConfigError(f"--backend must look like SET=http://host:port, got {spec!r}")
        if key.isdigit() and int(key) < len(pudding.pool.sets):
            index = int(key)
        elif key in names:
            index = names[key]
        else:
            raise ConfigError(f"--backend {spec!r}: no set {key!r} in the pool (sets 0..{len(pudding.pool.sets) - 1}: "
                              f"{', '.join(names)})")
        backends[index] = url.rstrip("/")
    if not backends:
        raise ConfigError("gateway mode needs at least one --backend SET=URL")
    return backends


def create_gateway(pudding: PuddingModel, backends: dict[int, str], settings: ServeSettings | None = None,
                   timeout: float = 600.0):
    """A FastAPI app that routes each request and proxies it to ``backends[chosen set]``."""
    httpx = require("httpx", "serve")
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    settings = settings or ServeSettings()
    available = sorted(backends)
    depths = [entry.k for entry in pudding.pool.sets]
    state = {}

    @asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(timeout=timeout) as client:
            state["client"] = client
            yield

    app = FastAPI(title="pudding gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    # The same edge guard as `pudding serve`: a body is counted as it arrives, chunked or not, and refused
    # once past the limit instead of being buffered whole.
    app.add_middleware(_RequestGuard, max_bytes=settings.max_body_bytes, client_gone=lambda endpoint: None,
                       too_large=lambda endpoint: fail(OpenAIError(
                           413, f"request body over {settings.max_body_bytes} bytes")))

    def fail(error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    def router_text(path: str, body: dict) -> str:
        if path.endswith("chat/completions"):
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise OpenAIError(400, "messages must be a non-empty list", param="messages")
            return chat_router_text(messages)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "the gateway forwards one string prompt per request", param="prompt")
        return prompt

    def tolerance_of(body: dict) -> float | None:
        if body.get("tolerance") is None:  # absent or an explicit null: no tolerance, as in `pudding serve`
            return None
        try:
            return pudding.check_tolerance(body["tolerance"])
        except ConfigError as error:
            raise OpenAIError(400, str(error), param="tolerance") from None

    def choose(text: str, tolerance: float | None) -> int:
        try:  # the library's prompt checks (pudding.routing.model.check_prompts), as in `pudding serve`
            [route] = pudding.route([text])
        except PromptError as error:
            raise OpenAIError(400, str(error), param=error.param, code=error.code) from None
        scores = torch.tensor([route.scores])
        if tolerance is not None:
            return choose_by_tolerance(scores, depths, tolerance, available).item()
        # The router's own rule (argmax, or safe routing's default set) among the served sets only.
        unserved = torch.ones(scores.shape[1], dtype=torch.bool)
        unserved[available] = False
        return pudding.router.choose(scores.masked_fill(unserved, -torch.inf)).item()

    async def forward(request: Request, path: str):
        raw = await request.body()  # within the size limit: _RequestGuard counted it as it arrived
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("not an object")
            tolerance = tolerance_of(body)
            index = choose(router_text(path, body), tolerance)
        except ValueError:
            return fail(OpenAIError(400, "the request body is not a valid JSON object"))
        except OpenAIError as error:
            return fail(error)
        entry = pudding.pool.sets[index]
        headers = {SET_HEADER: entry.name, BLOCKS_HEADER: ",".join(map(str, entry.blocks))}
        info = {"set": entry.name, "set_index": index, "blocks": list(entry.blocks)}
        if tolerance is not None:
            headers[TOLERANCE_HEADER] = repr(tolerance)
            info.update(k=entry.k, tolerance=tolerance)
        if "tolerance" in body:  # a backend serving one fixed set would refuse it
            raw = json.dumps({key: value for key, value in body.items() if key != "tolerance"}).encode()
        client = state["client"]
        upstream = client.build_request("POST", f"{backends[index]}{path}", content=raw,
                                        headers={"content-type": "application/json"})
        try:
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as error:
            return fail(OpenAIError(502, f"backend for set {entry.name} unreachable: {type(error).__name__}",
                                    "server_error"))
        if body.get("stream"):
            async def relay():
                try:
                    async for piece in response.aiter_raw():
                        yield piece
                finally:
                    await response.aclose()
            return StreamingResponse(relay(), status_code=response.status_code, headers=headers,
                                     media_type=response.headers.get("content-type", "text/event-stream"))
        content = await response.aread()
        await response.aclose()
        try:
            answer = json.loads(content)
            if response.status_code == 200 and isinstance(answer, dict):
                answer["pudding"] = info
            return JSONResponse(answer, status_code=response.status_code, headers=headers)
        except ValueError:
            return Response(content, status_code=response.status_code, headers=headers,
                            media_type=response.headers.get("content-type"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await forward(request, "/v1/chat/completions")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "pudding"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "backends": {pudding.pool.sets[i].name: url for i, url in backends.items()}}

    return app
