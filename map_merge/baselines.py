"""What a user would run instead of MAP, on real evaluations only (no surrogate of ours).

Each baseline calls ``objective(coeffs: (K, T)) -> metrics: (K, M)`` and returns a
:class:`BaselineResult` holding every real evaluation in order, so that fronts, hypervolume and
preference regret can be compared with MAP's at equal numbers of evaluations:

- :func:`lambda_sweep`: one coefficient for all tasks, ``c = lambda * 1`` (uniform task
  arithmetic; TIES or DARE when the objective merges with those methods).
- :func:`random_search`: uniform draws from the coefficient box.
- :func:`nsga2_search`: NSGA-II (pymoo) evolving coefficient vectors on real evaluations.
- :func:`mobo_search`: multi-objective Bayesian optimisation (botorch: one GP per task,
  qLogNEHVI), the standard black-box optimiser for few expensive evaluations.
- :func:`cma_search`: CMA-ES (the ``cma`` package) on one preference-weighted scalarisation
  of the metrics, what mergekit's evolutionary merging (mergekit-evolve) runs.

Every run is deterministic for a seed, and its first ``n`` evaluations do not depend on the
budget, so with an evaluation store a longer run re-uses a shorter one's evaluations.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .map import call_objective
from .pareto import ParetoFront, check_preference, check_senses, orient

__all__ = ["BaselineResult", "lambda_sweep", "random_search", "nsga2_search", "mobo_search", "cma_search"]

Objective = Callable[[np.ndarray], np.ndarray]


@dataclass
class BaselineResult:
    """Every real evaluation of one baseline run, in order.

    Attributes:
        name: method name.  coeffs: ``(N, T)`` evaluated coefficient vectors.
        metrics: ``(N, M)`` their metrics (own units and senses).  senses: M of ``"max"``/``"min"``.
        task_names: M names.  seconds: wall time, evaluations included.  settings: the run's settings.
    """

    name: str
    coeffs: np.ndarray
    metrics: np.ndarray
    senses: tuple[str, ...]
    task_names: tuple[str, ...]
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_evaluations(self) -> int:
        return int(len(self.coeffs))

    def evaluated_front(self) -> ParetoFront:
        """Non-dominated set of all evaluations (each a real merged model)."""
        return ParetoFront(self.coeffs, self.metrics, self.task_names, self.senses, label=self.name).nondominated()


def _setup(objective: Objective, num_coeffs: int, budget: int | None, bounds: tuple[float, float]) -> tuple[float, float]:
    if num_coeffs < 1:
        raise ValueError(f"num_coeffs must be at least 1, got {num_coeffs}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be at least 1 evaluation, got {budget}")
    low, high = float(bounds[0]), float(bounds[1])
    if not low < high:
        raise ValueError(f"bounds must satisfy low < high, got {bounds}")
    return low, high


def _result(name: str, objective: Objective, coeffs: np.ndarray, metrics: np.ndarray, start: float, settings: dict[str, Any]) -> BaselineResult:
    senses = check_senses(getattr(objective, "senses", None), metrics.shape[1])
    names = getattr(objective, "task_names", None) or tuple(f"task{j}" for j in range(metrics.shape[1]))
    return BaselineResult(name, coeffs, metrics, senses, tuple(names), time.perf_counter() - start, settings)


def lambda_sweep(objective: Objective, num_coeffs: int, lambdas: Sequence[float] = tuple(np.linspace(0, 1, 11)), name: str = "task arithmetic") -> BaselineResult:
    """Evaluate ``c = lambda * (1, ..., 1)`` for each of ``lambdas: (L,)``: L evaluations."""
    start = time.perf_counter()
    lambdas = np.asarray(lambdas, dtype=np.float64).reshape(-1)
    if len(lambdas) == 0:
        raise ValueError("lambdas is empty")
    coeffs = np.repeat(lambdas[:, None], num_coeffs, axis=1)
    return _result(name, objective, coeffs, call_objective(objective, coeffs), start, {"lambdas": lambdas.tolist()})


def random_search(objective: Objective, num_coeffs: int, budget: int, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0) -> BaselineResult:
    """``budget`` coefficient vectors drawn uniformly from the box (prefix-stable in the budget)."""
    low, high = _setup(objective, num_coeffs, budget, bounds)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    coeffs = low + (high - low) * rng.uniform(size=(budget, num_coeffs))  # drawn row by row: prefix-stable
    return _result("random search", objective, coeffs, call_objective(objective, coeffs), start, {"budget": budget, "seed": seed})


def nsga2_search(
    objective: Objective,
    num_coeffs: int,
    budget: int,
    pop_size: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
) -> BaselineResult:
    """NSGA-II (pymoo's defaults: SBX and polynomial mutation) on real evaluations, stopped after
    exactly ``budget`` evaluations (the last generation is cut short if needed).

    ``pop_size`` defaults to ``max(4, min(20, budget // 3))`` so that a small budget still buys a
    few generations."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.population import Population
    from pymoo.core.problem import Problem
    from pymoo.core.termination import NoTermination
    from pymoo.problems.static import StaticProblem

    low, high = _setup(objective, num_coeffs, budget, bounds)
    pop_size = max(4, min(20, budget // 3)) if pop_size is None else int(pop_size)
    if pop_size < 2:
        raise ValueError(f"pop_size must be at least 2, got {pop_size}")
    start = time.perf_counter()
    coeffs_seen: list[np.ndarray] = []
    metrics_seen: list[np.ndarray] = []
    senses: tuple[str, ...] | None = None
    problem = None
    algorithm = NSGA2(pop_size=pop_size, eliminate_duplicates=True)
    spent = 0
    while spent < budget:
        if problem is None:
            # the number of objectives is only known after the first evaluation
            x = np.random.default_rng(seed).uniform(low, high, size=(min(pop_size, budget), num_coeffs))
        else:
            population = algorithm.ask()
            population = population[: budget - spent]
            x = population.get("X")
        metrics = call_objective(objective, x)
        coeffs_seen.append(np.asarray(x, dtype=np.float64))
        metrics_seen.append(metrics)
        spent += len(x)
        if problem is None:
            senses = check_senses(getattr(objective, "senses", None), metrics.shape[1])
            problem = Problem(n_var=num_coeffs, n_obj=metrics.shape[1], xl=low, xu=high)
            algorithm.setup(problem, termination=NoTermination(), seed=seed, verbose=False,
                            sampling=Population.new("X", x))
            population = algorithm.ask()  # the initial population: our x
        Evaluator().eval(StaticProblem(problem, F=-orient(metrics, senses)), population)
        algorithm.tell(infills=population)
    return _result("NSGA-II", objective, np.concatenate(coeffs_seen), np.concatenate(metrics_seen), start,
                   {"budget": budget, "pop_size": pop_size, "seed": seed})


def mobo_search(
    objective: Objective,
    num_coeffs: int,
    budget: int,
    initial: int | None = None,
    batch: int | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    asynchronous: bool | str = "auto",
) -> BaselineResult:
    """Multi-objective Bayesian optimisation on real evaluations: a Sobol start of ``initial``
    points (default ``2 (T + 1)``), then rounds of ``batch`` points (default ``T``) maximising
    botorch's qLogNEHVI under one GP per task (inputs normalised, outcomes standardised).
    With an executor of ``W > 1`` workers (``asynchronous="auto"``) ``W`` evaluations stay in
    flight and each finished one triggers one new point conditioned on the pending ones."""
    from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import ModelListGP, SingleTaskGP
    from botorch.models.transforms import Normalize, Standardize
    from botorch.optim import optimize_acqf
    from botorch.sampling import SobolQMCNormalSampler
    from gpytorch.mlls import SumMarginalLogLikelihood
    from scipy.stats import qmc

    low, high = _setup(objective, num_coeffs, budget, bounds)
    initial = min(budget, 2 * (num_coeffs + 1)) if initial is None else int(initial)
    batch = max(1, num_coeffs) if batch is None else int(batch)
    if initial < 2 or batch < 1:
        raise ValueError(f"mobo_search needs initial >= 2 and batch >= 1, got initial={initial}, batch={batch}")
    if asynchronous not in ("auto", True, False):
        raise ValueError(f"asynchronous must be 'auto', True or False, got {asynchronous!r}")
    start = time.perf_counter()
    sobol = qmc.Sobol(num_coeffs, scramble=True, seed=seed).random(2 ** math.ceil(math.log2(max(initial, 2))))[:initial]
    coeffs = low + (high - low) * sobol
    dtype = torch.float64
    box = torch.tensor([[low] * num_coeffs, [high] * num_coeffs], dtype=dtype)
    senses_of = lambda m: check_senses(getattr(objective, "senses", None), m)  # noqa: E731

    def propose(done_x: np.ndarray, done_y: np.ndarray, size: int, pending: np.ndarray | None) -> np.ndarray:
        x = torch.tensor(done_x, dtype=dtype)
        y = torch.tensor(orient(done_y, senses_of(done_y.shape[1])), dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ModelListGP(*[SingleTaskGP(x, y[:, j : j + 1], input_transform=Normalize(num_coeffs, bounds=box),
                                               outcome_transform=Standardize(1)) for j in range(y.shape[1])])
            try:
                fit_gpytorch_mll(SumMarginalLogLikelihood(model.likelihood, model))
            except Exception:  # noqa: BLE001 - keep the default hyper-parameters
                pass
            spread = y.max(0).values - y.min(0).values
            ref_point = (y.min(0).values - 0.1 * (spread + 1e-9)).tolist()
            acquisition = qLogNoisyExpectedHypervolumeImprovement(
                model=model, ref_point=ref_point, X_baseline=x, prune_baseline=True,
                sampler=SobolQMCNormalSampler(torch.Size([64]), seed=seed + len(done_x)),
                X_pending=torch.tensor(pending, dtype=dtype) if pending is not None and len(pending) else None)
            with torch.random.fork_rng():
                torch.manual_seed(seed + len(done_x))
                candidates, _ = optimize_acqf(acquisition, bounds=box, q=size, num_restarts=4, raw_samples=128, sequential=True,
                                              options={"maxiter": 60})
        return candidates.detach().numpy().clip(low, high)

    width = int(getattr(getattr(objective, "executor", None), "num_workers", 1))
    if (width > 1 and asynchronous == "auto") or asynchronous is True:
        from .asynchronous import evaluate_async

        trace = evaluate_async(objective, coeffs, lambda x, y, p: propose(x, y, 1, p)[0], budget)
        coeffs, metrics = trace.coeffs, trace.metrics
    else:
        metrics = call_objective(objective, coeffs)
        while len(coeffs) < budget:
            new = propose(coeffs, metrics, min(batch, budget - len(coeffs)), None)
            coeffs = np.concatenate([coeffs, new])
            metrics = np.concatenate([metrics, call_objective(objective, new, metrics.shape[1])])
    return _result("qNEHVI (botorch)", objective, coeffs, metrics, start, {"budget": budget, "initial": initial, "batch": batch, "seed": seed})


class _OwnGlobalRandom:
    """Run code that draws from numpy's global random state (``cma`` does) on a state of its own,
    leaving the caller's global state as it was."""

    def __init__(self) -> None:
        self.state: dict | None = None

    def __enter__(self) -> "_OwnGlobalRandom":
        self._saved = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.state = np.random.get_state()
        np.random.set_state(self._saved)


def cma_search(
    objective: Objective,
    num_coeffs: int,
    budget: int,
    preference: Sequence[float] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    sigma0: float = 0.25,
    popsize: int | None = None,
    seed: int = 0,
) -> BaselineResult:
    """CMA-ES on real evaluations, minimising one scalarisation of the metrics: the
    ``preference``-weighted sum of the metrics oriented higher-is-better (``"min"`` metrics
    negated), negated; equal weights by default. This is what mergekit-evolve runs (its weights
    multiply the raw scores, so metrics on different scales weigh by their scale).

    Starts at the centre of the box with step ``sigma0`` times its width; the ``cma`` package's
    default population (``4 + 3 ln T``) unless ``popsize``; coefficients stay in ``bounds``
    (cma's bound transform). Stops after exactly ``budget`` evaluations (the last generation is
    cut short if needed). Every evaluation is returned; the best scalarisation is
    ``settings["best"]``. Deterministic for a seed, prefix-stable in the budget, and numpy's
    global random state is left as it was.

    Raises:
        ImportError: ``cma`` is not installed (``pip install 'map_merge[cma]'``).
        ValueError: bad budget, bounds, ``sigma0`` or a preference of the wrong length."""
    try:
        import cma
    except ImportError:
        raise ImportError("cma_search needs the cma package: pip install 'map_merge[cma]' (or cma)") from None

    low, high = _setup(objective, num_coeffs, budget, bounds)
    if not (np.isfinite(sigma0) and sigma0 > 0):
        raise ValueError(f"sigma0 must be a positive fraction of the box width, got {sigma0}")
    if popsize is not None and int(popsize) < 2:
        raise ValueError(f"popsize must be at least 2, got {popsize}")
    known = getattr(objective, "task_names", None)
    if preference is not None and known:
        check_preference(preference, len(known))  # fail before the first evaluation
    start = time.perf_counter()
    options = {"bounds": [low, high], "seed": int(seed) + 1, "verbose": -9, "verb_log": 0, "verb_disp": 0, "verb_filenameprefix": None}
    if popsize is not None:
        options["popsize"] = int(popsize)
    rng = _OwnGlobalRandom()
    with rng, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        es = cma.CMAEvolutionStrategy([0.5 * (low + high)] * num_coeffs, float(sigma0) * (high - low), options)
    coeffs_seen: list[np.ndarray] = []
    metrics_seen: list[np.ndarray] = []
    weights: np.ndarray | None = None
    sign: np.ndarray | None = None
    best = (math.inf, None)
    spent = 0
    while spent < budget:
        with rng, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            asked = es.ask()
        x = np.clip(np.asarray(asked, dtype=np.float64), low, high)[: budget - spent]
        metrics = call_objective(objective, x, None if weights is None else len(weights))
        if weights is None:
            senses = check_senses(getattr(objective, "senses", None), metrics.shape[1])
            sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
            weights = check_preference(preference, metrics.shape[1]) if preference is not None else np.full(metrics.shape[1], 1.0 / metrics.shape[1])
        scores = -(metrics * sign) @ weights  # CMA-ES minimises
        coeffs_seen.append(x)
        metrics_seen.append(metrics)
        spent += len(x)
        k = int(np.argmin(scores))
        if scores[k] < best[0]:
            best = (float(scores[k]), x[k].tolist())
        if len(x) < len(asked):
            break  # the budget cut this generation short: nothing more to learn from
        with rng, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            es.tell(asked, scores.tolist())
    return _result("CMA-ES", objective, np.concatenate(coeffs_seen), np.concatenate(metrics_seen), start,
                   {"budget": budget, "seed": seed, "sigma0": sigma0, "popsize": es.popsize, "preference": weights.tolist(),
                    "best": {"scalarisation": -best[0], "coeffs": best[1]}})
