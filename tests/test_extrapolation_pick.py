"""The quadratic + GP model never hands over an extrapolation the evaluations do not support.

A recorded failure (``benchmarks/bench_fronts.py --problem analytic --tasks 4``, MAP seed 3): the
quadratic in logit space predicted 0.97 +- 0.01 for task 4 at a corner of the box no evaluation came
near (nearest one 0.6 away), the residual GP was sure of it, and the cautious pick handed that model
over: its real score was 0.20. The evaluations' coefficients are kept in ``tests/data``; the ground
truth is the benchmark's closed-form function, recomputed here.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import map_merge as mm
from map_merge.gp_model import GPModel
from map_merge.residual_gp import ResidualGPModel
from map_merge.result import Samples
from map_merge.surrogate import QuadraticSurrogate

OPTIMA = 0.15 + 0.7 * np.random.default_rng(7).uniform(size=(4, 4))


def bumps(coeffs: np.ndarray) -> np.ndarray:
    """``(K, 4)``: per task a sigmoid of a bump at its own optimum (bench_fronts.analytic(4))."""
    coeffs = np.atleast_2d(coeffs)
    dist = ((coeffs[:, None, :] - OPTIMA[None]) ** 2).sum(-1)
    return 1 / (1 + np.exp(-(2.5 - 8 * dist**1.5 + 0.4 * np.sin(5 * coeffs[:, :1] + 3 * coeffs[:, -1:]))))


@pytest.mark.filterwarnings("ignore")
def test_pick_for_each_task_is_never_an_unsupported_extrapolation():
    coeffs = np.array(json.loads((Path(__file__).parent / "data" / "analytic4_map_seed3_coeffs.json").read_text()))
    assert coeffs.shape == (60, 4)
    metrics = bumps(coeffs)
    result = mm.MAP(model="quadratic+gp").fit_samples(Samples(coeffs, metrics))
    for task in range(4):
        preference = np.eye(4)[task]
        real = bumps(result.select(preference))[0, task]
        # brute force over the evaluations: the best model the run already holds for this task
        assert real >= metrics[:, task].max() - 0.01, (task, real, metrics[:, task].max())


@pytest.mark.filterwarnings("ignore")
def test_residual_model_std_adds_the_disagreement_in_proportion_to_the_distance_from_the_evaluations():
    rng = np.random.default_rng(0)
    coeffs = rng.uniform(0, 0.5, (12, 2))
    metrics = np.stack([np.sin(3 * coeffs[:, 0]) + coeffs[:, 1] ** 2, coeffs[:, 0] * coeffs[:, 1]], 1)
    quadratics = [QuadraticSurrogate(link="identity", r2_warn=-np.inf).fit(coeffs, metrics[:, j]) for j in range(2)]
    reference = GPModel(coeffs, metrics, (0.0, 1.0))
    plain = ResidualGPModel(quadratics, coeffs, metrics, (0.0, 1.0))
    guarded = ResidualGPModel(quadratics, coeffs, metrics, (0.0, 1.0), reference=reference)
    points = np.concatenate([coeffs[:2], [[0.25, 0.25], [1.0, 1.0], [0.0, 1.0]]])
    mean, std = guarded.predict(points, return_std=True)
    plain_mean, plain_std = plain.predict(points, return_std=True)
    np.testing.assert_allclose(mean, plain_mean, rtol=1e-6, atol=1e-9)  # the mean is the quadratic + GP's alone
    # botorch's default RBF kernel has prior variance 1 on the standardised residuals
    reach = np.clip(plain_std / plain.scale.numpy(), 0, 1)
    gap = plain_mean - reference.predict(points)
    np.testing.assert_allclose(std, np.sqrt(plain_std**2 + (reach * gap) ** 2), rtol=1e-6, atol=1e-9)
    assert (reach[:2].max(axis=0) < reach[3]).all()  # the disagreement counts more far out (1, 1) than at an evaluation
    assert np.array_equal(guarded.predict(points), mean)
