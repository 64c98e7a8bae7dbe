"""The exceptions that several of map_merge's modules raise, at the bottom layer (this module
imports nothing of the package, so any module may raise them without an import circle).

Each is also importable from where it was first defined: :class:`RecipeError` from
:mod:`map_merge.mergekit_config`, :class:`ConfigError` from :mod:`map_merge.config`,
:class:`CheckpointFileError` from :mod:`map_merge.task_vectors.checkfile`,
:class:`EvaluationError` and :class:`WorkerError` from :mod:`map_merge` and
:mod:`map_merge.executors`.
"""

from __future__ import annotations

__all__ = ["CheckpointFileError", "ConfigError", "EvaluationError", "RecipeError", "WorkerError"]


class RecipeError(ValueError):
    """A mergekit recipe this library cannot read or write; the message names the field."""


class ConfigError(ValueError):
    """A config file field is missing or wrong."""


class CheckpointFileError(ValueError):
    """A checkpoint file that is malformed: the message names the file (and the entry)."""


class EvaluationError(RuntimeError):
    """An evaluation raised on a worker; the message carries the item and the worker's traceback."""


class WorkerError(RuntimeError):
    """An item's worker died or timed out more often than the retries allow, or no worker could
    be placed to run it."""
