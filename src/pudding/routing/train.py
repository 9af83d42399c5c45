"""The routing stage's entry point: train a router on a label artifact and save a complete PuDDing artifact.

**Targets.** The paper regresses the raw vector of each set's gold log-likelihood. Most of that vector's
variance is the prompt's difficulty, which every set shares and which says nothing about which set to pick.
So the ``mse`` targets are centred per prompt (each set's label minus the mean over sets) and divided by
one scalar, the standard deviation of the centred training targets; predictions are scaled back. The
``ce`` loss (the paper's ablation) classifies the set with the highest label.

**Split.** Train and validation are split by question: a prompt's router text is hashed, so the same
question (even if it occurs in two tasks) never lands on both sides.

**Frozen encoders** (``embed-mlp``, ``task``, ``llm-embed``) are run once over all prompts; training then touches
only the head. The ``encoder`` router runs its backbone every step. The ``task`` router's head is trained to tell
the calibration tasks apart (cross-entropy on the task names); its table of each task's mean target per set is
measured on the training prompts, not trained.

**Label targets** (``target``): ``tl`` is the paper's gold mean log-likelihood; ``margin`` and
``choice-prob`` follow accuracy instead, from each choice's score under the task's lm-eval metric (see
:func:`label_targets`).

**Safe routing** (``safe=True``): the default set is the best single set on the training prompts' accuracy;
the router leaves it only when a set is predicted to beat it by more than a threshold, tuned for accuracy
on the validation prompts (:func:`tune_switch`).

The best epoch by validation loss is kept. The history (train and validation loss per epoch, plus routing
quality) is written as JSON and a PNG.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.metrics import choice_scores, first_argmax
from pudding.core.provenance import atomic_write_figure, atomic_write_json, locks_output, provenance
from pudding.core.tasks import get_task
from pudding.pool.artifact import CandidatePool
from pudding.routing.labels import Labels
from pudding.routing.router import (
    LLM_BACKBONE,
    EncoderRouter,
    Router,
    RouterConfig,
    TaskMixtureHead,
    TaskMixtureRouter,
    build_router,
    choose_sets,
)

LOSSES = ("mse", "ce")
TARGETS = ("tl", "margin", "choice-prob")
VAL_FRACTION = 0.2  # share of questions held out for validation


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``pudding train-router``; each field's help text is its documentation."""

    labels: str = field(metadata={"help": "label folder (pudding label --out)"})
    pool: str = field(metadata={"help": "the pool the labels were computed for"})
    out: str = field(metadata={"help": "PuDDing artifact folder to write"})
    router: str = field(default="embed-mlp", metadata={
        "help": "encoder, embed-mlp, llm-embed or task (pudding.routing.router.ROUTERS)"})
    loss: str = field(default="mse", metadata={"choices": LOSSES, "help": "regression (mse) or classification (ce)"})
    backbone: str = field(default="default", metadata={
        "help": "encoder for encoder/embed-mlp/task ('default': the embedded MiniLM)"})
    hidden: int = field(default=256, metadata={"type": "positive_int", "help": "MLP head width"})
    max_length: int = field(default=128, metadata={"type": "positive_int", "help": "prompt tokens the router reads"})
    epochs: int | None = field(default=None, metadata={
        "type": "positive_int", "help": "default: 60 for frozen encoders, 4 for the fine-tuned one"})
    batch_size: int = field(default=32, metadata={"type": "positive_int", "help": "prompts per optimiser step"})
    lr: float = field(default=1e-3, metadata={"help": "head learning rate"})
    encoder_lr: float = field(default=3e-5, metadata={"help": "the fine-tuned backbone's learning rate (encoder)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    val_fraction: float = field(default=VAL_FRACTION, metadata={"help": "share of questions held out for validation"})
    seed: int = field(default=0, metadata={"help": "initialisation and batch-order seed"})
    target: str = field(default="tl", metadata={
        "choices": TARGETS, "help": "label each set by the gold's mean log-likelihood (tl, the paper), its metric "
                                    "margin over the best wrong choice, or its softmax probability among the choices"})
    safe: bool = field(default=False, metadata={
        "help": "safe routing: keep the best single set unless another is predicted to beat it by a threshold "
                "tuned on the validation prompts"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; known losses: {', '.join(LOSSES)}")
        if self.target not in TARGETS:
            raise ConfigError(f"unknown label target {self.target!r}; known targets: {', '.join(TARGETS)}")
        if self.router == TaskMixtureRouter.kind and self.loss != "mse":
            raise ConfigError(f"the task router predicts each set's label (--loss mse), not the best set "
                              f"({self.loss})")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        for name in ("lr", "encoder_lr"):
            # nan or inf train to a nan router without an error; a negative rate climbs the loss.
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")

    @property
    def n_epochs(self) -> int:
        return self.epochs or (4 if self.router == "encoder" else 60)


# --- data ------------------------------------------------------------------------------------------------


def is_validation(text: str, fraction: float) -> bool:
    """Deterministic, question-level split: the same prompt text always lands on the same side."""
    digest = hashlib.sha256(" ".join(text.split()).lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class RoutingData:
    """The label table as tensors: prompts, the label matrix, and what is needed to score accuracy."""

    texts: list[str]
    labels: torch.Tensor  # (docs, sets): the label target under each set (default: gold mean log-likelihood)
    correct: torch.Tensor  # (docs, sets): 1.0 where the set answers the document correctly (task metric)
    tasks: list[str]

    def subset(self, rows: list[int]) -> RoutingData:
        return RoutingData([self.texts[i] for i in rows], self.labels[rows], self.correct[rows],
                           [self.tasks[i] for i in rows])


def label_targets(choice_logprob: list[list[float]], chars: list[int], gold: int, metric: str, tl: list[float],
                  target: str) -> list[float]:
    """One document's label per set.

    - ``tl``: the gold answer's mean per-token log-likelihood (the paper's label, ``tl`` here);
    - ``margin``: the gold's metric score minus the best wrong choice's: positive exactly when the set
      answers correctly, and by how much;
    - ``choice-prob``: the gold's probability after a softmax over the choices' metric scores, the smooth
      version of being right.
    """
    if target == "tl":
        return list(tl)
    out = []
    for logprobs in choice_logprob:
        scores = choice_scores(logprobs, chars, metric)
        if target == "margin":
            out.append(scores[gold] - max(v for i, v in enumerate(scores) if i != gold))
        else:
            out.append(float(torch.tensor(scores, dtype=torch.float64).softmax(0)[gold]))
    return out


def is_correct(logprobs: list[float], chars: list[int], gold: int, metric: str) -> float:
    """1.0 if the task's lm-eval metric (``acc`` or ``acc_norm``) picks the gold choice, else 0.0."""
    # lm-eval's own values (no rescaling), so a float tie is broken exactly as lm-eval breaks it.
    values = [lp / c for lp, c in zip(logprobs, chars)] if metric == "acc_norm" else logprobs
    return float(first_argmax(values) == gold)


def routing_data(labels: Labels, target: str = "tl") -> RoutingData:
    """Tensors from a label artifact; ``correct`` uses each task's lm-eval metric (acc or acc_norm), and
    ``labels`` holds the chosen label ``target`` (:func:`label_targets`)."""
    table = labels.table
    metrics = {t: get_task(t).metric for t in set(table["task"])}
    rows = list(zip(table["task"], table["choice_logprob"], table["choice_chars"], table["gold"], table["label"]))
    correct = [[is_correct(lp, chars, gold, metrics[task]) for lp in per_set]
               for task, per_set, chars, gold, _ in rows]
    targets = [label_targets(per_set, chars, gold, metrics[task], tl, target)
               for task, per_set, chars, gold, tl in rows]
    return RoutingData(list(table["router_text"]), torch.tensor(targets, dtype=torch.float64),
                       torch.tensor(correct, dtype=torch.float64), list(table["task"]))


def split_rows(texts: list[str], fraction: float) -> tuple[list[int], list[int]]:
    val = [i for i, t in enumerate(texts) if is_validation(t, fraction)]
    held = set(val)
    return [i for i in range(len(texts)) if i not in held], val


# --- routing quality ---------------------------------------------------------------------------------------


def routing_quality(chosen: torch.Tensor, data: RoutingData, static_set: int) -> dict[str, float]:
    """How good a routing decision is, against the oracle and against one static set.

    ``label_gain_captured`` is (router - static) / (oracle - static) on the mean label: 1 is the oracle,
    0 is no better than always using ``static_set``.
    """
    rows = torch.arange(len(chosen))
    oracle = data.labels.argmax(1)
    routed_label = data.labels[rows, chosen].mean().item()
    static_label = data.labels[:, static_set].mean().item()
    oracle_label = data.labels.max(1).values.mean().item()
    gap = oracle_label - static_label
    return {
        "n": len(chosen),
        "top1_agreement": (chosen == oracle).double().mean().item(),
        "label_routed": routed_label,
        "label_oracle": oracle_label,
        "label_static": static_label,
        "label_gain_captured": (routed_label - static_label) / gap if gap > 0 else float("nan"),
        "acc_routed": data.correct[rows, chosen].mean().item(),
        "acc_static": data.correct[:, static_set].mean().item(),
        "acc_oracle_label": data.correct[rows, oracle].mean().item(),
    }


# --- training --------------------------------------------------------------------------------------------


def _targets(labels: torch.Tensor, loss: str, scale: float) -> torch.Tensor:
    if loss == "ce":
        return labels.argmax(1)
    return ((labels - labels.mean(1, keepdim=True)) / scale).float()


def _loss_fn(loss: str):
    return nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()


# Frozen-encoder features of the same prompts are the same for every router trained on them (a reproduction
# trains dozens): computed once per process. Keyed on the encoder, not on the LLM, so llm-embed does not use it.
_FROZEN_FEATURES: dict[tuple, torch.Tensor] = {}


def _encoded(router: Router, texts: list[str], progress: bool) -> torch.Tensor:
    with torch.no_grad():
        chunks = [router.encode(texts[i:i + 64])
                  for i in tqdm(range(0, len(texts), 64), desc="features", disable=not progress)]
    return torch.cat(chunks).float()


def frozen_features(router: Router, texts: list[str], progress: bool = False) -> torch.Tensor | None:
    """The frozen encoder's features of ``texts`` (embed-mlp and task routers), computed once per process for
    every router that shares the encoder; None for a router that fine-tunes its encoder or reads the LLM."""
    if router.trains_encoder or not isinstance(router, EncoderRouter):
        return None
    key = (router.config.backbone, router.config.max_length, hashlib.sha256("\x1f".join(texts).encode()).hexdigest())
    if key not in _FROZEN_FEATURES:
        _FROZEN_FEATURES[key] = _encoded(router, texts, progress)
    return _FROZEN_FEATURES[key]


class _Features:
    """Encoder outputs, cached for frozen encoders, recomputed (with gradients) for the fine-tuned one."""

    def __init__(self, router: Router, texts: list[str], progress: bool):
        self.router, self.texts = router, texts
        self.cache = None
        if not router.trains_encoder:
            shared = frozen_features(router, texts, progress)
            self.cache = shared if shared is not None else _encoded(router, texts, progress)

    def __call__(self, rows: list[int]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[rows]
        return self.router.encode([self.texts[i] for i in rows])


def _predict(router: Router, features: _Features, rows: list[int], batch_size: int = 64,
             output: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The head's set scores for ``rows`` (or ``output``'s values: what the training loss compares)."""
    router.eval()
    output = output or router.head
    with torch.no_grad():
        return torch.cat([output(features(rows[i:i + batch_size])) for i in range(0, len(rows), batch_size)])


@dataclass(frozen=True)
class _Objective:
    """What a router is trained on: ``output`` (of the encoder features) against ``targets`` under ``loss_fn``."""

    output: Callable[[torch.Tensor], torch.Tensor]
    targets: torch.Tensor
    loss_fn: nn.Module


def _objective(router: Router, data: RoutingData, train: list[int], config: TrainConfig) -> _Objective:
    if isinstance(router.head, TaskMixtureHead):
        task_ids = torch.tensor([router.config.tasks.index(t) for t in data.tasks])
        router.head.fill_table(_targets(data.labels[train], "mse", router.config.target_scale), task_ids[train])
        return _Objective(router.head.task_logits, task_ids, nn.CrossEntropyLoss())
    return _Objective(router.head, _targets(data.labels, config.loss, router.config.target_scale),
                      _loss_fn(config.loss))


def _optimizer(router: Router, config: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": list(router.head.parameters()), "lr": config.lr}]
    if router.trains_encoder:
        groups.append({"params": [p for p in router.encoder.parameters() if p.requires_grad], "lr": config.encoder_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def fit(router: Router, data: RoutingData, train: list[int], val: list[int], config: TrainConfig) -> dict[str, Any]:
    """Train ``router`` in place; keep the epoch with the lowest validation loss. Returns the history."""
    torch.manual_seed(config.seed)
    features = _Features(router, data.texts, config.progress)
    objective, optimizer = _objective(router, data, train, config), _optimizer(router, config)
    targets, loss_fn = objective.targets, objective.loss_fn
    static = int(data.labels[train].mean(0).argmax())  # the best single set, chosen on training data
    history, best, best_state = [], math.inf, None
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in tqdm(range(1, config.n_epochs + 1), desc=f"train {router.kind}", disable=not config.progress):
        router.train()  # dropout in the head (and the encoder when fine-tuned); cached features are fixed
        order = [train[i] for i in torch.randperm(len(train), generator=generator).tolist()]
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            rows = order[start:start + config.batch_size]
            loss = loss_fn(objective.output(features(rows)), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        train_out, val_out = (_predict(router, features, rows, output=objective.output) for rows in (train, val))
        record = {"epoch": epoch, "train_loss": loss_fn(train_out, targets[train]).item(),
                  "train_loss_running": total / len(train), "val_loss": loss_fn(val_out, targets[val]).item(),
                  "val": routing_quality(_predict(router, features, val).argmax(1), data.subset(val), static)}
        history.append(record)
        if record["val_loss"] < best:
            best = record["val_loss"]
            best_state = {k: v.detach().clone() for k, v in router.trainable_state().items()}
    router.load_state_dict(best_state, strict=False)
    router.eval()
    best_epoch = min(history, key=lambda r: r["val_loss"])
    return {"history": history, "best_epoch": best_epoch["epoch"], "static_set": static,
            "val": best_epoch["val"], "train": routing_quality(_predict(router, features, train).argmax(1),
                                                                data.subset(train), static)}


def tune_switch(scores: torch.Tensor, correct: torch.Tensor, default: int) -> tuple[float, dict[str, float]]:
    """The switch threshold for safe routing that maximises accuracy on held-out prompts.

    ``scores`` are the router's per-set predictions and ``correct`` whether each set answers each prompt.
    A prompt leaves ``default`` when its best set is predicted to gain more than the threshold. Candidates
    are 0 and every observed positive gain (the largest never switches); ties go to the larger threshold,
    which switches less.
    """
    threshold, accuracy = _tuned(scores, correct, default)
    rows, best = torch.arange(len(scores)), scores.argmax(1)
    switched = (choose_sets(scores, default, threshold) != default).double().mean().item()
    return threshold, {"default_set": default, "threshold": threshold, "acc_safe": accuracy,
                       "acc_safe_crossfit": _crossfit_accuracy(scores, correct, default),
                       "acc_argmax": correct[rows, best].mean().item(),
                       "acc_default": correct[:, default].mean().item(),
                       "switch_rate": switched, "n": len(scores)}


def _crossfit_accuracy(scores: torch.Tensor, correct: torch.Tensor, default: int) -> float:
    """Safe routing's accuracy with the threshold tuned on one half of the prompts and measured on the other,
    both ways: an estimate that the tuning has not seen, for comparing safe routing with plain argmax."""
    if len(scores) < 4:
        return float("nan")
    halves = [list(range(0, len(scores), 2)), list(range(1, len(scores), 2))]
    right = 0.0
    for tune, test in (halves, halves[::-1]):
        threshold, _ = _tuned(scores[tune], correct[tune], default)
        chosen = choose_sets(scores[test], default, threshold)
        right += correct[test][torch.arange(len(test)), chosen].sum().item()
    return right / len(scores)


def _tuned(scores: torch.Tensor, correct: torch.Tensor, default: int) -> tuple[float, float]:
    rows = torch.arange(len(scores))
    best = scores.argmax(1)
    gains = scores.gather(1, best[:, None])[:, 0] - scores[:, default]
    accuracy = {t: correct[rows, choose_sets(scores, default, t)].mean().item()
                for t in sorted({0.0, *(g for g in gains.tolist() if g > 0)})}
    threshold = max(accuracy, key=lambda t: (accuracy[t], t))
    return threshold, accuracy[threshold]


def plot_history(history: list[dict], title: str, path: Path) -> None:
    from pudding.core.extras import pyplot

    plt = pyplot()

    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, agree_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    loss_ax.plot(epochs, [r["val_loss"] for r in history], label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title=title)
    loss_ax.legend()
    agree_ax.plot(epochs, [r["val"]["top1_agreement"] for r in history], label="top-1 agreement with oracle")
    agree_ax.plot(epochs, [r["val"]["label_gain_captured"] for r in history], label="oracle label gain captured")
    agree_ax.set(xlabel="epoch", title="validation routing quality")
    agree_ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path)


@locks_output("out")
def train_router(config: TrainConfig, *, model=None, tokenizer=None):
    """Train a router on ``config.labels`` and save a PuDDing artifact to ``config.out``; returns the model."""
    from pudding.core.load import load_model
    from pudding.routing.model import PuddingModel

    pool = CandidatePool.from_pretrained(config.pool)
    labels = Labels.load(config.labels).for_pool(pool)
    data = routing_data(labels, config.target)
    train, val = split_rows(data.texts, config.val_fraction)
    if not train or not val:
        raise ConfigError(f"{len(data.texts)} labelled prompts are too few to split into train and validation")
    if model is None:
        model, tokenizer = load_model(pool.model["spec"])
    pool.check_model(model.config)
    centred = data.labels[train] - data.labels[train].mean(1, keepdim=True)
    scale = float(centred.std()) if config.loss == "mse" and float(centred.std()) > 0 else 1.0
    backbone = LLM_BACKBONE if config.router == "llm-embed" else config.backbone
    tasks = tuple(sorted(set(data.tasks))) if config.router == TaskMixtureRouter.kind else ()
    router_config = RouterConfig(config.router, len(pool.sets), backbone, config.hidden, config.max_length,
                                 config.loss, scale, config.target, tasks=tasks)
    # The head's initial weights come from the global generator: seed it here, not only in fit, or the
    # result depends on whatever drew random numbers earlier in the process (e.g. another router's training).
    torch.manual_seed(config.seed)
    router = build_router(router_config, llm=model, llm_tokenizer=tokenizer)
    start = time.perf_counter()
    result = fit(router, data, train, val, config)
    if config.safe:
        # Default: the best single set by accuracy on the training prompts; threshold: tuned on validation.
        default = int(data.correct[train].mean(0).argmax())
        val_scores = router.scores([data.texts[i] for i in val])
        threshold, result["safe"] = tune_switch(val_scores, data.correct[val], default)
        router.config = router_config = replace(router_config, default_set=default, switch_threshold=threshold)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["n_train"], result["n_val"] = len(train), len(val)
    pudding = PuddingModel(model, tokenizer, pool, router, training={"config": asdict(config), **result})
    out = pudding.save_pretrained(config.out)
    atomic_write_json(out / "training.json", {"config": asdict(config), "router": asdict(router_config), **result,
                                              "labels": labels.meta.get("config"), "labels_identity": labels.identity,
                                              "pool": pool.fingerprint(), "provenance": provenance()})
    plot_history(result["history"], f"{config.router} router ({config.loss})", out / "training.png")
    return pudding
