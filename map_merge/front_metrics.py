"""Quality indicators of a front against a reference front (all maximise, see :mod:`map_merge.pareto`).

``points: (N, M)``, ``reference: (R, M)``. Hypervolume is exact in any dimension (moocore's
implementation of the exact algorithms); the distance indicators are plain numpy.
"""

from __future__ import annotations

import moocore
import numpy as np
from scipy.spatial.distance import cdist

__all__ = ["hypervolume", "igd", "igd_plus", "gd", "win_rate", "dominates_matrix", "preference_grid", "preference_regret", "front_report"]


def _as_points(points: np.ndarray, name: str, num_cols: int | None = None) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim == 1 and num_cols is not None and array.shape[0] == num_cols:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (N, M), got shape {array.shape}")
    if num_cols is not None and array.shape[1] != num_cols:
        raise ValueError(f"{name} has {array.shape[1]} objectives, expected {num_cols}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf")
    return array


def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by ``points: (N, M)`` and dominating ``ref: (M,)`` (maximisation).
    Points that do not strictly dominate ``ref`` add nothing."""
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    points = _as_points(points, "points", ref.shape[0])
    points = points[(points > ref).all(axis=1)]
    if points.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(points, ref=ref, maximise=True))


def _shortfall(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(R, N)`` IGD+ distances ``||max(z - p, 0)||`` from reference z to point p."""
    gap = np.maximum(reference[:, None, :] - points[None, :, :], 0.0)
    return np.sqrt((gap**2).sum(axis=2))


def igd(points: np.ndarray, reference: np.ndarray) -> float:
    """Mean over reference points of the distance to the nearest of ``points`` (lower is better)."""
    reference = _as_points(reference, "reference")
    points = _as_points(points, "points", reference.shape[1])
    return float(cdist(reference, points).min(axis=1).mean())


def igd_plus(points: np.ndarray, reference: np.ndarray) -> float:
    """IGD+: like :func:`igd` but counting only how far points fall *short* of each reference
    point (Pareto-compliant; lower is better)."""
    reference = _as_points(reference, "reference")
    points = _as_points(points, "points", reference.shape[1])
    return float(_shortfall(points, reference).min(axis=1).mean())


def gd(points: np.ndarray, reference: np.ndarray) -> float:
    """Generational distance: mean over ``points`` of the distance to the nearest reference point."""
    reference = _as_points(reference, "reference")
    points = _as_points(points, "points", reference.shape[1])
    return float(cdist(points, reference).min(axis=1).mean())


def dominates_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(A, B)`` booleans: row i of ``a`` dominates row j of ``b``."""
    ge = (a[:, None, :] >= b[None, :, :]).all(axis=2)
    gt = (a[:, None, :] > b[None, :, :]).any(axis=2)
    return ge & gt


def win_rate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of ``b``'s points dominated by some point of ``a`` (in [0, 1])."""
    b = _as_points(b, "b")
    a = _as_points(a, "a", b.shape[1])
    if b.shape[0] == 0:
        raise ValueError("b is empty: win rate is undefined")
    if a.shape[0] == 0:
        return 0.0
    return float(dominates_matrix(a, b).any(axis=0).mean())


def preference_grid(num_objectives: int, about: int = 20) -> np.ndarray:
    """About ``about`` preference vectors ``(P, M)`` spread evenly over the simplex: the simplex
    lattice whose point count is closest to ``about`` (M=2: 20, M=3: 21, M=4: 20)."""
    from math import comb

    from .search import _simplex_lattice

    if num_objectives < 1:
        raise ValueError(f"num_objectives must be at least 1, got {num_objectives}")
    if num_objectives == 1:
        return np.ones((1, 1))
    partitions = min(range(1, 4 * about), key=lambda h: (abs(comb(h + num_objectives - 1, num_objectives - 1) - about), h))
    return _simplex_lattice(num_objectives, partitions)


def preference_regret(points: np.ndarray, reference: np.ndarray, preferences: np.ndarray) -> np.ndarray:
    """Regret ``(P,)`` of picking, for each preference ``w`` of ``preferences: (P, M)``, the point
    of ``points`` with the best weighted score ``w . z``: the best weighted score over
    ``reference`` minus that pick's (maximisation; negative if ``points`` beat the reference)."""
    reference = _as_points(reference, "reference")
    points = _as_points(points, "points", reference.shape[1])
    preferences = _as_points(preferences, "preferences", reference.shape[1])
    if points.shape[0] == 0:
        raise ValueError("points is empty: there is nothing to pick for a preference")
    return (reference @ preferences.T).max(axis=0) - (points @ preferences.T).max(axis=0)


def front_report(
    points: np.ndarray,
    reference: np.ndarray,
    ref_point: np.ndarray,
    preferences: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
) -> dict[str, float]:
    """All indicators of ``points`` against the reference front (maximisation): hypervolume, its
    ratio to the reference's, IGD, IGD+, GD and the point count; with ``preferences: (P, M)``
    the mean and max :func:`preference_regret`; with ``baseline: (B, M)`` (e.g. the task
    arithmetic sweep) the :func:`win_rate` over it."""
    points = _as_points(points, "points")
    reference = _as_points(reference, "reference", points.shape[1])
    hv_ref = hypervolume(reference, ref_point)
    hv = hypervolume(points, ref_point)
    out = {
        "hypervolume": hv,
        "hv_ratio": hv / hv_ref if hv_ref > 0 else float("nan"),
        "igd": igd(points, reference),
        "igd_plus": igd_plus(points, reference),
        "gd": gd(points, reference),
        "num_points": int(points.shape[0]),
    }
    if preferences is not None:
        regret = preference_regret(points, reference, preferences)
        out["regret_mean"] = float(regret.mean())
        out["regret_max"] = float(regret.max())
    if baseline is not None:
        out["win_rate_vs_baseline"] = win_rate(points, baseline)
    return out
