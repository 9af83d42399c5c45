"""The candidate pool: the artifact every stage after pruning shares.

A :class:`CandidatePool` is the list of omission sets a router chooses among, each with the searches (or
static methods) that found it. Searches and baselines write one; labels, routers, healing, serving and
evaluation read it. It lives below those stages so that none of them has to import the search to use it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pudding.core.errors import ConfigError
from pudding.core.load import load_config, model_fingerprint
from pudding.core.omit import OmissionSet, parse_omission, removable_blocks, validate_omission
from pudding.core.provenance import atomic_write_json, provenance

POOL_FILE = "pool.json"
POOL_FORMAT = "pudding.pool/1"
SUBLAYER_POOL_FORMAT = "pudding.pool/2"
"""A pool with a set that names sub-layers ("12.attn"); readers of /1 expect block indices only, so such a
pool is written as /2 and a whole-block pool stays /1, byte for byte what it always was."""
CONFIG_FILE = "pudding.json"  # a routed artifact's config, beside its pool.json
SHIPPED = Path(__file__).parents[1] / "artifacts"
# Artifacts shipped inside the package for the embedded SmolLM2, by the name a user gives instead of a folder.
# "default" stays the k=6 one that earlier releases loaded; "default-k3" is the k at which routing beats the
# static baselines on this model (README, "At k=3 of 30"); "default-adaptive" routes over a depth ladder
# (dense, k=3, k=6), so a request's tolerance chooses how many blocks to skip (docs/ADAPTIVE.md).
SHIPPED_ARTIFACTS = {"default": SHIPPED / "smollm2-135m-k6", "default-k3": SHIPPED / "smollm2-135m-k3",
                     "default-adaptive": SHIPPED / "smollm2-135m-ladder"}
DEFAULT_ARTIFACT = SHIPPED_ARTIFACTS["default"]


def artifact_folder(spec: str | Path) -> Path:
    """The folder of an artifact given by folder or by a shipped artifact's name (:data:`SHIPPED_ARTIFACTS`)."""
    return SHIPPED_ARTIFACTS.get(str(spec), Path(spec))


def is_shipped(spec: str | Path) -> bool:
    return str(spec) in SHIPPED_ARTIFACTS


@dataclass(frozen=True)
class SetSource:
    """Where one candidate set came from, and what finding it cost."""

    method: str  # "greedy" or a one-shot method of pudding.pruning.baselines
    task: str | None
    objective: str | None
    removal_order: list[int] | list[str]  # sub-layer searches remove "12.attn"-style items
    trajectory: list[float]  # loss before and after each removal (greedy) or block importances (one-shot)
    sample_ids: list[str]
    seconds: float


@dataclass(frozen=True)
class PoolEntry:
    """A distinct omission set and every search that found it."""

    blocks: OmissionSet
    sources: tuple[SetSource, ...]
    # A depth ladder holds the same search at several k: its names carry the k ("arc_easy-tl-k3") to stay distinct.
    depth_in_name: bool = field(default=False, compare=False)

    @property
    def name(self) -> str:
        source = self.sources[0]
        name = "-".join(p for p in (source.method if source.method != "greedy" else None, source.task,
                                    source.objective) if p)
        return f"{name}-k{self.k}" if self.depth_in_name and self.blocks else name

    @property
    def k(self) -> int | float:
        """Blocks this set skips (its depth in a ladder); a sub-layer counts as half a block."""
        sublayers = sum(isinstance(i, str) for i in self.blocks)
        return len(self.blocks) - sublayers + sublayers / 2 if sublayers else len(self.blocks)

    @property
    def has_sublayers(self) -> bool:
        return any(isinstance(i, str) for i in self.blocks)


