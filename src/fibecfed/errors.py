"""Errors a user can cause. The CLI prints their message in one line, without a traceback."""

from __future__ import annotations


class FibecfedError(Exception):
    """Base class for every error caused by input (config, data, model) rather than a bug."""


class ConfigError(FibecfedError):
    """A config key is unknown, or a value has the wrong type or is out of range."""


class DataError(FibecfedError):
    """A data file is missing or malformed, a column or label is unknown, a partition is empty."""


class ModelError(FibecfedError):
    """A model cannot be found or loaded, or does not fit the requested head."""
