"""The errors that cross layers, in the bottom layer so that any module can raise them.

Each message names the cause and what to do: the key and its allowed values (:class:`ConfigError`),
the path (:class:`CheckpointError`).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the allowed values."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""
