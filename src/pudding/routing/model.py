"""The PuDDing model, which routes each prompt and generates without its chosen blocks.

A :class:`PuddingModel` holds the base LLM, the candidate pool and a router. ``route`` reads each prompt
once and picks the set with the best predicted score; ``generate`` groups the prompts by chosen set and runs
each group with those blocks omitted (the residual stream passes through) and a normal KV cache.

**Artifact.** ``save_pretrained`` writes only pudding's own files, never the LLM and never a pickle:

- ``pudding.json``: format version, the base model's spec, name and fingerprint, and the router config;
- ``pool.json``: the candidate pool;
- ``router.safetensors``: the router's trained tensors (the head; the encoder too when it was fine-tuned).

``from_pretrained("default")`` loads the artifact shipped inside the package for the embedded SmolLM2 (k=6), and
``from_pretrained("default-k3")`` the one at k=3, ``from_pretrained("default-adaptive")`` the depth-ladder one
for ``tolerance`` (:data:`pudding.pool.artifact.SHIPPED_ARTIFACTS`).

**Prompt limits.** An empty prompt is refused. The router truncates a long prompt to its ``max_length``; the
LLM does not truncate: a prompt that, with ``max_new_tokens``, exceeds the model's context is refused.
:meth:`PuddingModel.check_length` makes these checks (a :class:`PromptError`) for ``generate`` and for the
server, which answers its message with a 400.

**Generation.** :func:`generate_batch` is the one batched generation path: ``generate`` runs it once per set
group, and the serving engine once per batch of requests that chose the same set.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pudding.core.errors import ConfigError
from pudding.core.load import context_length, load_config, load_model, model_fingerprint
from pudding.core.omit import OmissionSet, omit_blocks
from pudding.core.provenance import atomic_write_json, provenance, read_json
from pudding.core.quantize import check_quantization, check_quantized
from pudding.pool.artifact import CONFIG_FILE, POOL_FILE, CandidatePool, artifact_folder
from pudding.routing.adaptive import check_adaptive, check_tolerance, choose_by_tolerance
from pudding.routing.router import Router, RouterConfig, build_router, load_router_weights, save_router

ROUTER_FILE = "router.safetensors"
FORMAT = "pudding.model"
FORMAT_VERSION = 1
KNOWN_KEYS = {"format", "version", "base_model", "router", "training", "provenance", "pool_fingerprint"}


@dataclass(frozen=True)
class Route:
    """The routing decision for one prompt."""

    set_index: int
    blocks: OmissionSet
    name: str
    scores: list[float]  # the router's score of every set (the chosen one is the highest, or the default)
    tolerance: float | None = None  # the predicted drop this prompt accepted (adaptive depth), if it gave one


@dataclass(frozen=True)
class Generation:
    """One prompt's completion, with its route and timings."""

    text: str
    route: Route
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # wall time of the generate call of this prompt's set group


@dataclass(frozen=True)
class TimedGeneration:
    """One prompt generated alone and timed (``pudding generate``, :meth:`PuddingModel.timed_generate`)."""

    generation: Generation
    seconds: float  # this prompt's generation alone
    route_ms: float  # the router's time per prompt, routing all the prompts as one batch
    dense_text: str | None = None  # with compare_dense: the dense model's completion, forced to the same length
    dense_seconds: float | None = None


