"""Black-box objectives: ``objective(coeffs: (K, T)) -> metrics: (K, M)``.

The algorithm core (MAP, Bayesian sampling, nested merging, fronts) only ever calls an
objective. :class:`ModelObjective` is the adapter for real models: it merges into one live
model per coefficient vector and runs every task's metric. :class:`FunctionObjective` wraps a
plain function (analytic test problems). Both consult an :class:`~map_merge.store.EvaluationStore`
first and persist each new result the moment it exists, so a killed run loses nothing.

Metrics are returned in their own units and sense (an accuracy, or a loss); ``senses`` says
per task whether higher (``"max"``) or lower (``"min"``) is better.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .merge_methods import MergeMethod, resolve_method
from .store import EvaluationStore, coeff_key
from .task_vectors import TaskVectors

__all__ = ["Task", "Objective", "FunctionObjective", "ModelObjective", "Executor", "LocalExecutor", "check_senses"]

log = logging.getLogger(__name__)


def check_senses(senses: Sequence[str] | None, num: int) -> tuple[str, ...]:
    """Validate per-task senses (``"max"`` or ``"min"``); ``None`` means all ``"max"``."""
    if senses is None:
        return ("max",) * num
    senses = tuple(str(s) for s in senses)
    if len(senses) != num:
        raise ValueError(f"got {len(senses)} senses for {num} tasks")
    bad = [s for s in senses if s not in ("max", "min")]
    if bad:
        raise ValueError(f"a task's sense must be 'max' or 'min', got {bad}")
    return senses


@dataclass(frozen=True)
class Task:
    """One task of a :class:`ModelObjective`.

    Args:
        metric: ``metric(model) -> float``, called under ``torch.inference_mode()``.
        sense: ``"max"`` if higher is better (accuracy), ``"min"`` if lower is (loss).
        link: surrogate link suited to the metric (``"sigmoid"`` for values in [0, 1],
            ``"softplus"`` for positive ones, ``"identity"``), or ``None`` to leave it to MAP.
    """

    metric: Callable[[nn.Module], float]
    sense: str = "max"
    link: str | None = None


def as_task(task: Any) -> Task:
    """A :class:`Task` from a Task, a task adapter carrying ``sense`` / ``link`` (see
    :mod:`map_merge.tasks`), or a bare ``metric(model)`` callable (sense ``"max"``)."""
    if isinstance(task, Task):
        return task
    return Task(metric=task, sense=getattr(task, "sense", "max"), link=getattr(task, "link", None))


class Executor(Protocol):
    """Runs ``fn`` over ``items``; yields ``(index, result)`` as each finishes (any order).

    The default runs locally and sequentially; a distributed executor (for example on Ray)
    can spread evaluations over machines without any change to the algorithms."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class LocalExecutor:
    """Evaluates one item after another in this process."""

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item)


class Objective:
    """Base class: validation, store look-ups, persistence and progress for any objective.

    Subclasses set ``task_names``, ``senses``, ``num_coeffs`` and implement
    :meth:`evaluate_one` (one coefficient vector) and :meth:`fingerprint`."""

    task_names: tuple[str, ...]
    senses: tuple[str, ...]
    links: tuple[str | None, ...]
    num_coeffs: int

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

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def fingerprint(self) -> str:
        raise NotImplementedError

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        """Metrics ``(M,)`` of one coefficient vector ``(T,)``."""
        raise NotImplementedError

    def evaluate_batch(self, coeffs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(row, metrics (M,))`` for ``coeffs: (K, T)``; default: through the executor."""
        return self.executor.map(self.evaluate_one, list(coeffs))

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

    def __call__(self, coeffs: Any) -> np.ndarray:
        """Metrics ``(K, M)`` for ``coeffs: (K, T)`` (or ``(T,)``, giving ``(1, M)``)."""
        coeffs = self.check_coeffs(coeffs)
        num_rows, num_tasks = coeffs.shape[0], self.num_tasks
        fingerprint = self.fingerprint() if self.store is not None else None
        out = np.full((num_rows, num_tasks), np.nan)
        if self.store is not None:
            out[:] = self.store.get(fingerprint, coeffs, self.task_names)
        # evaluate each distinct missing coefficient vector once
        todo: dict[bytes, list[int]] = {}
        for i in range(num_rows):
            if np.isnan(out[i]).any():
                todo.setdefault(coeff_key(coeffs[i]), []).append(i)
        self.num_cached += num_rows - sum(len(v) for v in todo.values())
        if not todo:
            return out
        first_rows = [rows[0] for rows in todo.values()]
        pending = coeffs[first_rows]
        failures: list[str] = []
        bar = tqdm(total=len(first_rows), desc=self.description, disable=not self.progress or len(first_rows) < 2, leave=False)
        try:
            for index, metrics in self.evaluate_batch(pending):
                metrics = np.asarray(metrics, dtype=np.float64).reshape(-1)
                if metrics.shape[0] != num_tasks:
                    raise ValueError(f"objective returned {metrics.shape[0]} metrics for {num_tasks} tasks {list(self.task_names)}")
                rows = todo[coeff_key(pending[index])]
                finite = {t: float(v) for t, v in zip(self.task_names, metrics) if np.isfinite(v)}
                if len(finite) < num_tasks:
                    bad = [t for t, v in zip(self.task_names, metrics) if not np.isfinite(v)]
                    failures.append(f"coeffs {pending[index].tolist()}: non-finite metric for task(s) {bad}")
                if self.store is not None and finite:
                    self.store.put(fingerprint, pending[index], finite)
                out[rows] = metrics
                self.num_evaluations += 1
                bar.update(1)
        finally:
            bar.close()
        if failures:
            raise ValueError(
                "the objective produced non-finite metrics (finite results were stored): " + "; ".join(failures[:5])
            )
        return out


def metric_value(value: Any, task: str, coeffs: Any) -> float:
    """A metric's return value as a float, or a TypeError naming the task and the coefficients
    (``None``, strings, containers and multi-element tensors are not metrics)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(-1)[0]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.number)):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"the metric of task {task!r} returned {type(value).__name__} {shown} for coefficients "
                        f"{np.asarray(coeffs, dtype=float).tolist()}; a metric must return a number")
    return float(value)


