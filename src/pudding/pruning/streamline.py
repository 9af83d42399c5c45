"""LLM-Streamline (Chen et al., "Streamlining Redundant Layers to Compress Large Language Models", ICLR 2025,
arXiv:2403.19135; first titled "Compressing LLMs by Streamlining the Unimportant Layer") as a static baseline.

**Layer pruning.** Over calibration text, find the contiguous run of blocks whose input and output hidden
states are most alike: the mean over real tokens of cos(hidden state entering the run's first block, hidden
state leaving its last block). **Layer replacement.** Remove the run and put one lightweight network in its
place, trained to map the run's input hidden states to its output hidden states by mean squared error.

The accounting follows the authors' released code: to remove ``k`` blocks net, it takes the most similar run
of ``k + 1`` blocks and replaces it by **one transformer block of the model's own architecture, initialised
from the run's first block** (their README: inheriting that block trains better than a fresh FFN). The result
has ``n - k`` blocks, the same as every k-block omission in the tables, and vanilla transformers loads it,
because it *is* an ordinary model of n - k blocks. Before training, that model is exactly the original without
blocks ``s+1 .. s+k``; its validation MSE is reported beside the trained one's.

``train=None`` gives the variant without replacement: the most similar run of ``k`` blocks, plainly removed.

Where ours differs from the paper and its code (docs/MERGE_BASELINES.md): calibration and training text is
BoolQ passages (theirs: SlimPajama, 0.06B tokens and more), training runs on this CPU for a few hundred
steps (:class:`TrainSettings`), the first and last blocks are protected by the same barriers as the other
baselines, the loss ignores padded positions, and the similarity is the plain cosine (their ``0.5 + 0.5 cos``
ranks runs identically).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.load import DEFAULT_MODEL
from pudding.core.omit import get_blocks, prune_blocks
from pudding.core.provenance import atomic_write_figure, atomic_write_json, locks_output
from pudding.core.score import PackedBatch
from pudding.pruning.compress import (
    COMMON_FIELDS,
    base_model_record,
    block_states,
    calibration_text,
    check_common,
    masked_mse,
    pack_text,
    prepare,
    run_one_block,
    save_compressed,
)

TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class TrainSettings:
    """How the replacement block is trained (MSE on hidden states, AdamW, cosine schedule with warm-up); each
    field's help text is its documentation (its ``pudding compress --method streamline`` flag's).

    The defaults are the authors' optimiser settings (lr 2e-4 decaying to 5e-5, weight decay 1e-3, gradient
    clipping at 5, keep the best state on held-out data) with a budget that fits this 2-core CPU for
    SmolLM2-135M in 5-8 minutes uncontended (docs/MERGE_BASELINES.md: measured steps, estimated total).
    """

    steps: int = field(default=400, metadata={
        "flag": "--train-steps", "type": "positive_int",
        "help": "optimiser steps for the replacement block; one step is one packed batch of training text"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate of the cosine schedule"})
    min_lr: float = field(default=5e-5, metadata={"help": "final learning rate of the cosine schedule"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=1e-3, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient-norm clip"})
    train_samples: int = field(default=256, metadata={
        "type": "positive_int", "help": "calibration documents (BoolQ passages) the block is trained on"})
    val_samples: int = field(default=32, metadata={
        "type": "positive_int", "help": "further, disjoint documents: pick the best state, report the MSE"})
    eval_every: int = field(default=25, metadata={
        "type": "positive_int", "help": "steps between validation measurements"})
    seed: int = field(default=0, metadata={"help": "seeds the batch order"})

    def __post_init__(self):
        for name in ("steps", "train_samples", "val_samples", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be a non-negative integer, got {self.warmup_steps!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            positive = name in ("lr", "grad_clip")
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not (number and (value > 0 if positive else value >= 0)):
                raise ConfigError(f"train.{name} must be a finite {'positive' if positive else 'non-negative'} "
                                  f"number, got {value!r}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}")


@dataclass(frozen=True)
class StreamlineConfig:
    """Settings of ``pudding compress --method streamline``; each field's help text is its documentation (its
    flag's). ``k`` is net, after the replacement block; ``out=None``: build only, in memory."""

    model: str = field(default=DEFAULT_MODEL, metadata=COMMON_FIELDS["model"])
    k: int = field(default=6, metadata=COMMON_FIELDS["k"])
    train: TrainSettings | None = field(default_factory=TrainSettings, metadata={
        "nested": "TrainSettings", "flag": "--no-train", "what": "training",
        "help": "remove the most similar k-run, with no replacement block (no training)"})
    samples: int = field(default=16, metadata=COMMON_FIELDS["samples"])
    barriers: tuple[int, int] = field(default=(1, 1), metadata=COMMON_FIELDS["barriers"])
    max_length: int = field(default=256, metadata=COMMON_FIELDS["max_length"])
    max_batch_tokens: int = field(default=512, metadata=COMMON_FIELDS["max_batch_tokens"])
    out: str | None = field(default=None, metadata=COMMON_FIELDS["out"])
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        if self.k is None:
            raise ConfigError("k must be a positive integer, got None")
        object.__setattr__(self, "barriers", check_common(self.k, self.samples, self.max_length,
                                                          self.max_batch_tokens, self.barriers))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainSettings(**self.train))
        elif self.train is not None and not isinstance(self.train, TrainSettings):
            raise ConfigError(f"train must be TrainSettings or None, got {type(self.train).__name__}")

    @property
    def run_length(self) -> int:
        """Blocks the removed run spans: k+1 replaced by one trained block, or k removed outright."""
        return self.k + 1 if self.train is not None else self.k

    def check_model(self, total: int) -> None:
        """ConfigError unless a run of :attr:`run_length` blocks fits between the barriers of ``total`` blocks."""
        first, last = self.barriers
        room = total - first - last
        if self.run_length > room:
            what = f"a run of k+1={self.run_length} blocks (replaced by one trained block)" if self.train else \
                f"a run of k={self.k} blocks"
            raise ConfigError(f"k={self.k} needs {what}, but only {max(room, 0)} of the {total} blocks lie between "
                              f"the barriers {self.barriers}")


