"""MAP: amortized Pareto fronts of merging coefficients via quadratic surrogates.

``MAP(...).fit(objective, num_tasks)`` evaluates the objective at a design of K coefficient
vectors, fits one quadratic surrogate per metric, searches the surrogates for the Pareto front
(no further real evaluations) and returns a :class:`MAPResult`. ``result.reevaluate(objective)``
checks chosen front points on the real objective ("MAP real" beside "MAP predicted");
``result.refine(objective, reevaluations)`` spends them in rounds, refitting on each round's real
points (the better use of the same evaluations).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .designs import default_num_samples, make_design, num_quadratic_params, with_points
from .objective import check_senses
from .pareto import ParetoFront, orient
from .residual_gp import ResidualGPModel
from .search import nsga3_search, scalarization_search, thin_front
from .surrogate import LINKS, QuadraticSurrogate, SurrogateSet

__all__ = ["MAP", "MAPResult", "Samples", "fit_surrogates", "surrogate_front", "call_objective"]

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Real evaluations: ``coeffs: (K, T)``, ``metrics: (K, M)``, ``round: (K,)`` (0 = initial design)."""

    coeffs: np.ndarray
    metrics: np.ndarray
    round: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.round is None:
            self.round = np.zeros(len(self.coeffs), dtype=int)

    def __len__(self) -> int:
        return len(self.coeffs)

    def append(self, coeffs: np.ndarray, metrics: np.ndarray, round_index: int) -> "Samples":
        return Samples(
            np.concatenate([self.coeffs, coeffs]),
            np.concatenate([self.metrics, metrics]),
            np.concatenate([self.round, np.full(len(coeffs), round_index, dtype=int)]),
        )


