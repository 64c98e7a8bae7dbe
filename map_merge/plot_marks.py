"""Marked points on figures (the pick, the user's recipe) and the layering, limits and legends
that keep a figure readable on its own (used by :mod:`map_merge.plots`).

Layers, bottom to top: reference (``Z_REFERENCE``), predicted fronts (``Z_PREDICTED``), real
evaluations (``Z_REAL``), marks (``Z_MARK``) and the pick (``Z_PICK``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .pareto import cautious_pick

__all__ = ["STYLES", "save", "Mark", "pick_mark", "as_marks", "is_predicted", "draw_marks", "cover", "legend",
           "Z_REFERENCE", "Z_PREDICTED", "Z_REAL", "Z_MARK", "Z_PICK"]

Z_REFERENCE, Z_PREDICTED, Z_REAL, Z_MARK, Z_PICK = 1.0, 2.0, 3.0, 5.0, 6.0
PICK_STYLE = dict(marker="*", s=340, color="gold", edgecolors="black", linewidths=1.0, zorder=Z_PICK)
MARK_STYLES = [dict(marker="X", color="black"), dict(marker="P", color="magenta"), dict(marker="D", color="darkorange"),
               dict(marker="h", color="teal")]


STYLES = [
    dict(color="C0", marker="o"), dict(color="C1", marker="s"), dict(color="C2", marker="^"), dict(color="C3", marker="D"),
    dict(color="C4", marker="v"), dict(color="C5", marker="P"), dict(color="C6", marker="X"), dict(color="C7", marker="*"),
    dict(color="C8", marker="<"), dict(color="C9", marker=">"),
]


def save(fig: Figure, path: str | os.PathLike | None) -> Figure:
    """Write ``fig`` to ``path`` (its folder created) when a path is given; returns ``fig``."""
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _fmt(values: np.ndarray) -> str:
    return ", ".join(f"{v:.3g}" for v in values)


@dataclass
class Mark:
    """A point to mark on a figure.

    Attributes:
        metrics: ``(M,)`` its metrics (or ``(K, M)``: several points under one legend entry).
        coeffs: ``(T,)`` its merging coefficients where known (shown in the legend; placed on
            coefficient-space plots such as :func:`~map_merge.plots.plot_landscape`).
        label: the legend text (``"your recipe"``).
    """

    metrics: Any
    coeffs: Any = None
    label: str = ""

    def __post_init__(self) -> None:
        self.metrics = np.atleast_2d(np.asarray(self.metrics, dtype=np.float64))
        self.coeffs = None if self.coeffs is None else np.asarray(self.coeffs, dtype=np.float64)

    def legend(self, default: str = "marked") -> str:
        """The legend entry: the label and, for one point with known coefficients, ``c = (...)``."""
        text = self.label or default
        if self.coeffs is not None and self.coeffs.ndim == 1:
            text += f" (c = {_fmt(self.coeffs)})"
        return text


def pick_mark(front: Any, preference: Sequence[float], label: str = "pick", evaluated: Any = None,
              choice: "tuple[Any, int] | None" = None, posterior: Any = None, noisy: Sequence[bool] | None = None) -> Mark:
    """The point that ``preference`` picks, labelled with the preference: from ``front`` (a
    :class:`~map_merge.ParetoFront`; :meth:`~map_merge.ParetoFront.select_index`); given
    ``choice``, the ``(front, index)`` a run hands over (:meth:`~map_merge.MAPResult.choice`: the
    way to mark what a run's :meth:`~map_merge.MAPResult.select` hands over, noisy metrics
    included); given the real ``evaluated`` points alone, :func:`~map_merge.pareto.cautious_pick`
    on them (on their measured metrics, unless ``posterior`` and ``noisy`` say otherwise, as
    there). A pick that is a real evaluation (not a point of ``front``) is marked as one:
    "(predicted)" in ``label`` then reads "(real evaluation)"."""
    if (posterior is not None or noisy is not None) and (choice is not None or evaluated is None):
        raise ValueError("posterior= and noisy= score the real evaluated= points: give evaluated= with them, and no choice=")
    if choice is not None:
        chosen, index = choice
    elif evaluated is not None:
        chosen, index = cautious_pick(front, preference, evaluated, posterior=posterior, noisy=noisy)
    else:
        chosen, index = front, front.select_index(preference)
    if chosen is not front:
        label = label.replace("(predicted)", "(real evaluation)")
    return Mark(chosen.metrics[index], chosen.coeffs[index], f"{label}, preference ({_fmt(np.asarray(preference, dtype=float))})")


def as_marks(pick: Mark | None, marks: Mapping[str, Any] | None, num: int) -> list[tuple[Mark, dict]]:
    """``[(mark, scatter style)]``: the pick first, then each of ``marks`` (``label -> Mark`` or
    metrics ``(M,)`` / ``(K, M)``); every mark's metrics must have ``num`` columns."""
    out = []
    if pick is not None:
        if not isinstance(pick, Mark):
            raise TypeError(f"pick must be a Mark (e.g. plot_marks.pick_mark(front, preference)), got {type(pick).__name__}")
        out.append((pick, dict(PICK_STYLE, label=pick.legend("pick"))))
    for k, (name, value) in enumerate((marks or {}).items()):
        mark = value if isinstance(value, Mark) else Mark(value, label=str(name))
        if not mark.label:
            mark.label = str(name)
        style = MARK_STYLES[k % len(MARK_STYLES)]
        out.append((mark, dict(marker=style["marker"], s=130, color=style["color"], edgecolors="white", linewidths=0.8,
                               zorder=Z_MARK, label=mark.legend())))
    for mark, _ in out:
        if mark.metrics.shape[1] != num:
            raise ValueError(f"mark {mark.label!r} has {mark.metrics.shape[1]} metrics, the figure shows {num}")
    return out


