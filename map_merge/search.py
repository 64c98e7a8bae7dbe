"""Search for the Pareto front of cheap, smooth objectives (the surrogates); no real evaluations.

Both searches maximise ``fn(coeffs: (K, T)) -> (K, M)`` over the box ``[low, high]^T`` and return
the non-dominated archive of everything they saw.

- :func:`scalarization_search` (default): a space-filling pool of candidates, then for a
  well-spread set of weight vectors both the weighted sum and a smoothed Chebyshev
  scalarisation of the normalised objectives are maximised by projected gradient ascent
  (Adam, all problems batched in one tensor), started from the best pool points.
- :func:`nsga3_search`: NSGA-III (pymoo) with the MAP authors' settings, archive of all
  non-dominated individuals seen.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import qmc

from .pareto import pareto_mask

__all__ = ["scalarization_search", "nsga3_search", "weight_vectors", "thin_front", "SearchResult"]

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """Non-dominated archive: ``coeffs: (N, T)``, ``values: (N, M)`` (maximised), evaluations spent."""

    coeffs: np.ndarray
    values: np.ndarray
    num_evaluations: int


def weight_vectors(num_objectives: int, approx: int = 100, seed: int = 0) -> np.ndarray:
    """About ``approx`` weight vectors on the simplex ``(W, M)``: a Das-Dennis lattice for M <= 3,
    one-hots plus quasi-random Dirichlet(1) points beyond."""
    if num_objectives == 1:
        return np.ones((1, 1))
    if num_objectives <= 3:
        partitions = max(1, approx - 1) if num_objectives == 2 else max(1, int(math.sqrt(2 * approx)) - 1)
        return _simplex_lattice(num_objectives, partitions)
    sobol = qmc.Sobol(num_objectives, scramble=True, seed=seed).random_base2(math.ceil(math.log2(max(approx, num_objectives))))
    dirichlet = -np.log(np.clip(sobol, 1e-12, 1.0))
    dirichlet /= dirichlet.sum(axis=1, keepdims=True)
    return np.concatenate([np.eye(num_objectives), dirichlet])


def _simplex_lattice(num: int, partitions: int) -> np.ndarray:
    """All points of the simplex with coordinates in multiples of ``1 / partitions`` (Das-Dennis)."""
    from itertools import combinations

    rows = []
    for bars in combinations(range(partitions + num - 1), num - 1):
        edges = (-1,) + bars + (partitions + num - 1,)
        rows.append([edges[i + 1] - edges[i] - 1 for i in range(num)])
    return np.array(rows, dtype=np.float64) / partitions


def thin_front(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` rows of ``values: (N, M)`` chosen by farthest-point
    sampling in range-normalised space, starting from each objective's best point."""
    num = values.shape[0]
    if num <= max_points:
        return np.arange(num)
    spread = values.max(axis=0) - values.min(axis=0)
    scaled = (values - values.min(axis=0)) / np.where(spread > 0, spread, 1.0)
    chosen = list(dict.fromkeys(int(i) for i in np.argmax(values, axis=0)))[:max_points]
    dist = np.min(np.linalg.norm(scaled[:, None, :] - scaled[None, chosen, :], axis=2), axis=1)
    while len(chosen) < max_points:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(scaled - scaled[nxt], axis=1))
    return np.sort(np.array(chosen))


def _archive(coeffs: np.ndarray, values: np.ndarray, max_points: int | None) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values).all(axis=1)
    coeffs, values = coeffs[keep], values[keep]
    _, unique = np.unique(np.round(coeffs, 10), axis=0, return_index=True)
    coeffs, values = coeffs[unique], values[unique]
    mask = pareto_mask(values)
    coeffs, values = coeffs[mask], values[mask]
    if max_points is not None:
        index = thin_front(values, max_points)
        coeffs, values = coeffs[index], values[index]
    order = np.lexsort(values.T[::-1])
    return coeffs[order], values[order]


def _pool(num_coeffs: int, low: float, high: float, num_random: int, seed: int) -> np.ndarray:
    sobol = qmc.Sobol(num_coeffs, scramble=True, seed=seed).random_base2(max(4, math.ceil(math.log2(num_random))))
    parts = [low + (high - low) * sobol, np.full((1, num_coeffs), 0.5 * (low + high))]
    if num_coeffs <= 10:
        corners = np.array(np.meshgrid(*([[low, high]] * num_coeffs), indexing="ij")).reshape(num_coeffs, -1).T
        parts.append(corners)
    return np.concatenate(parts)