@dataclass
class MAPResult:
    """Outcome of a MAP run.

    Attributes:
        samples: the real evaluations (coeffs (K, T), metrics (K, M)).
        surrogates: one fitted :class:`QuadraticSurrogate` per metric.
        front: the predicted Pareto front (``ParetoFront``, label "MAP predicted").
        task_names, senses: per metric.
        real_front: the re-evaluated front points, once :meth:`reevaluate` ran.
        timings: seconds spent evaluating, fitting and searching.
    """

    samples: Samples
    surrogates: list[QuadraticSurrogate]
    front: ParetoFront
    task_names: tuple[str, ...]
    senses: tuple[str, ...]
    bounds: tuple[float, float]
    real_front: ParetoFront | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the predictive model the front was searched on (None: the quadratic surrogates)
    fitter: Any = field(default=None, repr=False)  # the MAP that made this result (refine refits with it)

    @property
    def num_evaluations(self) -> int:
        """Real evaluations spent on the surrogates (re-evaluations of front points excluded)."""
        return len(self.samples)

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        """Predictions ``(K, M)`` (and predictive std ``(K, M)``) at ``coeffs: (K, T)`` of the model
        the front was searched on."""
        model = self.model if self.model is not None else SurrogateSet(self.surrogates)
        return model.predict(coeffs, return_std=return_std)

    def diagnostics(self) -> dict[str, dict[str, float]]:
        """Per task: R^2, RMSE, leave-one-out RMSE, samples, parameters."""
        return {name: s.diagnostics.as_dict() for name, s in zip(self.task_names, self.surrogates)}

    def select(self, preference: Sequence[float]) -> np.ndarray:
        """Coefficients ``(T,)`` of the predicted front point preferred by ``preference: (M,)``."""
        return self.front.select(preference)

    def reevaluate(self, objective: Callable[[np.ndarray], np.ndarray], max_points: int | None = 20, index: Sequence[int] | None = None) -> ParetoFront:
        """Evaluate front points on the real objective ("MAP real"); stored in ``real_front``.

        Args:
            objective: the real objective.
            max_points: how many well-spread front points (ignored when ``index`` is given).
            index: explicit front indices to re-evaluate.
        """
        if index is None:
            index = thin_front(self.front.oriented, max_points) if max_points else np.arange(len(self.front))
        chosen = self.front.subset(index)
        metrics = call_objective(objective, chosen.coeffs, len(self.task_names))
        self.real_front = ParetoFront(chosen.coeffs, metrics, self.task_names, self.senses, label="MAP real")
        return self.real_front

    def refine(self, objective: Callable[[np.ndarray], np.ndarray], reevaluations: int = 30, rounds: int = 2) -> "MAPResult":
        """Spend ``reevaluations`` real evaluations of front points in ``rounds``: each round
        re-evaluates well-spread points of the current predicted front, refits the surrogates on
        every real evaluation so far and searches again. Returns the refitted result: its
        ``samples`` hold the original samples and the earlier rounds' re-evaluations (``round``
        1, 2, ...), its ``real_front`` the last round's."""
        if self.fitter is None:
            raise ValueError("refine needs the result of MAP.fit / fit_samples (it refits with the same settings)")
        if int(rounds) < 1 or int(reevaluations) < int(rounds):
            raise ValueError(f"refine needs rounds >= 1 and at least one re-evaluation per round; got {reevaluations} for {rounds} rounds")
        sizes = [len(part) for part in np.array_split(np.arange(int(reevaluations)), int(rounds))]
        current, samples = self, self.samples
        for index, size in enumerate(sizes):
            real = current.reevaluate(objective, max_points=size)
            if index == len(sizes) - 1:
                break
            samples = samples.append(real.coeffs, real.metrics, int(samples.round.max()) + 1)
            current = self.fitter.fit_samples(samples, objective=objective, task_names=self.task_names, senses=self.senses,
                                              timings=self.timings)
        current.settings["refine"] = {"reevaluations": int(reevaluations), "rounds": int(rounds)}
        return current

    def preference_regret(self, objective: Callable[[np.ndarray], np.ndarray], reference: np.ndarray | None = None,
                          preferences: np.ndarray | None = None) -> dict[str, Any]:
        """Evaluate the model :meth:`select` picks for each preference for real and score it.

        Args:
            objective: the real objective (picks already evaluated come from its store).
            reference: metrics ``(N, M)`` in the objective's own units and senses of the best
                known models, e.g. a dense grid of real evaluations; default: every real model
                this run evaluated plus the picks (regret against what the run itself found).
            preferences: ``(P, M)`` non-negative weights (default: about 20 spread over the
                simplex, :func:`~map_merge.preference_grid`); each row is normalised to sum 1.

        Returns ``{"preferences" (P, M), "coeffs" (P, T), "metrics" (P, M), "regret" (P,),
        "mean", "max"}``: regret = best weighted score ``w . z`` over the reference minus the
        pick's real one, in metric units (oriented so that higher is better; 0 is perfect)."""
        from .front_metrics import preference_grid

        num = len(self.task_names)
        prefs = preference_grid(num) if preferences is None else np.atleast_2d(np.asarray(preferences, dtype=np.float64))
        if prefs.shape[1] != num or (prefs < 0).any() or not (prefs.sum(axis=1) > 0).all():
            raise ValueError(f"preferences must be (P, {num}) non-negative rows, none all zero; got shape {prefs.shape}")
        prefs = prefs / prefs.sum(axis=1, keepdims=True)
        picks = np.array([self.select(w) for w in prefs])
        real = call_objective(objective, picks, num)
        oriented = orient(real, self.senses)
        if reference is None:
            reference = np.concatenate([self.evaluated_front().metrics, real])
        reference = np.atleast_2d(np.asarray(reference, dtype=np.float64))
        if reference.ndim != 2 or reference.shape[1] != num or len(reference) == 0:
            raise ValueError(f"reference must be metrics (N, {num}) with N >= 1, got shape {reference.shape}")
        best = (orient(reference, self.senses) @ prefs.T).max(axis=0)
        regret = best - np.einsum("pm,pm->p", oriented, prefs)
        return {"preferences": prefs, "coeffs": picks, "metrics": real, "regret": regret,
                "mean": float(regret.mean()), "max": float(regret.max())}

    def evaluated_front(self) -> ParetoFront:
        """Non-dominated set of every real evaluation made: the samples and the re-evaluated
        front points (each is a real merged model a user can pick)."""
        coeffs, metrics = self.samples.coeffs, self.samples.metrics
        if self.real_front is not None:
            coeffs = np.concatenate([coeffs, self.real_front.coeffs])
            metrics = np.concatenate([metrics, self.real_front.metrics])
        front = ParetoFront(coeffs, metrics, self.task_names, self.senses, label="all real evaluations")
        return front.nondominated()

    def to_dict(self) -> dict[str, Any]:
        out = {
            "task_names": list(self.task_names),
            "senses": list(self.senses),
            "bounds": list(self.bounds),
            "num_evaluations": self.num_evaluations,
            "samples": {"coeffs": self.samples.coeffs.tolist(), "metrics": self.samples.metrics.tolist(), "round": self.samples.round.tolist()},
            "diagnostics": self.diagnostics(),
            "front": self.front.to_dict(),
            "timings": self.timings,
            "settings": self.settings,
        }
        if self.real_front is not None:
            out["real_front"] = self.real_front.to_dict()
        return out


