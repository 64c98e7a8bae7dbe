"""An objective over a plain function of the coefficients (analytic test problems, a model's
metrics computed elsewhere): :class:`FunctionObjective`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .executors import Executor, Recipe
from .objective_base import Objective, check_senses, content_key, key_hash
from .pareto import check_noisy
from .store import EvaluationStore

__all__ = ["FunctionObjective"]


def _call_function(fn: Callable[[np.ndarray], Any], batched: bool, coeffs: np.ndarray) -> np.ndarray:
    if batched:
        return np.asarray(fn(np.asarray(coeffs)[None, :]), dtype=np.float64).reshape(-1)
    return np.asarray(fn(np.asarray(coeffs)), dtype=np.float64).reshape(-1)



class FunctionObjective(Objective):
    """Wrap a function as an objective.

    Args:
        fn: ``fn(coeffs (K, T)) -> (K, M)`` if ``batched`` (default), else ``fn(c (T,)) -> (M,)``.
        num_coeffs: T.
        task_names: names of the M metrics.
        senses: per metric ``"max"`` (default) or ``"min"``.
        noisy: per metric, whether it is a noisy estimate (default: none is); see
            :meth:`~map_merge.MAPResult.select`.
        key: identifies the function in the store. Default: its qualified name plus a digest of
            its content (code, closure, defaults, the globals it reads; see
            :func:`~map_merge.fingerprint.content_digest`), so two lambdas, or two closures over
            other data, never share stored results. Pass a key to keep a store's results across
            edits of the function.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], Any],
        num_coeffs: int,
        task_names: Sequence[str],
        senses: Sequence[str] | None = None,
        links: Sequence[str | None] | None = None,
        batched: bool = True,
        key: str | None = None,
        store: EvaluationStore | None = None,
        executor: Executor | None = None,
        progress: bool = False,
        noisy: Sequence[bool] | None = None,
    ) -> None:
        super().__init__(store=store, executor=executor, progress=progress)
        if int(num_coeffs) < 1:
            raise ValueError(f"num_coeffs must be at least 1, got {num_coeffs}")
        self.fn = fn
        self.num_coeffs = int(num_coeffs)
        self.task_names = tuple(str(t) for t in task_names)
        self.senses = check_senses(senses, len(self.task_names))
        self.noisy = check_noisy(noisy, len(self.task_names))
        self.links = tuple(links) if links is not None else (None,) * len(self.task_names)
        self.batched = batched
        self.key = key or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        self._content: str | None = None if key is None else ""  # the function's content digest, once asked for

    def fingerprint(self) -> str:
        if self._content is None:  # no key given: the function's content is its identity
            self._content = content_key(self.fn, "the function")
        return key_hash("function", self.key, self.num_coeffs, self.task_names, *([self._content] if self._content else []))

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        return _call_function(self.fn, self.batched, coeffs)

    def recipe(self) -> Recipe:
        """The function alone (keyed by its pickled content), not the objective around it."""
        if self._recipe is None:
            self._recipe = Recipe(_call_function, self.fn, self.batched)
        return self._recipe

    def evaluate_batch(self, coeffs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if not self.batched:
            return super().evaluate_batch(coeffs)
        values = np.asarray(self.fn(coeffs), dtype=np.float64)
        if values.shape != (coeffs.shape[0], self.num_tasks):
            raise ValueError(f"fn returned shape {values.shape}; expected {(coeffs.shape[0], self.num_tasks)}")
        return iter(enumerate(values))