# --- layer pruning: the most similar run -------------------------------------------------------------------


def run_similarities(model, batches: Sequence[PackedBatch], lengths: Sequence[int],
                     barriers: tuple[int, int]) -> dict[int, dict[int, float]]:
    """Per run length, per allowed run start s: the mean over real tokens of cos(hidden state entering block s,
    hidden state leaving block s+length-1). One forward pass per batch serves every length."""
    total = len(get_blocks(model))
    runs = {n: list(range(barriers[0], total - barriers[1] - n + 1)) for n in lengths}
    for n, starts in runs.items():
        if not starts:
            raise ConfigError(f"no run of {n} blocks fits between the barriers {barriers} of {total} blocks")
    sums, count = {n: dict.fromkeys(starts, 0.0) for n, starts in runs.items()}, 0
    inputs = sorted({s for starts in runs.values() for s in starts})
    outputs = sorted({s + n - 1 for n, starts in runs.items() for s in starts})
    for batch in batches:
        states = block_states(model, batch, inputs=inputs, outputs=outputs)
        mask = batch.attention_mask.float()
        count += int(mask.sum())
        for n, starts in runs.items():
            for s in starts:
                cosine = nn.functional.cosine_similarity(states["in", s].float(), states["out", s + n - 1].float(),
                                                         dim=-1)
                sums[n][s] += float((cosine * mask).sum())
    return {n: {s: value / count for s, value in by_start.items()} for n, by_start in sums.items()}


def most_similar_run(similarities: dict[int, float]) -> int:
    """The run start with the highest similarity (ties: the lowest start)."""
    return max(sorted(similarities), key=lambda s: similarities[s])


# --- layer replacement: training one block -------------------------------------------------------------------


@dataclass
class _Pairs:
    """Training pairs: each packed batch with the run's input and output hidden states (on the model's device)."""

    batches: list[PackedBatch]
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]


