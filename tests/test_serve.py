"""The OpenAI-compatible server, its set-batching engine and the gateway, on a tiny llama."""

import asyncio
import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pudding.core.load import model_fingerprint
from pudding.core.omit import omit_blocks
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource
from pudding.routing.model import PuddingModel, Route
from pudding.routing.router import RouterConfig, build_router
from pudding.serving.engine import Job, SetBatchingEngine
from pudding.serving.server import BLOCKS_HEADER, SET_HEADER, ServeSettings, create_app

SETS = [(1, 2), (2, 3), (3, 4), (1, 4)]
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")
PROMPTS = ["The man turned on the faucet.", "Sarah was a much better surgeon", "A revolving door is",
           "How do I ready a guinea pig cage", "Question: Which technology was developed most recently?"]


@pytest.fixture(scope="module")
def pudding(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    entries = tuple(PoolEntry(s, (SetSource("greedy", "t", "tl", list(s), [], [], 0.0),)) for s in SETS)
    pool = CandidatePool(entries, {"spec": tiny_dir, "name": "tiny", "fingerprint": model_fingerprint(model.config)})
    torch.manual_seed(3)
    router = build_router(RouterConfig("llm-embed", len(SETS), "llm", hidden=8), llm=model, llm_tokenizer=tokenizer)
    return PuddingModel(model, tokenizer, pool, router)


@pytest.fixture(scope="module")
def client(pudding):
    with TestClient(create_app(pudding, ServeSettings(max_tokens_limit=32, max_body_bytes=4000))) as test_client:
        yield test_client


def _solo(pudding, prompt, n):
    [out] = pudding.generate([prompt], max_new_tokens=n)
    return out.text


def _error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]


def _metric_lines(text: str, endpoint: str) -> dict[str, float]:
    """``pudding_requests_total`` of one endpoint from a /metrics page, by status."""
    prefix = f'pudding_requests_total{{endpoint="{endpoint}",status="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


async def _drive(app, path: str, messages: list[dict], headers: dict[str, str]) -> tuple[list[dict], int]:
    """Call the ASGI ``app`` with these request messages; what it sent, and how many messages it pulled.

    In-process and deterministic: unlike a socket, nothing reads ahead of the app.
    """
    pulled, sent = 0, []

    async def receive():
        nonlocal pulled
        if pulled == len(messages):
            await asyncio.sleep(3600)  # the client is still there and has nothing more to send
        pulled += 1
        return messages[pulled - 1]

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("test", 80), "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    try:  # an app that waits for the rest of an endless upload fails here rather than hanging the suite
        await asyncio.wait_for(app(scope, receive, send), 10)
    except TimeoutError:
        pytest.fail(f"the app was still reading the body after {pulled} messages")
    return sent, pulled


CHUNKED = {"content-type": "application/json", "transfer-encoding": "chunked"}


class _Server:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


# --- endpoints ---------------------------------------------------------------------------------------------


def test_completion_is_routed_and_matches_the_library(client, pudding):
    for prompt in PROMPTS[:3]:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert response.status_code == 200, response.text
        body = response.json()
        [route] = pudding.route([prompt])
        assert body["pudding"]["blocks"] == list(route.blocks) and body["pudding"]["set"] == route.name
        assert response.headers[SET_HEADER] == route.name
        assert response.headers[BLOCKS_HEADER] == ",".join(map(str, route.blocks))
        assert body["choices"][0]["text"] == _solo(pudding, prompt, 8)
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 8


def test_chat_completion_uses_the_template_and_routes_on_user_text(client, pudding):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[1]}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["pudding"]["blocks"] == list(pudding.route([PROMPTS[1]])[0].blocks)
    prompt = pudding.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    [route] = pudding.route([PROMPTS[1]])
    [expected] = pudding.generate([prompt], routes=[route], max_new_tokens=6)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}


