"""Pareto dominance and the :class:`ParetoFront` result type.

Convention: every function here *maximises* (higher is better in every column). Metrics with
sense ``"min"`` are negated by :func:`orient` before they get here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import moocore
import numpy as np

__all__ = ["pareto_mask", "orient", "check_senses", "check_noisy", "check_preference", "ParetoFront", "cautious_pick", "PICK_CAUTION"]

# How many predictive standard deviations a predicted pick must clear to be handed over instead of a
# model already evaluated (benchmarks/bench_fronts.py, docs/fronts.md "Which model is handed over").
PICK_CAUTION = 1.0


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Boolean mask ``(N,)`` of the non-dominated rows of ``points: (N, M)`` (maximisation).

    A row is dominated if another row is >= in every column and > in at least one; exact
    duplicates do not dominate each other, so all copies of a non-dominated point are kept."""
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be (N, M), got shape {points.shape}")
    if points.shape[0] == 0:
        return np.zeros(0, dtype=bool)
    if not np.isfinite(points).all():
        raise ValueError("points contain NaN or inf")
    return np.asarray(moocore.is_nondominated(points, maximise=True, keep_weakly=True), dtype=bool)


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


def check_noisy(noisy: Sequence[bool] | None, num: int) -> tuple[bool, ...]:
    """Validate per-metric noise flags (``True``: the metric is a noisy estimate, such as accuracy on
    a sample of a few hundred questions); ``None`` means none is."""
    if noisy is None:
        return (False,) * num
    if isinstance(noisy, (bool, np.bool_)):
        return (bool(noisy),) * num
    if isinstance(noisy, (str, bytes, Mapping)) or not isinstance(noisy, Iterable) or np.ndim(noisy) != 1:
        raise ValueError(f"noisy must be True, False or a sequence of {num} of them (one per task), got {noisy!r}")
    flags = tuple(noisy)
    if len(flags) != num:
        raise ValueError(f"got {len(flags)} noise flags for {num} tasks")
    bad = [f for f in flags if not isinstance(f, (bool, np.bool_))]
    if bad:
        raise ValueError(f"a task's noise flag must be True or False, got {bad}")
    return tuple(bool(f) for f in flags)


def orient(metrics: np.ndarray, senses: Sequence[str]) -> np.ndarray:
    """Metrics ``(N, M)`` turned higher-is-better: columns with sense ``"min"`` negated."""
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    return np.asarray(metrics, dtype=np.float64) * sign


