"""Healing: LoRA fine-tuning of the pruned model, with PEFT, one adapter per set or one shared by every set.

Depth-pruning methods recover part of what removing blocks costs by a short LoRA fine-tune afterwards
(SLEB, Shortened-LLaMA, LLM-Pruner, and the official PuDDing code, which trains one adapter per omission
set on Alpaca). ``pudding heal`` does the same, in two modes:

- ``per-set``: one adapter per pool set, trained with that set omitted (:func:`pudding.core.omit.omit_blocks`,
  so training sees exactly the pruned model). Its LoRA modules live only in the kept blocks.
- ``shared``: one adapter trained while each step omits a set drawn from the pool (seeded, optionally the
  dense model too). One adapter then serves every route: a server keeps one model plus one adapter.

**Data** (:data:`DATA_SOURCES`): generic text that is not one of the evaluated tasks' formats. Offline,
``boolq-passages`` is BoolQ's Wikipedia passages from the calibration split (minus any passage that also
occurs in the evaluation split); it can favour BoolQ, whose contexts are such passages, so reports give the
average with and without BoolQ. With the hub, a dataset id in Alpaca format (``yahma/alpaca-cleaned``,
``tatsu-lab/alpaca``) is rendered with the Alpaca prompt template; a local ``.json``/``.jsonl`` file of
Alpaca rows or ``{"text": ...}`` rows works the same offline. Texts are tokenized, joined by EOS and cut
into ``seq_length`` chunks (packing); the last ``val_chunks`` chunks are held out for a before/after loss.

**Artifacts.** Adapters are saved by PEFT's ``save_pretrained`` (safetensors) inside the PuDDing artifact:
``adapters/set-<i>/`` and ``adapters/shared/``, each with ``pudding_adapter.json`` (base-model and pool
fingerprints, mode, blocks, config, data, provenance) and ``training.json``/``training.png`` (loss curve).
Never a copy of the LLM. :class:`AdapterBank` loads them onto a model and picks the adapter for each
omission set; :class:`pudding.routing.model.PuddingModel` uses it for every route.

**Checkpoints** go to ``run_dir/<adapter>/`` every ``checkpoint_every`` steps: the LoRA tensors and the
AdamW state as safetensors, the step, the history and the optimizer's scalar settings as JSON (no pickle).
Data order, set draws and dropout are functions of (seed, step), so a resumed run trains exactly as an
uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.identity import identity_differences, refuse_differences
from pudding.core.load import load_config, load_model, model_fingerprint, model_name
from pudding.core.omit import (
    OmissionSet,
    get_architecture,
    get_blocks,
    omit_blocks,
    require_whole_blocks,
    validate_omission,
)
from pudding.core.provenance import (
    atomic_folder,
    atomic_output,
    atomic_write_figure,
    atomic_write_json,
    exclusive_output,
    provenance,
    read_json,
)
from pudding.healing.adapters import (
    ADAPTER_FILE,
    ADAPTER_FORMAT,
    ADAPTERS_DIR,
    MODES,
    SHARED,
    TRAINING_FILE,
    TRAINING_PLOT,
    adapter_name,
)
from pudding.pool.artifact import CandidatePool, PoolEntry, SetSource

CHECKPOINT_FORMAT = "pudding.heal-checkpoint/1"
# The Alpaca prompt template (Taori et al. 2023), as the official PuDDing and LLM-Pruner code use it.
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n{output}")


@dataclass(frozen=True)
class HealConfig:
    """Settings of ``pudding heal``; each field's help text is its documentation (docs/HEALING.md).

    With ``omit`` (or a bare pool folder) the pool is saved to ``out`` too. The learning rate warms up linearly
    over ``warmup`` of the steps, then decays linearly.
    """

    pool: str | None = field(default=None, metadata={
        "one_of": "sets", "help": "a PuDDing artifact folder (adapters go inside it) or a pool folder"})
    out: str | None = field(default=None, metadata={
        "help": "artifact folder for the adapters (out/adapters/...); default: --pool, when it is an artifact"})
    model: str | None = field(default=None, metadata={"help": "base model spec; default: the one the pool records"})
    mode: str = field(default="per-set", metadata={
        "choices": MODES, "help": "per-set: one adapter per set; shared: one adapter, a drawn set omitted per step"})
    sets: tuple[int, ...] = field(default=(), metadata={
        "help": "pool set indices to heal (per-set) or draw from (shared), e.g. 0,3; default: all"})
    omit: tuple[OmissionSet, ...] = field(default=(), metadata={
        "one_of": "sets", "help": "explicit sets instead of a pool, ';'-separated, e.g. '20,21;18,19'"})
    include_dense: bool = field(default=False, metadata={"help": "shared: the dense model is a draw too"})
    rank: int = field(default=8, metadata={"type": "positive_int", "help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the scaling numerator)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated module names to adapt; default: every linear projection inside the blocks"})
    # 60 steps: SmolLM2 on 2 CPU cores, about 30 minutes at the defaults (docs/HEALING.md, "Budget")
    steps: int = field(default=60, metadata={"type": "positive_int", "help": "optimizer steps"})
    lr: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate (warm-up, then linear decay)"})
    warmup: float = field(default=0.1, metadata={"help": "share of the steps the learning rate warms up over"})
    batch_size: int = field(default=4, metadata={"type": "positive_int", "help": "sequences per step"})
    seq_length: int = field(default=256, metadata={"type": "positive_int", "help": "tokens per sequence"})
    data: str = field(default="boolq-passages", metadata={
        "help": "boolq-passages (offline), an Alpaca-format hub dataset id, or a .json/.jsonl file"})
    max_texts: int | None = field(default=None, metadata={
        "type": "positive_int", "help": "use at most this many texts; default: all"})
    val_chunks: int = field(default=8, metadata={
        "type": "positive_int", "help": "held-out sequences for the before/after loss"})
    seed: int = field(default=0, metadata={"help": "data order, set draws, dropout, LoRA init"})
    checkpoint_every: int = field(default=10, metadata={
        "type": "positive_int", "help": "steps between training checkpoints"})
    run_dir: str = field(default="runs/heal", metadata={"help": "training checkpoints; reruns resume"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if (self.pool is None) == (not self.omit):
            raise ConfigError("give a PuDDing artifact or pool folder (--pool), or explicit sets (--omit), not both")
        if self.omit and self.out is None:
            raise ConfigError("explicit --omit sets need --out (the folder their pool and adapters are written to)")
        object.__setattr__(self, "sets", _index_list(self.sets))
        object.__setattr__(self, "omit", _omission_list(self.omit))
        object.__setattr__(self, "target_modules", _name_list(self.target_modules))
        for name in ("rank", "steps", "batch_size", "seq_length", "val_chunks", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_texts is not None and self.max_texts < 1:
            raise ConfigError(f"max_texts must be a positive integer or None, got {self.max_texts!r}")
        if not self.lr > 0 or not self.alpha > 0:
            raise ConfigError(f"lr and alpha must be positive, got lr={self.lr}, alpha={self.alpha}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup < 1:
            raise ConfigError(f"dropout and warmup must be in [0, 1), got {self.dropout}, {self.warmup}")

    def training_identity(self) -> dict[str, Any]:
        """What a checkpoint depends on (a resume with other values is refused)."""
        keys = ("rank", "alpha", "dropout", "target_modules", "steps", "lr", "warmup", "batch_size", "seq_length",
                "data", "max_texts", "val_chunks", "seed", "include_dense")
        return {k: _jsonable(getattr(self, k)) for k in keys}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _index_list(value) -> tuple[int, ...]:
    if isinstance(value, str):  # pool indices, not an omission set: "none" is no shorthand for "every set" here
        try:
            value = [int(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"sets must be comma-separated pool indices, e.g. '0,3', got {value!r}") from None
    items = list(value)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ConfigError(f"sets must be non-negative pool indices, got {items}")
    return tuple(dict.fromkeys(items))


def _omission_list(value) -> tuple[OmissionSet, ...]:
    if isinstance(value, str):
        value = [part for part in value.split(";") if part.strip()]
    sets = tuple(dict.fromkeys(require_whole_blocks(v, None, "pudding heal --omit") for v in value))
    if () in sets:
        raise ConfigError("an explicit set omits no block; the dense model needs no healing")
    return sets


def _name_list(value) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(dict.fromkeys(i.strip() for i in items if i and i.strip()))


# --- healing data ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealingData:
    """Texts to heal on, and what they could favour among the evaluated tasks."""

    texts: list[str]
    source: str
    favours: tuple[str, ...]  # evaluated tasks whose format or text the data shares
    note: str

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256("\x00".join(self.texts).encode()).hexdigest()[:16]
        return {"source": self.source, "texts": len(self.texts), "sha256": digest, "favours": list(self.favours),
                "note": self.note}


def _boolq_passages() -> HealingData:
    from pudding.core.tasks import load_docs

    def passage(doc) -> str:  # BoolQ contexts are "{passage}\nQuestion: ...?\nAnswer:" (tasks._render_boolq)
        return doc.contexts[0].rsplit("\nQuestion:", 1)[0]

    # A passage carries several questions, and the split is by (question, passage): drop every passage that
    # an evaluation document also shows, so healing never trains on text the evaluation scores.
    held_out = {passage(d) for d in load_docs("boolq", "evaluation")}
    texts = list(dict.fromkeys(p for p in map(passage, load_docs("boolq", "calibration")) if p not in held_out))
    return HealingData(texts, "boolq-passages", ("boolq",),
                       "Wikipedia passages from BoolQ's calibration split (none shown by an evaluation document); "
                       "BoolQ's contexts are such passages, so it may gain more than the other tasks")


DATA_SOURCES = {"boolq-passages": _boolq_passages}


def alpaca_text(row: dict) -> str:
    """An Alpaca row (instruction, input, output) rendered with the Alpaca prompt template, answer included."""
    template = ALPACA_WITH_INPUT if str(row.get("input") or "").strip() else ALPACA_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input") or "", output=row["output"])


def row_text(row: dict) -> str:
    """The training text of one data row: its ``text``, or an Alpaca row through the template."""
    if isinstance(row.get("text"), str):
        return row["text"]
    if isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        return alpaca_text(row)
    raise ConfigError(f"a healing data row needs a 'text' string or Alpaca 'instruction'/'output' strings; got keys "
                      f"{sorted(row)}")


def _read_rows(path: Path) -> list[dict]:
    try:
        raw = path.read_text(encoding="utf-8")
        rows = ([json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl"
                else json.loads(raw))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read healing data {path}: {error}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ConfigError(f"{path} must hold a list of objects (JSON) or one object per line (JSONL)")
    return rows


def _hub_rows(dataset_id: str) -> list[dict]:
    from pudding.core.hub import hub_reachable

    if not hub_reachable():
        raise ConfigError(f"healing data {dataset_id!r} is neither a known source ({', '.join(DATA_SOURCES)}), a "
                          "local .json/.jsonl file, nor reachable: the hub is offline")
    import datasets

    return list(datasets.load_dataset(dataset_id, split="train"))


def healing_data(source: str, max_texts: int | None = None) -> HealingData:
    """The texts of ``source``: a key of :data:`DATA_SOURCES`, a local .json/.jsonl file or a hub dataset id."""
    if source in DATA_SOURCES:
        data = DATA_SOURCES[source]()
    else:
        path = Path(source).expanduser()
        local = path.suffix in (".json", ".jsonl")
        if local and not path.is_file():
            raise ConfigError(f"healing data file {source} does not exist")
        rows = _read_rows(path) if local else _hub_rows(source)
        data = HealingData([row_text(r) for r in rows], source, (),
                           "instruction data (Alpaca format): no evaluated task's format" if rows and
                           "instruction" in rows[0] else "user-supplied text")
    texts = [t for t in data.texts if t.strip()][:max_texts]
    if not texts:
        raise ConfigError(f"healing data {source!r} holds no text")
    return replace(data, texts=texts)


def pack(tokenizer, texts: Sequence[str], seq_length: int) -> torch.Tensor:
    """Tokenize ``texts``, join them with EOS and cut the stream into rows of ``seq_length`` tokens.

    Returns a LongTensor (chunks x seq_length); the incomplete tail is dropped. Packing wastes no compute
    on padding, and every position is a training target.
    """
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    n = len(stream) // seq_length
    return torch.tensor(stream[:n * seq_length], dtype=torch.long).view(n, seq_length)


# --- schedules (functions of the seed, so a resumed run draws exactly what an uninterrupted one would) ----------


def shared_schedule(choices: Sequence[OmissionSet], steps: int, seed: int) -> list[OmissionSet]:
    """The omission set of every step of a shared adapter's training: ``steps`` seeded draws from ``choices``.

    >>> shared_schedule([(1,), (2,)], 4, 0) == shared_schedule([(1,), (2,)], 4, 0)
    True
    """
    if not choices:
        raise ConfigError("the shared adapter has no set to draw from")
    rng = random.Random(seed)
    return [choices[rng.randrange(len(choices))] for _ in range(steps)]


def batch_schedule(n_chunks: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Chunk indices of every step: seeded epochs over ``n_chunks``, each a fresh permutation."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_chunks, generator=generator).tolist()
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def learning_rate(config: HealConfig, step: int) -> float:
    """Linear warm-up over the first ``warmup`` of the steps, then linear decay to zero."""
    warm = max(1, math.ceil(config.warmup * config.steps))
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - warm))


# --- LoRA ------------------------------------------------------------------------------------------------------


def default_target_modules(model: nn.Module) -> tuple[str, ...]:
    """Leaf names of every linear projection inside the first block (``q_proj``, ..., ``down_proj``)."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's projections

    block = get_blocks(model)[0]
    names = {name.rsplit(".", 1)[-1] for name, module in block.named_modules()
             if isinstance(module, (nn.Linear, Conv1D))}
    if not names:
        raise ConfigError(f"found no linear projection inside the blocks of this {model.config.model_type} model")
    return tuple(sorted(names))


