"""Load check for `pudding serve`: concurrent clients against a sequential loop, on loopback.

Starts the server in-process on 127.0.0.1 (a free port), then:

1. sequential reference: each distinct prompt generated alone with ``PuddingModel.generate`` (greedy);
2. load: ``--clients`` concurrent clients each send ``--requests`` greedy completions, one after another.

It checks that every concurrent answer equals the sequential answer for the same prompt, and prints the
throughput of both plus the p50/p95 latency. The run is bounded (``--timeout``) and stops by itself.

    .venv/bin/python benchmarks/load_check.py --model default --out results/serve/load_check.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from pudding.core.provenance import atomic_write_json, provenance
from pudding.core.tasks import load_docs
from pudding.routing.model import PuddingModel
from pudding.serving.server import ServeSettings, create_app

TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "sciq", "openbookqa")


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts, taken round-robin from several tasks' evaluation splits."""
    per_task = {t: [d.router_text for d in load_docs(t, "evaluation", limit=n)] for t in TASKS}
    out = []
    for i in range(n):
        texts = per_task[TASKS[i % len(TASKS)]]
        out.append(texts[i // len(TASKS)][:400])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


async def load(url: str, texts: list[str], clients: int, requests: int, max_tokens: int):
    latencies, answers = [], []

    async def client(index: int, http: httpx.AsyncClient):
        for j in range(requests):
            prompt_index = (index * requests + j) % len(texts)
            start = time.perf_counter()
            response = await http.post("/v1/completions", json={"prompt": texts[prompt_index],
                                                                 "max_tokens": max_tokens, "temperature": 0})
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            answers.append((prompt_index, response.json()["choices"][0]["text"]))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - start
    return wall, latencies, answers


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--prompts", type=int, default=16, help="distinct prompts")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="give up after this many seconds")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)

    pudding = PuddingModel.from_pretrained(args.model)
    texts = prompts(args.prompts)
    pudding.generate(texts[:1], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    reference = [pudding.generate([t], max_new_tokens=args.max_tokens)[0].text for t in texts]
    sequential_wall = time.perf_counter() - start
    sequential_rps = len(texts) / sequential_wall

    settings = ServeSettings(batch_window_ms=args.batch_window_ms, max_batch_size=args.clients,
                             max_concurrency=args.clients * 2)
    app = create_app(pudding, settings)
    with Server(app) as url:
        wall, latencies, answers = asyncio.run(asyncio.wait_for(
            load(url, texts, args.clients, args.requests, args.max_tokens), args.timeout))
        batches = httpx.get(f"{url}/health").json()["batches"]
    mismatches = [(i, a) for i, a in answers if a != reference[i]]
    total = args.clients * args.requests
    result = {
        "requests": total, "distinct_prompts": len(texts), "max_tokens": args.max_tokens,
        "sets_chosen": len({r.blocks for r in pudding.route(texts)}),
        "sequential": {"requests": len(texts), "seconds": round(sequential_wall, 3),
                       "requests_per_s": round(sequential_rps, 3)},
        "concurrent": {"clients": args.clients, "seconds": round(wall, 3), "requests_per_s": round(total / wall, 3),
                       "latency_p50_s": round(percentile(latencies, 0.5), 3),
                       "latency_p95_s": round(percentile(latencies, 0.95), 3),
                       "mean_latency_s": round(statistics.mean(latencies), 3), "generate_batches": batches},
        "throughput_ratio": round((total / wall) / sequential_rps, 3),
        "greedy_mismatches": len(mismatches),
        "config": vars(args), "provenance": provenance(),
    }
    print(f"sequential: {len(texts)} requests in {sequential_wall:.1f} s = {sequential_rps:.2f} req/s")
    print(f"concurrent: {total} requests from {args.clients} clients in {wall:.1f} s = {total / wall:.2f} req/s "
          f"({result['throughput_ratio']:.2f}x sequential), {batches} generate batches")
    print(f"latency p50 {result['concurrent']['latency_p50_s']:.2f} s, "
          f"p95 {result['concurrent']['latency_p95_s']:.2f} s")
    print(f"greedy answers equal to the sequential ones: {total - len(mismatches)}/{total}")
    if args.out:
        atomic_write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return 0 if not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