def check_preference(preference: Sequence[float], num: int) -> np.ndarray:
    """Validate a preference vector: length ``num``, finite, non-negative, not all zero.
    Returns it normalised to sum 1."""
    w = np.asarray(preference, dtype=np.float64).reshape(-1)
    if w.shape[0] != num:
        raise ValueError(f"preference has {w.shape[0]} weights but there are {num} tasks")
    if not np.isfinite(w).all():
        raise ValueError(f"preference must be finite, got {w.tolist()}")
    if (w < 0).any():
        raise ValueError(f"preference weights must be non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError("preference weights are all zero: give at least one positive weight")
    return w / w.sum()


@dataclass
class ParetoFront:
    """A set of coefficient vectors and their metrics (predicted or measured).

    Attributes:
        coeffs: ``(N, T)`` merging coefficients.
        metrics: ``(N, M)`` metrics in their own units and sense.
        task_names: M names.  senses: M of ``"max"``/``"min"``.
        label: what these metrics are (``"MAP predicted"``, ``"MAP real"``...).
    """

    coeffs: np.ndarray
    metrics: np.ndarray
    task_names: tuple[str, ...]
    senses: tuple[str, ...] = ()
    label: str = ""
    std: np.ndarray | None = None  # (N, M) predictive std where known
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coeffs = np.atleast_2d(np.asarray(self.coeffs, dtype=np.float64))
        self.metrics = np.atleast_2d(np.asarray(self.metrics, dtype=np.float64))
        self.task_names = tuple(self.task_names)
        if not self.senses:
            self.senses = ("max",) * len(self.task_names)
        self.senses = tuple(self.senses)
        if self.metrics.shape[0] == 0 or self.coeffs.size == 0:
            raise ValueError(f"empty Pareto front{f' ({self.label})' if self.label else ''}: no points to choose from")
        if self.coeffs.shape[0] != self.metrics.shape[0]:
            raise ValueError(f"{self.coeffs.shape[0]} coefficient vectors but {self.metrics.shape[0]} metric rows")
        if self.metrics.shape[1] != len(self.task_names) or len(self.senses) != len(self.task_names):
            raise ValueError(f"metrics have {self.metrics.shape[1]} columns for {len(self.task_names)} task names / {len(self.senses)} senses")

    def __len__(self) -> int:
        return self.metrics.shape[0]

    @property
    def oriented(self) -> np.ndarray:
        """``(N, M)`` metrics turned higher-is-better."""
        return orient(self.metrics, self.senses)

    def nondominated(self) -> "ParetoFront":
        """The sub-front of points not dominated by another point of this front."""
        return self.subset(np.flatnonzero(pareto_mask(self.oriented)))

    def subset(self, index: Sequence[int] | np.ndarray) -> "ParetoFront":
        index = np.asarray(index, dtype=int)
        return ParetoFront(
            self.coeffs[index], self.metrics[index], self.task_names, self.senses, self.label,
            None if self.std is None else self.std[index], dict(self.extra),
        )

    def select_index(self, preference: Sequence[float]) -> int:
        """Index of the point maximising ``<w / ||w||, oriented metrics>`` for weights ``w >= 0``."""
        w = check_preference(preference, len(self.task_names))
        return int(np.argmax(self.oriented @ w))

    def select(self, preference: Sequence[float]) -> np.ndarray:
        """Coefficients ``(T,)`` of the point preferred by ``preference: (M,)`` (see :meth:`select_index`)."""
        return self.coeffs[self.select_index(preference)].copy()

    def nearest(self, target: Sequence[float], scale: Sequence[float] | None = None) -> np.ndarray:
        """Coefficients ``(T,)`` of the point whose metrics are nearest ``target: (M,)``
        (Euclidean, each column divided by ``scale``, default: the front's range)."""
        target = np.asarray(target, dtype=np.float64).reshape(-1)
        if target.shape[0] != len(self.task_names):
            raise ValueError(f"target has {target.shape[0]} values but there are {len(self.task_names)} tasks")
        if scale is None:
            spread = self.metrics.max(axis=0) - self.metrics.min(axis=0)
            scale = np.where(spread > 0, spread, 1.0)
        dist = np.linalg.norm((self.metrics - target) / np.asarray(scale, dtype=np.float64), axis=1)
        return self.coeffs[int(np.argmin(dist))].copy()

    def meeting(self, floors: Sequence[float | None]) -> "ParetoFront":
        """The points meeting per-task floors (``None`` = no floor). For a ``"min"`` task the
        floor is a ceiling. Raises ``ValueError`` naming the tasks when no point meets them."""
        floors = list(floors)
        if len(floors) != len(self.task_names):
            raise ValueError(f"got {len(floors)} floors for {len(self.task_names)} tasks")
        ok = np.ones(len(self), dtype=bool)
        for j, floor in enumerate(floors):
            if floor is None:
                continue
            ok &= self.metrics[:, j] >= floor if self.senses[j] == "max" else self.metrics[:, j] <= floor
        if not ok.any():
            best = [f"{n}: best {self.metrics[:, j].max() if s == 'max' else self.metrics[:, j].min():.4g}"
                    for j, (n, s) in enumerate(zip(self.task_names, self.senses)) if floors[j] is not None]
            raise ValueError(f"no front point meets the floors {floors} ({'; '.join(best)})")
        return self.subset(np.flatnonzero(ok))

    def to_dict(self) -> dict:
        out = {
            "label": self.label, "task_names": list(self.task_names), "senses": list(self.senses),
            "coeffs": self.coeffs.tolist(), "metrics": self.metrics.tolist(),
        }
        if self.std is not None:
            out["std"] = self.std.tolist()
        return out


def cautious_pick(front: "ParetoFront", preference: Sequence[float], evaluated: "ParetoFront | None" = None,
                  caution: float = PICK_CAUTION, posterior: "tuple[np.ndarray, np.ndarray] | None" = None,
                  noisy: Sequence[bool] | None = None) -> tuple["ParetoFront", int]:
    """The model handed to a user who prefers ``preference: (M,)``: ``(front it comes from, index)``.

    Scores are weighted sums ``<w, oriented metrics>`` with ``w`` the preference normalised to sum 1.
    The predicted ``front``'s point with the highest cautious score ``<w, mean> - caution *
    sqrt(<w**2, std**2>)`` (its predictive ``std``; a front without one: the mean alone) is handed
    over unless a point of ``evaluated`` (real evaluations, same metrics) scores higher for real:
    then that one. A prediction is trusted as far as its uncertainty, and never over a model already
    measured to be better than the prediction can promise.

    ``posterior = (mean (E, M), std (E, M))``, the model's prediction at the E evaluated points,
    scores them like predicted points instead of by their measurements: in the metrics flagged
    ``noisy: (M,)`` (default: every metric), noisy estimates such as accuracy on a few hundred
    questions, whose best measurement owes part of its lead to luck; the other metrics keep their
    measurements (docs/fronts.md, "Which model is handed over"). ``noisy`` with a flag set needs
    ``posterior`` (``ValueError``). A metric weighted 0 plays no part; a point whose score or std is
    NaN is never picked over one that is known (``ValueError`` when no point is known). Of real
    evaluations tied on the top score, a dominated one (by their measurements) is never handed over:
    scored by their measurements alone, the pick is the same over all real evaluations as over
    their non-dominated set. Scored by the model in some metric, it is not (a model the
    measurements dominate may score best): pass every real evaluation then."""
    if float(caution) < 0 or not np.isfinite(caution):
        raise ValueError(f"caution must be a finite number >= 0, got {caution}")
    if len(front) == 0:
        raise ValueError("the front is empty: there is nothing to pick from")
    w = check_preference(preference, len(front.task_names))
    used = w > 0  # a metric weighted 0 plays no part, whatever its value or std (0 * inf is NaN)

    def cautious(oriented: np.ndarray, std: np.ndarray | None) -> np.ndarray:
        score = np.where(used, oriented, 0.0) @ w
        if std is not None and caution > 0:
            score = score - float(caution) * np.sqrt(np.where(used, np.asarray(std, dtype=np.float64), 0.0) ** 2 @ w**2)
        # a point whose weighted score or uncertainty is unknown (NaN) is not trusted: never picked over
        # one that is known (np.argmax would return the first NaN)
        return np.where(np.isnan(score), -np.inf, score)

    if noisy is not None and posterior is None and any(check_noisy(noisy, len(w))):
        raise ValueError("noisy metrics are scored by the model at the real evaluations: give posterior=(mean, std) there "
                         "(MAPResult.predict(evaluated.coeffs, return_std=True)), or use MAPResult.choice")
    score = cautious(front.oriented, front.std)
    real = None
    if evaluated is not None and len(evaluated):
        if tuple(evaluated.senses) != tuple(front.senses) or len(evaluated.task_names) != len(front.task_names):
            raise ValueError(f"the evaluated points have senses {evaluated.senses}, the front {front.senses}")
        if posterior is None:
            real = cautious(evaluated.oriented, None)
        else:
            mean, std = (np.atleast_2d(np.asarray(part, dtype=np.float64)) for part in posterior)
            if mean.shape != evaluated.metrics.shape or std.shape != evaluated.metrics.shape:
                raise ValueError(f"the posterior at the evaluated points has shapes {mean.shape} and {std.shape}; "
                                 f"expected {evaluated.metrics.shape}, one row per evaluated point")
            model = np.ones(len(w), dtype=bool) if noisy is None else np.asarray(check_noisy(noisy, len(w)))
            real = cautious(np.where(model, orient(mean, evaluated.senses), evaluated.oriented), np.where(model, std, 0.0))
    if not np.isfinite(score).any() and (real is None or not np.isfinite(real).any()):
        raise ValueError(f"no front point has a finite weighted score{'' if front.std is None else ' and predictive std'} "
                         f"for preference {w.tolist()}, and no real evaluation to pick instead")
    best = int(np.argmax(score))
    if real is not None and real.max() > score[best]:
        return evaluated, _best_undominated(real, evaluated.oriented)
    return front, best


def _best_undominated(score: np.ndarray, oriented: np.ndarray) -> int:
    """Index of the first point with the top ``score: (N,)`` that no other top point dominates
    (``oriented: (N, M)``, higher is better; :func:`pareto_mask`). A metric weighted 0 lets a point
    tie with one that dominates it; the dominated one is never handed over. A point that dominates
    a top point is a top point itself (weights >= 0), so this is the first top point of the
    non-dominated set. Top points with a non-finite metric: the first top point."""
    top = np.flatnonzero(score == score.max())
    points = oriented[top]
    if len(top) == 1 or not np.isfinite(points).all():
        return int(top[0])
    return int(top[np.argmax(pareto_mask(points))])
