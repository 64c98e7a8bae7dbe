"""The objective over real models (:class:`ModelObjective`): every coefficient vector is merged
into one live model (:class:`LiveModel`), which each task's metric then scores (:class:`Task`)."""

from __future__ import annotations

import functools
import json
import numbers
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .executors import Executor, Recipe
from .fingerprint import content_digest
from .groups import Groups, coefficient_names
from .merge_methods import MergeMethod, resolve_method
from .objective_base import Objective, check_senses, content_key, key_hash
from .store import EvaluationStore
from .task_vectors import TaskVectors

__all__ = ["Task", "as_task", "metric_value", "LiveModel", "ModelObjective"]


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
        noisy: ``True`` or ``False``: the metric is a noisy estimate (accuracy on a few hundred
            questions): MAP's picks score real evaluations in it by the model
            (:meth:`~map_merge.MAPResult.select`). Default ``None``: what ``metric`` says (its
            ``noisy`` attribute: an :class:`~map_merge.LMEvalTask`'s, ``True`` by default, a
            :class:`~map_merge.Classification`'s, ``True`` for accuracy), else ``False``.
    """

    metric: Callable[[nn.Module], float]
    sense: str = "max"
    link: str | None = None
    metric_name: str | None = None
    metric_unit: str | None = None
    noisy: bool | None = None

    def __post_init__(self) -> None:
        noisy = getattr(self.metric, "noisy", False) if self.noisy is None else self.noisy
        if not isinstance(noisy, (bool, np.bool_)):
            raise ValueError(f"a task's noisy flag must be True or False, got {noisy!r}"
                             + (" (its metric's 'noisy' attribute)" if self.noisy is None else ""))
        object.__setattr__(self, "noisy", bool(noisy))


def as_task(task: Any) -> Task:
    """A :class:`Task` from a Task, a task adapter carrying ``sense`` / ``link`` (see
    :mod:`map_merge.tasks`), or a bare ``metric(model)`` callable (sense ``"max"``)."""
    if isinstance(task, Task):
        return task
    return Task(metric=task, sense=getattr(task, "sense", "max"), link=getattr(task, "link", None),
                metric_name=getattr(task, "metric_name", None), metric_unit=getattr(task, "metric_unit", None),
                noisy=getattr(task, "noisy", None))



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




def _of_live(name: str, doc: str) -> property:
    """A read-only property of a :class:`ModelObjective`: the same attribute of its :class:`LiveModel`."""
    return property(lambda self: getattr(self.live, name), doc=doc)

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
        self.noisy = tuple(bool(t.noisy) for t in self.tasks.values())
        self.links = tuple(t.link for t in self.tasks.values())
        self.coeff_names = coefficient_names(live.task_vectors.names, live.groups)
        self.num_coeffs = len(self.coeff_names)
        if live.groups is not None:  # every tensor in exactly one group, and no group owning nothing: checked now
            live.task_vectors.coefficients_by_key(np.zeros(self.num_coeffs), live.groups)
        self.key = key
        self._keyed_tasks = self.tasks  # whose data make the store key (a for_tasks subset: its parent's)
        self._task_data: list[str] | None = None

    model = _of_live("model", "The live model (built by the factory, and moved to ``device``, on first use).")
    task_vectors = _of_live("task_vectors", "The :class:`~map_merge.TaskVectors` merged.")
    method = _of_live("method", "The :class:`~map_merge.merge_methods.MergeMethod` merging them.")
    groups = _of_live("groups", "The coefficient groups (``None``: one coefficient per task).")
    device = _of_live("device", "Where the live model is evaluated (see the constructor).")
    merge_seconds = _of_live("merge_seconds", "Seconds spent merging in this process (shared by :meth:`for_tasks` subsets).")
    eval_seconds = _of_live("eval_seconds", "Seconds spent scoring tasks in this process (shared by :meth:`for_tasks` subsets).")

    def fingerprint(self) -> str:
        """The store key: task vectors, method, ``key``, groups and the data of every task (an
        adapter's data fingerprint, a plain metric function's content). :meth:`for_tasks` subsets
        keep the key of the objective they came from, so they share its stored results."""
        keyed = self._keyed_tasks
        if self._task_data is None:  # task adapters' data fingerprints; a plain metric function by its content, once
            self._task_data = [task.metric.fingerprint if isinstance(getattr(task.metric, "fingerprint", None), str)
                               else "fn:" + content_key(task.metric, f"the metric of task {name!r}")
                               for name, task in keyed.items()]
        grouped = () if self.groups is None else ({"groups": self.groups.spec},)  # ungrouped keys stay as they were
        return key_hash("model", self.task_vectors.fingerprint(), self.method.spec, self.key, self._task_data, *grouped)

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
