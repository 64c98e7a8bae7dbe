"""Sampling designs for the coefficient box: which ``coeffs: (K, T)`` to evaluate for real.

- :func:`map_design`: the MAP authors' design: the T one-hot vectors (scaled to the box), a
  few isotropic points ``u * 1`` and jittered copies of them, the rest from a regular grid with
  duplicates removed.
- :func:`sobol_design` / :func:`lhs_design`: space-filling quasi-random designs (scipy.stats.qmc)
  that always contain the one-hot vectors.

All designs are deterministic for a seed and lie in ``[low, high]^T``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import qmc

__all__ = ["num_quadratic_params", "quadratic_features", "default_num_samples", "map_design", "sobol_design", "lhs_design", "make_design", "one_hots", "grid_design", "qmc_design"]


def num_quadratic_params(num_tasks: int) -> int:
    """Parameters of a full quadratic in T variables: ``P = (T+1)(T+2)/2``. With coefficient groups
    the variables are the ``T x G`` coefficients: ``(TG+1)(TG+2)/2`` (T = 2: 6 at G = 1, 15 at
    G = 2, 28 at G = 3)."""
    return (num_tasks + 1) * (num_tasks + 2) // 2


def default_num_samples(num_tasks: int) -> int:
    """The authors' budget, twice the surrogate's parameters: ``(T+1)(T+2)``; pass ``T x G`` with
    coefficient groups: ``(TG+1)(TG+2)`` real evaluations (T = 2: 12, 30 and 56 at G = 1, 2, 3;
    T = 4, G = 3: 182)."""
    return 2 * num_quadratic_params(num_tasks)


def one_hots(num_tasks: int, low: float, high: float) -> np.ndarray:
    """The T box corners ``low + (high - low) e_i`` (the one-hot vectors for the box [0, 1])."""
    return low + (high - low) * np.eye(num_tasks)


def _check(num_tasks: int, num_samples: int, bounds: tuple[float, float]) -> tuple[float, float]:
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
    low, high = float(bounds[0]), float(bounds[1])
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"bounds must be finite with low < high, got {bounds}")
    if num_samples < num_tasks:
        raise ValueError(f"num_samples={num_samples} cannot hold the {num_tasks} one-hot vectors")
    return low, high


def _unique_rows(points: np.ndarray, decimals: int = 9) -> np.ndarray:
    _, index = np.unique(np.round(points, decimals), axis=0, return_index=True)
    return points[np.sort(index)]


def map_design(num_tasks: int, num_samples: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> np.ndarray:
    """The MAP authors' design, ``(num_samples, T)``.

    One-hots first, then ``max(1, n // 6)`` isotropic points ``u * 1`` (u uniform in the box),
    each with one jittered copy (Gaussian jitter of 10% of the box width, clipped), then points
    of the coarsest regular grid with at least 3 levels per axis (on 2 levels ``c_i^2 = c_i``
    and a quadratic is not identifiable) that has enough unused nodes, chosen at random and
    redrawn (up to 50 times) until the quadratic's feature matrix has full rank.
    """
    low, high = _check(num_tasks, num_samples, bounds)
    rng = np.random.default_rng(seed)
    width = high - low
    points = [one_hots(num_tasks, low, high)]
    remaining = num_samples - num_tasks
    num_iso = min(max(1, remaining // 6), remaining // 2) if remaining >= 2 else 0
    if num_iso:
        u = rng.uniform(low, high, size=(num_iso, 1))
        iso = np.repeat(u, num_tasks, axis=1)
        jitter = np.clip(iso + rng.normal(0.0, 0.1 * width, size=iso.shape), low, high)
        points += [iso, jitter]
    chosen = _unique_rows(np.concatenate(points))
    need = num_samples - len(chosen)
    if need > 0:
        per_axis = 3
        while True:
            grid = _grid(num_tasks, per_axis, low, high)
            fresh = _exclude(grid, chosen)
            if len(fresh) >= need or per_axis > 64:
                break
            per_axis += 1
        wanted = min(num_samples, num_quadratic_params(num_tasks))
        for _ in range(50):
            take = rng.choice(len(fresh), size=min(need, len(fresh)), replace=False)
            candidate = np.concatenate([chosen, fresh[np.sort(take)]])
            if _quadratic_rank(candidate) >= wanted:
                break
        chosen = candidate
    return chosen[:num_samples]


def quadratic_features(coeffs: np.ndarray) -> np.ndarray:
    """Features ``(K, P)``: ``[1, c_1..c_T, c_i c_j for i <= j]`` for ``coeffs: (K, T)`` (the
    surrogates' basis; ``P`` is :func:`num_quadratic_params`)."""
    coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
    rows, cols = np.triu_indices(coeffs.shape[1])
    return np.concatenate([np.ones((coeffs.shape[0], 1)), coeffs, coeffs[:, rows] * coeffs[:, cols]], axis=1)


def _quadratic_rank(points: np.ndarray) -> int:
    """Rank of the full-quadratic feature matrix of ``points`` (the surrogate's features)."""
    return int(np.linalg.matrix_rank(quadratic_features(points)))


def _grid(num_tasks: int, per_axis: int, low: float, high: float) -> np.ndarray:
    axis = np.linspace(low, high, per_axis)
    mesh = np.meshgrid(*([axis] * num_tasks), indexing="ij")
    return np.stack([m.reshape(-1) for m in mesh], axis=1)


def _exclude(candidates: np.ndarray, existing: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    close = (np.abs(candidates[:, None, :] - existing[None, :, :]) < tol).all(axis=2).any(axis=1)
    return candidates[~close]


def _qmc_design(sampler: qmc.QMCEngine, num_tasks: int, num_samples: int, low: float, high: float) -> np.ndarray:
    anchors = one_hots(num_tasks, low, high)
    need = num_samples - num_tasks
    if need <= 0:
        return anchors[:num_samples]
    if isinstance(sampler, qmc.Sobol):
        sample = sampler.random_base2(max(1, math.ceil(math.log2(need))))[:need]
    else:
        sample = sampler.random(need)
    return np.concatenate([anchors, qmc.scale(sample, [low] * num_tasks, [high] * num_tasks)])


def sobol_design(num_tasks: int, num_samples: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> np.ndarray:
    """One-hots plus a scrambled Sobol sequence, ``(num_samples, T)``."""
    low, high = _check(num_tasks, num_samples, bounds)
    return _qmc_design(qmc.Sobol(num_tasks, scramble=True, seed=seed), num_tasks, num_samples, low, high)


def lhs_design(num_tasks: int, num_samples: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> np.ndarray:
    """One-hots plus an optimised Latin hypercube, ``(num_samples, T)``."""
    low, high = _check(num_tasks, num_samples, bounds)
    sampler = qmc.LatinHypercube(num_tasks, seed=seed, optimization="random-cd" if num_tasks > 1 else None)
    return _qmc_design(sampler, num_tasks, num_samples, low, high)


def qmc_design(num_tasks: int, num_samples: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> np.ndarray:
    """A scrambled Sobol sequence alone, ``(num_samples, T)`` (no one-hots): the start for a
    black box whose coefficients are not those of fine-tuned experts."""
    low, high = float(bounds[0]), float(bounds[1])
    if num_tasks < 1 or not (np.isfinite(low) and np.isfinite(high) and low < high) or num_samples < 1:
        raise ValueError(f"qmc_design needs num_tasks >= 1, num_samples >= 1 and finite bounds low < high; got {num_tasks}, {num_samples}, {bounds}")
    sample = qmc.Sobol(num_tasks, scramble=True, seed=seed).random_base2(max(1, math.ceil(math.log2(num_samples))))[:num_samples]
    return qmc.scale(sample, [low] * num_tasks, [high] * num_tasks)


_DESIGNS = {"map": map_design, "sobol": sobol_design, "lhs": lhs_design, "qmc": qmc_design}


def make_design(name: str, num_tasks: int, num_samples: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> np.ndarray:
    """Dispatch by name: ``"map"``, ``"sobol"``, ``"lhs"`` (the one-hots first) or ``"qmc"`` (Sobol points alone)."""
    try:
        fn = _DESIGNS[name]
    except KeyError:
        raise ValueError(f"unknown design {name!r}; choose one of {sorted(_DESIGNS)}") from None
    return fn(num_tasks, num_samples, bounds, seed)


def grid_design(num_tasks: int, per_axis: int, bounds: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Regular grid ``(per_axis**T, T)`` over the box (reference fronts, sweeps)."""
    low, high = _check(num_tasks, num_tasks, bounds)
    if per_axis < 2:
        raise ValueError(f"per_axis must be at least 2, got {per_axis}")
    return _grid(num_tasks, per_axis, low, high)


def with_points(design: np.ndarray, include: np.ndarray | None, budget: int) -> np.ndarray:
    """``design (K, T)`` with the rows of ``include (J, T)`` first (a recipe's starting point, say),
    cut back to ``budget`` rows (the design's last rows give way)."""
    if include is None:
        return design
    include = np.atleast_2d(np.asarray(include, dtype=np.float64))
    if include.ndim != 2 or include.shape[1] != design.shape[1]:
        raise ValueError(f"include must be points of shape (J, {design.shape[1]}), got {np.shape(include)}")
    if not np.isfinite(include).all():
        raise ValueError("include has NaN/inf coefficients")
    if len(include) > budget:
        raise ValueError(f"include has {len(include)} points but the budget is {budget}")
    return np.concatenate([include, design[: budget - len(include)]])
