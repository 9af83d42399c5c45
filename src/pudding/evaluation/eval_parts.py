"""Resume an interrupted ``pudding eval``: every finished part of the run is saved as it ends.

A part is one task of one static row, or one set's documents in the routed row. Scoring 2,400 documents under a
few rows takes hours on a CPU, and without parts an interruption would lose all of it. The parts live in
``<output_dir>/.eval-parts/<identity>/`` as JSON (no pickle), written atomically. A rerun whose identity matches
reuses them. The identity covers the configuration, the model's fingerprint, the documents, and the contents
of the adapter and router files. A run with other settings gets a folder of its own, so it never mixes in
another run's scores. Once the result JSON is written, the folder is removed.

A part records each choice's full score (:class:`pudding.core.score.ChoiceScore`), so a resumed run's result
equals an uninterrupted one's. Only the seconds of the reused parts are those of the earlier process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from pudding.core.load import model_fingerprint
from pudding.core.metrics import DocScores
from pudding.core.provenance import atomic_write_json
from pudding.core.score import ChoiceScore

PARTS_DIR = ".eval-parts"
PART_FORMAT = "pudding.eval-part/1"
# what can change a run's results (EvalConfig fields); output_dir, progress and save_samples cannot
_RESULT_FIELDS_EXCLUDED = ("output_dir", "progress", "save_samples")

log = logging.getLogger(__name__)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def content_stamp(spec: str | None) -> str | None:
    """A hash of the files at ``spec`` (a file or a folder, recursively, by content; hidden files left out), or
    ``spec`` itself when it is not a local path (a hub id, ``default``). Content, not modification times, so a
    fresh clone still matches."""
    if spec is None or not Path(spec).exists():
        return spec
    root = Path(spec)
    # hidden files are locks and temporary files, not content
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(root).parts))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def run_identity(config, model, docs: dict[str, list]) -> dict[str, Any]:
    """What decides an evaluation's scores: ``config`` (an :class:`EvalConfig`) without its output settings, the
    model's fingerprint, every task's document ids and golds, and the adapter and router files' contents."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESULT_FIELDS_EXCLUDED}
    documents = {task: _sha(json.dumps([[d.doc_id, d.gold] for d in task_docs]).encode())
                 for task, task_docs in docs.items()}
    identity = {"config": settings, "model": model_fingerprint(model.config), "documents": documents,
                "files": {"adapter": content_stamp(config.adapter), "routed": content_stamp(config.routed)}}
    return json.loads(json.dumps(identity))  # as it reads back from a part: tuples become lists


def _doc_to_json(doc: DocScores) -> dict:
    return {"doc_id": doc.doc_id, "gold": doc.gold, "choice_chars": list(doc.choice_chars),
            "choices": [dataclasses.asdict(c) for c in doc.choices]}


def _doc_from_json(data: dict) -> DocScores:
    return DocScores(data["doc_id"], data["gold"], tuple(ChoiceScore(**c) for c in data["choices"]),
                     tuple(data["choice_chars"]))


class EvalParts:
    """The saved parts of one evaluation run; inert (nothing read or written) without an output folder."""

    def __init__(self, output_dir: str | Path | None, identity: dict[str, Any]):
        self.identity = identity
        self.folder = None if output_dir is None else Path(output_dir) / PARTS_DIR / _sha(
            json.dumps(identity, sort_keys=True).encode())
        self.reused: list[str] = []

    def load(self, name: str, doc_ids: list[str]) -> tuple[list[DocScores], float | None] | None:
        """Part ``name``'s scores and seconds, if it was saved by a run of the same identity for the same
        documents (``doc_ids``, in order); None otherwise. An unreadable part is scored again, not trusted."""
        if self.folder is None or not (path := self.folder / f"{name}.json").exists():
            return None
        try:
            data = json.loads(path.read_text())
            scored = [_doc_from_json(d) for d in data["docs"]]
            fits = (data.get("format") == PART_FORMAT and data.get("identity") == self.identity
                    and [d.doc_id for d in scored] == doc_ids)
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("eval part %s is unreadable (%s); scoring it again", path, error)
            return None
        if not fits:
            log.warning("eval part %s belongs to another run; scoring it again", path)
            return None
        self.reused.append(name)
        return scored, data.get("seconds")

    def save(self, name: str, scored: list[DocScores], seconds: float | None) -> None:
        if self.folder is not None:
            atomic_write_json(self.folder / f"{name}.json", {"format": PART_FORMAT, "identity": self.identity,
                                                             "seconds": seconds,
                                                             "docs": [_doc_to_json(d) for d in scored]})

    def finish(self) -> None:
        """Remove the parts (the result JSON now holds everything), and the parts folder if no other run's
        parts are left in it."""
        if self.folder is None or not self.folder.exists():
            return
        shutil.rmtree(self.folder)
        try:
            self.folder.parent.rmdir()
        except OSError:  # another run's parts are still there
            pass
