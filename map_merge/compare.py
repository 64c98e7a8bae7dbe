"""Side-by-side comparison of front-finding methods at equal numbers of real evaluations.

:func:`run_method` runs one method by name on an objective with a budget of real evaluations and
returns a :class:`MethodRun` (every real evaluation it made). :func:`score_runs` scores runs
against a reference front: hypervolume ratio, IGD+, preference regret, win rate over a baseline
run (e.g. the task-arithmetic sweep). The front of a method is the non-dominated set of all the
real models it evaluated: each of them is a model a user can pick.

Budgeted methods (``BUDGETED``): ``"MAP"`` (the default, adaptive sampling) spends the whole
budget; ``"MAP (design)"`` (the authors' one-shot design) and ``"Bayesian MAP"`` (quadratic-mean
adaptive sampling) spend ``budget - reevaluations`` on samples and the rest re-evaluating
well-spread front points; ``"random search"``, ``"NSGA-II"``, ``"qNEHVI"`` and ``"CMA-ES"`` (on the
equal-preference scalarisation, as mergekit-evolve) spend the whole budget (see
:mod:`map_merge.baselines`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .baselines import cma_search, mobo_search, nsga2_search, random_search
from .bayes import BayesianMAP
from .designs import num_quadratic_params
from .front_metrics import front_report
from .map import MAP
from .pareto import check_senses, orient, pareto_mask

__all__ = ["BUDGETED", "MethodRun", "run_method", "score_runs"]

BUDGETED = ("MAP", "MAP (design)", "Bayesian MAP", "random search", "NSGA-II", "qNEHVI", "CMA-ES")


@dataclass
class MethodRun:
    """The real evaluations of one method run.

    Attributes:
        method: its name.  inputs: ``(N, D)`` what was evaluated (coefficient vectors, or
            preference vectors for PWE-MoE).  metrics: ``(N, M)`` real metrics (own senses).
        evaluations: real evaluations charged.  seconds: wall time.  result: the method's own
        result object (``MAPResult``, ``BaselineResult``...).  extra: cost beyond evaluations
        (training steps, memory...).
    """

    method: str
    inputs: np.ndarray
    metrics: np.ndarray
    evaluations: int
    seconds: float
    result: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def front(self, senses: Sequence[str] | None = None) -> np.ndarray:
        """``(F, M)`` non-dominated metrics of the run's evaluations."""
        oriented = orient(self.metrics, check_senses(senses, self.metrics.shape[1]))
        return self.metrics[pareto_mask(oriented)]


def run_method(
    method: str,
    objective: Callable[[np.ndarray], np.ndarray],
    num_coeffs: int,
    budget: int,
    seed: int = 0,
    reevaluations: int = 10,
    pop_size: int | None = None,
    link: str = "auto",
    progress: bool = False,
    proposal_model: str | None = None,
) -> MethodRun:
    """Run one of :data:`BUDGETED` with ``budget`` real evaluations in all.

    ``"MAP (design)"`` and ``"Bayesian MAP"`` need ``budget - reevaluations`` to be at least the
    quadratic's ``(T+1)(T+2)/2`` parameters; their surrogate link is ``link`` (``"auto"``: the
    objective's suggestion, else sigmoid). ``proposal_model``: ``"MAP"``'s (see :class:`MAP`; ``None``: its default)."""
    if method not in BUDGETED:
        raise ValueError(f"unknown method {method!r}; choose from {BUDGETED}")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "MAP":
            result = MAP(budget=budget, link=link, seed=seed, proposal_model=proposal_model).fit(objective, num_coeffs, progress=progress)
            inputs, metrics = result.samples.coeffs, result.samples.metrics
        elif method in ("MAP (design)", "Bayesian MAP"):
            samples = budget - reevaluations
            needed = num_quadratic_params(num_coeffs)
            if samples < needed:
                raise ValueError(f"{method} with budget={budget} and reevaluations={reevaluations} has {samples} samples; "
                                 f"the quadratic surrogate of {num_coeffs} coefficients needs at least {needed}")
            if method == "MAP (design)":
                result = MAP(num_samples=samples, sampling="design", link=link, seed=seed).fit(objective, num_coeffs)
            else:
                initial = min(samples, needed + 2)
                result = BayesianMAP(budget=samples, initial=initial, batch=num_coeffs, link=link, seed=seed).fit(objective, num_coeffs, progress=progress)
            if reevaluations >= 2:  # two rounds: re-evaluate half, refit on them, re-evaluate the new front's points
                result = result.refine(objective, reevaluations=reevaluations, rounds=2)
                real = result.real_front
            elif reevaluations == 1:
                real = result.reevaluate(objective, max_points=1)
            else:
                real = None
            inputs = result.samples.coeffs if real is None else np.concatenate([result.samples.coeffs, real.coeffs])
            metrics = result.samples.metrics if real is None else np.concatenate([result.samples.metrics, real.metrics])
        else:
            if method == "random search":
                result = random_search(objective, num_coeffs, budget, seed=seed)
            elif method == "NSGA-II":
                result = nsga2_search(objective, num_coeffs, budget, pop_size=pop_size, seed=seed)
            elif method == "CMA-ES":
                result = cma_search(objective, num_coeffs, budget, popsize=pop_size, seed=seed)
            else:
                result = mobo_search(objective, num_coeffs, budget, seed=seed)
            inputs, metrics = result.coeffs, result.metrics
    return MethodRun(method, inputs, metrics, len(inputs), time.perf_counter() - start, result)


def score_runs(
    runs: Mapping[str, MethodRun],
    reference: np.ndarray,
    ref_point: np.ndarray,
    preferences: np.ndarray | None = None,
    baseline: str | None = None,
    senses: Sequence[str] | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`~map_merge.front_metrics.front_report` of every run's front against ``reference:
    (R, M)`` (metrics in their own senses), plus evaluations, seconds and, with ``baseline``
    (a key of ``runs``), the win rate over that run's front."""
    if len(runs) == 0:
        raise ValueError("no runs to score")
    num = np.asarray(reference).shape[1]
    senses = check_senses(senses, num)
    if baseline is not None and baseline not in runs:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(runs)}")
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    base = orient(runs[baseline].front(senses), senses) if baseline is not None else None
    out = {}
    for name, run in runs.items():
        report = front_report(orient(run.front(senses), senses), orient(reference, senses), np.asarray(ref_point) * sign,
                              preferences=preferences, baseline=base)
        out[name] = {"evaluations": run.evaluations, "seconds": run.seconds, **report, **run.extra}
    return out
