"""Noisy metrics predicted toward their quadratic trend.

An accuracy measured on a few hundred validation examples is a noisy estimate, and its noise is not
independent between merges: nearby coefficient vectors answer nearly the same questions, so the
validation set's own luck is a smooth surface a flexible model fits as if it were signal. A
Gaussian process (or a GP on a quadratic's residuals) then places the best weighted score where the
validation set happened to be kind, a few hundredths of a coefficient from where the test set is.
The global quadratic, with its ``(T+1)(T+2)/2`` parameters, cannot follow that surface and keeps the
trend. :class:`NoisyTrendModel` predicts each noisy metric as a blend of the two (``trend`` the
quadratic's weight; 0.5 by default, :data:`NOISY_TREND`) and every other metric by the model alone;
MAP searches its front and makes its picks on it (docs/fronts.md, "Noisy metrics follow their
trend (round 5)").

The blend is a two-model mixture, so its variance adds the models' disagreement: ``std**2 +
trend * (1 - trend) * (quadratic - model)**2``. At the default weight a metric's mean less one std
is then never above the lower of the two models' predictions, so a cautious pick does not trust a
quadratic that extrapolates where the evaluations do not reach; MAP blends only with at least
:data:`MIN_SAMPLES_PER_PARAMETER` evaluations per quadratic parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .gp_model import predict_in_chunks
from .surrogate import QuadraticSurrogate, torch_predict_all

__all__ = ["NoisyTrendModel", "NOISY_TREND", "MIN_SAMPLES_PER_PARAMETER", "check_trend"]

NOISY_TREND = 0.5
"""The quadratic trend's weight in a noisy metric's prediction (``MAP(noisy_trend=...)``)."""

MIN_SAMPLES_PER_PARAMETER = 2
"""MAP blends only from ``2 P`` evaluations on (P = (T+1)(T+2)/2, the quadratic's parameters): with
fewer, an unregularised quadratic all but interpolates the noise it is meant to smooth out."""


def check_trend(trend: float) -> float:
    """``trend`` as a float in ``[0, 1]``, else ``ValueError`` (a bool or a string is refused)."""
    if isinstance(trend, (bool, np.bool_)) or not isinstance(trend, (int, float, np.integer, np.floating)):
        raise ValueError(f"noisy_trend must be a number in [0, 1], got {trend!r}")
    value = float(trend)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"noisy_trend must be a weight in [0, 1] (0: the model alone, 1: the quadratic alone), got {trend}")
    return value


class NoisyTrendModel:
    """``model``'s predictions, with each noisy metric's mean moved toward its quadratic surrogate.

    Args:
        model: a predictive model (``num_coeffs``, ``predict(coeffs, return_std)``,
            ``torch_predict``): a :class:`~map_merge.gp_model.GPModel` or
            :class:`~map_merge.residual_gp.ResidualGPModel`.
        surrogates: one fitted :class:`~map_merge.surrogate.QuadraticSurrogate` per metric (M).
        noisy: ``(M,)`` flags; only flagged metrics are blended.
        trend: the quadratic's weight in ``[0, 1]``.

    Mean ``(1 - trend) * model + trend * quadratic`` in noisy metrics, the model's elsewhere; std
    ``sqrt(model std**2 + trend * (1 - trend) * (quadratic - model)**2)`` in noisy metrics (the
    mixture's spread), the model's elsewhere. ``model`` keeps the wrapped model (a GP warm start
    unwraps it).
    """

    def __init__(self, model: Any, surrogates: Sequence[QuadraticSurrogate], noisy: Sequence[bool], trend: float = NOISY_TREND) -> None:
        flags = np.asarray(noisy, dtype=bool)
        if len(surrogates) != len(flags):
            raise ValueError(f"got {len(surrogates)} quadratic surrogates for {len(flags)} noisy flags")
        self.model = model
        self.num_coeffs = model.num_coeffs
        self.trend = check_trend(trend)
        self.noisy = tuple(bool(f) for f in flags)
        self._quadratic = torch_predict_all(list(surrogates))
        self._weights = torch.tensor(np.where(flags, self.trend, 0.0), dtype=torch.float64)

    def torch_predict(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Differentiable predictive means ``(..., M)`` at ``coeffs: (..., T)`` (metric units)."""
        weights = self._weights.to(coeffs.device, coeffs.dtype)
        return (1 - weights) * self.model.torch_predict(coeffs) + weights * self._quadratic(coeffs)

    def predict(self, coeffs: np.ndarray, return_std: bool = False):
        """Predictive means ``(K, M)`` (and the mixture's standard deviations ``(K, M)``)."""
        if not return_std:
            return predict_in_chunks(self.torch_predict, None, coeffs, False)
        mean, std = self.model.predict(coeffs, return_std=True)
        quadratic = predict_in_chunks(self._quadratic, None, coeffs, False)
        weights = self._weights.numpy()
        blended = (1 - weights) * mean + weights * quadratic
        return blended, np.sqrt(np.asarray(std) ** 2 + weights * (1 - weights) * (quadratic - mean) ** 2)