@dataclass(frozen=True)
class CandidatePool:
    """Omission sets for one model, with the model's fingerprint so mismatched models can be refused."""

    sets: tuple[PoolEntry, ...]
    model: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``directory/pool.json`` atomically and return its path."""
        data = {"format": SUBLAYER_POOL_FORMAT if self.has_sublayers else POOL_FORMAT, "model": self.model,
                "config": self.config, "provenance": self.provenance,
                "sets": [{"blocks": list(e.blocks), "name": e.name, "sources": [asdict(s) for s in e.sources]}
                         for e in self.sets]}
        return atomic_write_json(Path(directory) / POOL_FILE, data)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CandidatePool:
        """Load a pool folder (or its pool.json); unknown keys are dropped with a warning."""
        path = Path(directory)
        path = path / POOL_FILE if path.is_dir() else path
        try:
            data = json.loads(path.read_text())
            if data.get("format") not in (POOL_FORMAT, SUBLAYER_POOL_FORMAT):
                raise ValueError(f"format is {data.get('format')!r}, expected {POOL_FORMAT!r} or "
                                 f"{SUBLAYER_POOL_FORMAT!r}")
            model = data["model"]
            total = _block_count(model)
            ladder = isinstance(data.get("config"), dict) and "ladder" in data["config"]
            read = _stored_blocks if data["format"] == POOL_FORMAT else _stored_items
            sets = tuple(PoolEntry(read(i, s, total), tuple(SetSource(**_known(SetSource, src))
                                                                     for src in s["sources"]), ladder)
                         for i, s in enumerate(data["sets"]))
        except FileNotFoundError:
            raise ConfigError(f"no candidate pool at {path}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{path} is not a valid candidate pool: {error}") from None
        return cls(sets, model, data.get("config", {}), data.get("provenance", {}))

    @property
    def has_sublayers(self) -> bool:
        """Whether a set names single sub-layers (stages that need whole blocks refuse such a pool)."""
        return any(e.has_sublayers for e in self.sets)

    def fingerprint(self) -> str:
        """A short hash of what later stages depend on: the model's fingerprint and the sets, in order."""
        key = json.dumps({"model": self.model.get("fingerprint"), "sets": [list(e.blocks) for e in self.sets]},
                         sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def check_model(self, config) -> None:
        """ConfigError if ``config`` is not the model this pool was built for."""
        fingerprint = model_fingerprint(config)
        if fingerprint != self.model.get("fingerprint"):
            raise ConfigError(f"this pool was built for {self.model.get('name')} {self.model.get('fingerprint')}, "
                              f"not for a model with fingerprint {fingerprint}")


def _block_count(model) -> int | None:
    """The pool model's block count, if its fingerprint records one."""
    if not isinstance(model, dict):
        raise ValueError(f"'model' must be an object, got {type(model).__name__}")
    fingerprint = model.get("fingerprint")
    count = fingerprint.get("num_blocks") if isinstance(fingerprint, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _stored_blocks(index: int, stored: dict, total: int | None) -> OmissionSet:
    """Set ``index``'s blocks as saved, checked now: an edited or corrupt pool.json would otherwise pass
    until generation, far from its cause. Kept in their saved order, which the pool's fingerprint hashes."""
    blocks, name = stored["blocks"], stored.get("name", "?")
    if not isinstance(blocks, list):
        raise ConfigError(f"set {index} ({name}): blocks must be a list of block indices, got "
                          f"{type(blocks).__name__}")
    try:
        validate_omission(blocks, total)
    except ConfigError as error:
        raise ConfigError(f"set {index} ({name}): {error}") from None
    return tuple(blocks)


def _stored_items(index: int, stored: dict, total: int | None) -> tuple[int | str, ...]:
    """Set ``index`` of a ``pudding.pool/2`` file: block indices and ``"12.attn"``-style sub-layers, which must
    be saved in canonical form (:func:`pudding.core.omit.parse_omission`), as :meth:`save_pretrained` writes them."""
    items, name = stored["blocks"], stored.get("name", "?")
    if not isinstance(items, list):
        raise ConfigError(f"set {index} ({name}): blocks must be a list, got {type(items).__name__}")
    try:
        key = parse_omission(items, total).key
    except ConfigError as error:
        raise ConfigError(f"set {index} ({name}): {error}") from None
    if list(key) != items:
        raise ConfigError(f"set {index} ({name}): {items} is not in canonical form; expected {list(key)}")
    return key


def _known(cls, data: dict) -> dict:
    names = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"ignoring unknown keys {unknown} in {cls.__name__}", stacklevel=3)
    missing = sorted(names - set(data))
    if missing:
        raise KeyError(f"missing keys {missing}")
    return {k: v for k, v in data.items() if k in names}


def deduplicate(found: list[tuple[OmissionSet, SetSource]]) -> tuple[PoolEntry, ...]:
    """One entry per distinct set, in order of first appearance, listing every source that found it."""
    merged: dict[tuple, list[SetSource]] = {}
    for blocks, source in found:  # canonical keys: sorted blocks, or "12.attn"-style items in block order
        merged.setdefault(parse_omission(blocks, None).key, []).append(source)
    return tuple(PoolEntry(blocks, tuple(sources)) for blocks, sources in merged.items())


def shrink_source(source: SetSource, k: int, removable: list[int]) -> SetSource:
    """What the same search finds at a smaller ``k``, without running it again.

    A greedy search's first ``k`` removals *are* the ``k``-block search: each step depends only on the blocks
    removed before it. A one-shot method removes the ``k`` least important blocks of the same importance
    scores (its ``trajectory``, one per removable block), picked as :func:`rank_blocks` picks them.
    ``seconds`` stays the cost of the original, larger search.
    """
    if source.method in ("greedy", "sleb"):
        return replace(source, removal_order=source.removal_order[:k], trajectory=source.trajectory[:k + 1])
    if len(source.trajectory) != len(removable):
        raise ConfigError(f"{source.method}: {len(source.trajectory)} importance scores for "
                          f"{len(removable)} removable blocks; the pool does not match its configuration")
    return replace(source, removal_order=list(least_important(dict(zip(removable, source.trajectory)), k)))


def shrink_pool(pool: CandidatePool, k: int) -> CandidatePool:
    """The pool (or baselines) the same searches give at a smaller ``k``; sets that coincide are merged.

    Exact, not an approximation (see :func:`shrink_source`), so ``pudding reproduce --k 3`` reuses the
    k=6 searches instead of repeating them.
    """
    _require_whole_block_sets(pool, "shrunk to a smaller k")
    found_k = pool.config.get("k")
    if not isinstance(found_k, int) or not 1 <= k <= found_k:
        raise ConfigError(f"a pool searched at k={found_k} can only be shrunk to 1 <= k <= {found_k}, not k={k}")
    if k == found_k:
        return pool
    removable = removable_blocks(pool.model["fingerprint"]["num_blocks"], tuple(pool.config.get("barriers", (1, 1))))
    shrunk = [shrink_source(source, k, removable) for entry in pool.sets for source in entry.sources]
    sets = deduplicate([(tuple(source.removal_order), source) for source in shrunk])
    config = {**pool.config, "k": k, "derived_from": {"k": found_k, "pool": pool.fingerprint(),
                                                      "provenance": pool.provenance}}
    return CandidatePool(sets, pool.model, config, provenance())


def _require_whole_block_sets(pool: CandidatePool, what: str) -> None:
    if pool.has_sublayers:
        raise ConfigError(f"a pool of sub-layer sets cannot be {what}: its budget decided which sub-layers each step "
                          "could take, so its first steps are not the search at a smaller budget; search again "
                          "with `pudding candidates --granularity sublayer --k K`")


def derive_pool(source: str | Path, k: int, model: str, out: str | Path) -> CandidatePool:
    """``--from-pool``: the pool at ``k`` shrunk (exactly, :func:`shrink_pool`) from the one at ``source``,
    searched at a larger k, checked against ``model`` and saved to ``out``; no search runs."""
    pool = shrink_pool(CandidatePool.from_pretrained(source), k)
    pool.check_model(load_config(model))
    pool.save_pretrained(out)
    return pool


DENSE_SOURCE = SetSource("dense", None, None, [], [], [], 0.0)


def ladder_pool(pools: Sequence[CandidatePool], depths: Sequence[int]) -> CandidatePool:
    """A depth ladder: every search's and baseline's set at each of ``depths``, as one pool.

    Each set is exact (:func:`shrink_source`): a greedy search's (and SLEB's) first ``k`` removals, a one-shot
    baseline's ``k`` least important blocks. Depth 0 adds the dense model as a set of its own, the reference
    of tolerance routing (:mod:`pudding.routing.adaptive`). Sets are ordered by depth, then as found; a set found by
    several searches at one depth is one entry with every source. A greedy search shorter than the deepest
    rung is refused: extend it first by rerunning it with the larger ``--k`` and the same ``--run-dir``
    (its checkpoint resumes; nothing already searched is recomputed).

    >>> ladder_pool([pool, baselines], (3, 6, 9))  # doctest: +SKIP
    """
    if not pools or not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depths):
        raise ConfigError(f"a ladder needs at least one pool and depths that are integers >= 0, got {list(depths)}")
    rungs = sorted(set(depths))
    model = pools[0].model
    found: list[tuple[OmissionSet, SetSource]] = []
    for pool in pools:
        if pool.model.get("fingerprint") != model.get("fingerprint"):
            raise ConfigError(f"the pools to ladder are of different models: {model.get('fingerprint')} and "
                              f"{pool.model.get('fingerprint')}")
        if "ladder" in pool.config:
            raise ConfigError("a ladder is built from the searched pools, not from another ladder")
        _require_whole_block_sets(pool, "laddered")
        removable = removable_blocks(model["fingerprint"]["num_blocks"], tuple(pool.config.get("barriers", (1, 1))))
        for entry in pool.sets:
            for source in entry.sources:
                found += [(tuple(s.removal_order), s) for s in _rungs(source, rungs, removable)]
    if 0 in rungs:
        found.insert(0, ((), DENSE_SOURCE))
    entries = tuple(replace(e, depth_in_name=True) for e in sorted(deduplicate(found), key=lambda e: e.k))
    config = {"k": None, "barriers": pools[0].config.get("barriers", [1, 1]),
              "ladder": {"depths": rungs, "from": [{"pool": p.fingerprint(), "k": p.config.get("k"),
                                                    "config": p.config, "provenance": p.provenance} for p in pools]}}
    return CandidatePool(entries, model, config, provenance())


def _rungs(source: SetSource, rungs: list[int], removable: list[int]) -> list[SetSource]:
    """``source`` at every positive depth of ``rungs``; ConfigError naming how to extend a short search."""
    deepest = max(rungs)
    if deepest >= len(removable):
        raise ConfigError(f"depth {deepest} leaves fewer than one of the {len(removable)} removable blocks")
    if source.method in ("greedy", "sleb") and len(source.removal_order) < deepest:
        what = "/".join(p for p in (source.method, source.task, source.objective) if p)
        raise ConfigError(f"the {what} search stopped at k={len(source.removal_order)}, short of depth {deepest}; "
                          f"extend it with `pudding {'baselines' if source.method == 'sleb' else 'candidates'} "
                          f"--k {deepest}` and its --run-dir (the checkpoint resumes), then ladder that pool")
    return [shrink_source(source, k, removable) for k in rungs if k > 0]


def least_important(importance: dict[int, float], k: int) -> tuple[int, ...]:
    """The ``k`` blocks with the lowest importance, ties to the lowest index, in block order."""
    return tuple(sorted(sorted(importance, key=lambda b: (importance[b], b))[:k]))
