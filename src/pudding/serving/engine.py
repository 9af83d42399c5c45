"""Serving engine: generation jobs batched by omission set, with per-row streaming and cancellation.

The HTTP layer (:mod:`pudding.serving.server`) routes each request once and submits a :class:`Job` here. Jobs wait in
one queue per (omission set, sampling settings). The worker takes the queue whose oldest job is oldest,
waits at most ``batch_window`` seconds from that job's arrival for peers of the same set to join, and runs
one batched ``generate`` with that set omitted: :func:`pudding.routing.model.generate_batch`, the path
``PuddingModel.generate`` runs too, so a request's completion equals the library's for the same prompts.
A job never waits for a batch of another set to *form*; it only waits for the model, which runs one batch
at a time.

Tokens reach each job as they are produced (a streamer that splits the batch by row). A job whose client
went away is cancelled: still queued, it is dropped; running, its row is stopped by a stopping criterion at
the next decode step while the other rows of its batch go on, and the batch ends once every row is done.
Rows with a smaller ``max_tokens`` than the batch's are cut at their own limit, which for greedy decoding
gives exactly the tokens a solo run would.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from pudding.core.omit import OmissionSet, omit_blocks
from pudding.routing.model import eos_tokens, generate_batch


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; jobs are batched only with others that share them."""

    temperature: float = 0.0
    top_p: float = 1.0

    @property
    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}


@dataclass(eq=False)
class Job:
    """One prompt to complete. Events go to ``events``: ("token", text delta) ... then ("done", info)."""

    prompt: str
    blocks: OmissionSet
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    events: asyncio.Queue | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple:
        return (self.blocks, self.sampling)


class _RowText:
    """Incremental detokenisation of one row, holding back what might still become a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...], limit: int, emit: Callable[[str], None]):
        self.tokenizer, self.stop, self.limit, self.emit = tokenizer, stop, limit, emit
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.text = ""

    def add(self, token: int, eos: set[int]) -> None:
        if self.finish:
            return
        if token in eos:  # counted, as generate_batch counts it, but never part of the text
            self.tokens.append(token)
            self.finish = "stop"
            self._flush(final=True)
            return
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.finish = self.text[:at], "stop"
                self._flush(final=True)
                return
        if len(self.tokens) >= self.limit:
            self.finish = "length"
            self._flush(final=True)
        else:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        # Hold back an incomplete UTF-8 character and any tail that could be the start of a stop string.
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            hold = max((len(s) - 1 for s in self.stop), default=0)
            end = max(self.sent, end - hold)
        if end > self.sent:
            self.emit(self.text[self.sent:end])
            self.sent = end


class _BatchStreamer(BaseStreamer):
    def __init__(self, rows: list[_RowText], eos: set[int]):
        self.rows, self.eos, self.prompt_seen = rows, eos, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first pushes the prompt itself
            self.prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.add(token, self.eos)

    def end(self) -> None:
        for row in self.rows:
            if row.finish is None:
                row.finish = "length"
                row._flush(final=True)


class _StopRows(StoppingCriteria):
    """Per-row stop: the row's client left, or it hit its own limit or stop string."""

    def __init__(self, jobs: list[Job], rows: list[_RowText]):
        self.jobs, self.rows = jobs, rows

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        for job, row in zip(self.jobs, self.rows):
            if row.finish is None and job.cancelled.is_set():
                row.finish = "cancelled"  # so the padding generate() still feeds a stopped row is not counted
        done = [row.finish is not None for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0


class SetBatchingEngine:
    """Runs jobs on one model, batching those that chose the same omission set.

    Args:
        model, tokenizer: the base LLM (blocks are omitted per batch).
        batch_window: seconds a batch waits, from its oldest job's arrival, for peers of the same set.
        max_batch_size: rows per batch.
        on_batch: called with (blocks, batch size) after each batch (for metrics).
        runner: ``runner(blocks)`` is the context a batch runs in; default :func:`omit_blocks` on ``model``.
            :meth:`pudding.routing.model.PuddingModel.running` also switches to the set's healing adapter.
    """

    def __init__(self, model, tokenizer, *, batch_window: float = 0.01, max_batch_size: int = 16,
                 on_batch: Callable[[OmissionSet, int], None] | None = None,
                 runner: Callable[[OmissionSet], AbstractContextManager] | None = None):
        # The HTTP layer tokenizes and routes on a thread of its own while this worker decodes. A fast tokenizer
        # shared by two threads fails with "RuntimeError: Already borrowed" (huggingface/tokenizers#537): each
        # call re-sets padding and truncation on the one Rust object. So the worker decodes with its own copy.
        self.model, self.tokenizer = model, copy.deepcopy(tokenizer)
        self.batch_window, self.max_batch_size = batch_window, max_batch_size
        self.on_batch = on_batch
        self.runner = runner or (lambda blocks: omit_blocks(model, blocks))
        self.queues: dict[tuple, deque[Job]] = {}
        self.wakeup = asyncio.Event()
        self.stats = EngineStats()
        self.eos = eos_tokens(model)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, job: Job) -> None:
        job.events = job.events or asyncio.Queue()
        self.queues.setdefault(job.key, deque()).append(job)
        self.wakeup.set()

    def _drop_cancelled(self) -> None:
        # Anywhere in a queue, not only at its head: an abandoned request's prompts sit behind other requests'.
        for queue in self.queues.values():
            for job in [j for j in queue if j.cancelled.is_set()]:
                queue.remove(job)
                job.events.put_nowait(("done", {"finish_reason": "cancelled", "completion_tokens": 0}))

    def _next_batch(self) -> list[Job] | None:
        self._drop_cancelled()
        live = {k: q for k, q in self.queues.items() if q}
        if not live:
            return None
        key = min(live, key=lambda k: live[k][0].arrived)
        queue = live[key]
        return [queue.popleft() for _ in range(min(len(queue), self.max_batch_size))]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not any(self.queues.values()):
                self.wakeup.clear()
                await self.wakeup.wait()
            oldest = min((q[0].arrived for q in self.queues.values() if q), default=time.monotonic())
            wait = oldest + self.batch_window - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            batch = self._next_batch()
            if batch:
                await asyncio.to_thread(self._generate, batch, loop)

    def _generate(self, jobs: list[Job], loop: asyncio.AbstractEventLoop) -> None:
        def emitter(job):
            return lambda text: loop.call_soon_threadsafe(job.events.put_nowait, ("token", text))

        rows = [_RowText(self.tokenizer, job.stop, job.max_tokens, emitter(job)) for job in jobs]
        error = None
        try:  # tokenizing inside too: an exception that escaped this thread would end the worker for good
            # the library's own batched path; the rows get their tokens from the streamer as they come
            generate_batch(self.model, self.tokenizer, [j.prompt for j in jobs], self.runner(jobs[0].blocks),
                           max_new_tokens=max(j.max_tokens for j in jobs), streamer=_BatchStreamer(rows, self.eos),
                           stopping_criteria=StoppingCriteriaList([_StopRows(jobs, rows)]), **jobs[0].sampling.kwargs)
        except Exception as exc:  # reported to every job of the batch; the engine keeps serving
            error = f"{type(exc).__name__}: {exc}"
        self.stats.batches += 1
        self.stats.rows += len(jobs)
        if self.on_batch:
            self.on_batch(jobs[0].blocks, len(jobs))
        for job, row in zip(jobs, rows):
            info = {"finish_reason": "error" if error else (row.finish or "length"),
                    "completion_tokens": len(row.tokens),
                    "text": row.text, "error": error, "batch_size": len(jobs)}
            loop.call_soon_threadsafe(job.events.put_nowait, ("done", info))
