import numpy as np
import pytest
from conftest import grid, quadratic_pair, quadratic_three

import map_merge as mm


def objective(fn, num, names):
    return mm.FunctionObjective(fn, num, names)


@pytest.mark.parametrize("fn, num, per_axis", [(quadratic_pair, 2, 401), (quadratic_three, 3, 61)])
def test_default_search_matches_dense_grid_and_beats_nsga3(fn, num, per_axis):
    obj = objective(fn, num, [f"t{i}" for i in range(num)])
    result = mm.MAP(sampling="design", link="identity").fit(obj, num)
    assert result.num_evaluations == (num + 1) * (num + 2)
    # the surrogates are exact here, so the grid over the objective is the grid over the surrogates
    ref = np.full(num, 0.0)
    dense = mm.hypervolume(fn(grid(num, per_axis)), ref)
    hv = mm.hypervolume(result.front.metrics, ref)
    assert hv >= dense * (1 - 0.005)
    nsga = mm.MAP(sampling="design", link="identity", search="nsga3").fit(obj, num)
    assert hv >= mm.hypervolume(nsga.front.metrics, ref)
    np.testing.assert_allclose(result.front.metrics, fn(result.front.coeffs), atol=1e-9)
    assert (result.front.coeffs >= 0).all() and (result.front.coeffs <= 1).all()


def test_front_is_nondominated_and_selection_is_optimal_on_grid():
    obj = objective(quadratic_pair, 2, ["a", "b"])
    result = mm.MAP(sampling="design", link="identity").fit(obj, 2)
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
    result = mm.MAP(sampling="design").fit(obj, 3)
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
    result = mm.MAP(sampling="design", link="softplus").fit(obj, 2)
    ends = result.front.metrics
    best = np.log1p(np.exp(-2.0))
    assert ends[:, 0].min() == pytest.approx(best, abs=1e-4) and ends[:, 1].min() == pytest.approx(best, abs=1e-4)
    np.testing.assert_allclose(result.select([1, 0]), [0.8, 0.2], atol=0.02)


def test_map_errors():
    obj = objective(quadratic_pair, 2, ["a", "b"])
    with pytest.raises(ValueError, match="too few for a quadratic surrogate in 2 coefficients: it has 6 parameters"):
        mm.MAP(sampling="design", num_samples=5).fit(obj, 2)
    with pytest.raises(ValueError, match="num_tasks=3 but the objective takes 2"):
        mm.MAP(sampling="design").fit(obj, 3)
    with pytest.warns(UserWarning, match="extrapolated"):
        mm.MAP(sampling="design", link="identity", search_bounds=(-1.0, 2.0)).fit(obj, 2)
    with pytest.raises(ValueError, match="NaN/inf"):
        mm.MAP(sampling="design").fit(lambda c: np.full((len(c), 2), np.nan), 2)
    with pytest.raises(ValueError, match="expected \\(K, M\\)"):
        mm.MAP(sampling="design").fit(lambda c: np.zeros(len(c)), 2)


def _unit_quadratics(c):
    """f_i(c) = 1 - |c - e_i|^2 (T = 2): for preference (a, 1 - a) the best weighted score is
    1 - 2 a (1 - a), reached at c = (a, 1 - a)."""
    c = np.atleast_2d(c)
    return np.stack([1 - ((c - e) ** 2).sum(1) for e in np.eye(2)], axis=1)


