"""Score every calibration document under every candidate set (the router's labels).

For each document and each set of a :class:`~pudding.pool.artifact.CandidatePool`, ``build_labels`` scores
every choice with those blocks omitted. The paper's label is the gold answer's mean per-token
log-likelihood (its task likelihood); every choice's summed log-likelihood is kept too, so later stages can
compute the accuracy of any routing decision, an oracle's included, without running the LLM again.

**Prefix reuse.** Sets that share their first omitted block share the dense blocks before it; the
:class:`~pudding.pool.evaluator.CandidateEvaluator` computes those once per batch for all sets.

**Storage.** One row per document in a Parquet file written with ``datasets`` (``labels.parquet``), next to
``labels.json``: the format, the pool's fingerprint (sets and model), the configuration and the provenance.
Column ``choice_logprob`` is ``[set][choice]``, ``label`` is ``[set]``, in the pool's set order.

**Sharding.** Documents are cut into shards of ``shard_size``; each shard keeps one file per set, written
atomically to ``run_dir``. A killed job reruns only what is missing, and the final file is byte-identical
to an uninterrupted run (shards and sets are assembled in a fixed order). The run's identity is the model,
the documents, the split, ``max_length`` and ``shard_size``, not the pool: labelling another pool in the
same ``run_dir`` scores only the sets it does not share with what is there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.identity import claim_identity
from pudding.core.metrics import DocScores, scores_by_doc
from pudding.core.omit import OmissionSet
from pudding.core.provenance import (
    atomic_output,
    atomic_write_json,
    locks_output,
    provenance,
    read_json,
)
from pudding.core.quantize import quantize_identity
from pudding.core.score import LikelihoodScorer, doc_requests
from pudding.core.tasks import PAPER_TASKS, SPLITS, TARGET_DELIMITER, MCDoc, load_docs
from pudding.pool.artifact import CandidatePool
from pudding.pool.evaluator import CandidateEvaluator
from pudding.pool.executor import (
    Executor,
    ExecutorFields,
    ModelReplica,
    start_executor,
)

LABELS_FILE = "labels.parquet"
META_FILE = "labels.json"
LABELS_FORMAT = "pudding.labels/2"
# Format 1 stored choice_chars with lm-eval's leading target delimiter counted (len(" " + choice)); every
# continuation pudding renders starts with it, so loading one subtracts len(TARGET_DELIMITER).
LEGACY_LABELS_FORMATS = ("pudding.labels/1",)
SHARD_IDENTITY = "identity.json"


def _features():
    import datasets

    datasets.disable_progress_bars()  # per-shard conversion bars would drown the job's own progress bar
    return datasets.Features({
        "task": datasets.Value("string"),
        "doc_id": datasets.Value("string"),
        "router_text": datasets.Value("string"),
        "gold": datasets.Value("int32"),
        "choice_tokens": datasets.Sequence(datasets.Value("int32")),
        "choice_chars": datasets.Sequence(datasets.Value("int32")),
        "choice_logprob": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
        "label": datasets.Sequence(datasets.Value("float64")),
    })


@dataclass(frozen=True)
class LabelConfig(ExecutorFields):
    """Settings of ``pudding label``; each field's help text is its documentation.

    ``quantize`` (the model that scores) is part of the run's identity when it is not ``none``.
    """

    pool: str = field(metadata={"help": "candidate pool folder or its pool.json (pudding candidates --out)"})
    out: str = field(metadata={"help": "folder for labels.parquet and labels.json"})
    model: str | None = field(default=None, metadata={
        "help": "base model; default: the spec recorded in the pool"})
    tasks: tuple[str, ...] = field(default=PAPER_TASKS, metadata={"help": "comma-separated tasks"})
    samples: int = field(default=64, metadata={
        "type": "positive_int", "help": "documents per task (a seeded sample of the split; a task with fewer "
                                        "uses all it has)"})
    split: str = field(default="calibration", metadata={
        "choices": SPLITS, "help": "calibration for router training, evaluation for reproduction tables"})
    max_length: int = field(default=256, metadata={"type": "positive_int", "help": "tokens kept per request"})
    max_batch_tokens: int = field(default=512, metadata={
        "flag": "--batch-tokens", "type": "positive_int", "help": "padded tokens per forward pass"})
    shard_size: int = field(default=16, metadata={"type": "positive_int", "help": "documents per checkpointed shard"})
    reuse_prefix: bool = field(default=True, metadata={
        "flag": "--no-prefix-reuse", "help": "recompute the dense prefix for every set (exact either way; slower)"})
    run_dir: str = field(default="runs/labels", metadata={"help": "shard checkpoints; reruns resume"})
    progress: bool = field(default=True, metadata={"help": "hide progress bars"})

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", tuple(t.strip() for t in self.tasks.split(",") if t.strip()))
        if not self.tasks:
            raise ConfigError("no tasks given")
        if self.split not in SPLITS:
            raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for name in ("samples", "max_length", "max_batch_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


# --- scoring documents under many sets ----------------------------------------------------------------------


def score_sets(scorer: LikelihoodScorer, docs: Sequence[MCDoc], sets: Sequence[OmissionSet],
               reuse_prefix: bool = True) -> list[list[DocScores]]:
    """For each omission set, every document's choice scores (reusing the dense prefix across sets)."""
    requests = [r for d in docs for r in doc_requests(d)]
    evaluator = CandidateEvaluator(scorer, requests, reuse_prefix=reuse_prefix)
    return [scores_by_doc(docs, flat) for flat in evaluator.evaluate(list(sets))]


