"""Where to evaluate next: expected hypervolume improvement under a Gaussian-process model.

:func:`propose_ehvi` maximises botorch's expected hypervolume improvement over the coefficient box.
The front it improves depends on the number of metrics:

- **Two metrics, evaluated coefficients given** (MAP's adaptive sampling): qLogNEHVI, the front of
  the model's *joint posterior* at the evaluated points. Merging metrics are deterministic, but an
  accuracy on a few hundred examples is rugged in the coefficients: a lucky evaluation set as the
  bar made the acquisition chase the model's widest uncertainty, in the dominated interior and the
  corners (on the vision zoo about 6 of 22 evaluations there). With two metrics the box
  decomposition per posterior sample is a sort: a proposal, fit included, takes about 0.6-0.7 s.
  Measured in ``benchmarks/bench_adaptive_levers.py`` ("observed front", "previous default";
  docs/fronts.md).
- **Three or more metrics, or no evaluated coefficients** (:class:`~map_merge.BayesianMAP`):
  qLogEHVI over the front of the *evaluated* metrics; the noisy variant's decomposition per
  posterior sample costs 10-20 s per proposal at T = 3.

Hypervolume is counted from :func:`ehvi_reference_point`. With two metrics that is
:func:`front_reference_point`, just beyond the nadir of the evaluated *front* (botorch's
``infer_reference_point``, as Ax does), not beyond the worst evaluation: evaluations far below
the front (on the text zoo an expert's score on the other task, once merges dominate that expert)
then do not make the acquisition chase long tails of the front that no preference would pick.
With three or more the nadir of a partial front lies inside the true one (estimating the nadir is
hard beyond two objectives), a reference there starves the front's edges, and the reference stays
just beyond the worst evaluation (:func:`reference_point`). Measured in ``benchmarks/bench_fronts.py``
(docs/fronts.md, ``benchmarks/results/ehvi_reference.json``): the front's nadir raised the text
zoo's HV ratio at T = 2 (0.944 to 0.981) and left the other T = 2 settings level; at T = 3 it
lowered the analytic problem's (0.978 to 0.955), raised the vision zoo's (0.588 to 0.618) and
worsened both picks.
Points still being evaluated (``pending``) are fantasised jointly, so asynchronous workers get
different points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .pareto import orient, pareto_mask

__all__ = ["propose_ehvi", "reference_point", "front_reference_point", "ehvi_reference_point", "signs", "best_of"]

logger = logging.getLogger(__name__)

RESTARTS = 6
MAXITER = 100


def _effort(num_metrics: int) -> tuple[int, int]:
    """``(raw_samples, mc_samples)``: the random starts screened and the quasi-Monte-Carlo draws
    per point. Four or more metrics cut the box decomposition into many more cells, so both are
    halved there (a proposal at T = M = 4 then takes about as long as at 3)."""
    return (512, 128) if num_metrics <= 3 else (256, 64)


def signs(senses: Sequence[str]) -> torch.Tensor:
    """``(M,)``: +1 for a maximised metric, -1 for a minimised one (float64)."""
    return torch.tensor([1.0 if s == "max" else -1.0 for s in senses], dtype=torch.float64)


def reference_point(oriented: np.ndarray) -> np.ndarray:
    """``(M,)`` hypervolume reference point for ``oriented: (N, M)`` metrics (higher is better):
    the worst value per metric, moved out by 10% of its range."""
    low, high = oriented.min(axis=0), oriented.max(axis=0)
    return low - 0.1 * (high - low + 1e-9)


def front_reference_point(oriented: np.ndarray) -> np.ndarray:
    """``(M,)`` the reference point of MAP's expected-hypervolume proposals for ``oriented: (N, M)``
    metrics (higher is better): the nadir of their Pareto front, moved out by 10% of the front's
    range per metric (botorch's ``infer_reference_point`` on the deduplicated front, as Ax does;
    dominated evaluations do not move it). A metric in which the front has no spread (one distinct
    front point, or all front points tied there) is moved out by 10% of its absolute value, as
    botorch does for a one-point front, or of the evaluations' range there where that value is 0:
    never onto the front, where no trade-off would count."""
    from botorch.utils.multi_objective.hypervolume import MIN_Y_RANGE

    oriented = np.atleast_2d(np.asarray(oriented, dtype=np.float64))
    front = np.unique(oriented[pareto_mask(oriented)], axis=0)  # copies of a point are one point
    if not len(front):
        raise ValueError("no evaluated metrics to place a hypervolume reference point by")
    nadir = front.min(axis=0)
    spread = front.max(axis=0) - nadir
    scale = np.where(spread > 0, spread, np.abs(nadir))
    spread_all = oriented.max(axis=0) - oriented.min(axis=0)  # where the front gives no scale (no spread, value 0)
    scale = np.where(scale >= MIN_Y_RANGE, scale, np.maximum(spread_all, MIN_Y_RANGE))
    return nadir - 0.1 * scale


def ehvi_reference_point(oriented: np.ndarray) -> np.ndarray:
    """``(M,)`` the default reference of :func:`propose_ehvi` for ``oriented: (N, M)`` metrics
    (higher is better): :func:`front_reference_point` with two metrics, :func:`reference_point`
    (beyond the worst evaluation) with three or more."""
    oriented = np.atleast_2d(np.asarray(oriented, dtype=np.float64))
    return front_reference_point(oriented) if oriented.shape[1] == 2 else reference_point(oriented)


def _box(bounds: tuple[float, float], num_coeffs: int) -> torch.Tensor:
    return torch.tensor([[bounds[0]] * num_coeffs, [bounds[1]] * num_coeffs], dtype=torch.float64)


def propose_ehvi(model, metrics: np.ndarray, senses: Sequence[str], bounds: tuple[float, float], q: int = 1,
                 pending: np.ndarray | None = None, seed: int = 0, ref_point: np.ndarray | None = None,
                 baseline: np.ndarray | None = None) -> np.ndarray:
    """``q`` new coefficient vectors ``(q, T)`` maximising qLogNEHVI (two metrics and ``baseline``
    given) or qLogEHVI (otherwise; see the module's docstring).

    Args:
        model: a fitted :class:`~map_merge.gp_model.GPModel` or
            :class:`~map_merge.residual_gp.ResidualGPModel`: its botorch ``gp`` and
            ``mc_objective(senses)``, the posterior samples in metric units oriented higher-is-better.
        metrics: ``(N, M)`` the evaluated metrics (own units and senses): their front is improved
            (qLogEHVI); it places the default reference point either way.
        senses: M of ``"max"`` / ``"min"``.  bounds: the coefficient box.
        q: points proposed jointly.  pending: ``(P, T)`` points being evaluated (fantasised).
        seed: seeds the quasi-Monte-Carlo sampler, the pruning of ``baseline`` and the optimiser's
            random starts (the caller's torch random state is left as it was).
        ref_point: ``(M,)`` the hypervolume reference, oriented higher-is-better (default
            :func:`ehvi_reference_point` of the evaluated metrics).
        baseline: ``(N, T)`` the coefficients ``metrics`` were evaluated at; with two metrics the
            front to improve is then the model's joint posterior there (qLogNEHVI).
    """
    from botorch.acquisition.multi_objective.logei import qLogExpectedHypervolumeImprovement, qLogNoisyExpectedHypervolumeImprovement
    from botorch.exceptions.errors import OptimizationGradientError
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from torch.quasirandom import SobolEngine
    from botorch.utils.multi_objective.box_decompositions.non_dominated import FastNondominatedPartitioning

    oriented = orient(np.asarray(metrics, dtype=np.float64), senses)
    ref = torch.tensor(ehvi_reference_point(oriented) if ref_point is None else np.asarray(ref_point, dtype=np.float64),
                       dtype=torch.float64)
    front = torch.tensor(oriented[pareto_mask(oriented)], dtype=torch.float64)
    raw_samples, mc_samples = _effort(oriented.shape[1])
    waiting = torch.tensor(pending, dtype=torch.float64) if pending is not None and len(pending) else None
    noisy = baseline is not None and oriented.shape[1] == 2
    if noisy:
        baseline = np.atleast_2d(np.asarray(baseline, dtype=np.float64))
        if baseline.shape != (len(oriented), model.num_coeffs):
            raise ValueError(f"baseline has shape {baseline.shape}; expected ({len(oriented)}, {model.num_coeffs}), one row per metrics row")
    box = _box(bounds, model.num_coeffs)
    with torch.random.fork_rng():  # the baseline's pruning draws posterior samples too: seeded, no global state touched
        torch.manual_seed(int(seed))
        sampler = SobolQMCNormalSampler(torch.Size([mc_samples]), seed=int(seed))
        acquisition = None
        if noisy:
            try:
                acquisition = qLogNoisyExpectedHypervolumeImprovement(
                    model=model.gp, ref_point=ref.tolist(), X_baseline=torch.tensor(baseline, dtype=torch.float64), sampler=sampler,
                    objective=model.mc_objective(senses), X_pending=waiting, prune_baseline=True, cache_root=False)
            except RuntimeError as error:  # a failed Cholesky at the baseline: the observed front instead, no lost run
                logger.warning("noisy hypervolume improvement failed at the evaluated points (%s); improving the observed front", error)
        if acquisition is None:
            acquisition = qLogExpectedHypervolumeImprovement(
                model=model.gp, ref_point=ref.tolist(), partitioning=FastNondominatedPartitioning(ref_point=ref, Y=front),
                sampler=sampler, objective=model.mc_objective(senses), X_pending=waiting)
        try:
            candidates, _ = optimize_acqf(acquisition, bounds=box, q=int(q), num_restarts=RESTARTS,
                                          raw_samples=raw_samples, sequential=True, options={"maxiter": MAXITER})
        except (OptimizationGradientError, RuntimeError) as error:  # NaN gradients, a failed Cholesky...: no lost run
            logger.warning("acquisition optimiser failed (%s); proposing the best of %d quasi-random points instead", error, raw_samples)
            sobol = SobolEngine(model.num_coeffs, scramble=True, seed=int(seed)).draw(raw_samples, dtype=torch.float64)
            candidates = best_of(acquisition, box[0] + (box[1] - box[0]) * sobol, int(q))
    return candidates.detach().numpy().clip(bounds[0], bounds[1])


def best_of(acquisition: Callable[[torch.Tensor], torch.Tensor], candidates: torch.Tensor, q: int) -> torch.Tensor:
    """The ``q`` rows of ``candidates: (R, T)`` with the largest single-point acquisition values
    ``(q, T)`` (no gradients: the fallback when the optimiser fails)."""
    with torch.no_grad():
        values = torch.cat([acquisition(chunk[:, None, :]) for chunk in candidates.split(256)])
    values = torch.nan_to_num(values, nan=-torch.inf)
    return candidates[torch.argsort(values, descending=True)[: int(q)]]