def run_pairs(model, batches: Sequence[PackedBatch], start: int, length: int) -> _Pairs:
    """The hidden states entering block ``start`` and leaving block ``start+length-1``, per batch."""
    pairs = _Pairs(list(batches), [], [])
    for batch in batches:
        states = block_states(model, batch, inputs=[start], outputs=[start + length - 1])
        pairs.inputs.append(states["in", start].clone())
        pairs.targets.append(states["out", start + length - 1].clone())
    return pairs


def replacement_mse(model, index: int, pairs: _Pairs) -> float:
    """Mean over real tokens of the squared error of block ``index`` mapping inputs to targets (token-weighted)."""
    total, tokens = 0.0, 0
    with torch.inference_mode():
        for batch, hidden_in, target in zip(pairs.batches, pairs.inputs, pairs.targets):
            n = int(batch.attention_mask.sum())
            pred = run_one_block(model, index, batch, hidden_in)
            total += float(masked_mse(pred.float(), target.float(), batch.attention_mask)) * n
            tokens += n
    return total / tokens


def identity_mse(pairs: _Pairs) -> float:
    """The same error for no block at all (output = input): the run removed with nothing in its place."""
    total, tokens = 0.0, 0
    for batch, hidden_in, target in zip(pairs.batches, pairs.inputs, pairs.targets):
        n = int(batch.attention_mask.sum())
        total += float(masked_mse(hidden_in.float(), target.float(), batch.attention_mask)) * n
        tokens += n
    return total / tokens


