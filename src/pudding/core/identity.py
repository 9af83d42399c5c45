"""One identity per artifact, one reuse rule.

Every artifact pudding resumes or reuses (a search checkpoint, a label run's shards, a pool, a score file, a
router, a healing checkpoint) records its *identity*: a JSON dict of everything that decided its content
(the model's fingerprint, the documents, the settings). An artifact is resumed or reused only when its
recorded identity equals the wanted one exactly; otherwise the fields that differ are named.

Two policies follow from where the artifact lies:

- **in the folder a run writes to** (its checkpoint, its ``--run-dir``, its ``--out``): a mismatch is refused
  (:func:`require_identity`), because going on would mix or overwrite another configuration's work;
- **anywhere else** (earlier results named by ``--reuse``): a mismatch is skipped, and the artifact is built
  anew into the run's own folder (:func:`find_reusable`).

This module only compares; what goes into each identity is defined next to the artifact that records it,
and the recorded content is never rewritten here (artifacts written by older versions must keep matching).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.provenance import atomic_write_json, read_json


def identity_differences(recorded: dict | None, wanted: dict) -> list[str]:
    """The top-level fields in which ``recorded`` differs from ``wanted``, sorted; ``[]`` on an exact match.

    A field present on one side only differs. ``recorded=None`` (an artifact written before it recorded an
    identity) differs in ``identity``.

    >>> identity_differences({"model": "a", "samples": 16}, {"model": "a", "samples": 128})
    ['samples']
    """
    if recorded is None:
        return ["identity (written before this artifact recorded one)"]
    return sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))


def require_identity(recorded: dict | None, wanted: dict, holder: str, remedy: str) -> None:
    """Refuse to resume into an artifact made for another configuration.

    Raises ConfigError ``"<holder> (differs in: <fields>); <remedy>"`` unless the identities are equal;
    ``holder`` names the artifact (``"checkpoint x.json was written for another model or configuration"``),
    ``remedy`` what the user can do.
    """
    refuse_differences(identity_differences(recorded, wanted), holder, remedy)


def refuse_differences(differing: list[str], holder: str, remedy: str) -> None:
    """ConfigError ``"<holder> (differs in: <fields>); <remedy>"`` if any field differs: the one refusal."""
    if differing:
        raise ConfigError(f"{holder} (differs in: {', '.join(differing)}); {remedy}")


def claim_identity(path: str | Path, wanted: dict, holder: str, remedy: str) -> None:
    """Make the identity file ``path`` say ``wanted``: write it if absent, else :func:`require_identity`.

    For a folder filled over several invocations (a label run's shards): the first one claims it, and
    every later one must be the same job.
    """
    path = Path(path)
    if path.exists():
        require_identity(read_json(path, f"{path} vanished"), wanted, holder, remedy)
    else:
        atomic_write_json(path, wanted)


def find_reusable(own: Path, elsewhere: Iterable[Path], differences: Callable[[Path], list[str]], what: str
                  ) -> Path | None:
    """The one reuse rule: the folder holding an artifact made for exactly what is wanted, or None.

    ``differences(folder)`` lists what differs between the artifact in ``folder`` and the wanted one (built
    from :func:`identity_differences`, plus what an identity cannot say, e.g. that a pool searched at a
    larger k holds every smaller one). The run's own folder ``own`` comes first: a mismatch there is
    refused, naming the differing fields, because building would overwrite it. The ``elsewhere`` folders
    (nearest first) are reused on an exact match and skipped otherwise; so is one that cannot be read.
    """
    if own.exists():
        refuse_differences(differences(own), f"{own} holds a {what} made for another configuration",
                           "delete it or choose another --out")
        return own
    for path in elsewhere:
        if path.resolve() != own.resolve():
            try:
                if not differences(path):
                    return path
            except ConfigError:  # unreadable or foreign: not reusable, and not ours to refuse
                continue
    return None


@dataclass
class StepCheckpoint:
    """A greedy search's progress in one JSON file: its identity, a few fixed ``fields`` (the search's base
    loss, say) and the steps done so far, rewritten atomically after every step.

    :meth:`load` refuses a file of another format, a corrupt one, or one written for another identity; each
    step is read back by ``read_step`` and written with :func:`dataclasses.asdict`. The layout on disk is
    ``{"format", "identity", **fields, "steps"}``, the one every search checkpoint has always had.
    """

    path: Path | None
    identity: dict
    format: str
    what: str  # the kind of checkpoint, for messages ("search", "FinerCut")
    read_step: Callable[[dict], Any]
    fields: dict[str, Any] = field(default_factory=dict)
    steps: list = field(default_factory=list)

    def load(self) -> None:
        """Replace ``fields`` and ``steps`` with the file's, if there is one; ConfigError as above."""
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != self.format:
                raise ValueError(f"format {data.get('format')!r}")
            saved_identity = data["identity"]
            fields = {name: data[name] for name in self.fields}
            steps = [self.read_step(step) for step in data["steps"]]
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"checkpoint {self.path} is corrupt or not a {self.what} checkpoint ({error}); "
                              "delete it to start over") from None
        require_identity(saved_identity, self.identity,
                         f"checkpoint {self.path} was written for another model or configuration",
                         "refusing to resume. Delete it or choose another run directory")
        self.fields, self.steps = fields, steps

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"format": self.format, "identity": self.identity, **self.fields,
                                          "steps": [asdict(step) for step in self.steps]})
