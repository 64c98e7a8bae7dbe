"""Bayesian adaptive sampling around the quadratic surrogates (the quadratic as the GP's mean).

:class:`BayesianMAP` starts from a small design, then each round refits the quadratic surrogates
on all data so far, picks the next batch of coefficient vectors, evaluates them, and repeats until
the budget is spent; the last batch is used in the final fit. It is the quadratic-surrogate member
of the MAP family; :class:`~map_merge.MAP`'s default adaptive sampling (constant-mean GPs) draws
larger fronts at the same budget (``benchmarks/bench_fronts.py``). Acquisitions:

- ``"ehvi"`` (default): botorch's qLogEHVI on the evaluated front, ``"nehvi"``: qLogNEHVI (the
  noisy variant: a box decomposition per posterior sample, several times slower). The model is a
  Gaussian process per task on the residuals of the quadratic surrogate (so the quadratic is the
  GP's mean); the acquisition's objective adds the quadratic back. By default the final front is
  searched on the same quadratic-plus-GP model (``final_model="gp"``), which corrects the
  quadratic's misfit near the points sampled.
- ``"binned"``: the MAP authors' angular-bin scheme, without their code's defects: cells of the
  hyperspherical angles of ``c`` are scored every round on *all* points so far by the mean squared
  leave-one-out residual plus half its bootstrap standard error; scores are scaled to [0, 1]
  before the softmax (at the authors' temperature 0.07 on raw squared errors the draw is nearly
  uniform); a point is drawn in a chosen cell with uniform angles and radius ``U(0.2, 0.8)`` of the
  box's diagonal reach. Prior points given by the user are used in every fit.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .designs import make_design, num_quadratic_params, with_points
from .acquisition import propose_ehvi, reference_point
from .adaptive import sample_adaptively
from .map import MAP, fit_surrogates, resolve_links
from .result import MAPResult, Samples
from .pareto import check_senses, orient
from .residual_gp import ResidualGPModel

__all__ = ["BayesianMAP", "ResidualGPModel", "angles", "from_angles", "ACQUISITIONS"]

ACQUISITIONS = ("ehvi", "nehvi", "binned")

log = logging.getLogger(__name__)


def angles(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hyperspherical coordinates of non-negative ``coeffs: (K, T)``: radius ``(K,)`` and
    ``T-1`` angles in ``[0, pi/2]`` ``(K, T-1)``."""
    coeffs = np.clip(np.atleast_2d(coeffs), 0.0, None)
    radius = np.linalg.norm(coeffs, axis=1)
    num = coeffs.shape[1]
    out = np.zeros((len(coeffs), num - 1))
    for i in range(num - 1):
        tail = np.linalg.norm(coeffs[:, i:], axis=1)
        out[:, i] = np.arctan2(np.linalg.norm(coeffs[:, i + 1 :], axis=1), coeffs[:, i])
        out[tail == 0, i] = 0.0
    return radius, out


