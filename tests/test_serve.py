"""The OpenAI-compatible server, its set-batching engine and the gateway, on a tiny llama."""

import asyncio
import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pudding.candidates import CandidatePool, PoolEntry, SetSource
from pudding.engine import Job, SetBatchingEngine
from pudding.load import model_fingerprint
from pudding.omit import omit_blocks
from pudding.routed import PuddingModel
from pudding.router import RouterConfig, build_router
from pudding.serve import BLOCKS_HEADER, SET_HEADER, ServeSettings, create_app

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
])
def test_bad_requests_get_openai_errors(client, payload, status, needle):
    if isinstance(payload, str):
        response = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        response = client.post("/v1/completions", json=payload)
    assert needle in _error(response, status)["message"] + str(_error(response, status)["param"])


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


# --- the gateway -----------------------------------------------------------------------------------------


def test_gateway_forwards_to_the_backend_of_the_chosen_set(pudding, client):
    from pudding.gateway import create_gateway, parse_backends

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


def test_gateway_backend_specs_are_checked(pudding):
    from pudding.errors import ConfigError
    from pudding.gateway import parse_backends

    assert parse_backends(["1=http://127.0.0.1:9000/"], pudding) == {1: "http://127.0.0.1:9000"}
    for bad in (["9=http://x"], ["1=ftp://x"], ["nope"], []):
        with pytest.raises(ConfigError):
            parse_backends(bad, pudding)
