"""The seed paper's quantization table on our model: dense, SLEB and PuDDing at fp32 and int8, same documents.

The paper quotes PuDDing with AWQ weights next to PuDDing in bf16 (docs/QUANTIZATION.md). Here the question is
the same: do the omission sets and the router, all built at fp32, keep their accuracy when the LLM that runs
them is quantized? Nothing is re-searched or re-trained; only the LLM's precision changes.

Inputs are a finished reproduction's saved evaluation scores (``<out>/scores/paper-tasks``, every document
under every scoring-pool set at fp32) and a PuDDing artifact whose router picks each document's set:

- the fp32 cells are read from the saved scores, so they equal the reproduction's own table (the run checks
  that its documents and sets are the table's);
- the int8 cells come from scoring the same documents again on the quantized model, each under the sets its
  rows need (dense, SLEB, and its routed set; the dense prefix is shared between them), in checkpointed
  shards under ``--run-dir`` that a rerun resumes;
- fidelity (int8 against fp32, per document and row): mean and largest absolute difference of a choice's
  summed log-likelihood, and how often the chosen answer is the same;
- paired per-document differences with 95% intervals: each row at int8 minus itself at fp32, and PuDDing
  minus each static row at each precision.

    .venv/bin/python benchmarks/quantized_table.py --scores results/smollm2/medium-choice-prob/k6/scores/paper-tasks \\
        --quantize int8-smooth --run-dir /work/runs/quantized-table --out results/smollm2/quantized-k6
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from pudding.core.errors import ConfigError
from pudding.core.identity import claim_identity
from pudding.core.metrics import choice_scores, first_argmax
from pudding.core.provenance import atomic_write_json, atomic_write_text, provenance, read_json
from pudding.core.quantize import QUANTIZATIONS, weight_bytes
from pudding.core.tasks import get_task, load_docs
from pudding.evaluation.tables import mean_stderr, paired_differences
from pudding.pool.artifact import DEFAULT_ARTIFACT
from pudding.pool.executor import ModelReplica
from pudding.routing.labels import Labels, score_sets
from pudding.routing.model import PuddingModel

STATIC_ROWS = {"dense": ("dense",), "SLEB": ("sleb-ppl", "sleb")}  # row -> accepted scoring-pool set names


@dataclass
class Documents:
    """The saved fp32 evaluation scores, one entry per document in the table's order."""

    tasks: list[str]
    doc_ids: list[str]
    texts: list[str]
    golds: list[int]
    chars: list[list[int]]
    fp32: list[list[list[float]]]  # document -> scoring-pool set -> choice log-likelihoods
    sets: list[tuple[int, ...]]
    set_names: list[str]
    meta: dict

    @classmethod
    def load(cls, folder: str | Path) -> Documents:
        labels = Labels.load(folder)
        table = labels.table
        return cls(list(table["task"]), list(table["doc_id"]), list(table["router_text"]), list(table["gold"]),
                   [list(c) for c in table["choice_chars"]], [[list(s) for s in d] for d in table["choice_logprob"]],
                   [tuple(s) for s in labels.meta["sets"]], list(labels.meta["set_names"]), labels.meta)

    def column(self, names: tuple[str, ...]) -> int:
        for name in names:
            if name in self.set_names:
                return self.set_names.index(name)
        raise ConfigError(f"the scores hold no set named {' or '.join(names)} (they hold {self.set_names})")


def answer(logprobs: list[float], chars: list[int], task: str) -> int:
    """The choice the task's lm-eval metric picks (acc or acc_norm, the first on ties)."""
    return first_argmax(choice_scores(logprobs, chars, get_task(task).metric))


def row_columns(docs: Documents, routes: list[tuple[int, ...]]) -> dict[str, list[int]]:
    """Per row, each document's scoring-pool column: the static rows' one set, PuDDing's routed set."""
    columns = {row: [docs.column(names)] * len(docs.tasks) for row, names in STATIC_ROWS.items()}
    index = {blocks: i for i, blocks in enumerate(docs.sets)}
    unknown = sorted({r for r in routes if r not in index})
    if unknown:
        raise ConfigError(f"the router picks sets the saved scores do not hold: {[list(r) for r in unknown]}; "
                          "use the scores of the reproduction whose pool this artifact routes over")
    columns["PuDDing"] = [index[r] for r in routes]
    return columns