def _hash(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class FunctionObjective(Objective):
    """Wrap a function as an objective.

    Args:
        fn: ``fn(coeffs (K, T)) -> (K, M)`` if ``batched`` (default), else ``fn(c (T,)) -> (M,)``.
        num_coeffs: T.
        task_names: names of the M metrics.
        senses: per metric ``"max"`` (default) or ``"min"``.
        key: identifies the function in the store (default: its qualified name).
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
    ) -> None:
        super().__init__(store=store, executor=executor, progress=progress)
        if int(num_coeffs) < 1:
            raise ValueError(f"num_coeffs must be at least 1, got {num_coeffs}")
        self.fn = fn
        self.num_coeffs = int(num_coeffs)
        self.task_names = tuple(str(t) for t in task_names)
        self.senses = check_senses(senses, len(self.task_names))
        self.links = tuple(links) if links is not None else (None,) * len(self.task_names)
        self.batched = batched
        self.key = key or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"

    def fingerprint(self) -> str:
        return _hash("function", self.key, self.num_coeffs, self.task_names)

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        if self.batched:
            return np.asarray(self.fn(np.asarray(coeffs)[None, :]), dtype=np.float64).reshape(-1)
        return np.asarray(self.fn(np.asarray(coeffs)), dtype=np.float64).reshape(-1)

    def evaluate_batch(self, coeffs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        if not self.batched:
            return super().evaluate_batch(coeffs)
        values = np.asarray(self.fn(coeffs), dtype=np.float64)
        if values.shape != (coeffs.shape[0], self.num_tasks):
            raise ValueError(f"fn returned shape {values.shape}; expected {(coeffs.shape[0], self.num_tasks)}")
        return iter(enumerate(values))


class ModelObjective(Objective):
    """Merge into one live model per coefficient vector and evaluate every task on it.

    Args:
        model: a model of the pretrained architecture; its weights are overwritten in place
            (see :meth:`TaskVectors.merge_into`).
        task_vectors: the :class:`TaskVectors` to merge.
        tasks: ``name -> Task``, a task adapter (:class:`~map_merge.HeldOutLoss`, :class:`~map_merge.LMEvalTask`,
            ... carrying their sense and link), or a ``metric(model)`` callable (sense ``"max"``).
        method: merge method (``"task_arithmetic"``, ``"ties"``, ``"dare"`` or a ``MergeMethod``).
        store: where results persist (``None``: none).
        key: extra text mixed into the store fingerprint; change it when the data behind a
            task's metric changes.
    """

    def __init__(
        self,
        model: nn.Module,
        task_vectors: TaskVectors,
        tasks: Mapping[str, Task | Callable[[nn.Module], float]],
        method: str | MergeMethod | None = None,
        store: EvaluationStore | None = None,
        executor: Executor | None = None,
        key: str = "",
        progress: bool = True,
    ) -> None:
        super().__init__(store=store, executor=executor, progress=progress, description="evaluating merged models")
        if not tasks:
            raise ValueError("tasks is empty: give at least one name -> metric(model)")
        self.model = model
        self.task_vectors = task_vectors
        self.method = resolve_method(method)
        self.tasks = {str(n): as_task(t) for n, t in tasks.items()}
        for name, task in self.tasks.items():
            if not callable(task.metric):
                raise TypeError(f"task {name!r}: metric must be callable as metric(model) -> float")
        self.task_names = tuple(self.tasks)
        self.senses = check_senses([t.sense for t in self.tasks.values()], len(self.tasks))
        self.links = tuple(t.link for t in self.tasks.values())
        self.num_coeffs = task_vectors.num_tasks
        self.key = key
        self.merge_seconds = 0.0
        self.eval_seconds = 0.0
        self.task_vectors.prepare(self.method)  # method statistics once, up front

    def fingerprint(self) -> str:
        data = [getattr(task.metric, "fingerprint", None) for task in self.tasks.values()]  # task adapters' data
        extra = (data,) if any(d is not None for d in data) else ()
        return _hash("model", self.task_vectors.fingerprint(), self.method.spec, self.key, *extra)

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        self.task_vectors.merge_into(self.model, coeffs, self.method)
        device = next((p.device for p in self.model.parameters()), self.task_vectors.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        merged = time.perf_counter()
        self.model.eval()
        with torch.inference_mode():
            values = np.array([metric_value(task.metric(self.model), name, coeffs) for name, task in self.tasks.items()])
        self.merge_seconds += merged - start
        self.eval_seconds += time.perf_counter() - merged
        return values

    def for_tasks(self, names: Sequence[str]) -> "ModelObjective":
        """The same merge (model, task vectors, method, store) scoring only ``names``: what
        :func:`~map_merge.nested_merge` asks for at each stage. Results share the store."""
        unknown = [n for n in names if n not in self.tasks]
        if unknown or not names:
            raise ValueError(f"for_tasks needs a non-empty subset of {list(self.task_names)}, got {list(names)}")
        return ModelObjective(self.model, self.task_vectors, {n: self.tasks[n] for n in names}, method=self.method,
                              store=self.store, executor=self.executor, key=self.key, progress=False)
