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
from typing import Any

import numpy as np
import torch

from .adaptive import fit_adaptive
from .designs import default_num_samples, make_design, num_quadratic_params, with_points
from .noisy_trend import MIN_SAMPLES_PER_PARAMETER, NOISY_TREND, NoisyTrendModel, check_trend
from .pareto import ParetoFront, check_noisy, check_senses
from .residual_gp import ResidualGPModel
from .result import MAPResult, Samples, call_objective
from .search import nsga3_search, scalarization_search
from .surrogate import LINKS, QuadraticSurrogate, SurrogateSet, safe_quadratics

__all__ = ["MAP", "MAPResult", "Samples", "fit_surrogates", "surrogate_front", "call_objective", "SAMPLINGS", "MODELS"]

log = logging.getLogger(__name__)


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


SAMPLINGS = ("adaptive", "design")
PROPOSAL_MODELS = ("gp", "auto")
MODELS = ("auto", "gp", "quadratic+gp", "quadratic")


class MAP:
    """Amortized Pareto fronts: spend a budget of real evaluations, model every metric as a
    function of the merging coefficients, search the model for the front.

    Two ways to spend the budget (``sampling``):

    - ``"adaptive"`` (default): a small starting design (at T = 2 the average merge, both
      coefficients 1/2 clipped to ``bounds``, where the design has room beside the experts; for a
      merge the T experts, i.e. the one-hot coefficient vectors; space-filling points), then one
      point at a time where the expected hypervolume improvement is largest under Gaussian-process
      models of the metrics (from 4 coefficients on, by default, under the model cross-validation
      prefers, constant-mean GPs or quadratic + GP: ``proposal_model``)
      (:mod:`~map_merge.acquisition`; with two metrics the front improved is the models' posterior
      at the evaluated points, with more the evaluated front); the last ``final`` evaluations go
      to the model's picks for ``preferences`` (none given, under the constant-mean GP proposals:
      each metric's own pick, the front's ends, where their hypervolume proposals spend least).
      The front is searched on the same models.
    - ``"design"``: the MAP authors' plan: the whole budget on one design, then quadratic
      surrogates (plus a Gaussian process on their residuals, ``model="quadratic+gp"``).

    Args:
        budget: total real evaluations (default ``(T+1)(T+2)``). With ``sampling="design"``
            at least the quadratic's ``P = (T+1)(T+2)/2`` parameters.
        sampling: ``"adaptive"`` or ``"design"`` (default: ``"design"`` when ``num_samples``
            without ``budget``, or ``final_model``, is given, as in earlier versions; else
            ``"adaptive"``).
        num_samples: the design's size (``sampling="design"``; same as ``budget``).
        initial: adaptive: size of the starting design (default ``max(6, 2T)``: at T = 2 the
            average merge, then for a merge the T experts and Sobol points, for a black box Sobol
            points alone; never above ``budget``; the average merge gives way to the user's
            ``include`` points and the experts when they fill it).
        batch: adaptive, synchronous: points proposed per round (default 1).
        preferences: ``(P, M)`` or ``(M,)`` preferences the user will pick for: the last
            ``final`` evaluations go to the model's picks for them.
        final: adaptive: evaluations spent on the model's picks at the end (default: one per
            preference given; else, under constant-mean GP proposals (below 4 coefficients, or
            ``proposal_model="gp"``), one per metric, each metric's own pick, the front's ends (an
            objective that names no metrics counts one per coefficient), and under cross-validated
            proposals, whose quadratic mean reaches the ends itself, none). Without preferences
            the picks are for the one-hot preferences first, then the equal one, then spread ones.
            A pick already evaluated gives way to a proposal (with several asynchronous workers
            or ``batch`` > 1, proposed in the picks' own round). ``final=0``: proposals to the end.
        noise: adaptive GP models: ``"infer"`` (default) or ``"fixed"`` (near-interpolation).
        bounds: the sampling box ``[low, high]^T`` for every coefficient.
        link: quadratic surrogate link: ``"auto"`` (default: the link each of the objective's
            tasks suggests, e.g. softplus for a loss; sigmoid where none is given), ``"loo"``
            (per task, that suggestion or ``"identity"``, whichever has the lower leave-one-out
            error), ``"sigmoid"``, ``"softplus"``, ``"identity"``, or one per metric.
        design: starting design (adaptive) or the whole design: ``"sobol"`` (the one-hots plus
            Sobol points), ``"qmc"`` (Sobol points alone), ``"map"`` (the authors'; the design
            default) or ``"lhs"``. Adaptive default: ``"sobol"`` when the objective merges task
            vectors (it has ``task_vectors``: each one-hot vector is a fine-tuned expert, nearly
            the best model for its task and an end of the front), else ``"qmc"`` (a black box).
        seed: seeds the design, the proposals and the search.
        search: ``"scalarization"`` (default) or ``"nsga3"`` (the authors').
        search_bounds: box searched for the front (default: ``bounds``); a wider box
            extrapolates the model and warns.
        ridge: L2 penalty of the quadratic fit.  r2_warn: warn when a quadratic surrogate's R^2
            falls below this (``"design"`` sampling).
        max_front_points: cap on the predicted front's size.
        model: the model the front is searched on: ``"gp"`` (Gaussian processes with a
            constant mean), ``"quadratic+gp"`` (quadratic surrogates plus a GP on their
            residuals, :class:`~map_merge.residual_gp.ResidualGPModel`: the design default),
            ``"quadratic"`` (the authors') or ``"auto"`` (the adaptive default: ``"gp"`` or
            ``"quadratic+gp"``, whichever predicts held-out evaluations better in 5-fold
            cross-validation, :mod:`~map_merge.model_choice`; ``"gp"`` while a fold's quadratic
            would have fewer than ``P + 1`` points, or with fewer than 10 evaluations).
            ``result.settings["model"]`` names the one used.
        final_model: the older name of ``model``: ``"gp"`` means ``"quadratic+gp"``.
        asynchronous: adaptive: ``"auto"`` (default) keeps an executor's ``W > 1`` workers busy
            (one proposal per finished evaluation, pending points fantasised); ``True`` /
            ``False`` force it.
        lookahead: asynchronous: propose while every worker is busy.
        proposal_model: adaptive: the model proposals are made under: ``None`` (default):
            ``"auto"`` from 4 coefficients on (T tasks, or T x G with coefficient groups) and
            ``"gp"`` below; ``"gp"``: constant-mean Gaussian processes; ``"auto"``: the model
            ``model="auto"`` would choose, by 5-fold cross-validation between ``"gp"`` and
            ``"quadratic+gp"``,
            re-chosen after every ``PROPOSAL_RECHOOSE`` (4) evaluations or more (a batch can
            step past) from ``P + 2`` evaluations on, P the quadratic's parameter count. A
            choice made before cross-validation has enough evaluations (2 per fold, P + 1 in
            each training set) is the GPs, and it stands for the next 4 evaluations too;
            ``result.settings["proposal_kinds"]`` lists every ``(evaluations, kind)`` choice
            and ``result.settings["proposal_model"]`` the one run
            (:func:`~map_merge.adaptive.proposal_model_for`). The quadratic + GP proposal model
            fits its own residual noise: ``noise="fixed"`` applies to the GPs alone.
        noisy_trend: the weight in ``[0, 1]`` of the quadratic surrogate in the prediction of a
            noisy metric (the objective's ``noisy`` flags, e.g. accuracies), under the ``"gp"`` and
            ``"quadratic+gp"`` models, from ``2 P`` evaluations on: their means are blended with it
            and their std widened by the two models' disagreement (default 0.5,
            :class:`~map_merge.noisy_trend.NoisyTrendModel`), so that the front and the picks follow the
            metric's trend rather than the validation set's luck; 0 keeps the model alone.
            ``result.settings["noisy_trend"]`` is the weight applied (0 when it was not).
    """

    def __init__(
        self,
        budget: int | None = None,
        sampling: str | None = None,
        num_samples: int | None = None,
        initial: int | None = None,
        batch: int | None = None,
        preferences: Sequence[float] | np.ndarray | None = None,
        final: int | None = None,
        noise: str = "infer",
        bounds: tuple[float, float] = (0.0, 1.0),
        link: str | Sequence[str] = "auto",
        design: str | None = None,
        seed: int = 0,
        search: str = "scalarization",
        search_bounds: tuple[float, float] | None = None,
        ridge: float = 0.0,
        r2_warn: float = 0.5,
        max_front_points: int | None = None,
        model: str | None = None,
        final_model: str | None = None,
        asynchronous: bool | str = "auto",
        lookahead: bool = True,
        proposal_model: str | None = None,
        noisy_trend: float = NOISY_TREND,
    ) -> None:
        if sampling is None:  # num_samples / final_model alone: the plain design of earlier versions
            sampling = "design" if (num_samples is not None and budget is None) or final_model is not None else "adaptive"
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if budget is not None and num_samples is not None and int(budget) != int(num_samples):
            raise ValueError(f"budget={budget} and num_samples={num_samples} disagree; give one")
        if final_model is not None:
            if final_model not in ("gp", "quadratic"):
                raise ValueError(f"final_model must be 'gp' or 'quadratic', got {final_model!r}")
            if model is not None:
                raise ValueError("give model or its older name final_model, not both")
            model = "quadratic+gp" if final_model == "gp" else "quadratic"
        if model is None:
            model = "auto" if sampling == "adaptive" else "quadratic+gp"
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if noise not in ("infer", "fixed"):
            raise ValueError(f"noise must be 'infer' or 'fixed', got {noise!r}")
        if proposal_model is not None and proposal_model not in PROPOSAL_MODELS:
            raise ValueError(f"proposal_model must be None or one of {PROPOSAL_MODELS}, got {proposal_model!r}")
        if asynchronous not in ("auto", True, False):
            raise ValueError(f"asynchronous must be 'auto', True or False, got {asynchronous!r}")
        for name, value, least in (("budget", budget, 1), ("num_samples", num_samples, 1), ("initial", initial, 2),
                                   ("batch", batch, 1), ("final", final, 0)):
            if value is not None and int(value) < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        self.sampling = sampling
        self.model = model
        self.final_model = "gp" if model == "quadratic+gp" else model  # the older name, for settings
        self.budget = budget if budget is not None else num_samples
        self.num_samples = self.budget
        self.initial = initial
        self.batch = batch
        self.preferences = None if preferences is None else np.atleast_2d(np.asarray(preferences, dtype=np.float64))
        if self.preferences is not None and (not np.isfinite(self.preferences).all() or (self.preferences < 0).any()
                                             or not (self.preferences.sum(axis=1) > 0).all()):
            raise ValueError(f"preferences must be finite non-negative rows, none all zero; got {self.preferences.tolist()}")
        self.final = final
        self.noise = noise
        self.bounds = (float(bounds[0]), float(bounds[1]))
        if not self.bounds[0] < self.bounds[1]:
            raise ValueError(f"bounds must satisfy low < high, got {bounds}")
        self.link = link
        self.design = design if design is not None else (None if sampling == "adaptive" else "map")  # adaptive: chosen per objective
        self.seed = seed
        self.search = search
        self.search_bounds = None if search_bounds is None else (float(search_bounds[0]), float(search_bounds[1]))
        self.ridge = ridge
        self.r2_warn = r2_warn
        self.max_front_points = max_front_points
        self.asynchronous = asynchronous
        self.lookahead = bool(lookahead)
        self.proposal_model = proposal_model
        self.noisy_trend = check_trend(noisy_trend)

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
                f"searching the box {box} beyond the sampled box {self.bounds}: the model is extrapolated "
                "there and its predictions are unreliable",
                UserWarning,
                stacklevel=3,
            )
        return box

    def fit(self, objective: Callable[[np.ndarray], np.ndarray], num_tasks: int, task_names: Sequence[str] | None = None,
            include: np.ndarray | None = None, progress: bool = False) -> MAPResult:
        """Run MAP on ``objective(coeffs (K, T)) -> metrics (K, M)``.

        Args:
            objective: the black-box objective (``senses`` and ``links`` attributes honoured).
            num_tasks: T, the number of merging coefficients (``T x G`` with coefficient groups).
            task_names: names of the M metrics (default: the objective's, else ``task0..``).
            include: ``(J, T)`` points evaluated first as part of the samples (e.g. a mergekit
                recipe's coefficients, the starting point of the search).
            progress: show a progress bar (adaptive sampling).
        """
        num_coeffs, names = self._setup(objective, num_tasks, task_names)
        if self.sampling == "adaptive":
            return fit_adaptive(self, objective, num_coeffs, names, include, progress)
        minimum = num_quadratic_params(num_coeffs)
        budget = default_num_samples(num_coeffs) if self.budget is None else int(self.budget)
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
        warm_start: Any = None,
        noisy: Sequence[bool] | None = None,
    ) -> MAPResult:
        """Fit the model on existing real evaluations and search its front (no evaluations).
        ``senses`` and ``noisy`` (per metric) default to the objective's (:class:`MAPResult`).
        ``warm_start``: an earlier :class:`~map_merge.gp_model.GPModel` or result's ``model``; its
        constant-mean GP's hyper-parameters start the GP fits (anything else is ignored)."""
        num_metrics = samples.metrics.shape[1]
        names = tuple(task_names) if task_names is not None else tuple(f"task{j}" for j in range(num_metrics))
        if len(names) != num_metrics:
            raise ValueError(f"got {len(names)} task names for {num_metrics} metrics")
        senses = check_senses(senses if senses is not None else getattr(objective, "senses", None), num_metrics)
        noisy = check_noisy(noisy if noisy is not None else getattr(objective, "noisy", None), num_metrics)
        timings = dict(timings or {})
        start = time.perf_counter()
        kind, errors = self._choose_model(samples, objective, names)
        surrogates, links = self._quadratics(samples, objective, names, kind)
        model = None
        from .gp_model import GPModel

        if isinstance(warm_start, NoisyTrendModel):
            warm_start = warm_start.model
        if isinstance(warm_start, ResidualGPModel):  # a quadratic + GP result's model: its constant-mean GP
            warm_start = warm_start.reference
        warm_start = warm_start if isinstance(warm_start, GPModel) else None
        if kind == "gp":
            model = GPModel(samples.coeffs, samples.metrics, self.bounds, noise=self.noise, warm_start=warm_start)
        elif kind == "quadratic+gp":
            # a constant-mean GP of the same evaluations: where it and the quadratic disagree (an
            # extrapolation the data does not reach), the disagreement counts as uncertainty
            reference = GPModel(samples.coeffs, samples.metrics, self.bounds, noise=self.noise, warm_start=warm_start)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = ResidualGPModel(surrogates, samples.coeffs, samples.metrics, self.bounds, reference=reference)
        enough = len(samples) >= MIN_SAMPLES_PER_PARAMETER * num_quadratic_params(samples.coeffs.shape[1])
        if model is not None and surrogates and enough and any(noisy) and self.noisy_trend > 0:  # noisy metrics toward their trend
            model = NoisyTrendModel(model, surrogates, noisy, self.noisy_trend)
        timings["fit"] = timings.get("fit", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        front = surrogate_front(model if model is not None else surrogates, senses, names, self._search_box(), self.search, self.seed,
                                self.max_front_points)
        timings["search"] = timings.get("search", 0.0) + time.perf_counter() - start
        settings = {
            "sampling": self.sampling, "model": kind, "model_errors": errors, "num_samples": len(samples), "bounds": list(self.bounds), "links": list(links),
            "design": self.design, "seed": self.seed, "search": self.search, "ridge": self.ridge, "final_model": self.final_model,
            "noisy_trend": model.trend if isinstance(model, NoisyTrendModel) else 0.0,
        }
        return MAPResult(samples, surrogates, front, names, senses, self.bounds, timings=timings, settings=settings, model=model,
                         fitter=self, noisy=noisy)

    def _choose_model(self, samples: Samples, objective: Any, names: tuple[str, ...]) -> tuple[str, dict[str, float] | None]:
        """``(model kind, cross-validated errors or None)``: ``"auto"`` picks by 5-fold cross-validation."""
        if self.model != "auto":
            return self.model, None
        return self.cross_validated_kind(samples, objective, names)

    def cross_validated_kind(self, samples: Samples, objective: Any, names: tuple[str, ...]) -> tuple[str, dict[str, float] | None]:
        """``(kind, errors)``: ``"gp"`` or ``"quadratic+gp"``, whichever predicts held-out real
        evaluations better in 5-fold cross-validation (``"gp"``, errors ``None``, with too few)."""
        from .gp_model import GPModel
        from .model_choice import FOLDS, cross_validated_errors

        num_coeffs = samples.coeffs.shape[1]
        if len(samples) < 2 * FOLDS or len(samples) * (FOLDS - 1) < (num_quadratic_params(num_coeffs) + 1) * FOLDS:
            return "gp", None  # too few for cross-validation (2 per fold), or a fold's quadratic would have under P + 1 points

        def residual(coeffs: np.ndarray, metrics: np.ndarray) -> ResidualGPModel:
            return self.residual_model(coeffs, metrics, objective, names)

        builders = {"gp": lambda c, m: GPModel(c, m, self.bounds, noise=self.noise), "quadratic+gp": residual}
        errors = cross_validated_errors(samples.coeffs, samples.metrics, builders, seed=self.seed)
        return min(errors, key=lambda name: (errors[name], name != "gp")), errors

    def residual_model(self, coeffs: np.ndarray, metrics: np.ndarray, objective: Any, names: tuple[str, ...]) -> ResidualGPModel:
        """Quadratic surrogates (quietly; identity where a link does not fit) plus GPs on their
        residuals, of ``coeffs (N, T)`` and ``metrics (N, M)``."""
        links = resolve_links("auto" if self.link == "loo" else self.link, objective, metrics.shape[1])
        return ResidualGPModel(safe_quadratics(coeffs, metrics, links, names, self.ridge), coeffs, metrics, self.bounds)

    def _quadratics(self, samples: Samples, objective: Any, names: tuple[str, ...], kind: str) -> tuple[list[QuadraticSurrogate], tuple[str, ...]]:
        """The quadratic surrogates: the model itself (``"quadratic"``) or its mean (``"quadratic+gp"``),
        else beside Gaussian processes diagnostics only (fitted when there are enough samples, never
        warning); with the GP model or the adaptive default, a link that does not fit a metric's
        range falls back to identity."""
        num_metrics = samples.metrics.shape[1]
        if kind == "gp" or self.model == "auto":
            links = resolve_links("auto" if self.link == "loo" else self.link, objective, num_metrics)
            if len(samples) < num_quadratic_params(samples.coeffs.shape[1]):
                return [], links
            surrogates = safe_quadratics(samples.coeffs, samples.metrics, links, names, self.ridge)
            return surrogates, tuple(q.link for q in surrogates)
        if self.link == "loo":
            surrogates = loo_surrogates(samples.coeffs, samples.metrics, resolve_links("auto", objective, num_metrics), names, self.ridge,
                                        self.r2_warn)
            return surrogates, tuple(s.link for s in surrogates)
        links = resolve_links(self.link, objective, num_metrics)
        return fit_surrogates(samples.coeffs, samples.metrics, links, names, self.ridge, self.r2_warn), links
