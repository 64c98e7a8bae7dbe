"""What a MAP run returns: its real evaluations (:class:`Samples`), the fitted model and the
predicted front (:class:`MAPResult`), and :func:`call_objective`, the one checked way to ask an
objective for metrics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .pareto import PICK_CAUTION, ParetoFront, cautious_pick, check_noisy, orient
from .search import thin_front
from .surrogate import QuadraticSurrogate, SurrogateSet

__all__ = ["Samples", "MAPResult", "call_objective"]


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
        noisy: per metric, whether it is a noisy estimate (the objective's ``noisy``; e.g. an
            :class:`~map_merge.LMEvalTask` on a sample of questions): :meth:`select` scores real
            evaluations in it by the model rather than by their measurement.
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
    noisy: tuple[bool, ...] | None = None  # None: every metric is measured exactly

    def __post_init__(self) -> None:
        if self.noisy is not None:  # one flag per metric (a wrong length fails here, not at the first pick)
            self.noisy = check_noisy(self.noisy, len(self.task_names))

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

    def select(self, preference: Sequence[float], caution: float = PICK_CAUTION) -> np.ndarray:
        """Coefficients ``(T,)`` of the model handed to a user who prefers ``preference: (M,)``:
        the predicted front's point with the best weighted score less ``caution`` predictive
        standard deviations, unless a real evaluation scores better (:func:`~map_merge.pareto.cautious_pick`).
        A real evaluation scores by its measurements, except in :attr:`noisy` metrics: there by the
        model's prediction at it, less ``caution`` predictive standard deviations (a noisy
        measurement's lead over the model is partly luck; docs/fronts.md)."""
        front, index = self.choice(preference, caution)
        return front.coeffs[index].copy()

    def choice(self, preference: Sequence[float], caution: float = PICK_CAUTION) -> tuple[ParetoFront, int]:
        """``(front, index)`` of :meth:`select`'s pick: ``self.front`` (a prediction) or
        :meth:`real_evaluations` (a real evaluation, with its measured metrics)."""
        evaluated = self.real_evaluations()
        if evaluated is None or not any(self.noisy or ()):
            return cautious_pick(self.front, preference, evaluated, caution)
        posterior = self.predict(evaluated.coeffs, return_std=True)
        return cautious_pick(self.front, preference, evaluated, caution, posterior=posterior, noisy=self.noisy)

    def real_evaluations(self) -> ParetoFront | None:
        """Every real evaluation (the samples, then the re-evaluated front points), dominated ones
        included, as a :class:`ParetoFront` labelled "all real evaluations"; ``None`` without any."""
        parts = [(self.samples.coeffs, self.samples.metrics)] if len(self.samples) else []
        if self.real_front is not None:
            parts.append((self.real_front.coeffs, self.real_front.metrics))
        if not parts:
            return None
        return ParetoFront(np.concatenate([c for c, _ in parts]), np.concatenate([m for _, m in parts]), self.task_names, self.senses,
                           label="all real evaluations")

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
        every real evaluation so far (its senses and :attr:`noisy` flags kept) and searches again.
        Returns the refitted result: its ``samples`` hold the original samples and the earlier
        rounds' re-evaluations (``round`` 1, 2, ...), its ``real_front`` the last round's."""
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
                                              timings=self.timings, noisy=self.noisy)
        current.settings = {**self.settings, **current.settings, "refine": {"reevaluations": int(reevaluations), "rounds": int(rounds)}}
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
        evaluated = self.real_evaluations()
        if evaluated is None:
            raise ValueError("empty Pareto front (all real evaluations): no points to choose from")
        return evaluated.nondominated()

    def to_dict(self) -> dict[str, Any]:
        out = {
            "task_names": list(self.task_names),
            "senses": list(self.senses),
            "noisy": list(self.noisy or (False,) * len(self.task_names)),
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
        if self.model is not None or self.surrogates:  # the model at every real evaluation: a pick among them keeps its prediction
            for key, part in (("samples", self.samples), ("real_front", self.real_front)):
                if part is not None and len(part.coeffs):
                    mean, std = self.predict(part.coeffs, return_std=True)
                    out[key].update(predicted=np.asarray(mean).tolist(), predicted_std=np.asarray(std).tolist())
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
