"""pudding: prompt-routed depth pruning of Hugging Face decoder LLMs.

The subpackages follow the pipeline, in the order data flows through it:

- ``core``: load a model, omit blocks, the tasks, log-likelihood scoring and metrics;
- ``pool``: the candidate-pool artifact and the multi-set evaluator that every later stage shares;
- ``pruning``: the greedy searches and the static and merge baselines, which write a pool;
- ``healing``: optional LoRA adapters for the pool's sets;
- ``routing``: labels, the router, its training, and the routed model (:class:`PuddingModel`);
- ``serving``: the batching engine, the HTTP server and the gateway;
- ``evaluation``: zero-shot accuracy, the reproduction tables, benchmarks and the lm-eval plugin.

Each imports only from the ones above it. The names below are imported lazily, so that ``import pudding``
(and ``pudding --help``) does not pull in torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "pudding.core.load",
    "omit_blocks": "pudding.core.omit",
    "prune_blocks": "pudding.core.omit",
    "validate_omission": "pudding.core.omit",
    "supported_model_types": "pudding.core.omit",
    "OmissionSet": "pudding.core.omit",
    "LikelihoodScorer": "pudding.core.score",
    "Request": "pudding.core.score",
    "load_docs": "pudding.core.tasks",
    "task_names": "pudding.core.tasks",
    "EvalConfig": "pudding.evaluation.zero_shot",
    "evaluate": "pudding.evaluation.zero_shot",
    "CandidatePool": "pudding.pool.artifact",
    "PoolConfig": "pudding.pruning.candidates",
    "build_pool": "pudding.pruning.candidates",
    "PuddingModel": "pudding.routing.model",
    "export_pruned": "pudding.pruning.export",
    "PuddingError": "pudding.core.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pudding' has no attribute {name!r}")