def _sse(response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_gives_the_same_text(client, pudding):
    prompt = PROMPTS[2]
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0,
                                                         "stream": True}) as response:
        assert response.status_code == 200 and response.headers[SET_HEADER]
        chunks = _sse(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == _solo(pudding, prompt, 10)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with client.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                              "max_tokens": 5, "temperature": 0, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as response:
        chunks = _sse(response)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["usage"]["completion_tokens"] <= 5


def test_stop_strings_cut_the_text(client, pudding):
    full = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    # a printable character after the start that first occurs there (tiny-model text is mostly noise)
    starts = [i for i in range(1, len(text)) if text[i].isprintable() and text[i].strip()
              and text[i] != "\ufffd" and text.find(text[i]) == i]
    assert starts, f"tiny-model text too short to test stop strings: {text!r}"
    stop = text[starts[0]]
    cut = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                                               "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[:text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_models_health_and_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "pudding"
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
    metrics = client.get("/metrics").text
    for name in ("pudding_requests_total", "pudding_tokens_total", "pudding_request_latency_seconds_bucket",
                 "pudding_set_chosen_total", "pudding_batch_size_bucket"):
        assert name in metrics


@pytest.mark.parametrize("payload, status, needle", [
    ('{"prompt": "hi", ', 400, "not valid JSON"),
    ({"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": "hi", "max_tokens": 33}, 400, "at most 32"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "   "}, 400, "empty"),
    ({"prompt": []}, 400, "empty"),
    ({"prompt": "word " * 125, "max_tokens": 8}, 400, "tokens"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "x" * 5000}, 413, "body"),
    ({"prompt": ["hi"] * 65}, 400, "at most 64 per request"),
    # wrong types are refused, not coerced (pydantic's lax mode took "2" and true as 2 and 1)
    ({"prompt": "hi", "max_tokens": "2"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "hi", "max_completion_tokens": 2.0}, 400, "max_completion_tokens"),
    ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ({"prompt": "hi", "temperature": True}, 400, "temperature"),
    ({"prompt": "hi", "top_p": "1"}, 400, "top_p"),
    ({"prompt": "hi", "n": True}, 400, "n"),
    ({"prompt": "hi", "stream": "true"}, 400, "stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": 1}}, 400, "include_usage"),
    # a temperature this small overflowed the sampling probabilities into NaN: a 500 before
    ({"prompt": "hi", "temperature": 1e-300}, 400, "temperature must be 0 (greedy) or at least 1e-05"),
])
def test_bad_requests_get_openai_errors(client, payload, status, needle):
    if isinstance(payload, str):
        response = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/completions", json=payload)
    assert needle in _error(response, status)["message"] + str(_error(response, status)["param"])


def test_invalid_unicode_is_a_400_not_a_500(client):
    # JSON can carry a lone UTF-16 surrogate; the tokenizer failed on it and the server answered 500
    cases = [("/v1/completions", '{"prompt": "caf\\ud800", "max_tokens": 2}', "prompt"),
             ("/v1/completions", '{"prompt": ["ok", "\\udc00"], "max_tokens": 2}', "prompt.1"),
             ("/v1/completions", '{"prompt": "ok", "stop": ["\\ud800"], "max_tokens": 2}', "stop.0"),
             ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
             ("/v1/completions", '{"prompt": "ok", "\\ud800": 1}', None)]  # pydantic refuses the key
    for path, raw, param in cases:
        response = client.post(path, content=raw, headers={"content-type": "application/json"})
        error = _error(response, 400)
        assert error["param"] == param, (raw, error)
        assert param is None or "surrogate" in error["message"]
    for endpoint in ("/v1/completions", "/v1/chat/completions"):
        assert "500" not in _metric_lines(client.get("/metrics").text, endpoint)