def test_preference_regret_of_picks_against_the_analytic_optimum():
    objective = mm.FunctionObjective(_unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    result = mm.MAP(sampling="design", link="identity", seed=0).fit(objective, 2)
    prefs = np.column_stack([np.linspace(0, 1, 21), 1 - np.linspace(0, 1, 21)])
    a = prefs[:, 0]
    optimum = 1 - 2 * a * (1 - a)  # hand-derived best weighted score per preference
    # the reference: the exact optimal models (their metrics), one per preference
    reference = _unit_quadratics(prefs)
    np.testing.assert_allclose((reference * prefs).sum(1), optimum, atol=1e-12)
    report = result.preference_regret(objective, reference=reference, preferences=prefs)
    assert report["regret"].shape == (21,) and report["coeffs"].shape == (21, 2)
    np.testing.assert_allclose(report["metrics"], _unit_quadratics(report["coeffs"]))  # evaluated for real
    assert report["regret"].min() > -1e-9  # nothing beats the optimum
    assert report["mean"] < 2e-3 and report["max"] < 1e-2  # exact quadratic surrogates: picks at the optimum
    # a run whose front and only real evaluation are one point (c = (1, 0)): regret is the optimum minus that
    # model's weighted score, by hand
    result.front = result.front.subset([int(np.argmax(result.front.metrics[:, 0]))])
    result.front.coeffs[:] = [1.0, 0.0]
    result.samples = type(result.samples)(np.array([[1.0, 0.0]]), _unit_quadratics(np.array([[1.0, 0.0]])), np.zeros(1, dtype=int))
    report = result.preference_regret(objective, reference=reference, preferences=prefs)
    np.testing.assert_allclose(report["regret"], optimum - (a * 1.0 + (1 - a) * (1 - 2.0)), atol=1e-12)
    assert report["max"] == pytest.approx(2.0)  # preference (0, 1): optimum 1, the pick scores -1
    with pytest.raises(ValueError, match="preferences must be"):
        result.preference_regret(objective, preferences=[[1.0, -1.0]])


def test_refine_spends_exactly_its_reevaluations_and_refits_on_them():
    objective = mm.FunctionObjective(_unit_quadratics, 2, ["a", "b"], links=["identity"] * 2)
    result = mm.MAP(sampling="design", link="identity", seed=0).fit(objective, 2)
    spent = objective.num_evaluations
    refined = result.refine(objective, reevaluations=9, rounds=3)
    assert objective.num_evaluations + objective.num_cached - spent == 9
    assert len(refined.samples) == 12 + 3 + 3 and refined.samples.round.max() == 2  # rounds 1, 2 joined the fit
    assert len(refined.real_front) == 3
    assert refined.surrogates[0].diagnostics.num_samples == 18
    np.testing.assert_allclose(refined.samples.metrics, _unit_quadratics(refined.samples.coeffs))
    with pytest.raises(ValueError, match="at least one re-evaluation per round"):
        result.refine(objective, reevaluations=1, rounds=2)


def test_loo_link_picks_the_link_that_generalises():
    def exact_quadratic(c):  # in [0, 1] but exactly quadratic: identity is exact, a sigmoid is not
        c = np.atleast_2d(c)
        return np.stack([0.5 + 0.4 * c[:, 0] - 0.3 * c[:, 0] ** 2 + 0.1 * c[:, 1], 0.9 - 0.5 * c[:, 1] ** 2], axis=1)

    def sigmoid_of_quadratic(c):  # a sigmoid of a quadratic with a wide range: the sigmoid link is exact
        c = np.atleast_2d(c)
        return 1 / (1 + np.exp(-np.stack([6 * c[:, 0] - 5 * c[:, 1] ** 2 - 1, 8 * c[:, 1] - 4 * c[:, 0] - 2], axis=1)))

    for fn, expected in ((exact_quadratic, "identity"), (sigmoid_of_quadratic, "sigmoid")):
        objective = mm.FunctionObjective(fn, 2, ["a", "b"])
        result = mm.MAP(sampling="design", link="loo", seed=0).fit(objective, 2)
        assert result.settings["links"] == [expected, expected]


def test_gp_final_model_passes_closer_to_the_samples_than_the_quadratic():
    def bumpy(c):
        c = np.atleast_2d(c)
        return np.stack([np.sin(4 * c[:, 0]) + c[:, 1] ** 3, np.cos(3 * c[:, 1]) * c[:, 0]], axis=1)

    objective = mm.FunctionObjective(bumpy, 2, ["a", "b"])
    quad = mm.MAP(sampling="design", link="identity", seed=0, num_samples=16, final_model="quadratic").fit(objective, 2)
    gp = mm.MAP(sampling="design", link="identity", seed=0, num_samples=16, final_model="gp").fit(objective, 2)
    test = np.random.default_rng(5).uniform(0, 1, (200, 2))
    err_quad = np.sqrt(np.mean((quad.predict(test) - bumpy(test)) ** 2))
    err_gp = np.sqrt(np.mean((gp.predict(test) - bumpy(test)) ** 2))
    assert gp.model is not None and err_gp < 0.7 * err_quad
    with pytest.raises(ValueError, match="final_model"):
        mm.MAP(sampling="design", final_model="spline")


def test_cautious_pick_by_hand():
    from map_merge.pareto import cautious_pick

    front = mm.ParetoFront(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([[0.8, 0.2], [0.5, 0.6]]), ("a", "b"), ("max", "max"),
                           std=np.array([[0.3, 0.3], [0.01, 0.01]]))
    # preference (1, 1) -> w = (0.5, 0.5): scores 0.5 - sqrt(2 * 0.25 * 0.09) = 0.2879 and 0.55 - sqrt(2 * 0.25 * 1e-4) = 0.5429
    assert cautious_pick(front, [1, 1])[1] == 1
    # preference (1, 0): 0.8 - 0.3 = 0.5 against 0.5 - 0.01 = 0.49; two std: 0.2 against 0.48
    assert cautious_pick(front, [1, 0])[1] == 0 and cautious_pick(front, [1, 0], caution=2.0)[1] == 1
    assert cautious_pick(front, [1, 1], caution=0.0)[1] == 1 and cautious_pick(front, [0, 1], caution=0.0)[1] == 1
    below = mm.ParetoFront(np.array([[0.3, 0.3]]), np.array([[0.52, 0.56]]), ("a", "b"), ("max", "max"))  # real 0.54 < 0.5429
    above = mm.ParetoFront(np.array([[0.3, 0.3]]), np.array([[0.56, 0.54]]), ("a", "b"), ("max", "max"))  # real 0.55 > 0.5429
    chosen, index = cautious_pick(front, [1, 1], below)
    assert chosen is front and index == 1
    chosen, index = cautious_pick(front, [1, 1], above)
    assert chosen is above and index == 0
    # losses are oriented before scoring: -(0.5 + 0.3) / 2 = -0.4 against -(0.6 + 0.1) / 2 = -0.35, each less 0.1
    losses = mm.ParetoFront(np.array([[0.0], [1.0]]), np.array([[0.5, 0.3], [0.6, 0.1]]), ("a", "b"), ("min", "min"),
                            std=np.full((2, 2), 0.1 * np.sqrt(2)))
    assert cautious_pick(losses, [1, 1])[1] == 1
    with pytest.raises(ValueError, match="caution"):
        cautious_pick(front, [1, 1], caution=-1)
    with pytest.raises(ValueError, match="senses"):
        cautious_pick(front, [1, 1], losses)
    with pytest.raises(ValueError, match="empty"):
        cautious_pick(front.subset([]), [1, 1])


def test_a_run_hands_over_a_real_evaluation_that_beats_its_predictions():
    obj = objective(quadratic_pair, 2, ["a", "b"])
    result = mm.MAP(sampling="design", link="identity").fit(obj, 2)
    real = result.samples.metrics
    for w in ([1, 0], [0, 1], [1, 1], [1, 3]):
        w = np.asarray(w, float) / np.sum(w)
        # exact surrogates: the predicted pick is at least as good as every sample, and handed over
        assert quadratic_pair(result.select(w))[0] @ w >= (real @ w).max() - 1e-9
    # a model that predicts everything 0.5 too low: every pick is the best real evaluation (brute force over the samples)
    result.front = mm.ParetoFront(result.front.coeffs, result.front.metrics - 0.5, ("a", "b"), ("max", "max"), std=result.front.std)
    for w in ([1, 0], [0, 1], [1, 1], [1, 3]):
        w = np.asarray(w, float) / np.sum(w)
        np.testing.assert_allclose(quadratic_pair(result.select(w))[0] @ w, (real @ w).max(), atol=1e-12)
        handed, _ = result.choice(w)
        assert handed.label == "all real evaluations"
