"""Noisy metrics (``noisy=``): the flag reaches every result and every pick, and a bad flag is
named. Hand-computed scores as ground truth."""

import argparse
import json

import numpy as np
import pytest

import map_merge as mm
from map_merge.pareto import cautious_pick, check_noisy

from conftest import quadratic_pair

FRONT = mm.ParetoFront(np.array([[0.0], [1.0]]), np.array([[0.8, 0.2], [0.5, 0.6]]), ("a", "b"), ("max", "max"),
                       std=np.array([[0.3, 0.3], [0.01, 0.01]]))
LUCKY = mm.ParetoFront(np.array([[0.3], [0.6]]), np.array([[0.62, 0.60], [0.50, 0.50]]), ("a", "b"), ("max", "max"))
SHRUNK = (np.array([[0.52, 0.54], [0.50, 0.50]]), np.array([[0.02, 0.02], [0.02, 0.02]]))


def test_noisy_metrics_without_the_posterior_are_refused_not_scored_by_their_measurements():
    # preference (1, 1): the front's best 0.55 - sqrt(2 * 0.25 * 1e-4) = 0.5429; LUCKY[0] measures 0.61, by the model
    # 0.53 - sqrt(2 * 0.25 * 4e-4) = 0.5159: with the posterior the front's point 1, measured LUCKY's point 0
    with pytest.raises(ValueError, match="give posterior="):
        cautious_pick(FRONT, [1, 1], LUCKY, noisy=(True, True))
    assert cautious_pick(FRONT, [1, 1], LUCKY, noisy=(False, False)) == (LUCKY, 0)  # no noisy metric: nothing missing
    # the plot's mark follows the same rule when given the posterior
    mark = mm.plots.pick_mark(FRONT, [1, 1], "pick (predicted)", evaluated=LUCKY, posterior=SHRUNK, noisy=(True, True))
    np.testing.assert_array_equal(mark.metrics[0], [0.5, 0.6])
    assert mark.label.startswith("pick (predicted)")
    mark = mm.plots.pick_mark(FRONT, [1, 1], "pick (predicted)", evaluated=LUCKY)
    np.testing.assert_array_equal(mark.metrics[0], [0.62, 0.60])
    with pytest.raises(ValueError, match="give evaluated="):
        mm.plots.pick_mark(FRONT, [1, 1], posterior=SHRUNK, noisy=(True, True))


def test_bad_noise_flags_are_named():
    with pytest.raises(ValueError, match="sequence of 2 of them"):
        check_noisy("true", 2)  # not four flags 't', 'r', 'u', 'e'
    with pytest.raises(ValueError, match="sequence of 2 of them"):
        check_noisy(1, 2)
    with pytest.raises(ValueError, match="sequence of 2 of them"):
        mm.FunctionObjective(quadratic_pair, 2, ["a", "b"], noisy={"a": True, "b": False})
    assert check_noisy(np.array([True, False]), 2) == (True, False)
    with pytest.raises(ValueError, match="noisy flag must be True or False, got 'no'"):
        mm.Task(lambda model: 0.0, noisy="no")  # bool("no") would have been True
    with pytest.raises(ValueError, match="noisy must be True or False, got 'false'"):
        mm.LMEvalTask("no_such_task", tokenizer=object(), noisy="false")
    with pytest.raises(ValueError, match="got 1 noise flags for 2 tasks"):  # at once, not at the first pick
        mm.MAPResult(mm.Samples(LUCKY.coeffs, LUCKY.metrics), [], FRONT, ("a", "b"), ("max", "max"), (0.0, 1.0), noisy=[True])


def test_a_task_wrapping_a_noisy_metric_keeps_its_flag():
    class Sampled:  # a task adapter that says its score is an estimate (as LMEvalTask does)
        noisy = True

        def __call__(self, model):
            return 0.0

    assert mm.Task(Sampled(), metric_name="accuracy").noisy is True  # wrapped for its label: still noisy
    assert mm.Task(Sampled(), noisy=False).noisy is False  # said outright
    assert mm.Task(lambda model: 0.0).noisy is False
    Sampled.noisy = "yes"
    with pytest.raises(ValueError, match="its metric's 'noisy' attribute"):
        mm.Task(Sampled())


def test_refine_keeps_the_noise_flags():
    rng = np.random.default_rng(0)
    coeffs = rng.uniform(size=(8, 2))
    result = mm.MAP(sampling="design", link="identity", seed=0).fit_samples(mm.Samples(coeffs, quadratic_pair(coeffs)), noisy=[True, False])
    assert result.noisy == (True, False)
    refined = result.refine(quadratic_pair, reevaluations=4, rounds=2)  # a plain function: it says nothing of noise
    assert refined.noisy == (True, False)


