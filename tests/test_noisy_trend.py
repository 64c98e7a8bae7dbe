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


def fitted(coeffs: np.ndarray) -> tuple[GPModel, list]:
    """A GP and identity-link quadratics of ``rough`` at ``coeffs: (N, 2)``: the two models a blend mixes."""
    metrics = rough(coeffs)
    return GPModel(coeffs, metrics, (0.0, 1.0)), safe_quadratics(coeffs, metrics, ["identity", "identity"], ["a", "b"], 0.0)


def test_blend_moves_noisy_metrics_toward_the_quadratic_and_keeps_the_rest():
    rng = np.random.default_rng(0)
    model, quadratics = fitted(rng.uniform(size=(14, 2)))
    blend = NoisyTrendModel(model, quadratics, [True, False], trend=0.25)
    points = rng.uniform(size=(9, 2))
    gp_mean, gp_std = model.predict(points, return_std=True)
    quadratic = SurrogateSet(quadratics).predict(points)
    mean, std = blend.predict(points, return_std=True)
    np.testing.assert_allclose(mean[:, 0], 0.75 * gp_mean[:, 0] + 0.25 * quadratic[:, 0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mean[:, 1], gp_mean[:, 1], rtol=1e-9, atol=1e-12)  # not noisy: the model's
    spread = np.sqrt(gp_std[:, 0] ** 2 + 0.25 * 0.75 * (quadratic[:, 0] - gp_mean[:, 0]) ** 2)  # the mixture's variance
    np.testing.assert_allclose(std[:, 0], spread, rtol=1e-9)
    np.testing.assert_allclose(std[:, 1], gp_std[:, 1])  # not noisy: the model's
    np.testing.assert_allclose(blend.torch_predict(torch.tensor(points)).detach().numpy(), mean, rtol=1e-9, atol=1e-12)
    assert not np.allclose(quadratic[:, 0], gp_mean[:, 0], atol=1e-3)  # the blend is not vacuous here
    with pytest.raises(ValueError, match="noisy flags"):
        NoisyTrendModel(model, quadratics, [True], trend=0.5)
    for bad in (1.5, -0.1, True, "0.5", None, float("nan")):
        with pytest.raises(ValueError, match="noisy_trend"):
            NoisyTrendModel(model, quadratics, [True, True], trend=bad)


def test_at_equal_weights_a_cautious_score_never_trusts_the_more_optimistic_model():
    """trend 0.5: mean - std <= min(model, quadratic) in each noisy metric, even where a quadratic fitted to a
    corner of the box extrapolates wildly elsewhere."""
    rng = np.random.default_rng(3)
    model, quadratics = fitted(rng.uniform(0.0, 0.3, size=(12, 2)))  # the evaluations in one corner: the quadratic extrapolates
    blend = NoisyTrendModel(model, quadratics, [True, True], trend=0.5)
    points = rng.uniform(size=(200, 2))
    mean, std = blend.predict(points, return_std=True)
    lower = np.minimum(model.predict(points), SurrogateSet(quadratics).predict(points))
    assert np.all(mean - std <= lower + 1e-9)
    assert np.abs(SurrogateSet(quadratics).predict(points) - model.predict(points)).max() > 0.1  # they do disagree here


def test_a_noisy_quadratic_gp_model_is_blended_and_still_warm_starts_a_refit():
    from map_merge.residual_gp import ResidualGPModel
    from map_merge.result import Samples

    rng = np.random.default_rng(5)
    coeffs = rng.uniform(size=(16, 2))
    samples = Samples(coeffs, rough(coeffs))
    first = mm.MAP(model="quadratic+gp", max_front_points=5).fit_samples(samples, noisy=[True, False])
    assert isinstance(first.model, NoisyTrendModel) and isinstance(first.model.model, ResidualGPModel)
    refit = mm.MAP(model="gp", max_front_points=5).fit_samples(samples, warm_start=first.model)
    direct = GPModel(coeffs, samples.metrics, (0.0, 1.0), warm_start=first.model.model.reference)  # unwrapped twice
    np.testing.assert_allclose(refit.model.predict(coeffs), direct.predict(coeffs), rtol=1e-6, atol=1e-9)


def test_map_blends_only_flagged_metrics_and_records_the_weight():
    def fit(noisy, budget=14, **kw):
        objective = mm.FunctionObjective(rough, 2, ["a", "b"], links=["identity"] * 2, noisy=noisy)
        return mm.MAP(budget=budget, seed=0, **kw).fit(objective, 2)

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
    few = fit([True, True], budget=11)  # under 2 P = 12 evaluations: a quadratic would all but interpolate the noise
    assert not isinstance(few.model, NoisyTrendModel) and few.settings["noisy_trend"] == 0.0


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


def test_save_preference_repicks_what_the_blended_run_handed_over(tmp_path):
    """``map-merge save --preference`` re-picks from result.json alone (the run's model is not kept): the
    predictions stored at the real evaluations must be the blend's, so it hands over what ``select`` did."""
    import argparse
    import json

    from map_merge.cli.save import _coeffs_for

    objective = mm.FunctionObjective(rough, 2, ["a", "b"], links=["identity"] * 2, noisy=[True, True])
    result = mm.MAP(budget=16, seed=2, max_front_points=30).fit(objective, 2)
    assert isinstance(result.model, NoisyTrendModel)
    stored = result.to_dict()
    (tmp_path / "result.json").write_text(json.dumps({**stored, "summary": {"command": "map"}}))
    blended = result.model.predict(result.samples.coeffs)
    np.testing.assert_allclose(stored["samples"]["predicted"], blended, rtol=1e-9, atol=1e-12)
    unblended = result.model.model.predict(result.samples.coeffs)
    assert np.abs(blended - unblended).max() > 1e-3  # the blend moves the stored predictions: the check can fail
    kinds = {result.choice(w)[0].label for w in ([1.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.0, 1.0], [1.0, 0.0])}
    assert kinds == {"MAP predicted", "all real evaluations"}  # both ways a pick is handed over are re-picked below
    for w in ([1.0, 1.0], [0.9, 0.1], [0.2, 0.8], [0.0, 1.0], [1.0, 0.0]):
        picked = {}
        coeffs = _coeffs_for(argparse.Namespace(coeffs=None, preference=",".join(map(str, w))), tmp_path, picked)
        np.testing.assert_allclose(coeffs, result.select(w), rtol=0, atol=1e-12, err_msg=str(w))
        assert picked["preference"] == w and picked["mean"] is not None