def test_chunked_body_over_the_limit_is_refused_without_reading_the_rest(pudding):
    # Content-Length was the only check: a chunked upload was buffered whole before its 413
    app = create_app(pudding, ServeSettings(max_body_bytes=4000))
    chunks = [{"type": "http.request", "body": b" " * 1000, "more_body": True} for _ in range(50)]
    sent, pulled = asyncio.run(_drive(app, "/v1/completions", chunks, CHUNKED))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert "over 4000 bytes" in body["error"]["message"]
    assert pulled == 5  # 4000 bytes are within the limit; the 5th chunk passes it, and nothing more is read
    # a declared Content-Length over the limit is refused before any of the body is read
    sent, pulled = asyncio.run(_drive(app, "/v1/completions", chunks, {"content-length": "50000"}))
    assert sent[0]["status"] == 413 and pulled == 0


def test_chunked_body_within_the_limit_is_reassembled(pudding):
    # over a real socket: httpx sends a generator body chunked (no Content-Length)
    import httpx

    payload = json.dumps({"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0}).encode()
    pieces = [payload[i:i + 7] for i in range(0, len(payload), 7)]
    with _Server(create_app(pudding, ServeSettings(max_body_bytes=4000))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        ok = http.post("/v1/completions", content=iter(pieces), headers={"content-type": "application/json"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["choices"][0]["text"] == _solo(pudding, PROMPTS[0], 3)
        too_big = http.post("/v1/completions", content=iter([b" " * 1000] * 6),
                            headers={"content-type": "application/json"})
        assert "over 4000 bytes" in _error(too_big, 413)["message"]


def test_client_leaving_mid_upload_is_not_a_server_error(pudding):
    app = create_app(pudding, ServeSettings())
    messages = [{"type": "http.request", "body": b'{"prompt": ', "more_body": True}, {"type": "http.disconnect"}]
    sent, _ = asyncio.run(_drive(app, "/v1/completions", messages, CHUNKED))
    assert sent == []  # nobody to answer
    counts = _metric_lines(TestClient(app).get("/metrics").text, "/v1/completions")
    assert counts == {"499": 1.0}  # counted apart from the server's own failures; it used to be a 500


def test_unknown_path_and_bad_chat_are_openai_errors(client):
    _error(client.get("/v1/nothing"), 404)
    _error(client.post("/v1/chat/completions", json={"messages": []}), 400)
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400)


def test_concurrency_limit_and_disconnect_frees_the_slot(pudding):
    import httpx

    # A long batching window keeps the first (streaming) request queued, holding the only slot.
    app = create_app(pudding, ServeSettings(max_concurrency=1, batch_window_ms=1500))
    with _Server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 50,
                                                          "stream": True}) as response:
            assert response.status_code == 200
            busy = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 2})
            assert _error(busy, 429)["code"] == "rate_limit_exceeded"
        # the client left mid-stream: its slot comes back
        for _ in range(100):
            ok = http.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 2})
            if ok.status_code == 200:
                break
            time.sleep(0.05)
        assert ok.status_code == 200, ok.text
        counts = _metric_lines(http.get("/metrics").text, "/v1/completions")
        assert counts["499"] == 1 and "500" not in counts


def test_each_prompt_of_a_list_takes_a_concurrency_slot(pudding):
    import httpx

    # A list took one slot whatever its length; the streaming request holds 1 of 3 slots while it is queued.
    app = create_app(pudding, ServeSettings(max_concurrency=3, batch_window_ms=1500))
    with _Server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 50,
                                                          "stream": True}) as response:
            assert response.status_code == 200
            busy = http.post("/v1/completions", json={"prompt": PROMPTS[1:4], "max_tokens": 2})
            assert "needs 3" in _error(busy, 429)["message"]
            fits = http.post("/v1/completions", json={"prompt": PROMPTS[1:3], "max_tokens": 2})
            assert fits.status_code == 200 and len(fits.json()["choices"]) == 2
        # more prompts than there are slots could never run: a 400 naming the cap, not a 429 forever
        never = http.post("/v1/completions", json={"prompt": PROMPTS[:4], "max_tokens": 2})
        assert "at most 3 per request" in _error(never, 400)["message"]