def label_rows(docs: Sequence[MCDoc], per_set: Sequence[Sequence[DocScores]]) -> dict[str, list]:
    """Column-wise rows (one per document) from :func:`score_sets`' output."""
    columns: dict[str, list] = {name: [] for name in _features()}
    for i, doc in enumerate(docs):
        choices = per_set[0][i].choices
        columns["task"].append(doc.task)
        columns["doc_id"].append(doc.doc_id)
        columns["router_text"].append(doc.router_text)
        columns["gold"].append(doc.gold)
        columns["choice_tokens"].append([c.n_tokens for c in choices])
        columns["choice_chars"].append(list(per_set[0][i].choice_chars))
        columns["choice_logprob"].append([[c.logprob for c in s[i].choices] for s in per_set])
        columns["label"].append([s[i].choices[doc.gold].mean_logprob for s in per_set])
    return columns


# --- shards, checkpoints and the final artifact ----------------------------------------------------------


def _write_parquet(columns: dict[str, list], path: Path) -> None:
    import datasets

    with atomic_output(path) as tmp:
        datasets.Dataset.from_dict(columns, features=_features()).to_parquet(str(tmp))


def _read_parquet(path: Path):
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path), features=_features(), keep_in_memory=True)
    except Exception as error:  # pyarrow raises several types for truncated or foreign files
        raise ConfigError(f"{path} is not a readable label file ({type(error).__name__}: {error})") from None


def _check_run_identity(run_dir: Path, identity: dict) -> None:
    claim_identity(run_dir / SHARD_IDENTITY, identity, f"{run_dir} holds shards of another labelling job",
                   "refusing to resume. Delete it or pick another --run-dir")


def _shards(docs: list[MCDoc], size: int) -> list[list[MCDoc]]:
    return [docs[i:i + size] for i in range(0, len(docs), size)]


def set_key(blocks: OmissionSet) -> str:
    """A file-name-safe name of one omission set: ``dense`` or the blocks joined by ``-``."""
    return "-".join(map(str, blocks)) or "dense"


def _shard_dir(run_dir: Path, index: int) -> Path:
    return run_dir / f"shard-{index:05d}"


def _set_file(run_dir: Path, index: int, blocks: OmissionSet) -> Path:
    return _shard_dir(run_dir, index) / f"set-{set_key(blocks)}.parquet"


def collect_docs(config: LabelConfig) -> list[MCDoc]:
    """The documents to label, task by task in the given order; ConfigError if a task has none."""
    docs = []
    for task in config.tasks:
        found = load_docs(task, config.split, limit=config.samples)
        if not found:
            raise ConfigError(f"task {task} has no {config.split} documents")
        docs.extend(found)
    return docs


def run_identity(config: LabelConfig, fingerprint: dict, docs: list[MCDoc]) -> dict:
    """What decides every shard's content: the model, the documents, how they are cut and scored.

    The sets are not in it: each set's scores are a file of their own, so a later pool that shares sets
    with this one scores only the sets that are new.
    """
    # The quantization adds keys only when there is one: fp32 shards written before it existed still match.
    return {"format": LABELS_FORMAT, "model": fingerprint, "docs": [d.doc_id for d in docs],
            **{k: v for k, v in asdict(config).items() if k in ("split", "max_length", "shard_size")},
            **quantize_identity(config.quantize, config.quantize_head, config.quantize_skip)}