def _learning_rate(step: int, settings: TrainSettings) -> float:
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_replacement(model, index: int, train: _Pairs, val: _Pairs, settings: TrainSettings,
                      progress: bool = True) -> dict[str, Any]:
    """Train block ``index`` of ``model`` in place to map ``train`` inputs to targets by MSE; keep the state
    with the lowest validation MSE (the untrained one included, so training never makes validation worse).

    Only that block's parameters change. Returns the history (per step: training loss and learning rate; per
    evaluation: validation MSE) and the validation MSE before and after.
    """
    block = get_blocks(model)[index]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for p in block.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    begin = time.perf_counter()
    best = {"val_mse": replacement_mse(model, index, val), "step": 0, "state": copy.deepcopy(block.state_dict())}
    history = {"steps": [], "val": [{"step": 0, "val_mse": best["val_mse"]}]}
    order: list[int] = []
    try:
        for step in tqdm(range(settings.steps), desc="replacement block", disable=not progress):
            if not order:
                order = torch.randperm(len(train.batches), generator=generator).tolist()
            i = order.pop()
            lr = _learning_rate(step, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.enable_grad():
                pred = run_one_block(model, index, train.batches[i], train.inputs[i])
                loss = masked_mse(pred.float(), train.targets[i].float(), train.batches[i].attention_mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            history["steps"].append({"step": step + 1, "train_mse": loss.item(), "lr": lr})
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
                val_mse = replacement_mse(model, index, val)
                history["val"].append({"step": step + 1, "val_mse": val_mse})
                if val_mse < best["val_mse"]:
                    best = {"val_mse": val_mse, "step": step + 1, "state": copy.deepcopy(block.state_dict())}
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    block.load_state_dict(best["state"])
    return {"history": history, "val_mse_untrained": history["val"][0]["val_mse"], "val_mse_trained": best["val_mse"],
            "best_step": best["step"], "train_seconds": round(time.perf_counter() - begin, 2)}


def plot_training(history: dict[str, Any], title: str, path: Path) -> None:
    """Training and validation MSE against step, as a PNG."""
    from pudding.core.extras import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([r["step"] for r in history["steps"]], [r["train_mse"] for r in history["steps"]], label="train (batch)",
            alpha=0.6)
    ax.plot([r["step"] for r in history["val"]], [r["val_mse"] for r in history["val"]], "o-", label="validation")
    ax.set(xlabel="step", ylabel="MSE of hidden states", title=title, yscale="log")
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path)


# --- the stage entry point -----------------------------------------------------------------------------------


def remaining_blocks(total: int, run: Sequence[int], replaced: bool) -> list[list[int]]:
    """Per block of the result, the original blocks it stands for: the replacement block stands for the run.

    >>> remaining_blocks(5, [1, 2], replaced=True)
    [[0], [1, 2], [3], [4]]
    """
    kept = [[b] for b in range(total) if b not in run]
    return kept[:run[0]] + [list(run)] + kept[run[0]:] if replaced else kept


def _train_block(model, tokenizer, config: StreamlineConfig, start: int) -> dict[str, Any]:
    """Collect the (k+1)-run's hidden states, prune it to its first block, train that block; returns the record."""
    settings = config.train
    docs = calibration_text(settings.train_samples + settings.val_samples)
    pack = lambda chunk: pack_text(model, tokenizer, chunk, config.max_length, config.max_batch_tokens)  # noqa: E731
    train_docs, val_docs = docs[:settings.train_samples], docs[settings.train_samples:]
    begin = time.perf_counter()
    train = run_pairs(model, pack(train_docs), start, config.run_length)
    val = run_pairs(model, pack(val_docs), start, config.run_length)
    collect_seconds = round(time.perf_counter() - begin, 2)
    prune_blocks(model, range(start + 1, start + config.run_length), inplace=True)
    result = train_replacement(model, start, train, val, settings, config.progress)
    return {**result, "val_mse_no_block": identity_mse(val), "train_doc_ids": [d.doc_id for d in train_docs],
            "val_doc_ids": [d.doc_id for d in val_docs], "collect_seconds": collect_seconds,
            "train_tokens": sum(int(b.attention_mask.sum()) for b in train.batches)}


@locks_output("out")
def streamline(config: StreamlineConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Compress ``config.model`` with LLM-Streamline and, if ``config.out`` is set, save the HF checkpoint there.

    Pass a loaded ``model`` and ``tokenizer`` to skip loading (the model is then changed in place). Returns the
    record also written to ``compress.json`` (with ``"model"``: the compressed model, in memory).
    """
    model, tokenizer, total, docs = prepare(config, model, tokenizer, config.check_model)
    begin = time.perf_counter()
    batches = pack_text(model, tokenizer, docs, config.max_length, config.max_batch_tokens)
    similarities = run_similarities(model, batches, sorted({config.k, config.run_length}), config.barriers)
    start = most_similar_run(similarities[config.run_length])
    run = list(range(start, start + config.run_length))
    plain = most_similar_run(similarities[config.k])
    record = {"method": "streamline", "k": config.k, "original_num_blocks": total, "num_blocks": total - config.k,
              "replaced_run" if config.train else "removed_run": run,
              "blocks": remaining_blocks(total, run, replaced=config.train is not None),
              "plain_removal_run": list(range(plain, plain + config.k)),
              "run_similarity": {str(length): {str(s): v for s, v in sims.items()}
                                 for length, sims in similarities.items()},
              "base_model": base_model_record(config.model, model.config), "config": asdict(config),
              "calibration": {"task": "boolq", "text": "passages", "doc_ids": [d.doc_id for d in docs]}}
    training = None
    if config.train is None:
        prune_blocks(model, run, inplace=True)
    else:
        training = _train_block(model, tokenizer, config, start)
        record["training"] = {key: training[key] for key in ("val_mse_no_block", "val_mse_untrained",
                                                             "val_mse_trained", "best_step", "train_tokens",
                                                             "collect_seconds", "train_seconds")}
    record["seconds"] = round(time.perf_counter() - begin, 2)
    if config.out is not None:
        save_compressed(model, tokenizer, config.out, record,
                        extra=None if training is None else lambda folder: _write_training(folder, training, config))
    return {**record, "model": model, **({"history": training["history"]} if training else {})}


def _write_training(folder: Path, training: dict[str, Any], config: StreamlineConfig) -> None:
    atomic_write_json(folder / TRAINING_FILE, {"config": asdict(config.train), **training})
    plot_training(training["history"], f"LLM-Streamline replacement block, k={config.k}", folder / "training.png")
