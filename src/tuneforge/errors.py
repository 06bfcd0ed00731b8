"""Errors a user can act on.

Every error raised for bad input is a ``TuneforgeError``; the CLI prints its message on one line
and exits non-zero, never a traceback. Messages name the thing to fix: a config key, or a file
and row.
"""

from __future__ import annotations


class TuneforgeError(Exception):
    """Base class: a problem with the user's input, config or environment."""


class ConfigError(TuneforgeError):
    """The config is invalid; the message names the key."""


class DataError(TuneforgeError):
    """A data file is unusable; the message names the file and, where known, the row."""


class ModelError(TuneforgeError):
    """A model cannot be found or loaded safely."""


class RunDirError(TuneforgeError):
    """A run directory is missing, incomplete, or would be overwritten."""
