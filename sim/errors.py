"""One error hierarchy for the whole product.

Every message names *where* (file:line, or the dotted field of a scenario), the
offending value, the rule it broke and the fix, so a user never needs a traceback:

    scenario.yaml:12: engine.max_num_seqs = 0: must be >= 1. Fix: set a positive integer.
"""

from __future__ import annotations


class ServetwinError(Exception):
    """Base of every error the product raises on purpose."""


class InputError(ServetwinError):
    """Bad user input: a trace, a scenario, a model or GPU file, a command-line value."""

    def __init__(self, where: str, message: str, fix: str = "") -> None:
        self.where = where
        self.message = message
        self.fix = fix
        text = f"{where}: {message}" if where else message
        if fix:
            text += f". Fix: {fix}"
        super().__init__(text)


class TraceError(InputError):
    """A request trace that cannot be read as given."""


class ScenarioError(InputError):
    """A scenario (YAML or --set override) that does not validate."""


class CatalogError(InputError):
    """A model config.json or GPU spec that is missing or malformed."""


class ConfigError(ServetwinError):
    """A configuration that validates field by field but cannot run as a whole
    (e.g. the KV cache cannot hold one max-length request)."""
