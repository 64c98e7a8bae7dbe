"""What every objective shares (:class:`Objective`): coefficient checks, store look-ups and
persistence, one evaluation per distinct vector, the executor, progress. The objectives over real
models and over plain functions are in :mod:`.model_objective` and :mod:`.function_objective`.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .executors import Executor, LocalExecutor, Recipe, as_recipe
from .fingerprint import content_digest
from .metric_labels import MetricLabel, metric_labels
from .pareto import check_senses  # noqa: F401 - its home is pareto; imported from here by older code
from .store import EvaluationStore, coeff_key

__all__ = ["Objective", "check_senses", "submit_one", "key_hash", "content_key"]

log = logging.getLogger(__name__)


class Objective:
    """Base class: validation, store look-ups, persistence and progress for any objective.

    Subclasses set ``task_names``, ``senses``, ``num_coeffs`` and implement
    :meth:`evaluate_one` (one coefficient vector) and :meth:`fingerprint`."""

    task_names: tuple[str, ...]
    senses: tuple[str, ...]
    links: tuple[str | None, ...]
    num_coeffs: int
    coeff_names: tuple[str, ...] | None = None  # names of the coefficients (``task/group`` with groups)
    noisy: tuple[bool, ...] | None = None  # per metric: a noisy estimate (None: every metric is exact)

    def __init__(
        self,
        store: EvaluationStore | None = None,
        executor: Executor | None = None,
        progress: bool = True,
        description: str = "evaluating",
    ) -> None:
        self.store = store
        self.executor = executor or LocalExecutor()
        self.progress = progress
        self.description = description
        self.num_evaluations = 0  # coefficient vectors actually evaluated (store hits excluded)
        self.num_cached = 0  # coefficient vectors answered by the store
        self._lock = threading.Lock()
        self._running: dict[bytes, cf.Future] = {}  # submitted, not finished: one evaluation per vector
        self._recipe: Recipe | None = None
        self._recipe_version: str | None = None

    def __getstate__(self) -> dict:
        # what a worker needs to evaluate; the store, executor and bookkeeping stay with the driver
        state = self.__dict__.copy()
        for name in ("store", "executor", "_lock", "_running", "_recipe", "num_evaluations", "num_cached"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.store, self.executor = None, LocalExecutor()
        self._lock, self._running, self._recipe = threading.Lock(), {}, None
        self.num_evaluations = self.num_cached = 0

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def metric_labels(self) -> tuple[MetricLabel, ...]:
        """Per metric: task name, metric name and unit where its task says, sense (figures' labels)."""
        return metric_labels(self)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        """Metrics ``(M,)`` of one coefficient vector ``(T,)``."""
        raise NotImplementedError

    def recipe(self) -> Recipe:
        """What the executor runs for one coefficient vector: ``recipe(coeffs (T,)) -> (M,)``, a
        :class:`~map_merge.executors.Recipe` that a :class:`~map_merge.RayExecutor` ships to each
        worker once. Default: the bound :meth:`evaluate_one` (the whole objective, less the
        driver's store, executor and counters), made anew when :meth:`fingerprint` changes;
        subclasses ship less (a model objective: what builds its model, plus its tasks)."""
        try:
            version = self.fingerprint()
        except NotImplementedError:  # no fingerprint: shipped (and keyed by content) at each submit
            return as_recipe(self.evaluate_one)
        if self._recipe is None or self._recipe_version != version:
            self._recipe, self._recipe_version = as_recipe(self.evaluate_one), version
        return self._recipe

    def evaluate_batch(self, coeffs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row, metrics (M,))`` for ``coeffs: (K, T)``; default: through the executor."""
        return self.executor.map(self.recipe(), list(coeffs))

    def check_coeffs(self, coeffs: Any) -> np.ndarray:
        array = np.asarray(coeffs, dtype=np.float64)
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2 or array.shape[1] != self.num_coeffs:
            raise ValueError(
                f"expected coefficients of shape (K, {self.num_coeffs}) (one per task vector), got {np.shape(coeffs)}"
            )
        if not np.isfinite(array).all():
            raise ValueError("coefficients contain NaN or inf")
        return array

    def _record(self, fingerprint: str | None, row: np.ndarray, metrics: Any) -> tuple[np.ndarray, str | None]:
        """Validate one result, persist its finite metrics; returns ``(metrics (M,), failure or None)``."""
        metrics = np.asarray(metrics, dtype=np.float64).reshape(-1)
        if metrics.shape[0] != self.num_tasks:
            raise ValueError(f"objective returned {metrics.shape[0]} metrics for {self.num_tasks} tasks {list(self.task_names)}")
        finite = {t: float(v) for t, v in zip(self.task_names, metrics) if np.isfinite(v)}
        failure = None
        if len(finite) < self.num_tasks:
            bad = [t for t, v in zip(self.task_names, metrics) if not np.isfinite(v)]
            failure = f"coeffs {row.tolist()}: non-finite metric for task(s) {bad}"
        if self.store is not None and finite:
            self.store.put(fingerprint, row, finite)
        with self._lock:
            self.num_evaluations += 1
        return metrics, failure

    def submit(self, coeffs: Any) -> cf.Future:
        """Queue one coefficient vector ``(T,)`` on the executor; the future gives its metrics
        ``(M,)`` (NaN where a metric was not finite). A stored result comes back at once; the
        result is stored by the driver the moment it arrives; a vector already in flight is not
        evaluated twice."""
        row = self.check_coeffs(coeffs)
        if row.shape[0] != 1:
            raise ValueError(f"submit takes one coefficient vector (T,), got shape {np.shape(coeffs)}")
        row = row[0]
        fingerprint = self.fingerprint() if self.store is not None else None
        if self.store is not None:
            stored = self.store.get(fingerprint, row[None], self.task_names)[0]
            if not np.isnan(stored).any():
                with self._lock:
                    self.num_cached += 1
                done: cf.Future = cf.Future()
                done.set_running_or_notify_cancel()
                done.set_result(stored)
                return done
        key = coeff_key(row)
        with self._lock:
            running = self._running.get(key)
            if running is not None:
                return running
            out: cf.Future = cf.Future()
            out.set_running_or_notify_cancel()
            self._running[key] = out

        def finished(inner: cf.Future) -> None:
            with self._lock:
                self._running.pop(key, None)
            if inner.cancelled():
                out.set_exception(cf.CancelledError(f"the evaluation of {row.tolist()} was cancelled"))
                return
            try:
                metrics, _ = self._record(fingerprint, row, inner.result())
            except BaseException as error:  # noqa: BLE001 - handed over through the future
                out.set_exception(error)
            else:
                out.set_result(metrics)

        submit = getattr(self.executor, "submit", None)
        if submit is None:  # an executor with map only: evaluate now
            inner: cf.Future = cf.Future()
            inner.set_running_or_notify_cancel()
            try:
                inner.set_result(next(iter(self.executor.map(self.recipe(), [row])))[1])
            except BaseException as error:  # noqa: BLE001
                inner.set_exception(error)
        else:
            inner = submit(self.recipe(), row)
        inner.add_done_callback(finished)
        return out

    def __call__(self, coeffs: Any) -> np.ndarray:
        """Metrics ``(K, M)`` for ``coeffs: (K, T)`` (or ``(T,)``, giving ``(1, M)``)."""
        coeffs = self.check_coeffs(coeffs)
        num_rows = coeffs.shape[0]
        fingerprint = self.fingerprint() if self.store is not None else None
        out = np.full((num_rows, self.num_tasks), np.nan)
        if self.store is not None:
            out[:] = self.store.get(fingerprint, coeffs, self.task_names)
        # evaluate each distinct missing coefficient vector once
        todo: dict[bytes, list[int]] = {}
        for i in range(num_rows):
            if np.isnan(out[i]).any():
                todo.setdefault(coeff_key(coeffs[i]), []).append(i)
        with self._lock:
            self.num_cached += num_rows - sum(len(v) for v in todo.values())
        if not todo:
            return out
        first_rows = [rows[0] for rows in todo.values()]
        pending = coeffs[first_rows]
        failures: list[str] = []
        bar = tqdm(total=len(first_rows), desc=self.description, disable=not self.progress or len(first_rows) < 2, leave=False)
        try:
            for index, metrics in self.evaluate_batch(pending):
                metrics, failure = self._record(fingerprint, pending[index], metrics)
                if failure:
                    failures.append(failure)
                out[todo[coeff_key(pending[index])]] = metrics
                bar.update(1)
        finally:
            bar.close()
        if failures:
            raise ValueError(
                "the objective produced non-finite metrics (finite results were stored): " + "; ".join(failures[:5])
            )
        return out



def submit_one(objective: Callable[[np.ndarray], np.ndarray], coeffs: np.ndarray) -> cf.Future:
    """``objective.submit(coeffs)`` for an :class:`Objective`; a plain callable is called now
    and its ``(1, M)`` answer wrapped in a finished future."""
    submit = getattr(objective, "submit", None)
    if submit is not None:
        return submit(coeffs)
    future: cf.Future = cf.Future()
    future.set_running_or_notify_cancel()
    try:
        future.set_result(np.asarray(objective(np.asarray(coeffs, dtype=np.float64)[None]), dtype=np.float64).reshape(-1))
    except BaseException as error:  # noqa: BLE001
        future.set_exception(error)
    return future



def key_hash(*parts: Any) -> str:
    """A 32-hex-digit store key of JSON-able ``parts`` (others by ``str``)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def content_key(fn: Any, what: str) -> str:
    """Content digest of a function or callable; one that cannot be hashed counts by its type and
    name (logged), so a store still works."""
    try:
        return content_digest(fn, size=16)
    except TypeError as error:
        log.warning("%s %r cannot be fingerprinted by content (%s); stored results are keyed by its name only", what, fn, error)
        return f"{type(fn).__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"

