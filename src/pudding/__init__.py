"""pudding: prompt-routed depth pruning of Hugging Face decoder LLMs.

The modules follow the pipeline: ``load`` (model) -> ``omit`` (skip blocks) -> ``tasks`` (data) ->
``score`` (log-likelihoods) -> ``metrics`` -> ``evaluate``. The names below are imported lazily, so that
``import pudding`` (and ``pudding --help``) does not pull in torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "pudding.load",
    "omit_blocks": "pudding.omit",
    "prune_blocks": "pudding.omit",
    "validate_omission": "pudding.omit",
    "supported_model_types": "pudding.omit",
    "OmissionSet": "pudding.omit",
    "LikelihoodScorer": "pudding.score",
    "Request": "pudding.score",
    "load_docs": "pudding.tasks",
    "task_names": "pudding.tasks",
    "EvalConfig": "pudding.evaluate",
    "evaluate": "pudding.evaluate",
    "CandidatePool": "pudding.candidates",
    "PoolConfig": "pudding.candidates",
    "build_pool": "pudding.candidates",
    "PuddingModel": "pudding.routed",
    "export_pruned": "pudding.export",
    "PuddingError": "pudding.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pudding' has no attribute {name!r}")