@locks_output("run_dir", "out")
def build_labels(config: LabelConfig, *, model=None, tokenizer=None,
                 on_shard: Callable[[int], None] | None = None) -> Path:
    """Label every document under every pool set; resumable. Returns the output folder.

    ``on_shard(i)`` is called after shard ``i`` is saved (tests use it to simulate a crash).
    """
    pool = CandidatePool.from_pretrained(config.pool)
    docs = collect_docs(config)
    replica = ModelReplica(config.model or pool.model["spec"], config.max_batch_tokens, config.max_length,
                           config.quantize, config.quantize_head, config.quantize_skip)
    executor = start_executor(config.executor, replica, config.ray_settings, model=model, tokenizer=tokenizer)
    pool.check_model(executor.model_config())
    run_dir = Path(config.run_dir)
    identity = run_identity(config, pool.model["fingerprint"], docs)
    _check_run_identity(run_dir, identity)
    shards = _shards(docs, config.shard_size)
    sets = list(dict.fromkeys(entry.blocks for entry in pool.sets))
    missing = {i: [b for b in sets if not _set_file(run_dir, i, b).exists()] for i in range(len(shards))}
    missing = {i: todo for i, todo in missing.items() if todo}
    with tqdm(total=len(docs) * len(sets), unit="doc-set", desc="labels", disable=not config.progress) as bar:
        bar.update(len(docs) * len(sets) - sum(len(shards[i]) * len(todo) for i, todo in missing.items()))
        for i, todo, columns in _scored_shards(executor, config.reuse_prefix, shards, missing):
            _save_shard(run_dir, i, todo, columns)
            if on_shard:
                on_shard(i)
            bar.update(len(shards[i]) * len(todo))
    return _finish(config, pool, run_dir, len(shards), identity)


DOC_COLUMNS = ("task", "doc_id", "router_text", "gold", "choice_tokens", "choice_chars")
SET_COLUMNS = ("choice_logprob", "label")


def _save_shard(run_dir: Path, index: int, sets: list[OmissionSet], columns: dict[str, list]) -> None:
    """One file per set (its scores, with the doc ids to check the join), and the documents' own columns once."""
    import datasets

    folder = _shard_dir(run_dir, index)
    if not (folder / "docs.parquet").exists():
        _write_table({name: columns[name] for name in DOC_COLUMNS}, folder / "docs.parquet")
    for j, blocks in enumerate(sets):
        per_set = {"doc_id": columns["doc_id"], "choice_logprob": [row[j] for row in columns["choice_logprob"]],
                   "label": [row[j] for row in columns["label"]]}
        _write_table(per_set, _set_file(run_dir, index, blocks), datasets.Features({
            "doc_id": datasets.Value("string"),
            "choice_logprob": datasets.Sequence(datasets.Value("float64")),
            "label": datasets.Value("float64")}))


def _write_table(columns: dict[str, list], path: Path, features=None) -> None:
    import datasets

    features = features or datasets.Features({name: _features()[name] for name in columns})
    with atomic_output(path) as tmp:
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(tmp))


def _read_table(path: Path) -> dict[str, list]:
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_dict()
    except Exception as error:  # pyarrow raises several types for truncated or foreign files
        raise ConfigError(f"{path} is not a readable label shard ({type(error).__name__}: {error}); delete it "
                          "to score it again") from None


def _scored_shards(executor: Executor, reuse_prefix: bool, shards, missing: dict[int, list[OmissionSet]]):
    """Yield (shard index, sets, label columns) for every shard with sets still to score, as the executor finishes
    them (the local one in shard order). Each shard's files are its own, so the order changes no result."""
    order = list(missing)
    jobs = [(shards[i], missing[i], reuse_prefix) for i in order]
    for j, columns in executor.map(label_shard, jobs):
        yield order[j], missing[order[j]], columns


def label_shard(scorer: LikelihoodScorer, docs: Sequence[MCDoc], sets: Sequence[OmissionSet],
                reuse_prefix: bool) -> dict[str, list]:
    """One shard's label columns under ``sets``; what a Ray actor runs for each shard it is sent."""
    return label_rows(docs, score_sets(scorer, docs, sets, reuse_prefix))


def _merged_shard(run_dir: Path, index: int, sets: list[OmissionSet]) -> dict[str, list]:
    columns = _read_table(_shard_dir(run_dir, index) / "docs.parquet")
    per_set = [_read_table(_set_file(run_dir, index, blocks)) for blocks in sets]
    for blocks, scores in zip(sets, per_set):
        if scores["doc_id"] != columns["doc_id"]:
            raise ConfigError(f"{_set_file(run_dir, index, blocks)} holds other documents than its shard")
    columns["choice_logprob"] = [list(row) for row in zip(*(s["choice_logprob"] for s in per_set))]
    columns["label"] = [list(row) for row in zip(*(s["label"] for s in per_set))]
    return columns


