"""Plots of fronts and surrogates (matplotlib, no pyplot state: every function returns a Figure).

Pass ``path=`` to save a PNG as well.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .objective import check_senses
from .pareto import ParetoFront, orient, pareto_mask

__all__ = ["plot_front_2d", "plot_pairwise", "plot_parallel", "plot_parity", "plot_landscape", "plot_curves", "plot_cost_quality", "plot_front_3d", "save"]

_STYLES = [
    dict(color="C0", marker="o"), dict(color="C1", marker="s"), dict(color="C2", marker="^"), dict(color="C3", marker="D"),
    dict(color="C4", marker="v"), dict(color="C5", marker="P"), dict(color="C6", marker="X"), dict(color="C7", marker="*"),
    dict(color="C8", marker="<"), dict(color="C9", marker=">"),
]


def save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _front_line(ax, points: np.ndarray, i: int, j: int, label: str, style: dict, line: bool, senses: Sequence[str]) -> None:
    if line and len(points) > 1:
        keep = pareto_mask(orient(points[:, [i, j]], (senses[i], senses[j])))  # non-dominated in these two metrics
        sub = points[keep]
        order = np.argsort(sub[:, i])
        dashed = "predicted" in label.lower()  # a surrogate's claim, not measured
        ax.plot(sub[order, i], sub[order, j], "--" if dashed else "-", color=style["color"], lw=1.2 if dashed else 1.5, alpha=0.9, label=label)
        ax.scatter(points[:, i], points[:, j], s=10, color=style["color"], alpha=0.35, marker=style["marker"])
    else:
        ax.scatter(points[:, i], points[:, j], s=28, color=style["color"], marker=style["marker"], label=label, alpha=0.85)


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
) -> Figure:
    """Two tasks' metrics: each front (line through its non-dominated points; dashed for labels
    containing "predicted"), the real samples, and the reference front.

    ``senses``: per metric ``"max"`` / ``"min"`` for the arrays among ``fronts`` (default: all
    ``"max"``); a :class:`ParetoFront` uses its own.

    ``fronts`` maps a label to a :class:`ParetoFront` or a ``(N, M)`` metric array. With ``zoom``
    (and a reference) a second panel zooms on the reference and the real (non-predicted) fronts."""
    i, j = tasks
    panels = 2 if (zoom and reference is not None) else 1
    fig = Figure(figsize=(6.0 * panels, 5.0))
    for panel in range(panels):
        ax = fig.add_subplot(1, panels, panel + 1)
        _draw_front_2d(ax, fronts, task_names, samples, reference, i, j, lines, reference_label, senses)
        if panel == 1:
            ref = np.asarray(reference)[:, [i, j]]
            low, high = ref.min(axis=0), ref.max(axis=0)
            margin = np.maximum(0.5 * (high - low), 0.03 * np.maximum(np.abs(high), 1e-3))
            ax.set_xlim(low[0] - margin[0], high[0] + 0.3 * margin[0])
            ax.set_ylim(low[1] - margin[1], high[1] + 0.3 * margin[1])
            ax.set_title("zoom on the reference front", fontsize=9)
            ax.get_legend().remove()
        elif title:
            ax.set_title(title, fontsize=10)
    return save(fig, path)


def _draw_front_2d(ax, fronts, task_names, samples, reference, i, j, lines, reference_label, senses=None) -> None:
    if reference is not None:
        ref = np.asarray(reference)
        order = np.argsort(ref[:, i])
        ax.plot(ref[order, i], ref[order, j], "-", color="0.3", lw=3, alpha=0.35, label=reference_label)
    if samples is not None:
        ax.scatter(samples[:, i], samples[:, j], s=18, facecolors="none", edgecolors="0.4", label="real samples")
    names = task_names
    for k, (label, front) in enumerate(fronts.items()):
        points = front.metrics if isinstance(front, ParetoFront) else np.asarray(front)
        if isinstance(front, ParetoFront):
            names = names or front.task_names
        draw_line = (lines or {}).get(label, len(points) > 12)
        own = front.senses if isinstance(front, ParetoFront) else check_senses(senses, points.shape[1])
        _front_line(ax, points, i, j, label, _STYLES[k % len(_STYLES)], draw_line, own)
    names = names or [f"task{i}", f"task{j}"]
    ax.set_xlabel(names[i])
    ax.set_ylabel(names[j])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_pairwise(
    fronts: Mapping[str, ParetoFront | np.ndarray],
    task_names: Sequence[str],
    reference: np.ndarray | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Grid of 2-task projections for T >= 3 tasks (upper triangle)."""
    num = len(task_names)
    fig = Figure(figsize=(3.2 * (num - 1), 3.0 * (num - 1)))
    for i in range(num - 1):
        for j in range(i + 1, num):
            ax = fig.add_subplot(num - 1, num - 1, i * (num - 1) + j)
            if reference is not None:
                ax.scatter(reference[:, i], reference[:, j], s=4, color="0.6", alpha=0.4, label="reference")
            for k, (label, front) in enumerate(fronts.items()):
                points = front.metrics if isinstance(front, ParetoFront) else np.asarray(front)
                style = _STYLES[k % len(_STYLES)]
                ax.scatter(points[:, i], points[:, j], s=8, color=style["color"], marker=style["marker"], alpha=0.6, label=label)
            ax.set_xlabel(task_names[i], fontsize=8)
            ax.set_ylabel(task_names[j], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == 0 and j == 1:
                ax.legend(fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_parallel(front: ParetoFront, highlight: Sequence[int] = (), max_lines: int = 300, path: str | os.PathLike | None = None) -> Figure:
    """Parallel coordinates of a front's metrics (each task scaled to its range on the front)."""
    metrics = front.metrics
    if len(metrics) > max_lines:
        from .search import thin_front

        index = thin_front(front.oriented, max_lines)
        metrics = metrics[index]
    low, high = metrics.min(axis=0), metrics.max(axis=0)
    scaled = (metrics - low) / np.where(high > low, high - low, 1.0)
    fig = Figure(figsize=(1.6 * len(front.task_names) + 2, 4))
    ax = fig.add_subplot(1, 1, 1)
    xs = np.arange(len(front.task_names))
    for row in scaled:
        ax.plot(xs, row, color="C0", alpha=0.15, lw=1)
    for h in highlight:
        row = (front.metrics[h] - low) / np.where(high > low, high - low, 1.0)
        ax.plot(xs, row, color="C3", lw=2.5)
    ax.set_xticks(xs, [f"{n}\n[{lo:.3f}, {hi:.3f}]" for n, lo, hi in zip(front.task_names, low, high)], fontsize=8)
    ax.set_ylabel("scaled metric on the front")
    ax.set_title(front.label or "front", fontsize=10)
    return save(fig, path)


def plot_parity(result: Any, path: str | os.PathLike | None = None) -> Figure:
    """Surrogate predicted vs measured metric per task (samples, and re-evaluated front points)."""
    names = result.task_names
    fig = Figure(figsize=(3.3 * len(names), 3.3))
    predicted = result.predict(result.samples.coeffs)
    real = result.real_front
    real_pred = result.predict(real.coeffs) if real is not None else None
    for j, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), j + 1)
        ax.scatter(result.samples.metrics[:, j], predicted[:, j], s=14, label="samples")
        if real is not None:
            ax.scatter(real.metrics[:, j], real_pred[:, j], s=14, marker="s", label="front (re-evaluated)")
        lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
        hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        d = result.surrogates[j].diagnostics
        ax.set_title(f"{name}: R²={d.r2:.3f}, LOO RMSE={d.loo_rmse:.3g}", fontsize=8)
        ax.set_xlabel("measured")
        ax.set_ylabel("predicted")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save(fig, path)


