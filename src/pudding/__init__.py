"""pudding: prompt-routed depth pruning of Hugging Face decoder LLMs.

The package layout follows the pipeline: ``load`` (model) -> ``omit`` (skip blocks) -> ``tasks`` (data) ->
``score`` (log-likelihoods) -> ``metrics`` -> ``evaluate``.
"""

from pudding.errors import PuddingError
from pudding.omit import OmissionSet, omit_blocks, prune_blocks, supported_model_types, validate_omission

__version__ = "0.1.0"

__all__ = [
    "OmissionSet",
    "PuddingError",
    "omit_blocks",
    "prune_blocks",
    "supported_model_types",
    "validate_omission",
    "__version__",
]