def test_health_answers_while_a_request_is_routed(pudding, monkeypatch):
    import httpx

    # Tokenizing and routing a long list ran on the event loop and blocked /health for seconds.
    route = pudding.route

    def slow_route(texts, *args, **kwargs):
        time.sleep(1.5)  # stands in for routing a long list of long prompts
        return route(texts, *args, **kwargs)

    monkeypatch.setattr(pudding, "route", slow_route)
    with _Server(create_app(pudding, ServeSettings(batch_window_ms=0))) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        answers = []
        worker = threading.Thread(target=lambda: answers.append(
            http.post("/v1/completions", json={"prompt": PROMPTS[:2], "max_tokens": 2})))
        worker.start()
        time.sleep(0.3)
        start = time.perf_counter()
        assert http.get("/health").status_code == 200
        waited = time.perf_counter() - start
        worker.join()
    assert answers and answers[0].status_code == 200, answers
    assert waited < 0.75, f"/health waited {waited:.2f} s behind the routing"


def test_a_non_streaming_client_that_leaves_cancels_its_prompts(pudding):
    import httpx

    # A long batching window keeps the prompts queued; the client gives up before the window ends.
    app = create_app(pudding, ServeSettings(max_concurrency=3, batch_window_ms=1500))
    with _Server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json={"prompt": PROMPTS[:3], "max_tokens": 20}, timeout=0.3)
        # its 3 slots come back at once (they used to stay taken until its generation had run to the end)
        for _ in range(40):
            again = http.post("/v1/completions", json={"prompt": PROMPTS[:3], "max_tokens": 2})
            if again.status_code != 429:
                break
            time.sleep(0.05)
        assert again.status_code == 200, again.text
        counts = _metric_lines(http.get("/metrics").text, "/v1/completions")
        batches = http.get("/health").json()["batches"]
    assert counts["499"] == 1 and counts["200"] == 1 and "500" not in counts  # a disconnect is no server error
    # only the second request's prompts were generated: the abandoned ones were dropped from the queue
    assert batches == len({r.blocks for r in pudding.route(PROMPTS[:3])})


# --- the engine ------------------------------------------------------------------------------------------


def test_engine_batches_by_set_and_matches_solo_runs(pudding):
    async def run():
        batches = []
        engine = SetBatchingEngine(pudding.model, pudding.tokenizer, batch_window=0.2,
                                   on_batch=lambda blocks, size: batches.append((blocks, size)))
        engine.start()
        jobs = [Job(p, SETS[i % 2], 6) for i, p in enumerate(PROMPTS)]
        for job in jobs:
            engine.submit(job)
        results = []
        for job in jobs:
            while True:
                kind, info = await job.events.get()
                if kind == "done":
                    results.append(info)
                    break
        await engine.stop()
        return jobs, results, batches

    jobs, results, batches = asyncio.run(run())
    assert sorted(batches) == sorted([(SETS[0], 3), (SETS[1], 2)])
    for job, result in zip(jobs, results):
        batch = pudding.tokenizer(job.prompt, return_tensors="pt")
        with omit_blocks(pudding.model, job.blocks):
            out = pudding.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = pudding.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        assert result["text"] == expected


