"""Optional dependencies (pip extras), imported only where they are used.

The core library (load, omit, score, search, label, route) installs without them; serving, plotting, Ray,
lm-eval and LoRA healing each live behind an extra of ``pyproject.toml``. Every import of one goes through
:func:`require`, inside the function that needs it, so a missing extra is a one-line error that names the pip
command to run instead of a traceback from deep inside a stage.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pudding.core.errors import MissingExtraError

EXTRAS = {
    "serve": "serving (pudding serve, the gateway)",
    "plots": "plotting",
    "ray": "the Ray executor (--executor ray)",
    "lm-eval": "the lm-evaluation-harness plugin",
    "heal": "LoRA healing (pudding heal, adapters)",
}
"""Each extra of ``pyproject.toml`` and what it enables (the error message names it)."""


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` (``"fastapi"``, ``"matplotlib.pyplot"``) and return it.

    Raises :class:`~pudding.core.errors.MissingExtraError` (a ConfigError and a ModuleNotFoundError) with one
    line naming the install when it, or a package it imports, is missing::

        serving (pudding serve, the gateway) needs fastapi: pip install 'pudding[serve]'
    """
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")  # a bug in pudding, not user input
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = (error.name or module).split(".")[0]
        missing_extra = MissingExtraError(f"{EXTRAS[extra]} needs {missing}: pip install 'pudding[{extra}]'")
        missing_extra.name = missing  # as ModuleNotFoundError sets it, for code that inspects the missing module
        raise missing_extra from None


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed); MissingExtraError without
    the ``plots`` extra."""
    matplotlib = require("matplotlib", "plots")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "plots")