def shards(columns: dict[str, list[int]], size: int) -> list[tuple[list[int], list[int]]]:
    """(document indices, scoring-pool columns) per shard: documents that need the same columns, ``size`` at a
    time, so each shard is one prefix-sharing pass over its few sets."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in range(len(next(iter(columns.values())))):
        needed = tuple(sorted({c[i] for c in columns.values()}))
        groups.setdefault(needed, []).append(i)
    return [(members[s:s + size], list(needed)) for needed, members in sorted(groups.items())
            for s in range(0, len(members), size)]


def score_quantized(docs: Documents, plan: list[tuple[list[int], list[int]]], replica: ModelReplica,
                    run_dir: Path, identity: dict, progress: bool) -> tuple[dict, int]:
    """{(document index, column): choice log-likelihoods} on the quantized model, resuming finished shards;
    also the model's resident weight bytes."""
    claim_identity(run_dir / "identity.json", identity, f"{run_dir} holds shards of another run",
                   "use another --run-dir")
    scorer = replica.scorer()
    by_id = {}
    for task in dict.fromkeys(docs.tasks):
        by_id.update({(task, d.doc_id): d for d in load_docs(task, "evaluation", limit=docs.meta["tasks"][task])})
    absent = sorted({docs.doc_ids[i] for members, _ in plan for i in members} - {d for _, d in by_id})
    if absent:
        raise ConfigError(f"{len(absent)} scored documents are not in this machine's evaluation split "
                          f"(first: {absent[0]}); the scores were made from other data")
    out = {}
    for n, (members, needed) in enumerate(tqdm(plan, desc="int8 shards", disable=not progress)):
        path = run_dir / f"shard-{n:05d}.json"
        if not path.exists():
            mc_docs = [by_id[(docs.tasks[i], docs.doc_ids[i])] for i in members]
            per_set = score_sets(scorer, mc_docs, [docs.sets[c] for c in needed])
            atomic_write_json(path, {"documents": [docs.doc_ids[i] for i in members], "columns": needed,
                                     "logprobs": [[[c.logprob for c in d.choices] for d in s] for s in per_set]})
        saved = read_json(path, f"{path} is missing")
        if saved["documents"] != [docs.doc_ids[i] for i in members] or saved["columns"] != needed:
            raise ConfigError(f"{path} holds other documents or sets than this run's shard {n}; delete it")
        for c, per_doc in zip(needed, saved["logprobs"]):
            out.update({(i, c): lp for i, lp in zip(members, per_doc)})
    return out, weight_bytes(scorer.model)


def correctness(docs: Documents, column: list[int], logprobs) -> list[float]:
    """Per document, 1.0 if the row's set answers it, from ``logprobs(i, c)``."""
    return [float(answer(logprobs(i, c), docs.chars[i], docs.tasks[i]) == docs.golds[i])
            for i, c in enumerate(column)]


def fidelity(docs: Documents, column: list[int], quantized: dict) -> dict:
    """How far the quantized scores are from fp32 under one row's sets: |dLL| per choice, answer agreement."""
    diffs = [abs(a - b) for i, c in enumerate(column) for a, b in zip(docs.fp32[i][c], quantized[(i, c)])]
    agree = [answer(docs.fp32[i][c], docs.chars[i], docs.tasks[i]) == answer(quantized[(i, c)], docs.chars[i],
                                                                            docs.tasks[i])
             for i, c in enumerate(column)]
    return {"mean_abs_ll_diff": statistics.fmean(diffs), "max_abs_ll_diff": max(diffs),
            "answer_agreement": sum(agree) / len(agree), "documents": len(agree)}


def table(docs: Documents, cells: dict[str, list[float]]) -> dict:
    """Per row: each task's accuracy with its standard error, and their mean (every task weighs the same)."""
    tasks = list(dict.fromkeys(docs.tasks))
    rows = {}
    for name, values in cells.items():
        per_task = {t: mean_stderr([v for v, task in zip(values, docs.tasks) if task == t]) for t in tasks}
        rows[name] = {"tasks": per_task, "average": statistics.fmean(c["value"] for c in per_task.values())}
    return rows


