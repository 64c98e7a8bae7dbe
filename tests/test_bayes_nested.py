import warnings

import numpy as np
import pytest
from conftest import grid

import map_merge as mm
from map_merge.bayes import angles, from_angles

OPTIMA = np.array([[0.85, 0.15], [0.2, 0.8]])


def bumpy(c):
    """Accuracy-like objectives that are not quadratic (so sample placement matters)."""
    c = np.atleast_2d(c)
    d = ((c[:, None, :] - OPTIMA[None]) ** 2).sum(-1)
    z = 2.5 - 8 * d**1.5 + 0.4 * np.sin(5 * c[:, :1] + 3 * c[:, 1:2])
    return 1 / (1 + np.exp(-z))


def test_angles_round_trip():
    rng = np.random.default_rng(0)
    c = rng.uniform(size=(20, 4))
    radius, theta = angles(c)
    assert (theta >= 0).all() and (theta <= np.pi / 2 + 1e-12).all()
    np.testing.assert_allclose(from_angles(radius, theta), c, atol=1e-12)


@pytest.mark.parametrize("acquisition", ["binned", "nehvi"])
def test_bayesian_rounds_budget_and_result(acquisition):
    obj = mm.FunctionObjective(bumpy, 2, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mm.BayesianMAP(budget=14, initial=8, batch=3, acquisition=acquisition, seed=1).fit(obj, 2)
    assert result.num_evaluations == 14 and obj.num_evaluations == 14
    np.testing.assert_array_equal(result.samples.round, [0] * 8 + [1] * 3 + [2] * 3)
    # every batch, the last included, is in the final fit
    assert result.surrogates[0].diagnostics.num_samples == 14
    assert (result.samples.coeffs >= 0).all() and (result.samples.coeffs <= 1).all()
    # adaptive points are new points, not repeats of the design
    assert len(np.unique(result.samples.coeffs.round(6), axis=0)) == 14
    assert result.settings["acquisition"] == acquisition


def test_binned_acquisition_goes_where_the_fit_is_bad():
    """One corner of the box holds a sharp bump the quadratic cannot fit: the binned scheme
    must put more of its new points into that angular sector than uniform sampling would."""
    def bump(c):
        c = np.atleast_2d(c)
        angle = np.arctan2(c[:, 1], c[:, 0])
        base = 0.6 + 0.1 * c[:, 0] - 0.1 * c[:, 1]
        spike = 0.3 * np.exp(-((angle - 1.35) ** 2) / 0.005) * (np.linalg.norm(c, axis=1) > 0.1)
        return np.stack([base + spike, 1.2 - base], axis=1)

    obj = mm.FunctionObjective(bump, 2, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = mm.BayesianMAP(budget=48, initial=12, batch=6, acquisition="binned", link="identity", design="sobol", seed=0).fit(obj, 2)
    new = result.samples.coeffs[result.samples.round > 0]
    theta = angles(new)[1][:, 0]
    share_last_bin = np.mean(theta >= 3 * np.pi / 8)  # the bin holding the spike (uniform share: 1/4)
    assert share_last_bin > 0.4


def test_bayesian_beats_plain_map_at_equal_budget():
    """Ground truth: a 201x201 grid of the true objectives. Both spend 12 samples plus 10
    re-evaluations; each front is the non-dominated set of all real evaluations."""
    dense = grid(2, 201)
    values = bumpy(dense)
    reference, ref_point = values[mm.pareto_mask(values)], values.min(axis=0)
    obj = mm.FunctionObjective(bumpy, 2, ["a", "b"])
    ratios = {"plain": [], "bayes": []}
    for seed in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, estimator in (("plain", mm.MAP(num_samples=12, seed=seed)), ("bayes", mm.BayesianMAP(budget=12, batch=2, seed=seed))):
                result = estimator.fit(obj, 2)
                result.reevaluate(obj, max_points=10)
                ratios[key].append(mm.front_report(result.evaluated_front().metrics, reference, ref_point)["hv_ratio"])
    wins = sum(b > p for b, p in zip(ratios["bayes"], ratios["plain"]))
    assert wins >= 2 and np.mean(ratios["bayes"]) > np.mean(ratios["plain"])


def test_bayesian_uses_prior_and_validates():
    obj = mm.FunctionObjective(bumpy, 2, ["a", "b"])
    prior_c = mm.sobol_design(2, 6, seed=9)
    result = mm.BayesianMAP(budget=8, initial=6, batch=2, acquisition="binned", prior=(prior_c, bumpy(prior_c))).fit(obj, 2)
    assert result.surrogates[0].diagnostics.num_samples == 14 and result.num_evaluations == 8
    with pytest.raises(ValueError, match="below the initial design"):
        mm.BayesianMAP(budget=6, initial=8).fit(obj, 2)
    with pytest.raises(ValueError, match="below the 6 parameters"):
        mm.BayesianMAP(budget=10, initial=5).fit(obj, 2)
    with pytest.raises(ValueError, match="at least 2 tasks"):
        mm.BayesianMAP().fit(mm.FunctionObjective(lambda c: c, 1, ["a"]), 1)
    with pytest.raises(ValueError, match="unknown acquisition"):
        mm.BayesianMAP(acquisition="ucb")


def _separable(num_tasks):
    """Task i's accuracy depends on every coefficient: its own helps, others interfere."""
    rng = np.random.default_rng(num_tasks)
    best = rng.uniform(0.5, 0.9, size=num_tasks)
    interference = rng.uniform(0.05, 0.3, size=(num_tasks, num_tasks))
    np.fill_diagonal(interference, 0.0)

    def metrics(c, idx):
        c = np.atleast_2d(c)
        own = c[:, idx]
        z = 2.0 - 6 * (own - best[idx]) ** 2 - (c**2) @ interference[idx].T
        return 1 / (1 + np.exp(-z))

    return metrics


@pytest.mark.parametrize("num_tasks", [4, 8])
def test_nested_merge_composes_coefficients_and_is_cheap(num_tasks):
    metrics = _separable(num_tasks)
    calls = []

    def objective_for(idx):
        idx = list(idx)

        def fn(c):
            calls.append((len(c), len(idx)))
            return metrics(c, idx)

        return fn

    preference = np.ones(num_tasks)
    result = mm.nested_merge(objective_for, num_tasks, preference, samples_per_stage=12, seed=0)
    assert len(result.stages) == num_tasks - 1
    # the final vector is the composition of the stages' choices
    np.testing.assert_allclose(result.stages[-1].coeffs, result.coeffs)
    np.testing.assert_allclose(result.metrics, metrics(result.coeffs, list(range(num_tasks)))[0])
    spent_models = sum(k for k, _ in calls)
    spent_task_evals = sum(k * m for k, m in calls)
    assert result.num_evaluations == spent_models and result.task_evaluations == spent_task_evals
    plain_task_evals = (num_tasks + 1) * (num_tasks + 2) * num_tasks
    if num_tasks >= 8:  # pairwise stages pay off for many tasks (for T = 4 they cost about the same)
        assert result.task_evaluations < 0.8 * plain_task_evals
    # quality: close to the best uniform task arithmetic, judged on a dense sweep
    lambdas = np.linspace(0, 1, 101)[:, None] * np.ones(num_tasks)
    best_uniform = metrics(lambdas, list(range(num_tasks))).mean(1).max()
    assert result.metrics.mean() >= best_uniform - 0.02


def test_nested_merge_validates():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        mm.nested_merge(lambda idx: None, 1, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        mm.nested_merge(lambda idx: None, 3, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="all zero"):
        mm.nested_merge(lambda idx: None, 3, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="similarity"):
        mm.nested_merge(lambda idx: None, 3, [1, 1, 1], pairing="similar_vectors")
