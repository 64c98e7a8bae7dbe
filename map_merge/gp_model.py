"""Gaussian-process models of the metrics as functions of the merging coefficients.

:class:`GPModel` is MAP's default predictive model: one Gaussian process per metric with a
constant prior mean and a Matern-5/2 kernel with one length scale per coefficient (botorch's
``SingleTaskGP`` with its default priors), inputs scaled to the unit box and outputs
standardised. At the small budgets MAP works with, a constant mean beats a quadratic one (a
confident quadratic extrapolates into the corners, where the front's ends lie, and starves them of
exploration; De Ath et al., arXiv 2004.08349, found the same); the quadratic surrogates stay as
diagnostics and as the plain design's model.

:func:`posterior_mean` is the closed-form predictive mean ``m + k(x, X) alpha`` of fitted botorch
GPs, differentiable and far cheaper than a ``posterior()`` call inside a gradient loop (the front
search runs hundreds of Adam steps through it).

botorch and gpytorch are imported when a model is built, not when this module is imported.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["GPModel", "posterior_mean", "predict_in_chunks"]

log = logging.getLogger(__name__)

NOISE_FLOOR = 1e-6
"""Observation noise (as a share of each metric's variance) of ``noise="fixed"``: interpolation of
deterministic metrics, with just enough jitter for a stable Cholesky factor."""


def posterior_mean(gps: Sequence[Any], coeffs: torch.Tensor, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    """Predictive means ``(N, M)`` of M fitted single-output botorch GPs (eval mode) at
    ``coeffs: (N, T)``, in each GP's training units (before any outcome transform is undone).
    ``cache`` keeps each GP's ``alpha = (K + s^2 I)^-1 (y - m)`` between calls."""
    columns = []
    for index, gp in enumerate(gps):
        if index not in cache:
            with torch.no_grad():
                gp(gp.transform_inputs(coeffs[:1]))  # fills gpytorch's prediction cache
            cache[index] = gp.prediction_strategy.mean_cache.detach()
        x = gp.transform_inputs(coeffs)
        cross = gp.covar_module(x, gp.train_inputs[0]).to_dense()
        columns.append(gp.mean_module(x) + cross @ cache[index])
    return torch.stack(columns, dim=-1)


class GPModel:
    """One Gaussian process per metric, fitted to real evaluations.

    Args:
        coeffs: ``(N, T)`` evaluated coefficient vectors.
        metrics: ``(N, M)`` their metrics, in their own units and senses.
        bounds: the coefficient box ``[low, high]`` (inputs are scaled to the unit box).
        noise: ``"infer"`` (default: the noise level is fitted, botorch's prior; robust for
            step-like metrics such as accuracy on a few hundred examples) or ``"fixed"``
            (near-interpolation, :data:`NOISE_FLOOR`, for smooth deterministic metrics).
        warm_start: a previous :class:`GPModel` on the same metrics; its hyper-parameters start
            the fit (fewer optimiser steps when one point was added).

    Has the predictive-model interface of :class:`~map_merge.surrogate.SurrogateSet`
    (``num_coeffs``, ``predict``, ``torch_predict``); ``gp`` is the botorch ``ModelListGP`` (in
    metric units) that acquisition functions use.
    """

    def __init__(self, coeffs: np.ndarray, metrics: np.ndarray, bounds: tuple[float, float], noise: str = "infer",
                 warm_start: "GPModel | None" = None) -> None:
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import ModelListGP, SingleTaskGP
        from botorch.models.transforms import Normalize, Standardize
        from gpytorch.mlls import SumMarginalLogLikelihood

        if noise not in ("infer", "fixed"):
            raise ValueError(f"noise must be 'infer' or 'fixed', got {noise!r}")
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        metrics = np.atleast_2d(np.asarray(metrics, dtype=np.float64))
        if len(coeffs) != len(metrics) or len(coeffs) < 2:
            raise ValueError(f"a GP model needs at least 2 evaluations with one metric row each; got coeffs {coeffs.shape}, "
                             f"metrics {metrics.shape}")
        if not (np.isfinite(coeffs).all() and np.isfinite(metrics).all()):
            raise ValueError("a GP model needs finite coefficients and metrics")
        dtype = torch.float64
        self.num_coeffs = coeffs.shape[1]
        self.num_metrics = metrics.shape[1]
        self.noise = noise
        self.bounds = (float(bounds[0]), float(bounds[1]))
        box = torch.tensor([[self.bounds[0]] * self.num_coeffs, [self.bounds[1]] * self.num_coeffs], dtype=dtype)
        x = torch.tensor(coeffs, dtype=dtype)
        y = torch.tensor(metrics, dtype=dtype)
        gps = []
        for j in range(self.num_metrics):
            column = y[:, j : j + 1]
            extra = {}
            if noise == "fixed":
                extra["train_Yvar"] = torch.full_like(column, NOISE_FLOOR * float(column.var().clamp_min(1e-12)))
            gps.append(SingleTaskGP(x, column, input_transform=Normalize(self.num_coeffs, bounds=box),
                                    outcome_transform=Standardize(1), **extra))
        self.gp = ModelListGP(*gps)
        if warm_start is not None and warm_start.noise == noise and warm_start.num_metrics == self.num_metrics:
            _copy_hyperparameters(warm_start.gp, self.gp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fit_gpytorch_mll(SumMarginalLogLikelihood(self.gp.likelihood, self.gp))
            except Exception as error:  # noqa: BLE001 - a failed hyper-parameter fit keeps the starting values
                log.warning("GP hyper-parameter fit failed (%s); keeping the starting values", error)
        self.gp.eval()
        self._alpha: dict[int, torch.Tensor] = {}

    def mc_objective(self, senses: Sequence[str]) -> Any:
        """botorch's multi-output MC objective turning posterior samples (metric units) into metrics
        oriented higher-is-better."""
        from botorch.acquisition.multi_objective.objective import WeightedMCMultiOutputObjective

        return WeightedMCMultiOutputObjective(torch.tensor([1.0 if s == "max" else -1.0 for s in senses], dtype=torch.float64))

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Differentiable predictive means ``(..., M)`` at ``coeffs: (..., T)`` (metric units)."""
        shape = coeffs.shape
        flat = coeffs.reshape(-1, shape[-1])
        standard = posterior_mean(self.gp.models, flat, self._alpha)
        means = torch.stack([gp.outcome_transform.means.reshape(()) for gp in self.gp.models])
        stdvs = torch.stack([gp.outcome_transform.stdvs.reshape(()) for gp in self.gp.models])
        out = standard * stdvs + means
        return out.reshape(shape[:-1] + (out.shape[-1],))

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        """Predictive means ``(K, M)`` (and standard deviations of the mean function ``(K, M)``)."""
        return predict_in_chunks(self.torch_predict, lambda x: self.gp.posterior(x).variance.clamp_min(0).sqrt(), coeffs, return_std)


def predict_in_chunks(mean: Any, std: Any, coeffs: np.ndarray, return_std: bool, chunk: int = 2048):
    """``mean(x) (N, M)`` (and ``std(x) (N, M)``) of a predictive model at ``coeffs: (K, T)``, as
    numpy arrays, computed without gradients in chunks of ``chunk`` rows (bounded memory)."""
    x = torch.tensor(np.atleast_2d(np.asarray(coeffs, dtype=np.float64)), dtype=torch.float64)
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            part = x[start : start + chunk]
            means.append(mean(part).numpy())
            if return_std:
                stds.append(std(part).numpy())
    out = np.concatenate(means)
    return (out, np.concatenate(stds)) if return_std else out


def _copy_hyperparameters(source: Any, target: Any) -> None:
    """Start ``target``'s fit from ``source``'s hyper-parameters (same structure, other data)."""
    wanted = {k: v for k, v in source.state_dict().items() if "raw_" in k}
    own = target.state_dict()
    shared = {k: v for k, v in wanted.items() if k in own and own[k].shape == v.shape}
    target.load_state_dict(shared, strict=False)