class _CancelAfter(threading.Event):
    """A job's cancel flag that turns itself on after ``checks`` looks: a client leaving mid-batch, on cue."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        return self.checks < 0 or super().is_set()


def test_engine_cancelling_a_row_leaves_its_batch_peers_alone(pudding):
    async def run(jobs):
        engine = SetBatchingEngine(pudding.model, pudding.tokenizer, batch_window=0.2)
        engine.start()
        for job in jobs:
            engine.submit(job)
        results = [await _final_info(job) for job in jobs]
        await engine.stop()
        return results, engine.stats

    # checked once while queued, then once per decode step: the row stops after a few tokens
    leaving = Job(PROMPTS[0], SETS[0], 12, cancelled=_CancelAfter(4))
    staying = Job(PROMPTS[1], SETS[0], 12)
    (left, stayed), stats = asyncio.run(run([leaving, staying]))
    assert stats.batches == 1  # they were batched together
    assert left["finish_reason"] == "cancelled" and 0 < left["completion_tokens"] < 12
    batch = pudding.tokenizer(PROMPTS[1], return_tensors="pt")
    with omit_blocks(pudding.model, SETS[0]):
        out = pudding.model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert stayed["text"] == pudding.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


async def _final_info(job) -> dict:
    while True:
        kind, info = await job.events.get()
        if kind == "done":
            return info


# --- the gateway -----------------------------------------------------------------------------------------


def test_gateway_forwards_to_the_backend_of_the_chosen_set(pudding, client):
    from pudding.serving.gateway import create_gateway, parse_backends

    wanted = {r.set_index for r in pudding.route(PROMPTS)}
    backends = {i: create_app(pudding, ServeSettings(force_set=i)) for i in sorted(wanted)}
    servers = {i: _Server(app) for i, app in backends.items()}
    urls = {i: server.__enter__() for i, server in servers.items()}
    try:
        specs = [f"{i}={url}" for i, url in urls.items()]
        with TestClient(create_gateway(pudding, parse_backends(specs, pudding))) as gateway:
            for prompt in PROMPTS:
                request = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
                via_gateway = gateway.post("/v1/completions", json=request)
                direct = client.post("/v1/completions", json=request)
                assert via_gateway.status_code == 200, via_gateway.text
                assert via_gateway.json()["pudding"] == direct.json()["pudding"]
                assert via_gateway.headers[SET_HEADER] == direct.headers[SET_HEADER]
                assert via_gateway.json()["choices"] == direct.json()["choices"]
            with gateway.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
                text = "".join(c["choices"][0]["text"] for c in _sse(response))
            assert text == direct.json()["choices"][0]["text"]
            _error(gateway.post("/v1/completions", content="nope", headers={"content-type": "application/json"}), 400)
    finally:
        for server in servers.values():
            server.__exit__()


def test_gateway_refuses_a_chunked_body_over_the_limit_without_reading_the_rest(pudding):
    # the gateway read the whole body, then compared its length with the limit
    from pudding.serving.gateway import create_gateway

    gateway = create_gateway(pudding, {0: "http://127.0.0.1:9"}, ServeSettings(max_body_bytes=4000))
    chunks = [{"type": "http.request", "body": b" " * 1000, "more_body": True} for _ in range(50)]
    sent, pulled = asyncio.run(_drive(gateway, "/v1/completions", chunks, CHUNKED))
    assert sent[0]["status"] == 413 and pulled == 5


def test_gateway_backend_specs_are_checked(pudding):
    from pudding.core.errors import ConfigError
    from pudding.serving.gateway import parse_backends

    assert parse_backends(["1=http://127.0.0.1:9000/"], pudding) == {1: "http://127.0.0.1:9000"}
    for bad in (["9=http://x"], ["1=ftp://x"], ["nope"], []):
        with pytest.raises(ConfigError):
            parse_backends(bad, pudding)


# --- one generation path, one prompt check ------------------------------------------------------------------


@pytest.mark.parametrize("request_settings, library_settings", [
    ({"temperature": 0}, {"do_sample": False}),
    ({"temperature": 0.8, "top_p": 0.9}, {"do_sample": True, "temperature": 0.8, "top_p": 0.9}),
])
def test_server_completions_equal_the_library_generate(pudding, monkeypatch, request_settings, library_settings):
    # The server batched and decoded with code of its own: the same prompts, routes and settings (and seed) must
    # give the library's tokens. One request with every prompt, so its batches are the library's set groups;
    # the routes alternate between two sets (the tiny router sends all five prompts to one).
    routes = [Route(i % 2, SETS[i % 2], pudding.pool.sets[i % 2].name, []) for i in range(len(PROMPTS))]
    monkeypatch.setattr(pudding, "route", lambda texts, **kwargs: routes[:len(texts)])
    with TestClient(create_app(pudding, ServeSettings(max_tokens_limit=32))) as client:
        torch.manual_seed(11)
        body = client.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 8, **request_settings}).json()
    torch.manual_seed(11)
    expected = pudding.generate(PROMPTS, routes=routes, max_new_tokens=8, **library_settings)
    assert [c["text"] for c in body["choices"]] == [g.text for g in expected]
    assert body["usage"]["completion_tokens"] == sum(g.completion_tokens for g in expected)
    assert body["usage"]["prompt_tokens"] == sum(g.prompt_tokens for g in expected)
    assert [p["blocks"] for p in body["pudding"]] == [list(r.blocks) for r in routes]


def test_an_end_of_sequence_token_counts_alike_in_the_server_and_the_library(pudding):
    # The engine left the end-of-sequence token out of completion_tokens, generate counted it. Make the third
    # greedy token of a prompt its end-of-sequence token, so both stop there.
    [free] = pudding.generate([PROMPTS[0]], max_new_tokens=4, min_new_tokens=4)
    [route] = pudding.route([PROMPTS[0]])
    tokens = _alone_tokens(pudding, PROMPTS[0], route.blocks, 4)
    config, saved = pudding.model.generation_config, pudding.model.generation_config.eos_token_id
    config.eos_token_id = tokens[2]
    try:
        [library] = pudding.generate([PROMPTS[0]], max_new_tokens=8)
        with TestClient(create_app(pudding, ServeSettings(max_tokens_limit=32))) as client:
            body = client.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 8,
                                                        "temperature": 0}).json()
    finally:
        config.eos_token_id = saved
    assert library.completion_tokens == tokens.index(tokens[2]) + 1 < free.completion_tokens + 1
    assert body["usage"]["completion_tokens"] == library.completion_tokens
    assert body["choices"][0] == {"index": 0, "text": library.text, "logprobs": None, "finish_reason": "stop"}


def _alone_tokens(pudding, prompt, blocks, n):
    batch = pudding.tokenizer(prompt, return_tensors="pt")
    with omit_blocks(pudding.model, blocks):
        out = pudding.model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def test_the_server_refuses_prompts_with_the_library_check(pudding):
    from pudding.routing.model import PromptError

    long = "word " * 125
    with pytest.raises(PromptError) as refused:
        pudding.check_length([long], 8, name="max_tokens")
    app = create_app(pudding, ServeSettings(max_prompt_tokens=4))
    with TestClient(app) as client, TestClient(create_app(pudding)) as plain:
        error = _error(plain.post("/v1/completions", json={"prompt": long, "max_tokens": 8}), 400)
        assert (error["message"], error["code"], error["param"]) == (str(refused.value), "context_length_exceeded",
                                                                      "prompt")
        assert "context of 128" in error["message"]
        # a list is checked whole, so the message names the prompt at fault
        error = _error(client.post("/v1/completions", json={"prompt": ["hi", PROMPTS[0]]}), 400)
        assert error["message"].startswith("prompt 1 has ") and "at most 4 are allowed" in error["message"]
        error = _error(plain.post("/v1/chat/completions", json={"messages": [
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": " "}]}), 400)
        assert error["message"] == "prompt 0 is empty"  # no user text to route on


def test_the_gateway_refuses_prompts_with_the_library_check(pudding):
    from pudding.serving.gateway import create_gateway

    with TestClient(create_gateway(pudding, {0: "http://127.0.0.1:9"})) as gateway:
        assert _error(gateway.post("/v1/completions", json={"prompt": "  "}), 400)["message"] == "prompt 0 is empty"
        # a lone surrogate reached the tokenizer and was a 500
        raw = '{"prompt": "caf\\ud800"}'
        error = _error(gateway.post("/v1/completions", content=raw, headers={"content-type": "application/json"}), 400)
        assert "not valid UTF-8" in error["message"]
