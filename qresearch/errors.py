"""Errors every layer may raise; the bottom of the import graph (imports nothing from qresearch)."""


class ConfigError(ValueError):
    """Bad user input: one line naming the value and what is allowed. Raised before expensive work."""


class NumericalError(RuntimeError):
    """NaN/inf where a number must be finite (loss, weights, perplexity)."""