def is_predicted(label: str) -> bool:
    """A front whose label says "predicted" is a surrogate's claim, not a measurement."""
    return "predicted" in str(label).lower()


def draw_marks(ax, marked: list[tuple[Mark, dict]], columns: Sequence[int]) -> None:
    """Scatter each mark at its metrics ``columns`` (2 or 3 of them) and make the axes cover it."""
    for mark, style in marked:
        ax.scatter(*[mark.metrics[:, c] for c in columns], **style)
    if len(columns) == 2 and marked:
        cover(ax, np.concatenate([m.metrics[:, list(columns)] for m, _ in marked]))


def cover(ax, points: np.ndarray, margin: float = 0.05) -> None:
    """Widen a 2-D axes' limits so every ``(N, 2)`` point lies strictly inside them."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    points = points[np.isfinite(points).all(axis=1)]
    if not len(points):
        return
    for k, (get, set_) in enumerate(((ax.get_xlim, ax.set_xlim), (ax.get_ylim, ax.set_ylim))):
        low, high = get()
        span = max(high - low, float(np.ptp(points[:, k])), 1e-12)
        new_low = min(low, points[:, k].min() - margin * span)
        new_high = max(high, points[:, k].max() + margin * span)
        if (new_low, new_high) != (low, high):
            set_(new_low, new_high)


def legend(fig, ax, inside_up_to: int = 6, fontsize: float = 7) -> None:
    """One legend for the figure: inside ``ax`` when it has few entries, else below the figure
    (so it covers no point)."""
    handles, labels = [], []
    for axes in fig.axes:
        for handle, label in zip(*axes.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    if not handles:
        return
    if len(handles) <= inside_up_to and len(fig.axes) == 1:
        made = ax.legend(handles, labels, fontsize=fontsize, loc="best")
    else:
        made = fig.legend(handles, labels, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)),
                          frameon=False)
    for handle in made.legend_handles:  # faint, tiny points (a predicted cloud) still readable in the legend
        if hasattr(handle, "set_sizes") and len(handle.get_sizes()):
            handle.set_sizes([max(float(handle.get_sizes()[0]), 20.0)])
            handle.set_alpha(1.0)