def lora_config(config: HealConfig, model: nn.Module, blocks: Sequence[int]):
    """The PEFT LoraConfig: ``target_modules`` restricted to ``blocks`` (the blocks the adapter can see)."""
    from pudding.core.extras import require

    LoraConfig = require("peft", "heal").LoraConfig

    layers_pattern = get_architecture(model.config).blocks_path.rsplit(".", 1)[-1]
    return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, bias="none",
                      target_modules=list(config.target_modules or default_target_modules(model)),
                      layers_to_transform=list(blocks), layers_pattern=layers_pattern, task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")


def _trainable(peft_model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


# --- training --------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    """One adapter to train: its name, its per-step omission plan and the sets its validation loss covers."""

    name: str
    set_index: int | None
    blocks: OmissionSet | None  # per-set: the omitted set; shared: None
    plan: list[OmissionSet]
    val_sets: list[OmissionSet]


def _validation_loss(model, chunks: torch.Tensor, blocks: OmissionSet, batch_size: int) -> float:
    """Mean token loss of ``chunks`` with ``blocks`` omitted (no dropout, no gradients)."""
    model.eval()
    total = 0.0
    with omit_blocks(model, blocks), torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            batch = chunks[start:start + batch_size]
            total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(chunks)


def _val_losses(model, chunks, sets: list[OmissionSet], batch_size: int) -> dict[str, float]:
    return {",".join(map(str, s)) or "dense": round(_validation_loss(model, chunks, s, batch_size), 5) for s in sets}


def _save_checkpoint(folder: Path, peft_model, optimizer, step: int, history: list, identity: dict) -> None:
    """LoRA tensors and AdamW tensors as safetensors; step, history and optimizer scalars as JSON (no pickle)."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{index}/{key}": value.detach().clone().contiguous() for index, entries in state["state"].items()
               for key, value in entries.items()}
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / "adapter.safetensors") as tmp:
        save_file({n: p.detach().contiguous() for n, p in _trainable(peft_model).items()}, str(tmp))
    with atomic_output(folder / "optimizer.safetensors") as tmp:
        save_file(tensors, str(tmp))
    # Written last: it names the step the two tensor files belong to, so a crash in between resumes the old step.
    atomic_write_json(folder / "checkpoint.json", {"format": CHECKPOINT_FORMAT, "identity": identity, "step": step,
                                                   "history": history, "param_groups": state["param_groups"]})


def _load_checkpoint(folder: Path, peft_model, optimizer, identity: dict) -> tuple[int, list]:
    """Restore a checkpoint written for ``identity``; (0, []) when there is none."""
    from safetensors.torch import load_file

    path = folder / "checkpoint.json"
    if not path.is_file():
        return 0, []
    saved = read_json(path, f"{path} is missing")
    refuse_differences((["format"] if saved.get("format") != CHECKPOINT_FORMAT else [])
                       + identity_differences(saved.get("identity") or {}, identity),
                       f"{folder} holds a checkpoint of a different healing run",
                       "remove it or choose another --run-dir")
    weights = load_file(str(folder / "adapter.safetensors"))
    params = _trainable(peft_model)
    if set(weights) != set(params):
        raise ConfigError(f"{folder}/adapter.safetensors does not match this adapter's LoRA tensors")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    return int(saved["step"]), list(saved["history"])


def train_adapter(peft_model, model, chunks: torch.Tensor, job: _Job, config: HealConfig, checkpoint: Path
                  ) -> list[dict]:
    """Train the active adapter of ``peft_model`` for ``config.steps`` steps; returns the loss history.

    Step ``s`` omits ``job.plan[s]`` and trains on the chunks :func:`batch_schedule` gives it. Resumes from
    ``checkpoint`` and writes one every ``config.checkpoint_every`` steps and at the end.
    """
    params = _trainable(peft_model)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=0.0)
    identity = {**config.training_identity(), "adapter": job.name, "plan_sha256": _plan_hash(job.plan),
                "fingerprint": model_fingerprint(model.config), "chunks": len(chunks)}
    step, history = _load_checkpoint(checkpoint, peft_model, optimizer, identity)
    batches = batch_schedule(len(chunks), config.steps, config.batch_size, config.seed)
    bar = tqdm(total=config.steps, initial=step, desc=f"heal {job.name}", unit="step", disable=not config.progress)
    while step < config.steps:
        torch.manual_seed(config.seed * 1_000_003 + step)  # dropout masks depend on the step, not on history
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        model.train()
        start = time.perf_counter()
        batch = chunks[batches[step]]
        with omit_blocks(model, job.plan[step]):
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)  # params of blocks omitted next step keep no stale gradient
        history.append({"step": step + 1, "loss": round(loss.item(), 5), "lr": optimizer.param_groups[0]["lr"],
                        "omitted": list(job.plan[step]), "seconds": round(time.perf_counter() - start, 3)})
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            _save_checkpoint(checkpoint, peft_model, optimizer, step, history, identity)
    bar.close()
    model.eval()
    return history


def _plan_hash(plan: list[OmissionSet]) -> str:
    return hashlib.sha256(json.dumps([list(p) for p in plan]).encode()).hexdigest()[:16]


# --- the stage -------------------------------------------------------------------------------------------------


def _resolve_pool(config: HealConfig) -> tuple[CandidatePool, Path, Path | None]:
    """The pool to heal, the artifact folder to write into, and the folder to copy the pool (or the whole
    artifact: router and all) from into it, None when the adapters go into the source itself."""
    from pudding.pool.artifact import CONFIG_FILE, artifact_folder, is_shipped

    if config.omit:
        spec = config.model
        if spec is None:
            raise ConfigError("explicit --omit sets need --model (the base model they are omitted from)")
        fingerprint = model_fingerprint(load_config(spec))
        entries = tuple(PoolEntry(validate_omission(s, fingerprint["num_blocks"]),
                                  (SetSource("manual", None, None, list(s), [], [], 0.0),)) for s in config.omit)
        pool = CandidatePool(entries, {"spec": spec, "name": model_name(spec), "fingerprint": fingerprint},
                             {"source": "pudding heal --omit"}, provenance())
        return pool, Path(config.out), Path(config.out)
    folder = artifact_folder(config.pool)
    pool = CandidatePool.from_pretrained(folder)
    is_artifact = (folder / CONFIG_FILE).is_file()
    if config.out is None and (not is_artifact or is_shipped(config.pool)):
        raise ConfigError(f"{config.pool} is {'the shipped artifact' if is_artifact else 'a pool, not an artifact'}; "
                          "give --out, the folder the adapters are written to")
    out = Path(config.out) if config.out is not None else folder
    return pool, out, (folder if out.resolve() != folder.resolve() else None)


def _jobs(config: HealConfig, pool: CandidatePool) -> list[_Job]:
    indices = list(config.sets) or list(range(len(pool.sets)))
    bad = [i for i in indices if i >= len(pool.sets)]
    if bad:
        raise ConfigError(f"sets {bad} are out of range: the pool has sets 0..{len(pool.sets) - 1}")
    for i in indices:  # an adapter wraps whole blocks' layers; a half-skipped block would train half its adapter
        require_whole_blocks(pool.sets[i].blocks, None, f"pudding heal (set {i}, {pool.sets[i].name})")
    if config.mode == "per-set":
        # Validated on its own set only: a per-set adapter never runs with another set, nor dense.
        return [_Job(adapter_name(i), i, pool.sets[i].blocks, [pool.sets[i].blocks] * config.steps,
                     [pool.sets[i].blocks]) for i in indices]
    choices = [pool.sets[i].blocks for i in indices] + ([()] if config.include_dense else [])
    return [_Job(SHARED, None, None, shared_schedule(choices, config.steps, config.seed),
                 list(dict.fromkeys([(), *choices])))]


def _record(config: HealConfig, job: _Job, pool: CandidatePool, fingerprint: dict, data: HealingData,
            summary: dict) -> dict:
    return {"format": ADAPTER_FORMAT, "name": job.name, "mode": config.mode, "set_index": job.set_index,
            "blocks": None if job.blocks is None else list(job.blocks),
            "sets": [list(s) for s in dict.fromkeys(job.plan)] if job.blocks is None else None,
            "base_model": {"spec": pool.model.get("spec"), "name": pool.model.get("name"), "fingerprint": fingerprint},
            "pool_fingerprint": pool.fingerprint(),
            "config": {**asdict(config), "omit": [list(s) for s in config.omit]},
            "data": data.describe(), "training": summary, "provenance": provenance()}


def _finished(folder: Path, pool: CandidatePool, config: HealConfig) -> bool:
    """True if ``folder`` holds this very adapter already (resume at the adapter level); refuse another one."""
    path = folder / ADAPTER_FILE
    if not path.is_file():
        return False
    record = read_json(path, f"{path} is missing")
    if record.get("pool_fingerprint") != pool.fingerprint() or record.get("config", {}).get("mode") != config.mode:
        raise ConfigError(f"{folder} holds an adapter for another pool or mode; remove it or choose another --out")
    return True


def _save_adapter(peft_model, folder: Path, record: dict, history: list[dict]) -> None:
    """PEFT's save_pretrained (safetensors) plus our JSON, into a temporary folder renamed into place."""
    with atomic_folder(folder) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: nothing we produced
        atomic_write_json(tmp / ADAPTER_FILE, record)
        atomic_write_json(tmp / TRAINING_FILE, {"history": history, **{k: record[k] for k in ("name", "training")}})
        plot_training(history, f"{record['name']} ({record['mode']})", tmp / TRAINING_PLOT)


def plot_training(history: list[dict], title: str, path: Path) -> None:
    """Training loss per step (and its running mean) as a PNG."""
    from pudding.core.extras import pyplot

    plt = pyplot()

    steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("causal-LM loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path)


def _heal_one(model, chunks: torch.Tensor, job: _Job, config: HealConfig, pool: CandidatePool, data: HealingData,
              folder: Path) -> dict:
    """Inject a fresh LoRA for ``job``, train it, save it, and remove it from ``model`` again."""
    from pudding.core.extras import require

    get_peft_model = require("peft", "heal").get_peft_model

    total = len(get_blocks(model))
    visible = [b for b in range(total) if job.blocks is None or b not in job.blocks]
    torch.manual_seed(config.seed)  # LoRA A initialisation
    peft_model = get_peft_model(model, lora_config(config, model, visible))
    try:
        val, train = chunks[-config.val_chunks:], chunks[:-config.val_chunks]
        before = _val_losses(model, val, job.val_sets, config.batch_size)
        start = time.perf_counter()
        checkpoint = Path(config.run_dir) / pool.fingerprint() / job.name  # one folder per pool: no clash
        history = train_adapter(peft_model, model, train, job, config, checkpoint)
        seconds = time.perf_counter() - start
        after = _val_losses(model, val, job.val_sets, config.batch_size)
        summary = {"steps": config.steps, "train_chunks": len(train), "val_chunks": len(val),
                   "tokens_per_step": config.batch_size * config.seq_length,
                   "seconds": round(seconds, 1), "seconds_per_step": _median([h["seconds"] for h in history]),
                   "val_loss_before": before, "val_loss_after": after,
                   "trainable_parameters": sum(p.numel() for p in _trainable(peft_model).values())}
        _save_adapter(peft_model, folder, _record(config, job, pool, model_fingerprint(model.config), data, summary),
                      history)
        return summary
    finally:
        peft_model.base_model.unload()  # ``model`` is plain again for the next adapter


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 3) if ordered else 0.0


def heal(config: HealConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Train the adapters of ``config`` and save them under ``<out>/adapters/``; returns a summary.

    Pass an already loaded ``model`` and ``tokenizer`` to skip loading the base model (it must match the
    pool's fingerprint). Finished adapters are kept (a rerun trains only the missing ones); an adapter's
    training resumes from its checkpoint in ``config.run_dir``.
    """
    from pudding.core.extras import require

    require("peft", "heal")  # and each adapter's loss plot: fail now, not after training the first adapter
    require("matplotlib", "plots")
    pool, out, source = _resolve_pool(config)
    jobs = _jobs(config, pool)
    # The lock files sit next to the locked folders, so the artifact itself only gains adapter files.
    with exclusive_output(out), exclusive_output(Path(config.run_dir)):
        if model is None:
            pool.check_model(load_config(config.model or pool.model["spec"]))
            data = healing_data(config.data, config.max_texts)
            model, tokenizer = load_model(config.model or pool.model["spec"])
        else:
            data = healing_data(config.data, config.max_texts)
        pool.check_model(model.config)
        if source is not None:
            _seed_output(pool, source, out)
        chunks = pack(tokenizer, data.texts, config.seq_length)
        if len(chunks) < config.val_chunks + config.batch_size:
            raise ConfigError(f"{data.source} packs into {len(chunks)} chunks of {config.seq_length} tokens, fewer "
                              f"than val_chunks + batch_size = {config.val_chunks + config.batch_size}")
        summary = {}
        for job in jobs:
            folder = out / ADAPTERS_DIR / job.name
            if _finished(folder, pool, config):
                summary[job.name] = {"kept": str(folder)}
                continue
            summary[job.name] = _heal_one(model, chunks, job, config, pool, data, folder)
    return {"out": str(out / ADAPTERS_DIR), "data": data.describe(), "adapters": summary}


def _seed_output(pool: CandidatePool, source: Path, out: Path) -> None:
    """Give ``out`` the healed pool (and, from an artifact, its router files, so ``out`` is an artifact that
    generate and serve load), unless the same pool is there already."""
    import shutil

    from pudding.pool.artifact import POOL_FILE

    if (out / POOL_FILE).is_file():
        if CandidatePool.from_pretrained(out).fingerprint() != pool.fingerprint():
            raise ConfigError(f"{out / POOL_FILE} holds another pool; choose another --out")
        return
    from pudding.pool.artifact import CONFIG_FILE

    is_artifact = source != out and (source / CONFIG_FILE).is_file()
    for file in sorted(source.iterdir()) if is_artifact else []:
        if file.is_file() and file.name != POOL_FILE:
            with atomic_output(out / file.name) as tmp:
                shutil.copyfile(file, tmp)
    pool.save_pretrained(out)  # last: its presence marks a finished copy


# --- applying adapters -----------------------------------------------------------------------------------------