def scalarization_search(
    fn: Callable[[np.ndarray], np.ndarray],
    fn_torch: Callable[[torch.Tensor], torch.Tensor],
    num_coeffs: int,
    bounds: tuple[float, float] = (0.0, 1.0),
    num_weights: int | None = None,
    num_random: int = 4096,
    steps: int = 150,
    lr: float = 0.02,
    temperature: float = 0.01,
    densify_rounds: int = 2,
    max_points: int | None = None,
    seed: int = 0,
) -> SearchResult:
    """Weighted-sum and Chebyshev scalarisations solved by batched projected gradient ascent.

    Args:
        fn: ``(K, T) -> (K, M)`` objectives to maximise (numpy).
        fn_torch: the same as a differentiable torch function.
        num_coeffs: T.  bounds: the search box.
        num_weights: about how many weight vectors (default: 100 for two objectives, 300 for three, 128 beyond).
        num_random: size of the quasi-random pool.
        steps, lr: Adam steps and learning rate (as a fraction of the box width).
        temperature: smoothing of the Chebyshev max (in normalised objective units).
        densify_rounds: rounds of local sampling around the archive (fills the front between
            the scalarisation solutions).
        max_points: cap on the returned front size (farthest-point thinning), ``None`` = no cap.
    """
    low, high = float(bounds[0]), float(bounds[1])
    pool = _pool(num_coeffs, low, high, num_random, seed)
    pool_values = np.asarray(fn(pool), dtype=np.float64)
    num_objectives = pool_values.shape[1]
    ideal = pool_values.max(axis=0)
    nadir = pool_values[pareto_mask(pool_values)].min(axis=0)
    span = np.where(ideal - nadir > 1e-12, ideal - nadir, 1.0)
    weights = weight_vectors(num_objectives, num_weights or {1: 1, 2: 100, 3: 300}.get(num_objectives, 128), seed)
    normed = (pool_values - nadir) / span
    # starting points: best pool point of each scalarisation and weight
    ws_start = np.argmax(normed @ weights.T, axis=0)
    cheb = np.max(weights[None, :, :] * (1.0 - normed[:, None, :]), axis=2)
    ch_start = np.argmin(cheb, axis=0)
    starts = np.concatenate([pool[ws_start], pool[ch_start]])
    kinds = np.concatenate([np.zeros(len(weights)), np.ones(len(weights))])
    all_weights = np.concatenate([weights, weights])

    dtype = torch.float64
    x = torch.tensor(starts, dtype=dtype, requires_grad=True)
    w = torch.tensor(all_weights, dtype=dtype)
    is_cheb = torch.tensor(kinds, dtype=dtype)
    nadir_t, span_t = torch.tensor(nadir, dtype=dtype), torch.tensor(span, dtype=dtype)
    optimizer = torch.optim.Adam([x], lr=lr * (high - low))
    for _ in range(steps):
        optimizer.zero_grad()
        f = (fn_torch(x) - nadir_t) / span_t
        weighted = (f * w).sum(dim=1)
        shortfall = w * (1.0 - f)
        chebyshev = -temperature * torch.logsumexp(shortfall / temperature, dim=1)
        loss = -(is_cheb * chebyshev + (1.0 - is_cheb) * weighted).sum()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.clamp_(low, high)
    solved = x.detach().numpy()
    solved_values = np.asarray(fn(solved), dtype=np.float64)
    coeffs, values = _archive(np.concatenate([pool, solved]), np.concatenate([pool_values, solved_values]), None)
    spent = len(pool) + len(solved) * (steps + 1)
    rng = np.random.default_rng(seed)
    for round_index in range(densify_rounds):
        scale = (high - low) * 0.02 / (round_index + 1)
        parents = coeffs[thin_front(values, 400)]
        children = np.clip(np.repeat(parents, 8, axis=0) + rng.normal(0.0, scale, (len(parents) * 8, num_coeffs)), low, high)
        child_values = np.asarray(fn(children), dtype=np.float64)
        spent += len(children)
        coeffs, values = _archive(np.concatenate([coeffs, children]), np.concatenate([values, child_values]), None)
    if max_points is not None:
        index = thin_front(values, max_points)
        coeffs, values = coeffs[index], values[index]
    return SearchResult(coeffs, values, num_evaluations=spent)


def nsga3_search(
    fn: Callable[[np.ndarray], np.ndarray],
    num_coeffs: int,
    bounds: tuple[float, float] = (0.0, 1.0),
    pop_size: int = 100,
    generations: int = 25,
    max_points: int | None = 500,
    seed: int = 0,
) -> SearchResult:
    """NSGA-III with the MAP authors' settings: population 100, 100 offspring, SBX (eta 20,
    p 0.7), polynomial mutation (eta 20, p 0.3, per-gene 1/T), two-layer Das-Dennis reference
    directions (p=2, and p=1 at scale 0.5), 25 generations; archive of all non-dominated
    individuals seen."""
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.callback import Callback
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.optimize import minimize
    from pymoo.util.ref_dirs import get_reference_directions

    low, high = float(bounds[0]), float(bounds[1])
    probe = np.asarray(fn(np.full((1, num_coeffs), 0.5 * (low + high))), dtype=np.float64)
    num_objectives = probe.shape[1]
    seen_x: list[np.ndarray] = []
    seen_f: list[np.ndarray] = []

    class _Problem(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=num_coeffs, n_obj=num_objectives, xl=low, xu=high)

        def _evaluate(self, x, out, *args, **kwargs):  # noqa: ANN001 - pymoo's signature
            values = np.asarray(fn(x), dtype=np.float64)
            seen_x.append(np.array(x, dtype=np.float64))
            seen_f.append(values)
            out["F"] = -values

    if num_objectives > 1:
        ref_dirs = get_reference_directions(
            "multi-layer",
            get_reference_directions("das-dennis", num_objectives, n_partitions=2, scaling=1.0),
            get_reference_directions("das-dennis", num_objectives, n_partitions=1, scaling=0.5),
        )
    else:
        ref_dirs = np.ones((1, 1))
    algorithm = NSGA3(
        ref_dirs=ref_dirs,
        pop_size=pop_size,
        n_offsprings=pop_size,
        crossover=SBX(prob=0.7, eta=20),
        mutation=PM(prob=0.3, eta=20, prob_var=1.0 / num_coeffs),
        eliminate_duplicates=True,
    )
    minimize(_Problem(), algorithm, ("n_gen", generations), seed=seed, verbose=False, callback=Callback())
    coeffs, values = _archive(np.concatenate(seen_x), np.concatenate(seen_f), max_points)
    return SearchResult(coeffs, values, num_evaluations=int(sum(len(x) for x in seen_x)))
