import numpy as np
import pytest
from conftest import grid, quadratic_pair

import map_merge as mm
from map_merge.surrogate import quadratic_features


@pytest.mark.parametrize("design", ["map", "sobol", "lhs"])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_designs_in_box_with_one_hots_and_seeded(design, num_tasks):
    k = mm.default_num_samples(num_tasks)
    pts = mm.make_design(design, num_tasks, k, bounds=(-0.5, 1.5), seed=1)
    assert pts.shape == (k, num_tasks)
    assert pts.min() >= -0.5 and pts.max() <= 1.5
    corners = -0.5 + 2.0 * np.eye(num_tasks)
    for corner in corners:
        assert np.isclose(pts, corner).all(axis=1).any()
    assert len(np.unique(pts.round(9), axis=0)) == k  # no duplicates
    np.testing.assert_array_equal(pts, mm.make_design(design, num_tasks, k, bounds=(-0.5, 1.5), seed=1))
    # a full-rank quadratic design
    assert np.linalg.matrix_rank(quadratic_features(pts)) == mm.num_quadratic_params(num_tasks)


def test_map_design_has_isotropic_points():
    pts = mm.map_design(3, 20, seed=0)
    iso = np.isclose(pts, pts[:, :1]).all(axis=1) & (pts[:, 0] > 0)
    assert iso.sum() >= 1


def test_exact_quadratic_recovered_to_precision():
    rng = np.random.default_rng(0)
    coeffs = mm.sobol_design(3, 20, seed=0)
    truth = rng.normal(size=mm.num_quadratic_params(3))
    values = quadratic_features(coeffs) @ truth
    s = mm.QuadraticSurrogate(link="identity").fit(coeffs, values)
    np.testing.assert_allclose(s.weights, truth, atol=1e-9)
    test = rng.uniform(size=(50, 3))
    np.testing.assert_allclose(s.predict(test), quadratic_features(test) @ truth, atol=1e-9)
    assert s.diagnostics.r2 == pytest.approx(1.0) and s.diagnostics.loo_rmse < 1e-9


def test_sigmoid_of_quadratic_recovered():
    coeffs = mm.map_design(2, 12, seed=0)
    truth = np.array([-0.5, 2.0, 1.0, -3.0, 1.5, -1.0])
    values = 1 / (1 + np.exp(-quadratic_features(coeffs) @ truth))
    s = mm.QuadraticSurrogate(link="sigmoid").fit(coeffs, values)
    test = grid(2, 11)
    np.testing.assert_allclose(s.predict(test), 1 / (1 + np.exp(-quadratic_features(test) @ truth)), atol=1e-6)


def test_loo_matches_brute_force_refits():
    rng = np.random.default_rng(1)
    coeffs = mm.sobol_design(2, 14, seed=2)
    values = quadratic_pair(coeffs)[:, 0] + 0.01 * rng.normal(size=14)
    s = mm.QuadraticSurrogate(link="identity").fit(coeffs, values)
    errors = []
    for i in range(14):
        keep = np.arange(14) != i
        fit = mm.QuadraticSurrogate(link="identity", r2_warn=-np.inf).fit(coeffs[keep], values[keep])
        errors.append(fit.predict(coeffs[i : i + 1])[0] - values[i])
    assert s.diagnostics.loo_rmse == pytest.approx(np.sqrt(np.mean(np.square(errors))), rel=1e-8)


def test_noise_is_handled_and_uncertainty_is_calibrated():
    rng = np.random.default_rng(3)
    coeffs = mm.sobol_design(2, 60, seed=4)
    clean = quadratic_pair(coeffs)[:, 1]
    s = mm.QuadraticSurrogate(link="identity").fit(coeffs, clean + 0.005 * rng.normal(size=60))
    test = grid(2, 9)
    mean, std = s.predict(test, return_std=True)
    err = np.abs(mean - quadratic_pair(test)[:, 1])
    assert err.max() < 0.01
    assert s.diagnostics.residual_std == pytest.approx(0.005, rel=0.35)
    assert (std > 0).all() and (err < 4 * std + 1e-3).mean() > 0.9
    draws = s.sample(test, 2000, seed=0)
    np.testing.assert_allclose(draws.std(axis=0), std, rtol=0.15, atol=2e-4)
    # more data, less uncertainty
    small = mm.QuadraticSurrogate(link="identity").fit(coeffs[:12], clean[:12] + 0.005 * rng.normal(size=12))
    assert small.predict(test, return_std=True)[1].mean() > std.mean()


def test_bad_fit_warns_and_bad_input_errors():
    coeffs = mm.sobol_design(2, 30, seed=0)
    values = 0.5 + 0.4 * np.sin(12 * coeffs[:, 0]) * np.cos(9 * coeffs[:, 1])
    with pytest.warns(mm.SurrogateFitWarning, match="R\\^2"):
        mm.QuadraticSurrogate(link="sigmoid", name="wiggly").fit(coeffs, values)
    with pytest.raises(ValueError, match="6 parameters but only 5 distinct"):
        mm.QuadraticSurrogate().fit(coeffs[:5], values[:5])
    line = np.stack([np.linspace(0, 1, 10)] * 2, axis=1)
    with pytest.raises(ValueError, match="rank-deficient"):
        mm.QuadraticSurrogate().fit(line, np.linspace(0.2, 0.8, 10))
    with pytest.raises(ValueError, match="sigmoid link needs metrics in \\[0, 1\\]"):
        mm.QuadraticSurrogate(link="sigmoid").fit(coeffs, values * 3)
    with pytest.raises(ValueError, match="finite"):
        mm.QuadraticSurrogate().fit(coeffs, np.where(np.arange(30) == 3, np.nan, values))
    with pytest.raises(RuntimeError, match="not fitted"):
        mm.QuadraticSurrogate().predict(coeffs)


def test_softplus_for_losses():
    coeffs = mm.sobol_design(2, 12, seed=0)
    softplus = lambda c: np.log1p(np.exp(-2.0 + 4.0 * ((c - 0.4) ** 2).sum(1)))
    s = mm.QuadraticSurrogate(link="softplus").fit(coeffs, softplus(coeffs))
    np.testing.assert_allclose(s.predict(grid(2, 9)), softplus(grid(2, 9)), atol=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 3, 4, 6])
def test_map_design_identifies_a_quadratic_even_at_the_minimum_budget(num_tasks):
    # with exactly P points the design must still determine every coefficient of a quadratic
    # (a 2-level grid would not: c^2 = c on {0, 1})
    from map_merge.surrogate import quadratic_features

    params = mm.num_quadratic_params(num_tasks)
    for seed in range(5):
        design = mm.map_design(num_tasks, params, seed=seed)
        assert np.linalg.matrix_rank(quadratic_features(design)) == params
        weights = np.random.default_rng(seed).normal(size=params)
        values = quadratic_features(design) @ weights
        fitted = mm.QuadraticSurrogate(link="identity").fit(design, values)
        probe = np.random.default_rng(99).uniform(size=(20, num_tasks))
        assert np.allclose(fitted.predict(probe), quadratic_features(probe) @ weights, atol=1e-6)
