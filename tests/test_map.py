import numpy as np
import pytest
from conftest import grid, quadratic_pair, quadratic_three

import map_merge as mm


def objective(fn, num, names):
    return mm.FunctionObjective(fn, num, names)


@pytest.mark.parametrize("fn, num, per_axis", [(quadratic_pair, 2, 401), (quadratic_three, 3, 61)])
def test_default_search_matches_dense_grid_and_beats_nsga3(fn, num, per_axis):
    obj = objective(fn, num, [f"t{i}" for i in range(num)])
    result = mm.MAP(link="identity").fit(obj, num)
    assert result.num_evaluations == (num + 1) * (num + 2)
    # the surrogates are exact here, so the grid over the objective is the grid over the surrogates
    ref = np.full(num, 0.0)
    dense = mm.hypervolume(fn(grid(num, per_axis)), ref)
    hv = mm.hypervolume(result.front.metrics, ref)
    assert hv >= dense * (1 - 0.005)
    nsga = mm.MAP(link="identity", search="nsga3").fit(obj, num)
    assert hv >= mm.hypervolume(nsga.front.metrics, ref)
    np.testing.assert_allclose(result.front.metrics, fn(result.front.coeffs), atol=1e-9)
    assert (result.front.coeffs >= 0).all() and (result.front.coeffs <= 1).all()


def test_front_is_nondominated_and_selection_is_optimal_on_grid():
    obj = objective(quadratic_pair, 2, ["a", "b"])
    result = mm.MAP(link="identity").fit(obj, 2)
    assert mm.pareto_mask(result.front.metrics).all()
    dense = grid(2, 301)
    values = quadratic_pair(dense)
    for w in ([1, 0], [0, 1], [1, 1], [1, 3]):
        w = np.asarray(w, float) / np.sum(w)
        best = (values @ w).max()
        chosen = quadratic_pair(result.select(w))[0] @ w
        assert chosen >= best - 1e-4


def test_map_on_sigmoid_accuracy_with_reevaluation():
    def accuracy(c):
        return 1 / (1 + np.exp(-4 * quadratic_three(c) + 1.5))

    obj = objective(accuracy, 3, ["a", "b", "c"])
    result = mm.MAP().fit(obj, 3)
    assert all(d["r2"] > 0.999 for d in result.diagnostics().values())
    real = result.reevaluate(obj, max_points=15)
    assert real.label == "MAP real" and len(real) == 15
    np.testing.assert_allclose(real.metrics, result.front.subset(
        [np.flatnonzero((result.front.coeffs == c).all(1))[0] for c in real.coeffs]).metrics, atol=2e-3)
    assert result.front.std is not None and result.front.std.shape == result.front.metrics.shape
    d = result.to_dict()
    assert d["num_evaluations"] == 20 and len(d["real_front"]["coeffs"]) == 15


def test_min_sense_losses_with_softplus():
    def losses(c):
        q = -2.0 + 4.0 * ((c[:, None, :] - np.array([[0.8, 0.2], [0.2, 0.9]])[None]) ** 2).sum(-1)
        return np.log1p(np.exp(q))  # softplus of a quadratic: the surrogate family is exact

    obj = mm.FunctionObjective(losses, 2, ["l1", "l2"], senses=["min", "min"])
    result = mm.MAP(link="softplus").fit(obj, 2)
    ends = result.front.metrics
    best = np.log1p(np.exp(-2.0))
    assert ends[:, 0].min() == pytest.approx(best, abs=1e-4) and ends[:, 1].min() == pytest.approx(best, abs=1e-4)
    np.testing.assert_allclose(result.select([1, 0]), [0.8, 0.2], atol=0.02)


def test_map_errors():
    obj = objective(quadratic_pair, 2, ["a", "b"])
    with pytest.raises(ValueError, match="too few for a quadratic surrogate in 2 coefficients: it has 6 parameters"):
        mm.MAP(num_samples=5).fit(obj, 2)
    with pytest.raises(ValueError, match="num_tasks=3 but the objective takes 2"):
        mm.MAP().fit(obj, 3)
    with pytest.warns(UserWarning, match="extrapolated"):
        mm.MAP(link="identity", search_bounds=(-1.0, 2.0)).fit(obj, 2)
    with pytest.raises(ValueError, match="NaN/inf"):
        mm.MAP().fit(lambda c: np.full((len(c), 2), np.nan), 2)
    with pytest.raises(ValueError, match="expected \\(K, M\\)"):
        mm.MAP().fit(lambda c: np.zeros(len(c)), 2)