def _finish(config: LabelConfig, pool: CandidatePool, run_dir: Path, n_shards: int, identity: dict) -> Path:
    out = Path(config.out)
    sets = [entry.blocks for entry in pool.sets]
    merged: dict[str, list] = {name: [] for name in _features()}
    for index in range(n_shards):
        for name, values in _merged_shard(run_dir, index, sets).items():
            merged[name].extend(values)
    _write_parquet(merged, out / LABELS_FILE)
    atomic_write_json(out / META_FILE, {
        "format": LABELS_FORMAT, "pool": pool.fingerprint(), "sets": [list(b) for b in sets],
        "set_names": [e.name for e in pool.sets], "n_docs": len(merged["doc_id"]),
        "tasks": {t: merged["task"].count(t) for t in config.tasks},
        "identity": identity,
        "config": asdict(config), "provenance": provenance()})
    return out


def labels_identity(meta: dict) -> dict | None:
    """What decided a label artifact's scores, for reuse checks: model, documents, split and max_length (the
    shard size only cuts the work). None for artifacts written before labels recorded it."""
    recorded = meta.get("identity")
    return {k: v for k, v in recorded.items() if k != "shard_size"} if recorded else None


@dataclass(frozen=True)
class Labels:
    """A loaded label artifact: the per-document table and its metadata."""

    table: Any  # datasets.Dataset
    meta: dict

    @staticmethod
    def read_meta(directory: str | Path) -> dict:
        """The artifact's metadata alone (its identity and sets), for reuse checks that need no table."""
        folder = Path(directory)
        meta_path = folder / META_FILE
        meta = read_json(meta_path, f"no label artifact at {folder} (missing {META_FILE})")
        if meta.get("format") not in (LABELS_FORMAT, *LEGACY_LABELS_FORMATS):
            raise ConfigError(f"{meta_path} has format {meta.get('format')!r}, expected {LABELS_FORMAT!r}")
        return meta

    @classmethod
    def load(cls, directory: str | Path) -> Labels:
        folder = Path(directory)
        meta = cls.read_meta(folder)
        table = _read_parquet(folder / LABELS_FILE)
        if meta["format"] in LEGACY_LABELS_FORMATS:
            table = table.map(lambda row: {"choice_chars": [n - len(TARGET_DELIMITER) for n in row["choice_chars"]]},
                              features=_features(), keep_in_memory=True)
        if len(table) != meta.get("n_docs"):
            raise ConfigError(f"{folder / LABELS_FILE} has {len(table)} rows, {META_FILE} says {meta.get('n_docs')}")
        return cls(table, meta)

    def check_pool(self, pool: CandidatePool) -> None:
        """ConfigError unless these labels were computed for ``pool`` (same sets, same model)."""
        if self.meta.get("pool") != pool.fingerprint():
            raise ConfigError("these labels were computed for another candidate pool "
                              f"(sets {self.meta.get('sets')}); relabel with `pudding label` for this pool")

    def for_pool(self, pool: CandidatePool) -> Labels:
        """These labels restricted to ``pool``'s sets, in its order: a pool of some of the labelled sets
        (the paper's pool out of pool + baselines, say) needs no new scoring. ConfigError if a set was never
        labelled or the labels are of another model."""
        if self.meta.get("pool") == pool.fingerprint():
            return self
        model = self.meta.get("identity", {}).get("model")
        if model != pool.model.get("fingerprint"):
            raise ConfigError("these labels were computed for another model or candidate pool "
                              f"(sets {self.meta.get('sets')}); relabel with `pudding label` for this pool")
        index = {tuple(blocks): i for i, blocks in enumerate(self.meta["sets"])}
        unlabelled = [list(e.blocks) for e in pool.sets if e.blocks not in index]
        if unlabelled:
            raise ConfigError(f"sets {unlabelled} were not labelled; label them with `pudding label` for this pool")
        columns = [index[e.blocks] for e in pool.sets]
        table = self.table.map(lambda row: {name: [row[name][c] for c in columns] for name in SET_COLUMNS},
                               features=_features(), keep_in_memory=True)
        meta = {**self.meta, "pool": pool.fingerprint(), "sets": [list(e.blocks) for e in pool.sets],
                "set_names": [e.name for e in pool.sets], "restricted_from": self.meta.get("pool")}
        return Labels(table, meta)

    @property
    def identity(self) -> dict | None:
        return labels_identity(self.meta)

    @property
    def n_sets(self) -> int:
        return len(self.meta["sets"])
