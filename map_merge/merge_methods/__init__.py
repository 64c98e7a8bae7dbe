"""Merge operators: how task vectors are prepared before per-task coefficients scale them.

Every operator maps task vectors to prepared vectors ``V'`` once per model; a merge is then
always linear in the coefficients::

    theta(c) = theta_0 + sum_i c_i V'_i            c: (T,)

so one preparation serves every coefficient vector (MAP evaluates hundreds).

Operators work on *chunks*: a flat element range ``[start, start + n)`` of one tensor ``key``,
with the deltas of all tasks as ``(T, n)`` fp32, on the device where the merge runs. Whole-model
statistics (thresholds, norms) come from :meth:`MergeMethod.fit`, which may stream over every
chunk as often as it needs; :meth:`MergeMethod.transform` then maps one chunk. The in-memory
and the streamed storages of :class:`~map_merge.TaskVectors` feed the same chunks (flat ranges of
whole rows of about :data:`CHUNK` elements), so both give the same merged model.

- :class:`TaskArithmetic`: ``V' = V``.
- :class:`Ties`: trim each task vector to its top-``k`` entries by magnitude, elect signs,
  disjoint mean (exact thresholds by a radix select, :mod:`.select`).
- :class:`Dare`: drop entries with probability ``p`` and rescale by ``1 / (1 - p)``, optionally
  followed by :class:`Ties`; masks from a counter-based hash (:mod:`.masks`), the same on every
  device and chunking.
- :class:`Breadcrumbs`: drop the largest ``gamma`` share and the smallest entries down to
  ``density`` (mergekit's ``breadcrumbs``).
- :class:`Della`: keep entries at random with probabilities rising with their magnitude rank
  in ``density +/- epsilon``, rescale (mergekit's ``della``).

Operators with a ``scope`` take their statistics over each whole task vector (``"global"``) or
per tensor (``"tensor"``). Options mergekit has that are not linear in the coefficients map
onto this form as described in :mod:`.consensus`.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Mapping
from typing import Any

from . import base as _base
from .base import ChunkSource, MergeMethod, TaskArithmetic, tile_columns
from .breadcrumbs import Breadcrumbs
from .dare import Dare
from .della import Della
from .masks import random_words
from .select import kth_largest_magnitude
from .settings import method_from_settings, method_settings
from .ties import Ties

__all__ = ["MergeMethod", "TaskArithmetic", "Ties", "Dare", "Breadcrumbs", "Della", "resolve_method", "CHUNK", "ChunkSource",
           "kth_largest_magnitude", "random_words", "tile_columns", "METHOD_NAMES",
           "method_from_settings", "method_settings"]

_BY_NAME: dict[str, type[MergeMethod]] = {"task_arithmetic": TaskArithmetic, "ta": TaskArithmetic, "ties": Ties, "dare": Dare,
                                          "breadcrumbs": Breadcrumbs, "della": Della}

METHOD_NAMES = ("task_arithmetic", "ties", "dare", "breadcrumbs", "della")
"""Names :func:`resolve_method` accepts (each with its operator's default settings)."""


class _Package(types.ModuleType):
    """This package's module type: ``CHUNK`` (elements per unit of streamed work, see
    :data:`.base.CHUNK`) read or set here is :data:`.base.CHUNK`, which the operators read at call
    time without importing the package (that would be an import circle)."""

    @property
    def CHUNK(self) -> int:
        return _base.CHUNK

    @CHUNK.setter
    def CHUNK(self, value: int) -> None:
        _base.CHUNK = value


sys.modules[__name__].__class__ = _Package


def resolve_method(method: str | Mapping[str, Any] | MergeMethod | None) -> MergeMethod:
    """Turn ``"task_arithmetic" | "ties" | "dare" | "breadcrumbs" | "della" | MergeMethod | None``
    into a :class:`MergeMethod` (names give the default settings), or a mapping of a name and
    settings such as ``{"name": "ties", "k": 0.6}`` (:func:`method_from_settings`)."""
    if method is None:
        return TaskArithmetic()
    if isinstance(method, MergeMethod):
        return method
    if isinstance(method, Mapping):
        return method_from_settings(method)
    if isinstance(method, str):
        try:
            return _BY_NAME[method.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown merge method {method!r}; choose one of {list(METHOD_NAMES)} "
                "or pass a MergeMethod instance such as Ties(k=0.1) (or {'name': 'ties', 'k': 0.1})"
            ) from None
    raise TypeError(f"method must be a string or a MergeMethod, not {type(method).__name__}")
