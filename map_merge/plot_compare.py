"""Figures that compare methods (not fronts): quality against cost, curves over budgets, bars
with their spread over seeds. Re-exported by :mod:`map_merge.plots`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .plot_marks import STYLES, save

__all__ = ["plot_curves", "plot_cost_quality", "plot_bars"]


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
        style = STYLES[k % len(STYLES)]
        ax.plot(x, mean, "-", marker=style["marker"], color=style["color"], label=label, ms=4)
        if std is not None:
            ax.fill_between(x, np.asarray(mean) - std, np.asarray(mean) + std, color=style["color"], alpha=0.15)
    _decorate(ax, xlabel, ylabel, title, legend=True)
    return save(fig, path)


def _decorate(ax, xlabel: str | None, ylabel: str, title: str = "", legend: bool = True, grid_axis: str = "both") -> None:
    """Axis labels, a light grid, the legend and the panel's title."""
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis=grid_axis)
    if legend:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)


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
            style = STYLES[k % len(STYLES)]
            ax.scatter([s[cost]], [s[key]], color=style["color"], marker=style["marker"], s=45, label=method)
        _decorate(ax, f"{cost.replace('_', ' ')} (cost, lower is better)", label, legend=p == 0)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_bars(
    values: Mapping[str, tuple[float, float]],
    ylabel: str,
    title: str = "",
    colors: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """One bar per method with its spread: ``method -> (mean, std)``; the value is written on
    each bar. ``ylabel`` should say which way is better."""
    fig = Figure(figsize=(max(5.0, 0.75 * len(values) + 1.5), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    names = list(values)
    means = np.array([values[n][0] for n in names], dtype=np.float64)
    stds = np.array([values[n][1] for n in names], dtype=np.float64)
    bars = ax.bar(np.arange(len(names)), means, yerr=stds, capsize=3, color=list(colors) if colors is not None else "C0",
                  label="mean ± std over seeds")
    for bar, mean in zip(bars, means):
        ax.annotate(f"{mean:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
    finite = np.isfinite(means)
    if finite.any() and means[finite].min() > 0.5 and means[finite].max() <= 1.1:  # ratios near 1: show the differences
        low, high = (means - stds)[finite].min(), (means + stds)[finite].max()
        ax.set_ylim(max(0.0, float(low) - 0.05), max(1.0, float(high)) + 0.02)
    _decorate(ax, None, ylabel, title, grid_axis="y")
    return save(fig, path)
