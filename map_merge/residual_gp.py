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
    predictive-model interface of :class:`~map_merge.surrogate.SurrogateSet`."""

    def __init__(self, surrogates, coeffs: np.ndarray, metrics: np.ndarray, bounds: tuple[float, float]) -> None:
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
        return predict_in_chunks(self.torch_predict, lambda x: self.gp.posterior(x).variance.clamp_min(0).sqrt() * self.scale, coeffs,
                                 return_std)