def call_objective(objective: Callable[[np.ndarray], np.ndarray], coeffs: np.ndarray, num_metrics: int | None = None) -> np.ndarray:
    """Call an objective and check that it returned finite metrics of shape ``(K, M)``."""
    metrics = np.asarray(objective(coeffs), dtype=np.float64)
    if metrics.ndim == 1 and len(coeffs) == 1:
        metrics = metrics[None, :]
    if metrics.ndim != 2 or metrics.shape[0] != len(coeffs) or (num_metrics is not None and metrics.shape[1] != num_metrics):
        raise ValueError(
            f"the objective returned shape {metrics.shape} for {len(coeffs)} coefficient vectors; expected (K, M)"
            + (f" with M = {num_metrics}" if num_metrics is not None else "")
        )
    bad = ~np.isfinite(metrics).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)[:5]
        raise ValueError(f"the objective returned NaN/inf metrics for coefficient vectors {coeffs[rows].tolist()}")
    return metrics


def resolve_links(link: str | Sequence[str], objective: Any, num_metrics: int) -> tuple[str, ...]:
    """One link per metric: ``"auto"`` takes the objective's suggestion (``links``) or sigmoid."""
    if isinstance(link, str):
        if link == "auto":
            suggested = getattr(objective, "links", None) or (None,) * num_metrics
            return tuple(s or "sigmoid" for s in suggested)
        links = (link,) * num_metrics
    else:
        links = tuple(link)
    if len(links) != num_metrics:
        raise ValueError(f"got {len(links)} links for {num_metrics} metrics")
    for item in links:
        if item not in LINKS:
            raise ValueError(f"unknown link {item!r}; choose one of {LINKS} (or 'auto')")
    return links


def fit_surrogates(
    coeffs: np.ndarray, metrics: np.ndarray, links: Sequence[str], task_names: Sequence[str], ridge: float = 0.0, r2_warn: float = 0.5
) -> list[QuadraticSurrogate]:
    """One :class:`QuadraticSurrogate` per metric column of ``metrics: (K, M)``."""
    return [
        QuadraticSurrogate(link=links[j], ridge=ridge, r2_warn=r2_warn, name=task_names[j]).fit(coeffs, metrics[:, j])
        for j in range(metrics.shape[1])
    ]