def plot_landscape(result: Any, task: int = 0, axes: tuple[int, int] = (0, 1), resolution: int = 60, path: str | os.PathLike | None = None) -> Figure:
    """Heat map of one task's surrogate over two coefficients (others at the box centre)."""
    low, high = result.bounds
    num = result.samples.coeffs.shape[1]
    grid = np.linspace(low, high, resolution)
    xx, yy = np.meshgrid(grid, grid)
    coeffs = np.full((xx.size, num), 0.5 * (low + high))
    coeffs[:, axes[0]] = xx.ravel()
    coeffs[:, axes[1]] = yy.ravel()
    values = result.surrogates[task].predict(coeffs).reshape(xx.shape)
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.contourf(xx, yy, values, levels=20, cmap="viridis")
    fig.colorbar(image, ax=ax, label=result.task_names[task])
    ax.scatter(result.samples.coeffs[:, axes[0]], result.samples.coeffs[:, axes[1]], c="w", s=12, edgecolors="k", label="samples")
    ax.set_xlabel(f"c[{axes[0]}]")
    ax.set_ylabel(f"c[{axes[1]}]")
    ax.set_title(f"surrogate of {result.task_names[task]}", fontsize=10)
    ax.legend(fontsize=7)
    return save(fig, path)


def plot_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """Lines with optional spread bands: ``label -> (x, mean, std or None)``."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    for k, (label, (x, mean, std)) in enumerate(curves.items()):
        style = _STYLES[k % len(_STYLES)]
        ax.plot(x, mean, "-", marker=style["marker"], color=style["color"], label=label, ms=4)
        if std is not None:
            ax.fill_between(x, np.asarray(mean) - std, np.asarray(mean) + std, color=style["color"], alpha=0.15)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return save(fig, path)


def plot_cost_quality(
    scores: Mapping[str, Mapping[str, float]],
    cost: str = "evaluations",
    qualities: Sequence[tuple[str, str]] = (("hv_ratio", "hypervolume ratio (higher is better)"), ("regret_mean", "mean preference regret (lower is better)")),
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """One panel per quality: each method is a labelled point at (its cost, its quality).
    ``scores``: ``method -> {cost: ..., quality: ...}`` (e.g. :func:`map_merge.compare.score_runs`)."""
    panels = [(key, label) for key, label in qualities if any(key in s for s in scores.values())]
    fig = Figure(figsize=(5.2 * max(1, len(panels)), 4.2))
    for p, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), p + 1)
        for k, (method, s) in enumerate(scores.items()):
            if key not in s or cost not in s:
                continue
            style = _STYLES[k % len(_STYLES)]
            ax.scatter([s[cost]], [s[key]], color=style["color"], marker=style["marker"], s=45, label=method)
        ax.set_xlabel(cost.replace("_", " "))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if p == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_front_3d(
    fronts: Mapping[str, ParetoFront | np.ndarray],
    task_names: Sequence[str],
    tasks: tuple[int, int, int] = (0, 1, 2),
    reference: np.ndarray | None = None,
    title: str = "",
    path: str | os.PathLike | None = None,
) -> Figure:
    """3-task view: each front's points ``(N, M)`` in the space of three tasks' metrics."""
    fig = Figure(figsize=(6.4, 5.6))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    i, j, k = tasks
    if reference is not None:
        ax.scatter(reference[:, i], reference[:, j], reference[:, k], s=4, color="0.6", alpha=0.3, label="reference")
    for n, (label, front) in enumerate(fronts.items()):
        points = front.metrics if isinstance(front, ParetoFront) else np.asarray(front)
        style = _STYLES[n % len(_STYLES)]
        ax.scatter(points[:, i], points[:, j], points[:, k], s=14, color=style["color"], marker=style["marker"], alpha=0.8, label=label)
    ax.set_xlabel(task_names[i], fontsize=8)
    ax.set_ylabel(task_names[j], fontsize=8)
    ax.set_zlabel(task_names[k], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=10)
    return save(fig, path)
