"""Noisy metrics follow their quadratic trend (map_merge.noisy_trend): the blend's arithmetic against its
parts, MAP's wiring, and the pick found on the blended model against a brute-force search."""

import numpy as np
import pytest
import torch

import map_merge as mm
from map_merge.gp_model import GPModel
from map_merge.noisy_trend import NoisyTrendModel
from map_merge.surrogate import SurrogateSet, safe_quadratics


def rough(coeffs: np.ndarray) -> np.ndarray:
    """Two accuracy-like metrics: a smooth trade-off plus a validation set's 'luck', a ripple the GP can fit."""
    c = np.atleast_2d(coeffs)
    ripple = 0.05 * np.sin(6.0 * c[:, 0] + 1.0) * np.cos(5.0 * c[:, 1])
    a = 0.55 + 0.35 * c[:, 0] - 0.15 * c[:, 0] ** 2 - 0.2 * c[:, 1] ** 2 + ripple
    b = 0.5 + 0.3 * c[:, 1] - 0.1 * c[:, 1] ** 2 - 0.25 * c[:, 0] ** 2 - ripple
    return np.stack([a, b], axis=1)


def test_blend_moves_noisy_metrics_toward_the_quadratic_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    coeffs = rng.uniform(size=(14, 2))
    metrics = rough(coeffs)
    model = GPModel(coeffs, metrics, (0.0, 1.0))
    quadratics = safe_quadratics(coeffs, metrics, ["identity", "identity"], ["a", "b"], 0.0)
    blend = NoisyTrendModel(model, quadratics, [True, False], trend=0.25)
    points = rng.uniform(size=(9, 2))
    gp_mean, gp_std = model.predict(points, return_std=True)
    quadratic = SurrogateSet(quadratics).predict(points)
    mean, std = blend.predict(points, return_std=True)
    np.testing.assert_allclose(mean[:, 0], 0.75 * gp_mean[:, 0] + 0.25 * quadratic[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean[:, 1], gp_mean[:, 1], rtol=1e-9, atol=1e-12)  # not noisy: the model's
    np.testing.assert_allclose(std, gp_std)
    np.testing.assert_allclose(blend.torch_predict(torch.tensor(points)).detach().numpy(), mean, rtol=1e-9, atol=1e-12)
    assert not np.allclose(quadratic[:, 0], gp_mean[:, 0], atol=1e-3)  # the blend is not vacuous here
    with pytest.raises(ValueError, match="noisy flags"):
        NoisyTrendModel(model, quadratics, [True], trend=0.5)
    with pytest.raises(ValueError, match="noisy_trend"):
        NoisyTrendModel(model, quadratics, [True, True], trend=1.5)


def test_map_blends_only_flagged_metrics_and_records_the_weight():
    def fit(noisy, **kw):
        objective = mm.FunctionObjective(rough, 2, ["a", "b"], links=["identity"] * 2, noisy=noisy)
        return mm.MAP(budget=14, seed=0, **kw).fit(objective, 2)

    noisy = fit([True, True])
    assert isinstance(noisy.model, NoisyTrendModel) and noisy.settings["noisy_trend"] == 0.5
    exact = fit(None)
    assert not isinstance(exact.model, NoisyTrendModel) and exact.settings["noisy_trend"] == 0.0
    off = fit([True, True], noisy_trend=0.0)
    assert not isinstance(off.model, NoisyTrendModel) and off.settings["noisy_trend"] == 0.0
    # the same evaluations either way (proposals are made under their own GPs); only the model differs
    np.testing.assert_allclose(noisy.samples.coeffs[:12], off.samples.coeffs[:12])
    with pytest.raises(ValueError, match="noisy_trend"):
        mm.MAP(noisy_trend=-0.1)


def test_the_pick_on_the_trend_alone_is_the_quadratics_best_point():
    """noisy_trend=1: noisy metrics are predicted by the quadratic surrogates alone, so the pick for a
    preference (no caution) scores within a hair of the quadratics' best over a dense grid (brute force)."""
    objective = mm.FunctionObjective(rough, 2, ["a", "b"], links=["identity"] * 2, noisy=[True, True])
    result = mm.MAP(budget=14, seed=1, final=0, noisy_trend=1.0).fit(objective, 2)
    quadratic = SurrogateSet(result.surrogates)
    axis = np.linspace(0.0, 1.0, 201)
    dense = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1).reshape(-1, 2)
    for w in (np.array([0.5, 0.5]), np.array([0.8, 0.2]), np.array([0.1, 0.9])):
        best = float((quadratic.predict(dense) @ w).max())
        picked = float((quadratic.predict(result.select(w, caution=0.0)[None, :]) @ w)[0])
        assert best - 2e-3 <= picked <= best + 1e-5, (w, best, picked)  # the grid is finite: a hair above it is fine
    # the check can fail: on the model alone (noisy_trend=0) the rippled GP picks elsewhere than the quadratic
    alone = mm.MAP(budget=14, seed=1, final=0, noisy_trend=0.0).fit(objective, 2)
    gaps = [float((quadratic.predict(dense) @ w).max() - (quadratic.predict(alone.select(w, caution=0.0)[None, :]) @ w)[0])
            for w in (np.array([0.5, 0.5]), np.array([0.8, 0.2]), np.array([0.1, 0.9]))]
    assert max(gaps) > 1e-2, gaps
