"""What each metric is, for people reading a figure: task, metric name, unit and which way is better.

The task adapters (:mod:`map_merge.tasks`) and :class:`~map_merge.Task` carry ``metric_name`` and
``metric_unit``; every :class:`~map_merge.Objective` gathers them with its senses as
``objective.metric_labels`` (:func:`metric_labels`), which the plots in :mod:`map_merge.plots`
take as ``labels=``::

    plots.plot_front_2d(fronts, labels=objective.metric_labels)
    axis_label("code", "held-out loss", "nats/token", "min")
    # -> "code: held-out loss (nats/token), lower is better"
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["MetricLabel", "axis_label", "better", "metric_labels", "resolve_labels"]


def better(sense: str | None) -> str:
    """``"lower is better"`` for ``"min"``, ``"higher is better"`` for ``"max"``, ``""`` for ``None``."""
    if sense is None:
        return ""
    if sense not in ("max", "min"):
        raise ValueError(f"sense must be 'max' or 'min', got {sense!r}")
    return "higher is better" if sense == "max" else "lower is better"


def axis_label(task: str, metric: str | None = None, unit: str | None = None, sense: str | None = None) -> str:
    """One axis' text: ``"code: held-out loss (nats/token), lower is better"``; parts not known
    (``None``) are left out (``"code, higher is better"``, ``"code: accuracy"``)."""
    text = str(task)
    if metric:
        text += f": {metric}"
    if unit:
        text += f" ({unit})"
    direction = better(sense)
    return f"{text}, {direction}" if direction else text


@dataclass(frozen=True)
class MetricLabel:
    """One metric as a figure names it.

    Attributes:
        task: the task's name (``"code"``).
        metric: what is measured (``"held-out loss"``), ``None`` if not known.
        unit: its unit (``"nats/token"``), ``None`` if unitless or not known.
        sense: ``"max"`` / ``"min"`` (which way is better), ``None`` if not known.
    """

    task: str
    metric: str | None = None
    unit: str | None = None
    sense: str | None = None

    def __post_init__(self) -> None:
        better(self.sense)  # validates

    @property
    def axis(self) -> str:
        """The axis label (:func:`axis_label`)."""
        return axis_label(self.task, self.metric, self.unit, self.sense)

    @property
    def measured(self) -> str:
        """Task, metric and unit without the direction (``"code: held-out loss (nats/token)"``)."""
        return axis_label(self.task, self.metric, self.unit)

    @property
    def better(self) -> str:
        """``"lower is better"`` / ``"higher is better"`` / ``""``."""
        return better(self.sense)


def metric_labels(objective: Any) -> tuple[MetricLabel, ...]:
    """Per metric of ``objective`` (anything with ``task_names`` and ``senses``): its task name,
    sense, and the ``metric_name`` / ``metric_unit`` of its task where the task carries them
    (``objective.tasks``, as a :class:`~map_merge.ModelObjective` has)."""
    names = tuple(objective.task_names)
    senses = tuple(getattr(objective, "senses", ()) or (None,) * len(names))
    if len(senses) != len(names):
        raise ValueError(f"got {len(senses)} senses for {len(names)} tasks {list(names)}")
    tasks = getattr(objective, "tasks", None) or {}
    out = []
    for name, sense in zip(names, senses):
        task = tasks.get(name) if hasattr(tasks, "get") else None
        out.append(MetricLabel(name, getattr(task, "metric_name", None), getattr(task, "metric_unit", None), sense))
    return tuple(out)


def resolve_labels(
    num: int,
    labels: Sequence[MetricLabel | str] | None = None,
    task_names: Sequence[str] | None = None,
    senses: Sequence[str] | None = None,
) -> tuple[MetricLabel, ...]:
    """``num`` labels for a plot: ``labels`` as given (a string is a task name; a label without a
    sense takes it from ``senses``), else ``task_names`` (default ``task0``...) with ``senses`` (default: not
    known, no direction said)."""
    if labels is not None:
        labels = list(labels)
        if len(labels) != num:
            raise ValueError(f"got {len(labels)} metric labels for {num} metrics")
        known = [None] * num if senses is None else list(senses)
        return tuple((replace(lab, sense=lab.sense or known[k]) if isinstance(lab, MetricLabel) else MetricLabel(str(lab), sense=known[k]))
                     for k, lab in enumerate(labels))
    names = list(task_names) if task_names is not None else [f"task{k}" for k in range(num)]
    if len(names) != num:
        raise ValueError(f"got {len(names)} task names for {num} metrics")
    if senses is not None and len(senses) != num:
        raise ValueError(f"got {len(senses)} senses for {num} metrics")
    return tuple(MetricLabel(str(n), sense=None if senses is None else senses[k]) for k, n in enumerate(names))
