"""Which predictive model to search the front on: the one that predicts held-out real evaluations best.

MAP's adaptive sampling proposes points under constant-mean Gaussian processes (they draw the larger
fronts), but the front a user picks from is searched on the model that predicts best: the same GPs,
or the quadratic surrogates plus GPs on their residuals, whose global quadratic shape often carries a
merge's front from a handful of points (the vision zoo at 12 evaluations: the predicted front,
re-evaluated, reaches the grid's hypervolume with the quadratic and 40% without it) while on other
metrics the GPs alone predict better. :func:`cross_validated_errors` scores candidate models by
K-fold cross-validation on the real evaluations; the lowest error wins.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["cross_validated_errors", "FOLDS"]

FOLDS = 5


def cross_validated_errors(coeffs: np.ndarray, metrics: np.ndarray, builders: Mapping[str, Callable[[np.ndarray, np.ndarray], Any]],
                           folds: int = FOLDS, seed: int = 0) -> dict[str, float]:
    """Held-out error of each model: ``builders[name](coeffs (N, T), metrics (N, M)) -> model``
    with ``predict(coeffs) -> (K, M)``. The N evaluations are cut into ``folds`` shuffled folds; each
    model is fitted on all folds but one and predicts that one. The error is the mean squared
    held-out error of each metric divided by that metric's variance, averaged over metrics (0 is
    perfect, about 1 is no better than the mean). A model whose fit fails, or that predicts NaN/inf,
    scores ``inf``."""
    coeffs = np.asarray(coeffs, dtype=np.float64)
    metrics = np.asarray(metrics, dtype=np.float64)
    num = len(coeffs)
    if num < 2 * folds:
        raise ValueError(f"cross-validation over {folds} folds needs at least {2 * folds} evaluations, got {num}")
    order = np.random.default_rng(seed).permutation(num)
    parts = np.array_split(order, folds)
    scale = np.maximum(metrics.var(axis=0), 1e-12)
    errors = {}
    for name, build in builders.items():
        squared = np.zeros(metrics.shape[1])
        try:
            for held in parts:
                train = np.setdiff1d(order, held)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = build(coeffs[train], metrics[train])
                squared += ((model.predict(coeffs[held]) - metrics[held]) ** 2).sum(axis=0)
        except (ValueError, RuntimeError, np.linalg.LinAlgError):
            errors[name] = float("inf")
            continue
        error = float(np.mean(squared / num / scale))
        errors[name] = error if np.isfinite(error) else float("inf")  # a NaN/inf prediction loses (NaN would win min())
    return errors