def measure(docs: Documents, routes: list[tuple[int, ...]], replica: ModelReplica, run_dir: Path,
            shard_size: int = 16, progress: bool = True) -> dict:
    """The table: each row at fp32 (saved scores) and quantized (``replica``), fidelity, paired differences."""
    columns = row_columns(docs, routes)
    replica_settings = {"quantize": replica.quantize, "quantize_head": replica.quantize_head,
                        "quantize_skip": list(replica.quantize_skip), "max_batch_tokens": replica.max_batch_tokens,
                        "max_length": replica.max_length}
    identity = {"scores": docs.meta["pool"], "documents": docs.doc_ids, "routes": [list(r) for r in routes],
                "model": (docs.meta.get("identity") or {}).get("model"), "replica": replica_settings,
                "shard_size": shard_size}
    start = time.perf_counter()
    quantized, resident = score_quantized(docs, shards(columns, shard_size), replica, run_dir, identity, progress)
    label = replica.quantize + (f" (fp32 {','.join(replica.quantize_skip)})" if replica.quantize_skip else "")
    cells = {}
    for row, column in columns.items():
        cells[f"{row} fp32"] = correctness(docs, column, lambda i, c: docs.fp32[i][c])
        cells[f"{row} {label}"] = correctness(docs, column, lambda i, c: quantized[(i, c)])
    differences = {f"{row} {label}": paired_differences(cells, f"{row} {label}", [f"{row} fp32"])
                   for row in columns}
    for precision in ("fp32", label):
        ours = f"PuDDing {precision}"
        differences.setdefault(ours, {}).update(paired_differences(cells, ours, [f"{r} {precision}"
                                                                                for r in STATIC_ROWS]))
    return {"precision": label, "rows": table(docs, cells), "paired_differences": differences,
            "fidelity": {row: fidelity(docs, column, quantized) for row, column in columns.items()},
            "routed_sets": {" ".join(map(str, docs.sets[c])) or "dense": columns["PuDDing"].count(c)
                            for c in sorted(set(columns["PuDDing"]))},
            "resident_weight_bytes": resident, "seconds": time.perf_counter() - start}


def render(result: dict) -> str:
    tasks = list(next(iter(result["rows"].values()))["tasks"])
    lines = ["| row | average | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for name, row in result["rows"].items():
        cells = " | ".join(f"{row['tasks'][t]['value']:.3f} ± {row['tasks'][t]['stderr']:.3f}" for t in tasks)
        lines.append(f"| {name} | {row['average']:.3f} | {cells} |")
    lines += ["", "| paired difference | mean | 95% interval | documents |", "|---|---|---|---|"]
    for ours, against in result["paired_differences"].items():
        for other, d in against.items():
            lines.append(f"| {ours} - {other} | {d['difference']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] "
                         f"| {d['n']} |")
    lines += ["", f"| fidelity of {result['precision']} against fp32 | mean abs. LL diff (nats) | max | "
              "answer agreement |", "|---|---|---|---|"]
    for row, f in result["fidelity"].items():
        lines.append(f"| {row} | {f['mean_abs_ll_diff']:.3f} | {f['max_abs_ll_diff']:.2f} | "
                     f"{f['answer_agreement']:.3f} ({f['documents']} documents) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scores", required=True, help="a reproduction's scores/paper-tasks folder (fp32)")
    parser.add_argument("--artifact", default=str(DEFAULT_ARTIFACT), help="the PuDDing artifact that routes")
    parser.add_argument("--model", default="default")
    parser.add_argument("--quantize", default="int8-smooth", choices=[q for q in QUANTIZATIONS if q != "none"])
    parser.add_argument("--quantize-skip", default="", help="comma-separated layer suffixes kept fp32")
    parser.add_argument("--run-dir", required=True, help="checkpointed int8 shards; a rerun resumes")
    parser.add_argument("--out", required=True, help="folder for quantized-table.json and .md")
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    docs = Documents.load(args.scores)
    config = docs.meta.get("config") if isinstance(docs.meta.get("config"), dict) else {}
    pudding = PuddingModel.from_pretrained(args.artifact, router_only=True, adapters="none")
    routes = [tuple(r.blocks) for r in pudding.route(docs.texts)]
    skip = tuple(s.strip() for s in args.quantize_skip.split(",") if s.strip())
    replica = ModelReplica(args.model, config.get("max_batch_tokens", 512), config.get("max_length", 256),
                           args.quantize, False, skip)
    result = measure(docs, routes, replica, Path(args.run_dir), args.shard_size, not args.no_progress)
    result = {"config": {**vars(args), "scores_config": config}, "provenance": provenance(), **result}
    out = Path(args.out)
    atomic_write_json(out / "quantized-table.json", result)
    text = render(result)
    atomic_write_text(out / "quantized-table.md", text)
    print(text)


if __name__ == "__main__":
    main()
