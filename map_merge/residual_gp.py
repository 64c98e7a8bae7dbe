"""Quadratic surrogates plus Gaussian processes on their residuals: the predictive model that
Bayesian sampling acquires on and that MAP (``final_model="gp"``) searches its front on.

botorch and gpytorch are imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .gp_model import posterior_mean, predict_in_chunks
from .surrogate import torch_predict_all

__all__ = ["ResidualGPModel"]

log = logging.getLogger(__name__)


class ResidualGPModel:
    """Quadratic surrogates plus one Gaussian process per task on their residuals (botorch).

    ``m_j(c) = q_j(c) + g_j(c)``, ``g_j ~ GP`` fitted to ``metric_j - q_j`` (standardised):
    the quadratic carries the global shape, the GP the local misfit it cannot express. Has the
    predictive-model interface of :class:`~map_merge.surrogate.SurrogateSet`.

    ``reference``: an optional second model of the same evaluations (a constant-mean
    :class:`~map_merge.gp_model.GPModel`). The predictive std then adds the two models'
    disagreement, in proportion to how far the point is from every evaluation:
    ``sqrt(std**2 + (reach * (mean - reference mean))**2)``, where ``reach = std / prior std`` of
    the residual GP (0 at an evaluation, 1 beyond the GP's reach). Out there the quadratic
    extrapolates, and the residual GP, fitted to small residuals, is as sure of it as anywhere (a
    saturated sigmoid link looks certain), while a constant-mean GP falls back to the metrics'
    average. Without it a cautious pick can hand over an unsupported extrapolation (measured: a
    predicted 0.97 that was 0.20 for real; docs/fronts.md); near the evaluations, where the two
    models' small differences are fit, not ignorance, the std is the residual GP's own."""

    def __init__(self, surrogates, coeffs: np.ndarray, metrics: np.ndarray, bounds: tuple[float, float], reference: Any = None) -> None:
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms import Normalize
        from gpytorch.mlls import SumMarginalLogLikelihood


        dtype = torch.float64
        self.num_coeffs = coeffs.shape[1]
        self.quadratic = torch_predict_all(surrogates)
        box = torch.tensor([[bounds[0]] * self.num_coeffs, [bounds[1]] * self.num_coeffs], dtype=dtype)
        x = torch.tensor(coeffs, dtype=dtype)
        residual = torch.tensor(metrics, dtype=dtype) - self.quadratic(x).detach()
        self.offset = residual.mean(dim=0)
        self.scale = residual.std(dim=0).clamp_min(1e-4)
        standard = (residual - self.offset) / self.scale  # standardised residuals (botorch's expectation)
        gps = [SingleTaskGP(x, standard[:, j : j + 1], input_transform=Normalize(self.num_coeffs, bounds=box), outcome_transform=None)
               for j in range(metrics.shape[1])]
        self.gp = ModelListGP(*gps)
        try:
            fit_gpytorch_mll(SumMarginalLogLikelihood(self.gp.likelihood, self.gp))
        except Exception as error:  # noqa: BLE001 - a failed hyper-parameter fit keeps the defaults
            log.warning("GP hyper-parameter fit failed (%s); using defaults", error)
        self.gp.eval()
        self._alpha: dict[int, torch.Tensor] = {}
        if reference is not None:  # a reference of other metrics would broadcast silently into the std
            shape = (getattr(reference, "num_coeffs", self.num_coeffs), getattr(reference, "num_metrics", metrics.shape[1]))
            if shape != (self.num_coeffs, metrics.shape[1]):
                raise ValueError(f"the reference model takes {shape[0]} coefficients and predicts {shape[1]} metrics; "
                                 f"this model {self.num_coeffs} and {metrics.shape[1]}")
        self.reference = reference
        self._reach_scale = self.scale.numpy() * self._prior_std() if reference is not None else None  # (M,) the residual GPs' prior std

    def _gp_mean(self, flat: torch.Tensor) -> torch.Tensor:
        return posterior_mean(self.gp.models, flat, self._alpha)

    def mc_objective(self, senses: Sequence[str]) -> Any:
        """botorch's MC objective adding the quadratic back to posterior samples of the
        standardised residuals, in metric units oriented higher-is-better."""
        from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective

        sign = torch.tensor([1.0 if s == "max" else -1.0 for s in senses], dtype=torch.float64)

        def full(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
            return (samples * self.scale + self.offset + self.quadratic(X)) * sign

        return GenericMCMultiOutputObjective(full)

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        shape = coeffs.shape
        flat = coeffs.reshape(-1, shape[-1])
        mean = self._gp_mean(flat) * self.scale + self.offset + self.quadratic(flat)
        return mean.reshape(shape[:-1] + (mean.shape[-1],))

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        """Predictive means ``(K, M)`` (and standard deviations ``(K, M)``, widened by the
        disagreement with ``reference`` away from the evaluations when there is one)."""
        out = predict_in_chunks(self.torch_predict, lambda x: self.gp.posterior(x).variance.clamp_min(0).sqrt() * self.scale, coeffs,
                                return_std)
        if not return_std or self.reference is None:
            return out
        mean, std = out
        reach = np.clip(std / self._reach_scale, 0.0, 1.0)
        other = np.asarray(self.reference.predict(coeffs), dtype=np.float64)
        if other.shape != mean.shape:
            raise ValueError(f"the reference model predicts shape {other.shape}, this model {mean.shape}")
        gap = mean - other
        return mean, np.sqrt(std**2 + (reach * gap) ** 2)

    def _prior_std(self) -> np.ndarray:
        """``(M,)`` prior standard deviation of each (standardised) residual GP: its stationary
        kernel's value at zero distance."""
        with torch.no_grad():
            point = torch.zeros(1, self.num_coeffs, dtype=torch.float64)
            return np.array([float(gp.covar_module(point, diag=True).clamp_min(1e-12).sqrt()) for gp in self.gp.models])
