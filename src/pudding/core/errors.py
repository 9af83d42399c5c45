"""User-facing errors.

Every error a user can cause by bad input is a `PuddingError`; the CLI prints its message on one line and
exits non-zero instead of showing a traceback. Subclasses also derive from the matching built-in type
(`ValueError`, `FileNotFoundError`, ...) so library users can catch what they expect.
"""


class PuddingError(Exception):
    """Base class for errors caused by the user's input or environment, not by a bug."""


class ConfigError(PuddingError, ValueError):
    """A setting, argument or omission set is invalid."""


class UnknownNameError(PuddingError, KeyError):
    """A name (task, architecture, method) is not in its registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain.
        return str(self.args[0]) if self.args else ""


class MissingAssetError(PuddingError, ModuleNotFoundError):
    """An embedded asset package (model, data) is not installed."""


class MissingExtraError(ConfigError, ModuleNotFoundError):
    """An optional dependency (a pip extra such as ``pudding[serve]``) is not installed; see core.extras."""


class ModelNotFoundError(PuddingError, FileNotFoundError):
    """A model spec is neither a local path nor a reachable hub id."""