def loo_surrogates(
    coeffs: np.ndarray, metrics: np.ndarray, suggested: Sequence[str], task_names: Sequence[str], ridge: float = 0.0, r2_warn: float = 0.5
) -> list[QuadraticSurrogate]:
    """Per metric, the surrogate with the lower leave-one-out RMSE (in metric units) between the
    suggested link and ``"identity"`` (a NaN error, e.g. as many samples as weights, loses)."""
    out = []
    for j in range(metrics.shape[1]):
        candidates = []
        for link in dict.fromkeys((suggested[j], "identity")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fitted = QuadraticSurrogate(link=link, ridge=ridge, r2_warn=-np.inf, name=task_names[j]).fit(coeffs, metrics[:, j])
            error = fitted.diagnostics.loo_rmse
            candidates.append((error if np.isfinite(error) else np.inf, link))
        best = min(candidates)[1]
        out.append(QuadraticSurrogate(link=best, ridge=ridge, r2_warn=r2_warn, name=task_names[j]).fit(coeffs, metrics[:, j]))
    return out


def surrogate_front(
    model: Sequence[QuadraticSurrogate] | Any,
    senses: Sequence[str],
    task_names: Sequence[str],
    bounds: tuple[float, float],
    search: str = "scalarization",
    seed: int = 0,
    max_points: int | None = None,
    label: str = "MAP predicted",
) -> ParetoFront:
    """Search a predictive model (quadratic surrogates, or any object with ``num_coeffs``,
    ``predict(coeffs, return_std)`` and ``torch_predict``) for its front over ``bounds^T``."""
    if isinstance(model, (list, tuple)):
        model = SurrogateSet(model)
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    sign_t = torch.tensor(sign, dtype=torch.float64)

    def fn(coeffs: np.ndarray) -> np.ndarray:
        return model.predict(coeffs) * sign

    def fn_torch(coeffs: torch.Tensor) -> torch.Tensor:
        return model.torch_predict(coeffs) * sign_t

    if search == "scalarization":
        found = scalarization_search(fn, fn_torch, model.num_coeffs, bounds, seed=seed, max_points=max_points)
    elif search == "nsga3":
        found = nsga3_search(fn, model.num_coeffs, bounds, seed=seed, max_points=max_points)
    else:
        raise ValueError(f"unknown search {search!r}; choose 'scalarization' or 'nsga3'")
    std = model.predict(found.coeffs, return_std=True)[1]
    return ParetoFront(found.coeffs, found.values * sign, tuple(task_names), tuple(senses), label=label, std=std)


class MAP:
    """Amortized Pareto fronts: sample, fit quadratic surrogates, search them.

    Args:
        num_samples: real evaluations K; ``None`` = ``(T+1)(T+2)``, twice the surrogate's
            ``P = (T+1)(T+2)/2`` parameters. Fewer than P is an error.
        bounds: the sampling box ``[low, high]^T`` for every coefficient.
        link: surrogate link: ``"auto"`` (default: the link each of the objective's tasks suggests,
            e.g. softplus for a loss; sigmoid where none is given), ``"loo"`` (per task, that
            suggestion or ``"identity"``, whichever has the lower leave-one-out error),
            ``"sigmoid"``, ``"softplus"``, ``"identity"``, or one per metric.
        design: ``"map"`` (the authors'), ``"sobol"`` or ``"lhs"``.
        seed: seeds the design and the search.
        search: ``"scalarization"`` (default) or ``"nsga3"`` (the authors').
        search_bounds: box searched for the front (default: ``bounds``); a wider box
            extrapolates the surrogates and warns.
        ridge: L2 penalty of the surrogate fit.
        r2_warn: warn when a surrogate's R^2 falls below this.
        max_front_points: cap on the predicted front's size.
        final_model: ``"gp"`` (default) searches the front on the quadratic surrogates plus a
            Gaussian process on their residuals (:class:`~map_merge.residual_gp.ResidualGPModel`), which
            bends the surface through the samples; ``"quadratic"`` on the quadratic surrogates
            alone (the authors'; before version 0.2 the default). On held-out vision-zoo tasks
            at T = 3 the GP lowers the mean preference regret of the picks 2x (with
            :meth:`MAPResult.refine`, 10x; ``benchmarks/bench_map_levers.py``).
    """

    def __init__(
        self,
        num_samples: int | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        link: str | Sequence[str] = "auto",
        design: str = "map",
        seed: int = 0,
        search: str = "scalarization",
        search_bounds: tuple[float, float] | None = None,
        ridge: float = 0.0,
        r2_warn: float = 0.5,
        max_front_points: int | None = None,
        final_model: str = "gp",
    ) -> None:
        if final_model not in ("gp", "quadratic"):
            raise ValueError(f"final_model must be 'gp' or 'quadratic', got {final_model!r}")
        self.final_model = final_model
        self.num_samples = num_samples
        self.bounds = (float(bounds[0]), float(bounds[1]))
        if not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"bounds must satisfy low < high, got {bounds}")
        self.link = link
        self.design = design
        self.seed = seed
        self.search = search
        self.search_bounds = None if search_bounds is None else (float(search_bounds[0]), float(search_bounds[1]))
        self.ridge = ridge
        self.r2_warn = r2_warn
        self.max_front_points = max_front_points

    def _setup(self, objective: Any, num_tasks: int, task_names: Sequence[str] | None):
        if int(num_tasks) < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        num_coeffs = int(num_tasks)
        declared = getattr(objective, "num_coeffs", None)
        if declared is not None and declared != num_coeffs:
            raise ValueError(f"num_tasks={num_coeffs} but the objective takes {declared} coefficients")
        names = task_names if task_names is not None else getattr(objective, "task_names", None)
        return num_coeffs, names

    def _search_box(self) -> tuple[float, float]:
        box = self.search_bounds or self.bounds
        if box[0] < self.bounds[0] or box[1] > self.bounds[1]:
            warnings.warn(
                f"searching the box {box} beyond the sampled box {self.bounds}: the surrogates are extrapolated "
                "there and their predictions are unreliable",
                UserWarning,
                stacklevel=3,
            )
        return box

    def fit(self, objective: Callable[[np.ndarray], np.ndarray], num_tasks: int, task_names: Sequence[str] | None = None,
            include: np.ndarray | None = None) -> MAPResult:
        """Run MAP on ``objective(coeffs (K, T)) -> metrics (K, M)``.

        Args:
            objective: the black-box objective (``senses`` and ``links`` attributes honoured).
            num_tasks: T, the number of merging coefficients (``T x G`` with coefficient groups).
            task_names: names of the M metrics (default: the objective's, else ``task0..``).
            include: ``(J, T)`` points evaluated first as part of the samples (e.g. a mergekit
                recipe's coefficients, the starting point of the search).
        """
        num_coeffs, names = self._setup(objective, num_tasks, task_names)
        minimum = num_quadratic_params(num_coeffs)
        budget = default_num_samples(num_coeffs) if self.num_samples is None else int(self.num_samples)
        if budget < minimum:
            raise ValueError(
                f"num_samples={budget} is too few for a quadratic surrogate in {num_coeffs} coefficients: "
                f"it has {minimum} parameters (default budget {default_num_samples(num_coeffs)})"
            )
        timings: dict[str, float] = {}
        start = time.perf_counter()
        coeffs = with_points(make_design(self.design, num_coeffs, budget, self.bounds, self.seed), include, budget)
        metrics = call_objective(objective, coeffs)
        timings["evaluate"] = time.perf_counter() - start
        return self.fit_samples(Samples(coeffs, metrics), objective=objective, task_names=names, timings=timings)

    def fit_samples(
        self,
        samples: Samples,
        objective: Any = None,
        task_names: Sequence[str] | None = None,
        senses: Sequence[str] | None = None,
        timings: dict[str, float] | None = None,
    ) -> MAPResult:
        """Fit surrogates and search the front from existing real evaluations."""
        num_metrics = samples.metrics.shape[1]
        names = tuple(task_names) if task_names is not None else tuple(f"task{j}" for j in range(num_metrics))
        if len(names) != num_metrics:
            raise ValueError(f"got {len(names)} task names for {num_metrics} metrics")
        senses = check_senses(senses if senses is not None else getattr(objective, "senses", None), num_metrics)
        timings = dict(timings or {})
        start = time.perf_counter()
        if self.link == "loo":
            surrogates = loo_surrogates(samples.coeffs, samples.metrics, resolve_links("auto", objective, num_metrics), names, self.ridge, self.r2_warn)
            links = tuple(s.link for s in surrogates)
        else:
            links = resolve_links(self.link, objective, num_metrics)
            surrogates = fit_surrogates(samples.coeffs, samples.metrics, links, names, self.ridge, self.r2_warn)
        model = None
        if self.final_model == "gp":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ResidualGPModel(surrogates, samples.coeffs, samples.metrics, self.bounds)
        timings["fit"] = time.perf_counter() - start
        start = time.perf_counter()
        front = surrogate_front(model if model is not None else surrogates, senses, names, self._search_box(), self.search, self.seed,
                                self.max_front_points)
        timings["search"] = time.perf_counter() - start
        settings = {
            "num_samples": len(samples), "bounds": list(self.bounds), "links": list(links), "design": self.design,
            "seed": self.seed, "search": self.search, "ridge": self.ridge, "final_model": self.final_model,
        }
        return MAPResult(samples, surrogates, front, names, senses, self.bounds, timings=timings, settings=settings, model=model,
                         fitter=self)