def from_angles(radius: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Inverse of :func:`angles`: ``(K,)`` radii and ``(K, T-1)`` angles to ``(K, T)``."""
    num = theta.shape[1] + 1
    out = np.zeros((len(radius), num))
    running = np.asarray(radius, dtype=np.float64).copy()
    for i in range(num - 1):
        out[:, i] = running * np.cos(theta[:, i])
        running = running * np.sin(theta[:, i])
    out[:, -1] = running
    return out


class BayesianMAP(MAP):
    """MAP with adaptive sampling; returns the same :class:`~map_merge.map.MAPResult`.

    Args:
        budget: total real evaluations B (default ``(T+1)(T+2)``, plain MAP's budget).
        initial: size of the starting design K0 (default ``P + 2``; at least ``P``).
        batch: coefficient vectors per round k (default ``max(1, T)``).
        acquisition: ``"ehvi"`` (default), ``"nehvi"`` or ``"binned"``.
        prior: optional earlier real evaluations ``(coeffs (K, T), metrics (K, M))`` used in every fit.
        temperature: softmax temperature of the binned scheme (on scores scaled to [0, 1]).
        final_model: ``"gp"`` (default): the front is searched on the quadratic surrogates plus
            residual Gaussian processes (:class:`ResidualGPModel`), the model the acquisition uses;
            ``"quadratic"``: on the quadratic surrogates alone, as plain MAP.
        asynchronous: ``"auto"`` (default): when the objective's executor runs ``W > 1``
            evaluations at once (e.g. a :class:`~map_merge.RayExecutor`), keep ``W`` in flight:
            the initial design is queued at once and each finished evaluation triggers a refit
            and one new point proposed conditioned on the pending ones (qLogNEHVI's
            ``X_pending``); ``batch`` is then unused. ``True`` / ``False`` force it.
        lookahead: in asynchronous mode, propose the next point while every worker is busy and
            hand it to the first one that frees up (hides the proposal's time; default ``True``).
        Other arguments as for :class:`~map_merge.map.MAP`.
    """

    def __init__(
        self,
        budget: int | None = None,
        initial: int | None = None,
        batch: int | None = None,
        acquisition: str = "ehvi",
        prior: tuple[np.ndarray, np.ndarray] | None = None,
        temperature: float = 0.2,
        final_model: str = "gp",
        asynchronous: bool | str = "auto",
        lookahead: bool = True,
        **kwargs,
    ) -> None:
        if final_model not in ("gp", "quadratic"):
            raise ValueError(f"final_model must be 'gp' or 'quadratic', got {final_model!r}")
        # the quadratic-surrogate family: its own loop (fit) over MAP's design-sampling settings and models
        super().__init__(sampling="design", final_model=final_model, asynchronous=asynchronous, lookahead=lookahead, **kwargs)
        if acquisition not in ACQUISITIONS:
            raise ValueError(f"unknown acquisition {acquisition!r}; choose one of {ACQUISITIONS}")
        self.budget = budget
        self.initial = initial
        self.batch = batch
        self.acquisition = acquisition
        self.prior = prior
        self.temperature = float(temperature)

    def fit(self, objective: Callable[[np.ndarray], np.ndarray], num_tasks: int, task_names: Sequence[str] | None = None, progress: bool = False,
            include: np.ndarray | None = None) -> MAPResult:
        """Run adaptive MAP on ``objective(coeffs (K, T)) -> metrics (K, M)``; ``samples.round``
        records the round of each evaluation (0 = initial design); ``include``: ``(J, T)`` points
        placed first in the initial design (a recipe's starting point)."""
        num_coeffs, names = self._setup(objective, num_tasks, task_names)
        if num_coeffs < 2:
            raise ValueError("adaptive sampling needs at least 2 tasks (one coefficient has nothing to trade off)")
        minimum = num_quadratic_params(num_coeffs)
        budget = (num_coeffs + 1) * (num_coeffs + 2) if self.budget is None else int(self.budget)
        initial = min(budget, minimum + 2) if self.initial is None else int(self.initial)
        batch = max(1, num_coeffs) if self.batch is None else int(self.batch)
        if initial < minimum:
            raise ValueError(f"initial={initial} is below the {minimum} parameters of a quadratic in {num_coeffs} coefficients")
        if budget < initial:
            raise ValueError(f"budget={budget} is below the initial design of {initial} evaluations")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        rng = np.random.default_rng(self.seed)
        timings = {"evaluate": 0.0, "acquire": 0.0}
        coeffs = with_points(make_design(self.design, num_coeffs, initial, self.bounds, self.seed), include, initial)
        width = int(getattr(getattr(objective, "executor", None), "num_workers", 1))
        asynchronous = width > 1 if self.asynchronous == "auto" else bool(self.asynchronous)
        context: dict = {}

        def propose(done_x: np.ndarray, done_y: np.ndarray, pending: np.ndarray | None, size: int) -> np.ndarray:
            if not context:
                context["senses"] = check_senses(getattr(objective, "senses", None), done_y.shape[1])
                context["links"] = resolve_links(self.link, objective, done_y.shape[1])
                context["names"] = tuple(names) if names is not None else tuple(f"task{j}" for j in range(done_y.shape[1]))
            return self._propose(done_x, done_y, context["senses"], context["links"], context["names"], size, rng, pending)

        prior = 0 if self.prior is None else len(np.atleast_2d(self.prior[0]))
        # asynchronous: while fewer results than a quadratic's parameters are back, workers get space-filling points
        filler = iter(make_design("sobol", num_coeffs, 2 * budget, self.bounds, self.seed + 1)[len(coeffs):])
        proposal_seconds: list[float] = []
        samples, in_flight = sample_adaptively(objective, coeffs, budget, propose, batch=batch, asynchronous=asynchronous,
                                               lookahead=self.lookahead, min_done=minimum - prior, filler=filler, progress=progress,
                                               timings=timings, proposal_seconds=proposal_seconds)
        senses = check_senses(getattr(objective, "senses", None), samples.metrics.shape[1])
        names = tuple(names) if names is not None else tuple(f"task{j}" for j in range(samples.metrics.shape[1]))
        fit_coeffs, fit_metrics = self._with_prior(samples)
        result = self.fit_samples(Samples(fit_coeffs, fit_metrics), objective=objective, task_names=names, senses=senses, timings=timings)
        # fit_samples searched the front on the model final_model names (quadratic + residual GP by default)
        result.samples = samples  # report only this run's evaluations; the prior was used in the fit
        result.settings.update({"strategy": "bayesian", "acquisition": self.acquisition, "budget": budget, "initial": initial,
                                "batch": None if asynchronous else batch, "final_model": self.final_model,
                                "asynchronous": asynchronous, "max_in_flight": in_flight, "proposal_seconds": proposal_seconds})
        return result

    def _propose(self, coeffs, metrics, senses, links, names, size, rng, pending) -> np.ndarray:
        """``size`` new points ``(size, T)`` from the evaluations so far (plus the prior)."""
        fit_coeffs, fit_metrics = self._with_prior(Samples(coeffs, metrics))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            surrogates = fit_surrogates(fit_coeffs, fit_metrics, links, names, self.ridge, -np.inf)
            if self.acquisition in ("nehvi", "ehvi"):
                return self._nehvi(fit_coeffs, fit_metrics, surrogates, senses, size, pending, noisy=self.acquisition == "nehvi")
            return self._binned(fit_coeffs, fit_metrics, surrogates, size, rng)

    def _with_prior(self, samples: Samples) -> tuple[np.ndarray, np.ndarray]:
        if self.prior is None:
            return samples.coeffs, samples.metrics
        coeffs, metrics = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in self.prior)
        if coeffs.shape[1] != samples.coeffs.shape[1] or metrics.shape[1] != samples.metrics.shape[1] or len(coeffs) != len(metrics):
            raise ValueError(f"prior must be (coeffs (K, {samples.coeffs.shape[1]}), metrics (K, {samples.metrics.shape[1]}))")
        return np.concatenate([coeffs, samples.coeffs]), np.concatenate([metrics, samples.metrics])

    # ------------------------------------------------------------------ acquisitions
    def _nehvi(self, coeffs: np.ndarray, metrics: np.ndarray, surrogates, senses, size: int, pending: np.ndarray | None = None,
               noisy: bool = True) -> np.ndarray:
        """qLogNEHVI (``noisy``) or qLogEHVI on the evaluated front, under the quadratic-mean model."""
        residual_model = ResidualGPModel(surrogates, coeffs, metrics, self.bounds)
        if not noisy:
            return propose_ehvi(residual_model, metrics, senses, self.bounds, q=size, pending=pending, seed=self.seed + len(coeffs),
                                ref_point=reference_point(orient(metrics, senses)))  # the reference Bayesian MAP was measured with
        from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
        from botorch.optim import optimize_acqf
        from botorch.sampling import SobolQMCNormalSampler

        dtype = torch.float64
        num_coeffs = coeffs.shape[1]
        low, high = self.bounds
        box = torch.tensor([[low] * num_coeffs, [high] * num_coeffs], dtype=dtype)
        acquisition = qLogNoisyExpectedHypervolumeImprovement(
            model=residual_model.gp, ref_point=reference_point(orient(metrics, senses)).tolist(), X_baseline=torch.tensor(coeffs, dtype=dtype),
            objective=residual_model.mc_objective(senses), sampler=SobolQMCNormalSampler(torch.Size([64]), seed=int(self.seed)),
            prune_baseline=True, X_pending=torch.tensor(pending, dtype=dtype) if pending is not None and len(pending) else None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + len(coeffs))
            candidates, _ = optimize_acqf(acquisition, bounds=box, q=size, num_restarts=4, raw_samples=128, sequential=True, options={"maxiter": 60})
        return candidates.detach().numpy().clip(low, high)

    def _binned(self, coeffs: np.ndarray, metrics: np.ndarray, surrogates, size: int, rng: np.random.Generator) -> np.ndarray:
        low, high = self.bounds
        if low < 0:
            raise ValueError("the binned acquisition works on non-negative coefficients (angles of c); use bounds with low >= 0")
        num_coeffs = coeffs.shape[1]
        bins = 4 if num_coeffs < 4 else 2
        # leave-one-out residuals, scaled per task by its spread, squared and averaged over tasks
        from .surrogate import _link_grad, quadratic_features

        phi = quadratic_features(coeffs)
        errors = []
        for j, s in enumerate(surrogates):
            jac = _link_grad(s.link, phi @ s.weights)[:, None] * phi
            leverage = np.einsum("ij,jk,ik->i", jac, np.linalg.pinv(jac.T @ jac), jac)
            resid = (s.predict(coeffs) - metrics[:, j]) / np.maximum(1.0 - leverage, 0.05)
            errors.append((resid / max(metrics[:, j].std(), 1e-9)) ** 2)
        error = np.mean(errors, axis=0)
        _, theta = angles(coeffs)
        cell_of = np.minimum((theta / (math.pi / 2) * bins).astype(int), bins - 1)
        cell_index = np.ravel_multi_index(cell_of.T, (bins,) * (num_coeffs - 1))
        num_cells = bins ** (num_coeffs - 1)
        scores = np.zeros(num_cells)
        for cell in range(num_cells):
            member = error[cell_index == cell]
            if len(member) == 0:
                scores[cell] = np.inf  # unexplored cells first
                continue
            boot = rng.choice(member, size=(50, len(member)), replace=True).mean(axis=1)
            scores[cell] = member.mean() + 0.5 * boot.std()
        finite = np.isfinite(scores)
        scaled = np.where(finite, scores / max(scores[finite].max(), 1e-12), 1.0)
        prob = np.exp((scaled - scaled.max()) / self.temperature)
        prob /= prob.sum()
        chosen = rng.choice(num_cells, size=size, p=prob)
        corners = np.array(np.unravel_index(chosen, (bins,) * (num_coeffs - 1))).T
        theta_new = (corners + rng.uniform(size=corners.shape)) * (math.pi / 2) / bins
        reach = high * math.sqrt(num_coeffs)
        radius = rng.uniform(0.2, 0.8, size=size) * reach
        return np.clip(from_angles(radius, theta_new), low, high)
