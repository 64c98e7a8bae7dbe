"""Plots of fronts and surrogates (matplotlib, no pyplot state: every function returns a Figure).

Pass ``path=`` to save a PNG as well. Every plot reads on its own: pass ``labels=objective.metric_labels``
(:mod:`map_merge.metric_labels`) and the axes name each task's metric, its unit and which way is
better; ``pick=`` (a :class:`~map_merge.plot_marks.Mark`, e.g. :func:`~map_merge.plot_marks.pick_mark`)
and ``marks=`` (``{"your recipe": metrics}``) are drawn above everything, with legend entries, and
the axes cover them. Real evaluations are drawn above fronts labelled "predicted".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .metric_labels import MetricLabel, axis_label, metric_labels, resolve_labels
from .pareto import ParetoFront, check_senses, orient, pareto_mask
from .plot_compare import plot_bars, plot_cost_quality, plot_curves
from .plot_marks import STYLES, save
from .plot_marks import Z_MARK, Z_PREDICTED, Z_REAL, Z_REFERENCE, Mark, as_marks, cover, draw_marks, is_predicted, legend, pick_mark

__all__ = ["plot_front_2d", "plot_pairwise", "plot_parallel", "plot_parity", "plot_landscape", "plot_curves", "plot_cost_quality", "plot_bars", "plot_front_3d",
           "save",
           "Mark", "MetricLabel", "axis_label", "metric_labels", "pick_mark"]

_STYLES = STYLES


def _labels(num: int, labels, task_names, senses) -> tuple[MetricLabel, ...]:
    return resolve_labels(num, labels, task_names, senses)


def _wrapped(label: MetricLabel) -> str:
    """An axis label on two lines (small panels): what is measured, then which way is better."""
    return f"{label.measured}\n{label.better}" if label.better else label.measured


def _points(front: ParetoFront | np.ndarray) -> np.ndarray:
    return front.metrics if isinstance(front, ParetoFront) else np.atleast_2d(np.asarray(front, dtype=np.float64))


def _known_senses(fronts: Mapping[str, Any], senses: Sequence[str] | None, num: int) -> tuple[str, ...] | None:
    """``senses`` if given, else those of the first :class:`ParetoFront` among ``fronts``, else ``None`` (not known)."""
    if senses is not None:
        return check_senses(senses, num)
    return next((f.senses for f in fronts.values() if isinstance(f, ParetoFront)), None)


def _known_names(fronts: Mapping[str, Any], task_names: Sequence[str] | None) -> Sequence[str] | None:
    return task_names if task_names is not None else next((f.task_names for f in fronts.values() if isinstance(f, ParetoFront)), None)


def _front_labels(fronts: Mapping[str, Any], task_names: Sequence[str] | None, senses: Sequence[str] | None,
                  labels: Sequence[MetricLabel | str] | None) -> tuple[int, tuple[MetricLabel, ...]]:
    """``(M, a label per metric)`` of fronts whose metrics are ``(N, M)`` arrays or :class:`ParetoFront` s
    (M from the first, else from ``task_names`` or ``labels``)."""
    num = next((_points(f).shape[1] for f in fronts.values()), None) or (len(task_names) if task_names is not None else len(labels or ()))
    return num, _labels(num, labels, _known_names(fronts, task_names), _known_senses(fronts, senses, num))


def _scatter_front(ax, columns: Sequence[np.ndarray], label: str, style: dict, edges: bool = False) -> None:
    """One front's points in ``columns`` (2 or 3 axes): small and faint under the real
    evaluations when ``label`` says "predicted", else in ``style`` (``edges``: thin white edges)."""
    if is_predicted(label):
        ax.scatter(*columns, s=4, color=style["color"], marker=".", alpha=0.25, label=label, zorder=Z_PREDICTED,
                   **({"linewidths": 0} if edges else {}))
    else:
        ax.scatter(*columns, s=16, color=style["color"], marker=style["marker"], alpha=0.9, label=label, zorder=Z_REAL,
                   **({"edgecolors": "white", "linewidths": 0.3} if edges else {}))


def _front_line(ax, points: np.ndarray, i: int, j: int, label: str, style: dict, line: bool, senses: Sequence[str]) -> None:
    predicted = is_predicted(label)  # a surrogate's claim, not measured: dashed, under the real evaluations
    z = Z_PREDICTED if predicted else Z_REAL
    if line and len(points) > 1:
        keep = pareto_mask(orient(points[:, [i, j]], (senses[i], senses[j])))  # non-dominated in these two metrics
        sub = points[keep]
        order = np.argsort(sub[:, i])
        ax.plot(sub[order, i], sub[order, j], "--" if predicted else "-", color=style["color"], lw=1.2 if predicted else 1.5, alpha=0.9,
                label=label, zorder=z)
        ax.scatter(points[:, i], points[:, j], s=10, color=style["color"], alpha=0.35, marker=style["marker"], zorder=z)
    else:
        ax.scatter(points[:, i], points[:, j], s=10 if predicted else 28, color=style["color"], marker=style["marker"], label=label,
                   alpha=0.35 if predicted else 0.85, zorder=z)


def plot_front_2d(
    fronts: Mapping[str, ParetoFront | np.ndarray],
    task_names: Sequence[str] | None = None,
    samples: np.ndarray | None = None,
    reference: np.ndarray | None = None,
    tasks: tuple[int, int] = (0, 1),
    lines: Mapping[str, bool] | None = None,
    title: str = "",
    zoom: bool = False,
    reference_label: str = "reference front (dense grid)",
    path: str | os.PathLike | None = None,
    senses: Sequence[str] | None = None,
    labels: Sequence[MetricLabel | str] | None = None,
    pick: Mark | None = None,
    marks: Mapping[str, Any] | None = None,
) -> Figure:
    """Two tasks' metrics: each front (line through its non-dominated points; dashed, and under
    the real evaluations, for labels containing "predicted"), the real samples, the reference
    front, the pick and other marked points.

    ``senses``: per metric ``"max"`` / ``"min"`` for the arrays among ``fronts`` (default: a
    :class:`ParetoFront`'s, else all ``"max"``); a :class:`ParetoFront` uses its own.
    ``labels``: per metric a :class:`~map_merge.metric_labels.MetricLabel` (e.g.
    ``objective.metric_labels``: the axes then name the metric, its unit and which way is
    better), default from ``task_names`` and the senses. ``pick``: a
    :class:`~map_merge.plot_marks.Mark` (e.g. :func:`~map_merge.plot_marks.pick_mark`) drawn
    as a star; ``marks``: ``label -> Mark or metrics (M,) / (K, M)`` (e.g. ``{"your recipe":
    metrics}``). The axes cover every marked point.

    ``fronts`` maps a label to a :class:`ParetoFront` or a ``(N, M)`` metric array. With ``zoom``
    (and a reference) a second panel zooms on the reference front and the pick: its limits lie
    strictly inside the main panel's."""
    i, j = tasks
    num = next((_points(f).shape[1] for f in fronts.values()), None)
    num = num if num is not None else (np.asarray(reference).shape[1] if reference is not None else max(i, j) + 1)
    known = _known_senses(fronts, senses, num)
    names = _labels(num, labels, _known_names(fronts, task_names), known)
    if senses is None and all(lab.sense for lab in names):
        senses = [lab.sense for lab in names]  # the arrays' senses: the labels say them
    marked = as_marks(pick, marks, num)
    panels = 2 if (zoom and reference is not None) else 1
    fig = Figure(figsize=(6.0 * panels, 5.0))
    main = fig.add_subplot(1, panels, 1)
    _draw_front_2d(main, fronts, names, samples, reference, i, j, lines, reference_label, senses)
    draw_marks(main, marked, (i, j))
    if title:
        main.set_title(title, fontsize=10)
    if panels == 2:
        ax = fig.add_subplot(1, panels, 2)
        _draw_front_2d(ax, fronts, names, samples, reference, i, j, lines, reference_label, senses)
        for mark, style in marked:
            ax.scatter(mark.metrics[:, i], mark.metrics[:, j], **{**style, "label": None})
        focus = _focus(np.asarray(reference, dtype=np.float64)[:, [i, j]], None if pick is None else pick.metrics[:, [i, j]])
        _zoom(ax, focus, main.get_xlim(), main.get_ylim())
        ax.set_title("zoom on the pick and the reference front near it" if pick is not None else "zoom on the reference front", fontsize=9)
    legend(fig, main)
    return save(fig, path)


def _focus(reference: np.ndarray, pick: np.ndarray | None, radius: float = 0.25) -> np.ndarray:
    """The points ``(N, 2)`` a zoom frames: the reference front near the pick (within ``radius``
    of the front's range, so that a front spanning the whole plot still zooms) and the pick; the
    whole reference front without a pick."""
    if pick is None:
        return reference
    span = np.where(np.ptp(reference, axis=0) > 0, np.ptp(reference, axis=0), 1.0)
    near = np.sqrt((((reference - pick.mean(axis=0)) / span) ** 2).sum(axis=1)) <= radius
    return np.concatenate([reference[near] if near.sum() >= 2 else reference, pick])


def _zoom(ax, focus: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    """Limits around ``focus (N, 2)`` (padded by 8% of its range), strictly inside ``xlim`` / ``ylim``."""
    for k, (main, set_) in enumerate(((xlim, ax.set_xlim), (ylim, ax.set_ylim))):
        low, high = float(focus[:, k].min()), float(focus[:, k].max())
        inset = 0.02 * (main[1] - main[0])
        pad = 0.08 * (high - low) if high > low else inset
        set_(max(low - pad, main[0] + inset), min(high + pad, main[1] - inset))


def _draw_front_2d(ax, fronts, names, samples, reference, i, j, lines, reference_label, senses=None) -> None:
    if reference is not None:
        ref = np.asarray(reference)
        order = np.argsort(ref[:, i])
        ax.plot(ref[order, i], ref[order, j], "-", color="0.3", lw=3, alpha=0.35, label=reference_label, zorder=Z_REFERENCE)
    if samples is not None:
        ax.scatter(samples[:, i], samples[:, j], s=18, facecolors="none", edgecolors="0.4", label="real samples", zorder=Z_REAL)
    for k, (label, front) in enumerate(fronts.items()):
        points = _points(front)
        draw_line = (lines or {}).get(label, len(points) > 12)
        own = front.senses if isinstance(front, ParetoFront) else check_senses(senses, points.shape[1])
        _front_line(ax, points, i, j, label, _STYLES[k % len(_STYLES)], draw_line, own)
    ax.set_xlabel(names[i].axis)
    ax.set_ylabel(names[j].axis)
    ax.grid(alpha=0.3)


def _pairs_grid(fig, pairs: list[tuple[int, int]], ncols: int = 3) -> list:
    """One axes per pair, ``ncols`` per row: exactly as many axes as pairs (no empty panel)."""
    ncols = min(ncols, len(pairs))
    nrows = -(-len(pairs) // ncols)
    return [fig.add_subplot(nrows, ncols, k + 1) for k in range(len(pairs))]


def plot_pairwise(
    fronts: Mapping[str, ParetoFront | np.ndarray],
    task_names: Sequence[str] | None = None,
    reference: np.ndarray | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
    senses: Sequence[str] | None = None,
    labels: Sequence[MetricLabel | str] | None = None,
    pick: Mark | None = None,
    marks: Mapping[str, Any] | None = None,
) -> Figure:
    """2-task projections for T >= 3 tasks: one panel per pair of tasks (three panels in a row
    for T = 3). Fronts labelled "predicted" are drawn small and faint under the real
    evaluations; ``labels`` / ``senses`` / ``pick`` / ``marks`` as in :func:`plot_front_2d`."""
    num, names = _front_labels(fronts, task_names, senses, labels)
    marked = as_marks(pick, marks, num)
    pairs = [(i, j) for i in range(num - 1) for j in range(i + 1, num)]
    ncols = min(3, len(pairs))
    fig = Figure(figsize=(4.0 * ncols, 3.7 * -(-len(pairs) // ncols)))
    order = sorted(range(len(fronts)), key=lambda k: not is_predicted(list(fronts)[k]))  # predicted first: underneath
    items = list(fronts.items())
    for ax, (i, j) in zip(_pairs_grid(fig, pairs), pairs):
        if reference is not None:
            ax.scatter(reference[:, i], reference[:, j], s=4, color="0.6", alpha=0.4, label="reference", zorder=Z_REFERENCE)
        for k in order:
            label, front = items[k]
            points = _points(front)
            _scatter_front(ax, [points[:, i], points[:, j]], label, _STYLES[k % len(_STYLES)], edges=True)
        draw_marks(ax, marked, (i, j))
        ax.set_xlabel(_wrapped(names[i]), fontsize=8)
        ax.set_ylabel(_wrapped(names[j]), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    legend(fig, fig.axes[0], inside_up_to=0)
    return save(fig, path)


def plot_parallel(
    front: ParetoFront,
    highlight: Sequence[int] = (),
    max_lines: int = 300,
    path: str | os.PathLike | None = None,
    labels: Sequence[MetricLabel | str] | None = None,
    pick: Mark | None = None,
    marks: Mapping[str, Any] | None = None,
    title: str | None = None,
) -> Figure:
    """Parallel coordinates of a front's metrics: each task scaled to its range on the front and
    turned so that the top is better (1: the front's best value, 0: its worst; raw direction for
    a task whose sense is not known). Each axis says which way is better and its best / worst
    values; every line kind has a legend entry: the front's points, ``highlight`` (front indices),
    ``pick`` and ``marks`` (as in :func:`plot_front_2d`; a mark beyond the front's range is drawn
    beyond 0 / 1)."""
    num = len(front.task_names)
    names = _labels(num, labels, front.task_names, front.senses)
    metrics = front.metrics
    if len(metrics) > max_lines:
        from .search import thin_front

        metrics = metrics[thin_front(front.oriented, max_lines)]
    low, high = front.metrics.min(axis=0), front.metrics.max(axis=0)
    flip = np.array([lab.sense == "min" for lab in names])
    top, bottom = np.where(flip, low, high), np.where(flip, high, low)

    def scaled(values: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(values) - bottom) / np.where(top != bottom, top - bottom, 1.0)

    fig = Figure(figsize=(2.2 * num + 2, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(num)
    for k, row in enumerate(scaled(metrics)):
        ax.plot(xs, row, color="C0", alpha=0.15, lw=1, zorder=Z_REAL, label=f"front points ({len(metrics)} of {len(front)})" if k == 0 else None)
    for n, h in enumerate(highlight):
        ax.plot(xs, scaled(front.metrics[h])[0], color=_STYLES[(n + 1) % len(_STYLES)]["color"], lw=2.2, zorder=Z_MARK,
                label=f"front point {h} (c = {', '.join(f'{v:.3g}' for v in front.coeffs[h])})")
    for mark, style in as_marks(pick, marks, num):
        for r, row in enumerate(scaled(mark.metrics)):
            ax.plot(xs, row, color="red" if mark is pick else style["color"], lw=2.8 if mark is pick else 2.0, ls="-" if mark is pick else "--",
                    marker=style["marker"], ms=12 if mark is pick else 8, mec="black", zorder=style["zorder"], label=style["label"] if r == 0 else None)
    ticks = []
    for lab, best, worst in zip(names, top, bottom):
        direction = lab.better or "direction not known"
        ticks.append(f"{lab.measured}\n{direction}\ntop {best:.4g}, bottom {worst:.4g}")
    ax.set_xticks(xs, ticks, fontsize=8)
    ax.set_ylabel("position in the front's range\n(1 = its best, 0 = its worst)" if flip.any() or any(lab.sense for lab in names)
                  else "scaled metric on the front")
    ax.grid(alpha=0.3, axis="x")
    ax.set_title(title or front.label or "front", fontsize=10)
    legend(fig, ax, inside_up_to=0)
    return save(fig, path)


def plot_parity(result: Any, path: str | os.PathLike | None = None, labels: Sequence[MetricLabel | str] | None = None) -> Figure:
    """Surrogate predicted vs measured metric per task (samples, and re-evaluated front points),
    with the line of perfect prediction; ``labels`` as in :func:`plot_front_2d` (default: the
    result's task names and senses)."""
    names = _labels(len(result.task_names), labels, result.task_names, getattr(result, "senses", None))
    fig = Figure(figsize=(3.6 * len(names), 3.8))
    predicted = result.predict(result.samples.coeffs)
    real = result.real_front
    real_pred = result.predict(real.coeffs) if real is not None else None
    for j, lab in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        ax.scatter(result.samples.metrics[:, j], predicted[:, j], s=14, label="samples", zorder=Z_REAL)
        if real is not None:
            ax.scatter(real.metrics[:, j], real_pred[:, j], s=14, marker="s", label="front (re-evaluated)", zorder=Z_REAL)
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured", zorder=Z_REFERENCE)
        d = result.surrogates[j].diagnostics
        what = axis_label("", lab.metric, lab.unit).lstrip(": ") or lab.task  # the metric and unit, or the task's name
        ax.set_title(f"{lab.task}: R²={d.r2:.3f}, LOO RMSE={d.loo_rmse:.3g}", fontsize=8)
        ax.set_xlabel(f"measured {what}", fontsize=8)
        ax.set_ylabel(f"predicted {what}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    legend(fig, fig.axes[0], inside_up_to=0)
    return save(fig, path)


def plot_landscape(result: Any, task: int = 0, axes: tuple[int, int] = (0, 1), resolution: int = 60, path: str | os.PathLike | None = None,
                   labels: Sequence[MetricLabel | str] | None = None, coeff_names: Sequence[str] | None = None, pick: Mark | None = None,
                   marks: Mapping[str, Mark] | None = None) -> Figure:
    """Heat map of one task's surrogate over two coefficients (others at the box centre), the
    samples, and ``pick`` / ``marks`` (:class:`~map_merge.plot_marks.Mark` with coefficients) at
    their coefficients; the axes cover them (a point outside the searched box included).
    ``coeff_names``: the coefficients' names (default: the task names when there is one
    coefficient per task)."""
    low, high = result.bounds
    num = result.samples.coeffs.shape[1]
    names = _labels(len(result.task_names), labels, result.task_names, getattr(result, "senses", None))
    if coeff_names is None:
        coeff_names = [f"c[{k}] ({n})" for k, n in enumerate(result.task_names)] if num == len(result.task_names) else [f"c[{k}]" for k in range(num)]
    grid = np.linspace(low, high, resolution)
    xx, yy = np.meshgrid(grid, grid)
    coeffs = np.full((xx.size, num), 0.5 * (low + high))
    coeffs[:, axes[0]] = xx.ravel()
    coeffs[:, axes[1]] = yy.ravel()
    values = result.surrogates[task].predict(coeffs).reshape(xx.shape)
    fig = Figure(figsize=(5.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.contourf(xx, yy, values, levels=20, cmap="viridis")
    fig.colorbar(image, ax=ax, label="predicted " + names[task].axis)
    ax.plot([low, high, high, low, low], [low, low, high, high, low], ":", color="0.3", lw=1, label=f"searched box [{low:g}, {high:g}]")
    ax.scatter(result.samples.coeffs[:, axes[0]], result.samples.coeffs[:, axes[1]], c="w", s=12, edgecolors="k", label="samples", zorder=Z_REAL)
    placed = []
    for mark, style in as_marks(pick, {k: v for k, v in (marks or {}).items()}, len(result.task_names)):
        if mark.coeffs is None:
            raise ValueError(f"mark {mark.label!r} has no coefficients to place on the landscape")
        at = np.atleast_2d(mark.coeffs)[:, list(axes)]
        ax.scatter(at[:, 0], at[:, 1], **style)
        placed.append(at)
    if placed:
        cover(ax, np.concatenate(placed))
    ax.set_xlabel(f"coefficient {coeff_names[axes[0]]}")
    ax.set_ylabel(f"coefficient {coeff_names[axes[1]]}")
    ax.set_title(f"surrogate of {names[task].measured} (others at the box centre)", fontsize=9)
    legend(fig, ax)
    return save(fig, path)


def plot_front_3d(
    fronts: Mapping[str, ParetoFront | np.ndarray],
    task_names: Sequence[str] | None = None,
    tasks: tuple[int, int, int] = (0, 1, 2),
    reference: np.ndarray | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
    senses: Sequence[str] | None = None,
    labels: Sequence[MetricLabel | str] | None = None,
    pick: Mark | None = None,
    marks: Mapping[str, Any] | None = None,
) -> Figure:
    """3-task view: each front's points ``(N, M)`` in the space of three tasks' metrics, fronts
    labelled "predicted" small and faint under the real evaluations; ``labels`` / ``senses`` /
    ``pick`` / ``marks`` as in :func:`plot_front_2d`."""
    num, names = _front_labels(fronts, task_names, senses, labels)
    fig = Figure(figsize=(6.8, 6.0))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    ax.computed_zorder = False  # draw in zorder: real evaluations over the predicted cloud
    i, j, k = tasks
    if reference is not None:
        ax.scatter(reference[:, i], reference[:, j], reference[:, k], s=4, color="0.6", alpha=0.3, label="reference", zorder=Z_REFERENCE)
    for n, (label, front) in enumerate(fronts.items()):
        points = _points(front)
        _scatter_front(ax, [points[:, i], points[:, j], points[:, k]], label, _STYLES[n % len(_STYLES)])
    draw_marks(ax, as_marks(pick, marks, num), (i, j, k))
    ax.set_xlabel(_wrapped(names[i]), fontsize=7)
    ax.set_ylabel(_wrapped(names[j]), fontsize=7)
    ax.set_zlabel(_wrapped(names[k]), fontsize=7)
    ax.tick_params(labelsize=7)
    legend(fig, ax, inside_up_to=0)
    if title:
        ax.set_title(title, fontsize=10)
    return save(fig, path)
