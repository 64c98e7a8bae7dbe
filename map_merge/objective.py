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

import functools
import hashlib
import json
import logging
import numbers
import threading
import time
import concurrent.futures as cf
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .executors import Executor, LocalExecutor, Recipe, as_recipe
from .fingerprint import content_digest
from .groups import Groups, coefficient_names
from .merge_methods import MergeMethod, resolve_method
from .metric_labels import MetricLabel, metric_labels
from .store import EvaluationStore, coeff_key
from .task_vectors import TaskVectors

__all__ = ["Task", "Objective", "FunctionObjective", "ModelObjective", "LiveModel", "Executor", "LocalExecutor", "Recipe", "check_senses",
           "submit_one"]

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
        metric_name, metric_unit: what the metric is and its unit (``"held-out loss"``,
            ``"nats/token"``), for figures' labels; ``None`` if not known.
    """

    metric: Callable[[nn.Module], float]
    sense: str = "max"
    link: str | None = None
    metric_name: str | None = None
    metric_unit: str | None = None


def as_task(task: Any) -> Task:
    """A :class:`Task` from a Task, a task adapter carrying ``sense`` / ``link`` (see
    :mod:`map_merge.tasks`), or a bare ``metric(model)`` callable (sense ``"max"``)."""
    if isinstance(task, Task):
        return task
    return Task(metric=task, sense=getattr(task, "sense", "max"), link=getattr(task, "link", None),
                metric_name=getattr(task, "metric_name", None), metric_unit=getattr(task, "metric_unit", None))


class Objective:
    """Base class: validation, store look-ups, persistence and progress for any objective.

    Subclasses set ``task_names``, ``senses``, ``num_coeffs`` and implement
    :meth:`evaluate_one` (one coefficient vector) and :meth:`fingerprint`."""

    task_names: tuple[str, ...]
    senses: tuple[str, ...]
    links: tuple[str | None, ...]
    num_coeffs: int
    coeff_names: tuple[str, ...] | None = None  # names of the coefficients (``task/group`` with groups)

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


def _content_of(fn: Any, what: str) -> str:
    """Content digest of a function or callable; one that cannot be hashed counts by its type and
    name (logged), so a store still works."""
    try:
        return content_digest(fn, size=16)
    except TypeError as error:
        log.warning("%s %r cannot be fingerprinted by content (%s); stored results are keyed by its name only", what, fn, error)
        return f"{type(fn).__module__}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


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
        self.key = key or f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
        self._content: str | None = None if key is None else ""  # the function's content digest, once asked for

    def fingerprint(self) -> str:
        if self._content is None:  # no key given: the function's content is its identity
            self._content = _content_of(self.fn, "the function")
        return _hash("function", self.key, self.num_coeffs, self.task_names, *([self._content] if self._content else []))

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


class LiveModel:
    """The one live model a :class:`ModelObjective` merges into, and how: the model (or the
    function that builds it), the task vectors, the merge method and the device.

    Objectives made by :meth:`ModelObjective.for_tasks` share it, so they share one model; a
    Ray worker holds one per distinct :meth:`identity`. Pickling drops a model the factory can
    rebuild.
    """

    def __init__(self, model: nn.Module | Callable[[], nn.Module], task_vectors: TaskVectors, method: str | MergeMethod | None = None,
                 device: str | torch.device | None = None, groups: Groups | None = None) -> None:
        if isinstance(model, nn.Module):
            self._model, self.factory = model, None
        elif callable(model):
            self._model, self.factory = None, model
        else:
            raise TypeError(f"model must be an nn.Module or a function building one, got {type(model).__name__}")
        self.task_vectors = task_vectors
        self.method = resolve_method(method)
        self.device = device
        self.groups = groups
        self._placed = device is None
        self._weights: str | None = None  # content digest of a given module, once asked for
        self.merge_seconds = 0.0
        self.eval_seconds = 0.0

    @property
    def model(self) -> nn.Module:
        """The live model (built by the factory, and moved to ``device``, on first use)."""
        if self._model is None:
            built = self.factory()
            if not isinstance(built, nn.Module):
                raise TypeError(f"the model factory returned {type(built).__name__}, not an nn.Module")
            self._model = built
        if not self._placed:
            target = self.device
            if target == "auto":
                target = "cuda" if torch.cuda.is_available() else None
            if target is not None:
                self._model.to(target)
            self._placed = True
        return self._model

    def merge(self, coeffs: np.ndarray) -> nn.Module:
        """Write the merge for ``coeffs (T,)`` (``T x G`` with groups) into the live model and return it."""
        model = self.model
        start = time.perf_counter()
        self.task_vectors.merge_into(model, coeffs, self.method, groups=self.groups)
        device = next((p.device for p in model.parameters()), self.task_vectors.device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.merge_seconds += time.perf_counter() - start
        return model

    def identity(self) -> tuple:
        """What makes this live model what it is, as content: the factory (pickled where it is
        used) or a digest of the given module's weights, the task vectors' fingerprint, the
        method and the device."""
        if self.factory is not None:
            model: Any = ("factory", self.factory)
        else:
            if self._weights is None:
                self._weights = content_digest(self._model, size=16)
            model = ("module", type(self._model).__qualname__, self._weights)
        grouped = () if self.groups is None else (json.dumps(self.groups.spec, sort_keys=True),)
        return (model, self.task_vectors.fingerprint(), self.method.spec, str(self.device), *grouped)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.factory is not None:
            state["_model"] = None  # rebuilt where it is used
            state["_placed"] = self.device is None
        return state


def _build(live: LiveModel) -> None:
    live.model  # noqa: B018 - builds and places it


def _evaluate_tasks(live: LiveModel, tasks: Mapping[str, Task], coeffs: np.ndarray) -> np.ndarray:
    """Metrics ``(M,)`` of the merge for ``coeffs (T,)``: merge into the live model, score each task."""
    model = live.merge(coeffs)
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        values = np.array([metric_value(task.metric(model), name, coeffs) for name, task in tasks.items()])
    live.eval_seconds += time.perf_counter() - start
    return values


def _recipe_ids(live: LiveModel, tasks: Mapping[str, Task]) -> tuple[tuple, tuple]:
    return live.identity(), _tasks_identity(tasks)


def _tasks_identity(tasks: Mapping[str, Task]) -> tuple:
    """Tasks as content: an adapter by its type and data fingerprint, a bare metric by itself."""
    out = []
    for name, task in tasks.items():
        data = getattr(task.metric, "fingerprint", None)
        metric = (type(task.metric).__qualname__, data) if isinstance(data, str) else task.metric
        out.append((name, metric, task.sense, task.link))
    return tuple(out)


class ModelObjective(Objective):
    """Merge into one live model per coefficient vector and evaluate every task on it.

    Args:
        model: a model of the pretrained architecture; its weights are overwritten in place
            (see :meth:`TaskVectors.merge_into`). Or a function of no arguments that builds it
            (e.g. ``lambda: AutoModelForCausalLM.from_pretrained(path)``): then the model is
            built on first use, where the evaluations run (each Ray worker builds its own, once;
            only the function travels).
        task_vectors: the :class:`TaskVectors` to merge.
        tasks: ``name -> Task``, a task adapter (:class:`~map_merge.HeldOutLoss`, :class:`~map_merge.LMEvalTask`,
            ... carrying their sense and link), or a ``metric(model)`` callable (sense ``"max"``).
        method: merge method (``"task_arithmetic"``, ``"ties"``, ``"dare"`` or a ``MergeMethod``).
        store: where results persist (``None``: none).
        key: extra text mixed into the store fingerprint; change it when the data behind a
            task's metric changes.
        device: where the live model is evaluated: ``None`` where it is; ``"auto"``: on CUDA when
            the process sees a GPU (a Ray worker given ``{"GPU": ...}``), else where it is; or a
            device. The model is moved on first use.
        groups: coefficient groups (:class:`~map_merge.Groups`): a coefficient vector then has
            ``T x G`` entries, task-major, named ``task/group`` (:attr:`coeff_names`); MAP's
            quadratic has ``(TG+1)(TG+2)/2`` parameters.
    """

    def __init__(
        self,
        model: nn.Module | Callable[[], nn.Module],
        task_vectors: TaskVectors,
        tasks: Mapping[str, Task | Callable[[nn.Module], float]],
        method: str | MergeMethod | None = None,
        store: EvaluationStore | None = None,
        executor: Executor | None = None,
        key: str = "",
        progress: bool = True,
        device: str | torch.device | None = None,
        groups: Groups | None = None,
    ) -> None:
        live = LiveModel(model, task_vectors, method, device, groups)
        self._setup(live, tasks, store, executor, key, progress)
        task_vectors.prepare(live.method)  # method statistics once, up front

    def _setup(self, live: LiveModel, tasks: Mapping[str, Any], store: EvaluationStore | None, executor: Executor | None,
               key: str, progress: bool) -> None:
        super().__init__(store=store, executor=executor, progress=progress, description="evaluating merged models")
        if not tasks:
            raise ValueError("tasks is empty: give at least one name -> metric(model)")
        self.live = live
        self.tasks = {str(n): as_task(t) for n, t in tasks.items()}
        for name, task in self.tasks.items():
            if not callable(task.metric):
                raise TypeError(f"task {name!r}: metric must be callable as metric(model) -> float")
        self.task_names = tuple(self.tasks)
        self.senses = check_senses([t.sense for t in self.tasks.values()], len(self.tasks))
        self.links = tuple(t.link for t in self.tasks.values())
        self.coeff_names = coefficient_names(live.task_vectors.names, live.groups)
        self.num_coeffs = len(self.coeff_names)
        if live.groups is not None:  # every tensor in exactly one group, and no group owning nothing: checked now
            live.task_vectors.coefficients_by_key(np.zeros(self.num_coeffs), live.groups)
        self.key = key
        self._keyed_tasks = self.tasks  # whose data make the store key (a for_tasks subset: its parent's)
        self._task_data: list[str] | None = None

    @property
    def model(self) -> nn.Module:
        """The live model (built by the factory, and moved to ``device``, on first use)."""
        return self.live.model

    @property
    def task_vectors(self) -> TaskVectors:
        return self.live.task_vectors

    @property
    def method(self) -> MergeMethod:
        return self.live.method

    @property
    def groups(self) -> Groups | None:
        return self.live.groups

    @property
    def device(self) -> str | torch.device | None:
        return self.live.device

    @property
    def merge_seconds(self) -> float:
        """Seconds spent merging in this process (shared by :meth:`for_tasks` subsets)."""
        return self.live.merge_seconds

    @property
    def eval_seconds(self) -> float:
        """Seconds spent scoring tasks in this process (shared by :meth:`for_tasks` subsets)."""
        return self.live.eval_seconds

    def fingerprint(self) -> str:
        """The store key: task vectors, method, ``key``, groups and the data of every task (an
        adapter's data fingerprint, a plain metric function's content). :meth:`for_tasks` subsets
        keep the key of the objective they came from, so they share its stored results."""
        keyed = self._keyed_tasks
        if self._task_data is None:  # task adapters' data fingerprints; a plain metric function by its content, once
            self._task_data = [task.metric.fingerprint if isinstance(getattr(task.metric, "fingerprint", None), str)
                               else "fn:" + _content_of(task.metric, f"the metric of task {name!r}")
                               for name, task in keyed.items()]
        grouped = () if self.groups is None else ({"groups": self.groups.spec},)  # ungrouped keys stay as they were
        return _hash("model", self.task_vectors.fingerprint(), self.method.spec, self.key, self._task_data, *grouped)

    def evaluate_one(self, coeffs: np.ndarray) -> np.ndarray:
        return _evaluate_tasks(self.live, self.tasks, coeffs)

    def recipe(self) -> Recipe:
        """The live model's recipe (model or factory, task vectors, method, device) plus the
        tasks: a :class:`~map_merge.RayExecutor` worker builds one model per distinct live model
        and binds each objective's tasks to it."""
        if self._recipe is None:
            self._recipe = Recipe(_evaluate_tasks, self.live, self.tasks, ids=functools.partial(_recipe_ids, self.live, self.tasks),
                                  setup=_build)
        return self._recipe

    def for_tasks(self, names: Sequence[str]) -> "ModelObjective":
        """The same merge (one live model, task vectors, method, store, executor) scoring only
        ``names``: what :func:`~map_merge.nested_merge` asks for at each stage. Results share the
        store; the subsets share the model, here and on every worker."""
        unknown = [n for n in names if n not in self.tasks]
        if unknown or not names:
            raise ValueError(f"for_tasks needs a non-empty subset of {list(self.task_names)}, got {list(names)}")
        subset = ModelObjective.__new__(ModelObjective)
        subset._setup(self.live, {n: self.tasks[n] for n in names}, self.store, self.executor, self.key, progress=False)
        subset._keyed_tasks, subset._task_data = self._keyed_tasks, self._task_data  # the parent's store key: shared results
        return subset
