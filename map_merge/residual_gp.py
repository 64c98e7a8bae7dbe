"""Quadratic surrogates plus Gaussian processes on their residuals: the predictive model that
Bayesian sampling acquires on and that MAP (``final_model="gp"``) searches its front on.

botorch and gpytorch are imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

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
        self._alpha: list[torch.Tensor] | None = None

    def _gp_mean(self, flat: torch.Tensor) -> torch.Tensor:
        # the predictive mean in closed form, m(x) + k(x, X) alpha, with alpha = gpytorch's cached
        # (K + s^2 I)^-1 (y - m(X)): far cheaper than a posterior() call inside a gradient loop
        if self._alpha is None:
            with torch.no_grad():
                for gp in self.gp.models:
                    gp(gp.transform_inputs(flat[:1]))  # fills the prediction cache
            self._alpha = [gp.prediction_strategy.mean_cache.detach() for gp in self.gp.models]
        columns = []
        for gp, alpha in zip(self.gp.models, self._alpha):
            x = gp.transform_inputs(flat)
            cross = gp.covar_module(x, gp.train_inputs[0]).to_dense()
            columns.append(gp.mean_module(x) + cross @ alpha)
        return torch.stack(columns, dim=-1)

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        shape = coeffs.shape
        flat = coeffs.reshape(-1, shape[-1])
        mean = self._gp_mean(flat) * self.scale + self.offset + self.quadratic(flat)
        return mean.reshape(shape[:-1] + (mean.shape[-1],))

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        coeffs = torch.tensor(np.atleast_2d(coeffs), dtype=torch.float64)
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(coeffs), 2048):
                chunk = coeffs[start : start + 2048]
                if return_std:
                    posterior = self.gp.posterior(chunk)
                    gp_mean = posterior.mean
                    stds.append((posterior.variance.clamp_min(0).sqrt() * self.scale).numpy())
                else:
                    gp_mean = self._gp_mean(chunk)
                means.append((gp_mean * self.scale + self.offset + self.quadratic(chunk)).numpy())
        mean = np.concatenate(means)
        return (mean, np.concatenate(stds)) if return_std else mean