def test_nested_stages_know_which_group_scores_are_noisy():
    flags = [True, False, False]

    def objective_for(idx):
        idx = list(idx)
        return mm.FunctionObjective(lambda c: quadratic_pair(c[:, :2]).repeat(2, axis=1)[:, idx], 3, [f"t{i}" for i in idx],
                                    noisy=[flags[i] for i in idx], key=f"sub{idx}")

    result = mm.nested_merge(objective_for, 3, np.ones(3), samples_per_stage=7, seed=0)
    assert len(result.stages) == 2
    for stage in result.stages:  # a group's preference-weighted score is noisy when one of its tasks' metrics is
        assert stage.result.noisy == (any(flags[i] for i in stage.left), any(flags[i] for i in stage.right))
    assert any(any(stage.result.noisy) for stage in result.stages)


class _Table:
    """A model known at each coefficient vector: ``predict`` looks the first coefficient up."""

    def __init__(self, table):
        self.table = table

    def predict(self, coeffs, return_std=False):
        mean = np.array([self.table[round(float(c[0]), 6)][0] for c in np.atleast_2d(coeffs)])
        std = np.array([self.table[round(float(c[0]), 6)][1] for c in np.atleast_2d(coeffs)])
        return (mean, std) if return_std else mean


def test_save_preference_and_select_agree_on_noisy_metrics_a_dominated_measurement_included(tmp_path):
    from map_merge.cli.save import _coeffs_for

    # front: one point predicted (0.5, 0.5) +- 0.01. Samples: A measured (0.9, 0.9), the model says (0.3, 0.3) +- 0.01 there;
    # B measured (0.5, 0.45) (A dominates it), the model says (0.8, 0.8) +- 0.01. Preference (1, 1):
    # front 0.5 - sqrt(2 * 0.25 * 1e-4) = 0.4929; both noisy: A 0.2929, B 0.7929 -> B; measured: A 0.9 -> A;
    # a noisy, b exact: A 0.5 * 0.3 + 0.5 * 0.9 - 0.005 = 0.595, B 0.5 * 0.8 + 0.5 * 0.45 - 0.005 = 0.62 -> B
    model = _Table({0.0: ([0.5, 0.5], [0.01, 0.01]), 0.2: ([0.3, 0.3], [0.01, 0.01]), 0.4: ([0.8, 0.8], [0.01, 0.01])})
    front = mm.ParetoFront(np.array([[0.0, 0.0]]), np.array([[0.5, 0.5]]), ("a", "b"), ("max", "max"), std=np.array([[0.01, 0.01]]))
    samples = mm.Samples(np.array([[0.2, 0.2], [0.4, 0.4]]), np.array([[0.9, 0.9], [0.5, 0.45]]))
    for noisy, expected in (((True, True), [0.4, 0.4]), ((False, False), [0.2, 0.2]), ((True, False), [0.4, 0.4])):
        result = mm.MAPResult(samples, [], front, ("a", "b"), ("max", "max"), (0.0, 1.0), model=model, noisy=noisy)
        (tmp_path / "result.json").write_text(json.dumps({**result.to_dict(), "summary": {"command": "map"}}))
        saved = _coeffs_for(argparse.Namespace(coeffs=None, preference="1,1"), tmp_path, {})
        assert saved == expected, noisy
        np.testing.assert_array_equal(result.select([1, 1]), expected)


def test_the_run_report_says_why_a_noisy_real_evaluation_was_handed_over(tmp_path, monkeypatch):
    from map_merge.cli.runs import _map_or_bayes

    objective = mm.FunctionObjective(quadratic_pair, 2, ["a", "b"], noisy=[True, False])
    # whatever the fit, hand over the first real evaluation (the text, not the rule, is under test here)
    monkeypatch.setattr(mm.MAPResult, "choice", lambda self, preference, caution=1.0: (self.real_evaluations(), 0))
    monkeypatch.setattr(mm.MAPResult, "select", lambda self, preference, caution=1.0: self.real_evaluations().coeffs[0].copy())
    _, pick, _ = _map_or_bayes("map", {"budget": 8, "sampling": "design", "link": "identity"}, tmp_path, objective, ["a", "b"],
                               [1.0, 1.0], {})
    assert pick.measured
    assert "scored by the model at it in its noisy metrics and by its measurements in the others" in pick.prediction
    assert "measured, it scores better" not in pick.prediction