class PromptError(ConfigError):
    """A prompt the model cannot take. ``param`` names the request field at fault and ``code`` is an
    OpenAI-style error code, so the server answers with the same message as the library raises."""

    def __init__(self, message: str, param: str = "prompt", code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def check_prompts(texts: Sequence[str]) -> list[str]:
    """The prompts as a list; PromptError for an empty list, a non-string or an empty prompt."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise PromptError("no prompts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise PromptError(f"prompt {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise PromptError(f"prompt {i} is empty")
        _check_encodable(i, text)
    return texts


def check_prompt_lengths(lengths: Sequence[int], max_new_tokens: int, context: int | None, *,
                         max_prompt_tokens: int | None = None, name: str = "max_new_tokens") -> None:
    """PromptError if a prompt of ``lengths[i]`` tokens is over ``max_prompt_tokens``, or with ``max_new_tokens``
    does not fit the ``context``. ``name`` is what the caller calls ``max_new_tokens`` (the server: max_tokens)."""
    for i, n in enumerate(lengths):
        if max_prompt_tokens is not None and n > max_prompt_tokens:
            raise PromptError(f"prompt {i} has {n} tokens; at most {max_prompt_tokens} are allowed",
                              code="context_length_exceeded")
        if context is not None and n + max_new_tokens > context:
            raise PromptError(f"prompt {i} has {n} tokens; with {name}={max_new_tokens} at most "
                              f"{max(context - max_new_tokens, 0)} fit the model's context of {context} tokens "
                              "(pudding does not truncate prompts)", code="context_length_exceeded")


def _check_encodable(index: int, text: str) -> None:
    # Python turns an argv or file byte that is not UTF-8 into a lone surrogate; the tokenizer cannot
    # encode one and fails deep inside with a traceback.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(f"prompt {index} is not valid UTF-8 text (an undecodable byte at character "
                          f"{error.start})") from None


class PuddingModel:
    """A base LLM, its candidate pool and a router: prompt-routed depth pruning.

    Args:
        model, tokenizer: the base LLM (its fingerprint must match the pool's).
        pool: the candidate omission sets.
        router: a router with one output per pool set.
    """

    def __init__(self, model, tokenizer, pool: CandidatePool, router: Router, training: dict | None = None,
                 *, config=None):
        pool.check_model(config if model is None else model.config)
        if router.config.n_sets != len(pool.sets):
            raise ConfigError(f"the router scores {router.config.n_sets} sets but the pool has {len(pool.sets)}")
        self.model, self.tokenizer, self.pool, self.router = model, tokenizer, pool, router
        self.training = training or {}
        self.block_store = None  # a pudding.core.lazy.BlockStore: only the kept blocks are resident
        self.adapters = None  # a pudding.healing.adapters.AdapterBank: each set's LoRA adapter (pudding heal)

    def use_block_store(self, store) -> None:
        """Keep only each generation's kept blocks resident (see :mod:`pudding.core.lazy`)."""
        self.block_store = store

    # --- loading and saving ---

    @classmethod
    def from_pretrained(cls, path: str | Path = "default", *, model=None, tokenizer=None,
                        router_only: bool = False, adapters: str = "auto", quantize: str = "none",
                        quantize_head: bool = False, quantize_skip: str | tuple[str, ...] = ()) -> PuddingModel:
        """Load an artifact folder (``default``: the shipped SmolLM2 one); the LLM by its recorded spec.

        Pass ``model`` and ``tokenizer`` to reuse an already loaded LLM; it must match the recorded
        fingerprint. ``router_only`` skips loading the LLM (only its config is read, to check the
        fingerprint) where the router does not need it: ``route`` works, ``generate`` does not.
        ``adapters`` picks the healing adapters in ``adapters/`` (``auto``, ``per-set``, ``shared``, ``none``;
        see :meth:`load_adapters`). ``quantize`` (with ``quantize_head``, ``quantize_skip``) quantize the LLM this
        loads (see :mod:`pudding.core.quantize`); a ``model`` passed in is never modified, so with ``quantize``
        other than ``none`` it must already be quantized that way (``quantize_model(model, "int8")``), else
        ConfigError.
        """
        check_quantization(quantize, quantize_head, skip=quantize_skip)
        if model is not None and quantize != "none":
            check_quantized(model, quantize, quantize_head, quantize_skip)
        folder = artifact_folder(path)
        config = read_config(folder)
        pool = CandidatePool.from_pretrained(folder)
        check_pool(config, pool, folder)
        base = config["base_model"]
        router_config = RouterConfig(**_known_fields(RouterConfig, config["router"], folder))
        model_config = None
        if model is None and router_only and router_config.kind != "llm-embed":
            model_config = load_config(base["spec"])
        elif model is None:
            model, tokenizer = load_model(base["spec"], quantize=quantize, quantize_head=quantize_head,
                                          quantize_skip=quantize_skip)
        fingerprint = model_fingerprint(model_config if model is None else model.config)
        if fingerprint != base.get("fingerprint"):
            raise ConfigError(f"{folder} was built for {base.get('name')} {base.get('fingerprint')}; the given model "
                              f"has fingerprint {fingerprint}. Refusing to route a different model")
        router = build_router(router_config, llm=model, llm_tokenizer=tokenizer, for_loading=True)
        load_router_weights(router, folder / ROUTER_FILE)
        pudding = cls(model, tokenizer, pool, router.eval(), config.get("training"), config=model_config)
        if model is not None and adapters != "none":
            pudding.load_adapters(folder, adapters)
        return pudding

    def load_adapters(self, folder: str | Path, mode: str = "auto") -> None:
        """Apply the LoRA adapters saved under ``folder/adapters`` by ``pudding heal``: ``per-set`` (each set
        runs with its own adapter), ``shared`` (one adapter for every set), or ``auto`` (per-set if there are
        any, else shared, else none). ConfigError for adapters trained for another base model or pool."""
        from pudding.healing.adapters import AdapterBank

        self.adapters = AdapterBank.load(self.model, folder, mode=mode, pool=self.pool)

    @contextmanager
    def running(self, blocks: OmissionSet) -> Iterator[Any]:
        """The LLM with ``blocks`` omitted and, if adapters are loaded, the adapter for ``blocks`` active.

        With a block store, the kept blocks are made resident first (here, so every caller gets them: the
        library's ``generate``, the serving engine, the lm-eval plugin).
        """
        if self.block_store is not None:
            self.block_store.ensure(i for i in range(len(self.block_store.block_size)) if i not in blocks)
        if self.adapters is None:
            with omit_blocks(self.model, blocks) as model:
                yield model
            return
        with self.adapters.activate(blocks), omit_blocks(self.model, blocks) as model:  # adapter first: see activate
            yield model

    def save_pretrained(self, directory: str | Path, training: dict | None = None) -> Path:
        """Write pudding.json, pool.json and router.safetensors (never the LLM) and return the folder."""
        if self.model is None:  # checked first: refusing after the pool and router are written leaves half an artifact
            raise ConfigError("a router-only PuddingModel cannot be saved; load it with its LLM")
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.pool.save_pretrained(folder)
        save_router(self.router, folder / ROUTER_FILE)
        pool_model = self.pool.model
        summary = training if training is not None else self.training
        atomic_write_json(folder / CONFIG_FILE, {
            "format": FORMAT, "version": FORMAT_VERSION,
            "base_model": {"spec": pool_model.get("spec"), "name": pool_model.get("name"),
                           "fingerprint": model_fingerprint(self.model.config)},
            "router": asdict(self.router.config),
            # The router's output i scores set i: binds the router to exactly this pool, in this order.
            "pool_fingerprint": self.pool.fingerprint(),
            "training": {k: v for k, v in (summary or {}).items() if k != "history"},
            "provenance": provenance()})
        return folder

    # --- routing ---

    def route(self, texts: str | Sequence[str], batch_size: int = 64, tolerance: float | None = None) -> list[Route]:
        """Each prompt's chosen omission set and the router's score of every set.

        With ``tolerance`` (a depth-ladder artifact only), each prompt takes the deepest set whose predicted
        drop from the reference is at most ``tolerance`` (:func:`pudding.routing.adaptive.choose_by_tolerance`).
        """
        texts = check_prompts(texts)
        if tolerance is not None:
            tolerance = self.check_tolerance(tolerance)
        scores = self.router.scores(texts, batch_size)
        chosen = (self.router.choose(scores) if tolerance is None
                  else choose_by_tolerance(scores, [e.k for e in self.pool.sets], tolerance))
        routes = []
        for row, index in zip(scores, chosen.tolist()):
            entry = self.pool.sets[index]
            routes.append(Route(index, entry.blocks, entry.name, [round(float(s), 6) for s in row], tolerance))
        return routes

    def check_tolerance(self, tolerance) -> float:
        """``tolerance`` as a float; ConfigError if it is not a finite number >= 0 or this artifact has no ladder."""
        value = check_tolerance(tolerance)
        check_adaptive([e.k for e in self.pool.sets], self.router.config.loss)
        return value

    # --- generation ---

    def check_length(self, texts: Sequence[str], max_new_tokens: int, *, max_prompt_tokens: int | None = None,
                     name: str = "max_new_tokens") -> list[int]:
        """The prompts' lengths in tokens. PromptError for a prompt :func:`check_prompts` refuses, or one that
        does not fit (:func:`check_prompt_lengths`). The one prompt check of ``generate`` and of the server."""
        lengths = [len(self.tokenizer(t)["input_ids"]) for t in check_prompts(texts)]
        check_prompt_lengths(lengths, max_new_tokens, context_length(self.model), max_prompt_tokens=max_prompt_tokens,
                             name=name)
        return lengths

    def generate_with(self, texts: list[str], blocks: OmissionSet, **kwargs) -> tuple[list[str], list[int]]:
        """Generate for ``texts`` with ``blocks`` omitted (one batch, :func:`generate_batch`); the completions
        and their lengths in tokens (an end-of-sequence token counts, as in the server's usage)."""
        rows = generate_batch(self.model, self.tokenizer, texts, self.running(blocks), **kwargs)
        stops = eos_tokens(self.model)
        return [completion_text(self.tokenizer, row, stops) for row in rows], [len(row) for row in rows]

    def generate(self, texts: str | Sequence[str], *, routes: Sequence[Route] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, tolerance: float | None = None,
                 **kwargs) -> list[Generation]:
        """Route each prompt (unless ``routes`` are given; with ``tolerance`` as :meth:`route` does), then
        generate each set's prompts together."""
        texts = check_prompts(texts)
        if self.model is None:
            raise ConfigError("this PuddingModel was loaded router-only; load it with its LLM to generate")
        prompt_lengths = self.check_length(texts, max_new_tokens)
        routes = list(routes) if routes is not None else self.route(texts, tolerance=tolerance)
        groups: dict[OmissionSet, list[int]] = {}
        for i, route in enumerate(routes):
            groups.setdefault(route.blocks, []).append(i)
        results: list[Generation | None] = [None] * len(texts)
        for blocks, members in groups.items():
            start = time.perf_counter()
            outputs, lengths = self.generate_with([texts[i] for i in members], blocks,
                                                  max_new_tokens=max_new_tokens, do_sample=do_sample, **kwargs)
            seconds = time.perf_counter() - start
            for i, text, n in zip(members, outputs, lengths):
                results[i] = Generation(text, routes[i], prompt_lengths[i], n, seconds)
        return results  # type: ignore[return-value]

    def timed_generate(self, prompts: Sequence[str], *, max_new_tokens: int, tolerance: float | None = None,
                       compare_dense: bool = False) -> Iterator[TimedGeneration]:
        """Route ``prompts`` together, then generate and time each alone, yielding each as it finishes.

        A two-token warm-up runs first, so the first timing is not a cold start. ``compare_dense`` also
        generates each completion's length with the dense model (greedy, forced to that many tokens), so the
        two times compare the same work.
        """
        prompts = check_prompts(prompts)
        if tolerance is not None:
            self.check_tolerance(tolerance)  # before the warm-up: an artifact without a ladder fails at once
        self.generate(prompts[:1], max_new_tokens=2)
        start = time.perf_counter()
        routes = self.route(prompts, tolerance=tolerance)
        route_ms = (time.perf_counter() - start) * 1000 / len(prompts)
        for prompt, route in zip(prompts, routes):
            start = time.perf_counter()
            [out] = self.generate([prompt], routes=[route], max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - start
            dense_text = dense_seconds = None
            if compare_dense:
                start = time.perf_counter()
                dense, _ = self.generate_with([prompt], (), max_new_tokens=out.completion_tokens,
                                              min_new_tokens=out.completion_tokens, do_sample=False)
                dense_seconds, dense_text = time.perf_counter() - start, dense[0]
            yield TimedGeneration(out, seconds, route_ms, dense_text, dense_seconds)

    def check_set_index(self, index: int | None, flag: str = "--force-set") -> int | None:
        """``index`` unchanged if it is None or one of the pool's sets; ConfigError naming ``flag`` otherwise."""
        if index is not None and not 0 <= index < len(self.pool.sets):
            raise ConfigError(f"{flag} {index} is out of range: the pool has {len(self.pool.sets)} sets")
        return index


def generate_batch(model, tokenizer, texts: list[str], running: AbstractContextManager, **kwargs) -> list[list[int]]:
    """One batched ``model.generate`` of ``texts`` inside ``running`` (the set omitted, its adapter active).

    Returns each row's new tokens, up to and including its end-of-sequence token. This is pudding's one
    generation path: :meth:`PuddingModel.generate` and the serving engine both run it, so the same batch with
    the same settings (and seed) gives the same tokens. ``kwargs`` go to ``generate``: ``max_new_tokens``, the
    sampling settings, and the engine's streamer and per-row stopping criteria.
    """
    # left padding: decoder-only generation continues from the right edge
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    with running, torch.inference_mode():
        output = model.generate(**batch, **kwargs)
    stops = eos_tokens(model)
    # After its end-of-sequence token a finished row is padded: keep only up to it.
    return [row[:_completion_length(row, stops)] for row in output[:, batch["input_ids"].shape[1]:].tolist()]


def eos_tokens(model) -> set[int]:
    """The model's end-of-sequence token ids (its generation config holds one id, a list, or None)."""
    eos = model.generation_config.eos_token_id
    return {t for t in (eos if isinstance(eos, list) else [eos]) if t is not None}


def completion_text(tokenizer, tokens: list[int], stops: set[int]) -> str:
    """The text of a completion's ``tokens``, without the end-of-sequence token that may close them."""
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _completion_length(tokens: list[int], stops: set[int]) -> int:
    """Tokens up to and including the first stop token (padding after an early finish is not counted)."""
    for i, token in enumerate(tokens):
        if token in stops:
            return i + 1
    return len(tokens)


def read_config(folder: Path) -> dict[str, Any]:
    """pudding.json as a dict; ConfigError if missing or invalid, a warning for keys from a newer version."""
    path = folder / CONFIG_FILE
    config = read_json(path, f"no PuDDing artifact at {folder} (missing {CONFIG_FILE})")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a PuDDing artifact config (format {FORMAT!r} expected)")
    for key in ("base_model", "router"):
        if key not in config:
            raise ConfigError(f"{path} lacks the {key!r} entry")
        if not isinstance(config[key], dict):
            raise ConfigError(f"{path}: {key!r} must be an object, got {type(config[key]).__name__}")
    base = config["base_model"]
    if not isinstance(base.get("spec"), str) or not isinstance(base.get("fingerprint"), dict):
        raise ConfigError(f"{path}: 'base_model' needs a 'spec' string and a 'fingerprint' object, got "
                          f"{base!r:.100}")
    unknown = sorted(set(config) - KNOWN_KEYS)
    version = config.get("version", FORMAT_VERSION)
    if unknown or (isinstance(version, int) and version > FORMAT_VERSION):
        warnings.warn(f"{path} was written by a newer pudding (version {version}); ignoring unknown keys {unknown}",
                      stacklevel=3)
    return config


def check_pool(config: dict[str, Any], pool: CandidatePool, folder: Path) -> None:
    """ConfigError if ``pool`` is not the pool the artifact's router was trained on (its sets, in order).

    A reordered or edited pool.json would otherwise load silently and route each prompt to the wrong set.
    Artifacts written before the fingerprint was recorded load with a warning.
    """
    recorded = config.get("pool_fingerprint")
    if recorded is None:
        warnings.warn(f"{folder / CONFIG_FILE} records no pool fingerprint (written by an older pudding), so "
                      f"{POOL_FILE} cannot be checked against the pool the router was trained on", stacklevel=3)
    elif recorded != pool.fingerprint():
        raise ConfigError(f"{POOL_FILE} does not match the pool the router was trained on: {folder / POOL_FILE} "
                          f"has fingerprint {pool.fingerprint()}, {CONFIG_FILE} records {recorded} (were its sets "
                          f"reordered, edited or replaced?)")


def _known_fields(cls, data: dict, folder: Path) -> dict:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        warnings.warn(f"{folder / CONFIG_FILE}: ignoring unknown router keys {unknown}", stacklevel=3)
    return {k: v for k, v in data.items() if k in names}
