"""The model a run hands over (pareto.cautious_pick) at its edges, and ``map-merge save --preference``
reading a run's result.json: hand-computed scores as ground truth."""

import argparse
import json

import numpy as np
import pytest

import map_merge as mm
from map_merge.pareto import cautious_pick

from conftest import quadratic_pair


def test_cautious_pick_never_hands_over_a_point_whose_std_is_unknown():
    front = mm.ParetoFront(np.array([[0.0], [0.5], [1.0]]), np.array([[0.9, 0.1], [0.6, 0.6], [0.2, 0.9]]), ("a", "b"), ("max", "max"),
                           std=np.array([[np.nan, 0.01], [0.01, 0.01], [0.01, np.inf]]))
    # preference (1, 1): point 0 unknown; 0.6 - sqrt(2 * 0.25 * 1e-4) = 0.5929 against 0.55 - inf
    assert cautious_pick(front, [1, 1]) == (front, 1)
    # preference (1, 0): b plays no part (point 2's infinite std on b included): 0.6 - 0.01 and 0.2 - 0.01; point 0 unknown
    assert cautious_pick(front, [1, 0]) == (front, 1)
    # preference (0, 1): a plays no part (point 0's unknown std on a included): 0.1 - 0.01, 0.6 - 0.01, 0.9 - inf
    assert cautious_pick(front, [0, 1]) == (front, 1)
    unknown = mm.ParetoFront(front.coeffs, front.metrics, ("a", "b"), ("max", "max"), std=np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="no front point has a finite"):
        cautious_pick(unknown, [1, 1])
    real = mm.ParetoFront(np.array([[0.3]]), np.array([[0.1, 0.2]]), ("a", "b"), ("max", "max"))
    assert cautious_pick(unknown, [1, 1], real) == (real, 0)  # nothing predicted is known: the real evaluation


def test_a_result_without_real_evaluations_still_picks_from_its_front():
    result = mm.MAP(sampling="design", link="identity").fit(mm.FunctionObjective(quadratic_pair, 2, ["a", "b"]), 2)
    result.samples = mm.Samples(np.zeros((0, 2)), np.zeros((0, 2)))
    w = np.array([0.25, 0.75])
    brute = np.argmax(result.front.metrics @ w - np.sqrt(result.front.std**2 @ w**2))  # every point's cautious score
    np.testing.assert_array_equal(result.select([1, 3]), result.front.coeffs[brute])


def _result_json(tmp_path, predicted: bool, sample_metrics, noisy=None):
    """A map run's result.json by hand: a predicted front of two points, the samples (and a
    re-evaluated front point, a copy of the first sample)."""
    samples = {"coeffs": [[0.3, 0.3], [0.9, 0.1]], "metrics": sample_metrics, "round": [0, 0]}
    real = {"label": "MAP real", "task_names": ["a", "b"], "senses": ["max", "max"], "coeffs": [[0.3, 0.3]], "metrics": [sample_metrics[0]]}
    if predicted:
        samples.update(predicted=[[0.41, 0.39], [0.69, 0.05]], predicted_std=[[0.02, 0.03], [0.04, 0.05]])
        real.update(predicted=[[0.41, 0.39]], predicted_std=[[0.02, 0.03]])
    result = {"task_names": ["a", "b"], "senses": ["max", "max"], "samples": samples, "real_front": real,
              "front": {"label": "MAP predicted", "task_names": ["a", "b"], "senses": ["max", "max"], "coeffs": [[0.0, 0.0], [1.0, 1.0]],
                        "metrics": [[0.8, 0.2], [0.5, 0.6]], "std": [[0.35, 0.35], [0.01, 0.01]]},
              "summary": {"command": "map"}}
    if noisy is not None:
        result["noisy"] = noisy
    (tmp_path / "result.json").write_text(json.dumps(result))


def _saved(tmp_path, preference: str):
    from map_merge.cli.save import _coeffs_for

    picked = {}
    coeffs = _coeffs_for(argparse.Namespace(coeffs=None, preference=preference), tmp_path, picked)
    return coeffs, picked


def test_save_preference_hands_over_what_the_run_that_wrote_result_json_handed_over(tmp_path):
    # preference (1, 0): by the mean 0.8 against 0.5 (point 0); cautious 0.8 - 0.35 = 0.45 against 0.5 - 0.01 = 0.49 (point 1);
    # the samples score 0.4 and 0.7 for real
    _result_json(tmp_path, predicted=False, sample_metrics=[[0.4, 0.4], [0.7, 0.0]])
    coeffs, picked = _saved(tmp_path, "1,0")  # written before the cautious rule: that run handed over the mean's pick
    assert coeffs == [0.0, 0.0]
    np.testing.assert_array_equal(picked["mean"], [0.8, 0.2])
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.4, 0.4], [0.7, 0.0]])
    coeffs, picked = _saved(tmp_path, "1,0")  # the run's rule: 0.7 real beats 0.49
    assert coeffs == [0.9, 0.1]
    np.testing.assert_array_equal(picked["mean"], [0.69, 0.05])
    np.testing.assert_array_equal(picked["std"], [0.04, 0.05])
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.4, 0.4], [0.45, 0.0]])
    assert _saved(tmp_path, "1,0")[0] == [1.0, 1.0]  # 0.49 predicted beats 0.45 real
    # preference (1, 1): 0.55 - sqrt(2 * 0.25 * 1e-4) = 0.5429 predicted against 0.60 real for the duplicated sample (0.3, 0.3)
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.5, 0.7], [0.45, 0.0]])
    coeffs, picked = _saved(tmp_path, "1,1")
    assert coeffs == [0.3, 0.3]
    np.testing.assert_array_equal(picked["mean"], [0.41, 0.39])


def test_save_preference_scores_real_evaluations_by_the_model_in_noisy_metrics(tmp_path):
    # preference (1, 1), the duplicated sample (0.3, 0.3) measures 0.60 and beats the front's 0.5429 (above);
    # scored by the model at it: 0.40 - sqrt(0.25 * (4e-4 + 9e-4)) = 0.382, and the other sample 0.37 - 0.032: the front's point 1
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.5, 0.7], [0.45, 0.0]], noisy=[True, True])
    coeffs, picked = _saved(tmp_path, "1,1")
    assert coeffs == [1.0, 1.0]
    np.testing.assert_array_equal(picked["mean"], [0.5, 0.6])
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.5, 0.7], [0.45, 0.0]], noisy=[False, False])
    assert _saved(tmp_path, "1,1")[0] == [0.3, 0.3]  # no noisy metric: the measurement, as before
    # preference (1, 0) with only a noisy: sample 1 by the model 0.69 - 0.04 = 0.65 beats 0.49 predicted
    _result_json(tmp_path, predicted=True, sample_metrics=[[0.5, 0.7], [0.95, 0.0]], noisy=[True, False])
    coeffs, picked = _saved(tmp_path, "1,0")
    assert coeffs == [0.9, 0.1]
    assert "scored by the model at it" in picked["prediction"]


def test_report_says_when_the_pick_is_a_real_evaluation(monkeypatch):
    from map_merge.cli import report_text

    monkeypatch.setattr(report_text, "block_markdown", lambda report: "")
    report = {"command": "map", "config": "run.yaml", "mergekit": None, "models": {"pretrained": "p", "finetuned": {"a": "x", "b": "y"}},
              "metrics": [{"axis": "a", "task": "a"}, {"axis": "b", "task": "b"}], "settings": {}, "method": "MAP",
              "operator": {"name": "task_arithmetic"}, "run": {"budget": 8, "evaluations": 8, "models_evaluated": 8, "from_store": 0},
              "extra_evaluations": {"models_evaluated": 0, "from_store": 0}, "files": {"front.png": "the front plot"}, "out": "out",
              "pick": {"measured": True}}
    text = report_text.report_markdown(report)
    assert "(a gold star, one of the run's real evaluations)" in text and "predicted)" not in text
    report["pick"]["measured"] = False
    assert "(a gold star, predicted)" in report_text.report_markdown(report)


def test_a_real_evaluation_is_scored_by_the_model_that_has_seen_it():
    front = mm.ParetoFront(np.array([[0.0], [1.0]]), np.array([[0.8, 0.2], [0.5, 0.6]]), ("a", "b"), ("max", "max"),
                           std=np.array([[0.3, 0.3], [0.01, 0.01]]))
    # preference (1, 1): the front's best cautious score is 0.55 - sqrt(2 * 0.25 * 1e-4) = 0.5429 (point 1)
    lucky = mm.ParetoFront(np.array([[0.3], [0.6]]), np.array([[0.62, 0.60], [0.50, 0.50]]), ("a", "b"), ("max", "max"))
    # measured: 0.61 beats 0.5429; the model at it: mean (0.52, 0.54), std 0.02 -> 0.53 - sqrt(2 * 0.25 * 4e-4) = 0.5159, loses
    shrunk = (np.array([[0.52, 0.54], [0.50, 0.50]]), np.array([[0.02, 0.02], [0.02, 0.02]]))
    assert cautious_pick(front, [1, 1], lucky) == (lucky, 0)
    assert cautious_pick(front, [1, 1], lucky, posterior=shrunk) == (front, 1)
    # a model sure of the second evaluation (mean (0.6, 0.58), std 0): 0.59 beats 0.5429
    sure = (np.array([[0.52, 0.54], [0.60, 0.58]]), np.array([[0.02, 0.02], [0.0, 0.0]]))
    assert cautious_pick(front, [1, 1], lucky, posterior=sure) == (lucky, 1)
    # caution 0: the means alone, 0.55 against 0.53 and 0.59
    assert cautious_pick(front, [1, 1], lucky, caution=0.0, posterior=shrunk) == (front, 1)
    with pytest.raises(ValueError, match="one row per evaluated point"):
        cautious_pick(front, [1, 1], lucky, posterior=(shrunk[0][:1], shrunk[1][:1]))


def test_only_the_noisy_metrics_of_a_real_evaluation_are_scored_by_the_model():
    front = mm.ParetoFront(np.array([[0.0], [1.0]]), np.array([[0.8, 0.2], [0.5, 0.6]]), ("a", "b"), ("max", "max"),
                           std=np.array([[0.3, 0.3], [0.01, 0.01]]))
    lucky = mm.ParetoFront(np.array([[0.3], [0.6]]), np.array([[0.62, 0.60], [0.50, 0.50]]), ("a", "b"), ("max", "max"))
    shrunk = (np.array([[0.52, 0.54], [0.50, 0.50]]), np.array([[0.02, 0.02], [0.02, 0.02]]))
    # preference (1, 1), front 0.5429. Both noisy: 0.53 - 0.0141 = 0.5159 loses
    assert cautious_pick(front, [1, 1], lucky, posterior=shrunk, noisy=(True, True)) == (front, 1)
    # a noisy, b exact: 0.5 * 0.52 + 0.5 * 0.60 - sqrt(0.25 * 4e-4) = 0.55 wins
    assert cautious_pick(front, [1, 1], lucky, posterior=shrunk, noisy=(True, False)) == (lucky, 0)
    # b noisy, a exact: 0.5 * 0.62 + 0.5 * 0.54 - 0.01 = 0.57 wins
    assert cautious_pick(front, [1, 1], lucky, posterior=shrunk, noisy=(False, True)) == (lucky, 0)
    # neither: the measurement 0.61
    assert cautious_pick(front, [1, 1], lucky, posterior=shrunk, noisy=(False, False)) == (lucky, 0)
    with pytest.raises(ValueError, match="noise flags for 2 tasks"):
        cautious_pick(front, [1, 1], lucky, posterior=shrunk, noisy=(True,))


def test_a_run_on_noisy_metrics_scores_its_evaluations_by_its_model():
    rng = np.random.default_rng(3)

    def noisy(c):  # a smooth pair of metrics plus measurement noise
        return quadratic_pair(c) + 0.05 * rng.standard_normal((len(np.atleast_2d(c)), 2))

    objective = mm.FunctionObjective(noisy, 2, ["a", "b"], noisy=[True, False])
    result = mm.MAP(budget=14, final=0, seed=0).fit(objective, 2)
    assert result.noisy == (True, False) and result.to_dict()["noisy"] == [True, False]
    evaluated = result.real_evaluations()
    mean, std = result.predict(result.front.coeffs, return_std=True)
    at, at_std = result.predict(evaluated.coeffs, return_std=True)
    differs = 0
    for w in ([1, 0], [0, 1], [1, 1], [3, 1]):
        w = np.asarray(w, float) / np.sum(w)
        # by hand: a by the model at each evaluation (less its std), b by the measurement
        predicted = mean @ w - np.sqrt(std**2 @ w**2)
        real = at[:, 0] * w[0] + evaluated.metrics[:, 1] * w[1] - at_std[:, 0] * w[0]
        brute = evaluated.coeffs[np.argmax(real)] if real.max() > predicted.max() else result.front.coeffs[np.argmax(predicted)]
        np.testing.assert_array_equal(result.select(w), brute)
        front, index = cautious_pick(result.front, w, evaluated)  # every metric by its measurement
        differs += not np.array_equal(result.select(w), front.coeffs[index])
    assert differs  # the noise flag changed a pick (else this test would not tell the rules apart)
    with pytest.raises(ValueError, match="noise flags for 2 tasks"):
        mm.FunctionObjective(noisy, 2, ["a", "b"], noisy=[True])


def test_a_run_picks_the_best_cautious_score_over_its_front_and_its_evaluations():
    rng = np.random.default_rng(3)

    def noisy(c):  # a smooth pair of metrics plus measurement noise
        return quadratic_pair(c) + 0.02 * rng.standard_normal((len(np.atleast_2d(c)), 2))

    result = mm.MAP(budget=14, seed=0).fit(mm.FunctionObjective(noisy, 2, ["a", "b"]), 2)
    evaluated = result.real_evaluations()
    assert len(evaluated) == 14  # every real evaluation, dominated ones included
    mean, std = result.predict(result.front.coeffs, return_std=True)
    np.testing.assert_allclose(mean, result.front.metrics, atol=1e-9)
    for w in ([1, 0], [0, 1], [1, 1], [1, 3]):
        w = np.asarray(w, float) / np.sum(w)
        # by hand: the front's cautious scores against the measured scores of every evaluation
        predicted = mean @ w - np.sqrt(std**2 @ w**2)
        measured = evaluated.metrics @ w
        brute = evaluated.coeffs[np.argmax(measured)] if measured.max() > predicted.max() else result.front.coeffs[np.argmax(predicted)]
        np.testing.assert_array_equal(result.select(w), brute)
        handed, index = result.choice(w)
        assert handed.label == ("all real evaluations" if measured.max() > predicted.max() else result.front.label)


def test_a_dominated_evaluation_tied_on_the_preference_is_never_handed_over():
    # preference (1, 0): b plays no part, so evaluation 0 (0.9, 0.1) ties with evaluation 1 (0.9, 0.5), which dominates it;
    # both beat the front's 0.6 - 0.1: the run hands over evaluation 1, as it did over the non-dominated evaluations alone
    front = mm.ParetoFront(np.array([[0.5, 0.5]]), np.array([[0.6, 0.6]]), ("a", "b"), ("max", "max"), std=np.array([[0.1, 0.1]]))
    samples = mm.Samples(np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]), np.array([[0.9, 0.1], [0.9, 0.5], [0.9, 0.5]]))
    result = mm.MAPResult(samples, [], front, ("a", "b"), ("max", "max"), (0.0, 1.0))
    np.testing.assert_array_equal(result.select([1, 0]), [0.2, 0.8])  # the first of the two undominated copies
    handed, index = result.choice([1, 0])
    assert handed.label == "all real evaluations" and index == 1
    evaluated = result.real_evaluations()
    # the same by the model's prediction at them (equal here): the measured metrics break the tie
    same = (np.full((3, 2), 0.8), np.zeros((3, 2)))
    assert cautious_pick(front, [1, 0], evaluated, posterior=same) == (evaluated, 1)
    mark = mm.plots.pick_mark(front, [1, 0], "pick (predicted)", evaluated)  # evaluated= passed positionally still works
    np.testing.assert_array_equal(mark.coeffs, [0.2, 0.8])
    assert mark.label.startswith("pick (real evaluation)")


def test_the_cli_marks_the_pick_where_it_came_from():
    from map_merge.cli.runs import _where_picked

    result = mm.MAP(sampling="design", link="identity").fit(mm.FunctionObjective(quadratic_pair, 2, ["a", "b"]), 2)
    shown, handed, index, measured = _where_picked(result, result.front.coeffs[3])
    assert shown is result.front and handed is result.front and index == 3 and not measured
    sample = result.samples.coeffs[1]
    assert not np.all(result.front.coeffs == sample, axis=1).any()  # a design point, not a point of the searched front
    shown, handed, index, measured = _where_picked(result, sample)
    assert shown is result.front and measured and np.array_equal(handed.coeffs[index], sample)
    np.testing.assert_array_equal(handed.metrics[index], result.samples.metrics[1])  # marked where it was measured
    elsewhere = np.array([0.123, 0.456])  # neither (a pick made otherwise): marked at the model's prediction
    shown, handed, index, measured = _where_picked(result, elsewhere)
    assert shown is handed and not measured
    np.testing.assert_allclose(handed.metrics[0], result.predict(elsewhere[None])[0])


def test_a_reevaluated_front_point_handed_over_is_marked_measured():
    # refine/reevaluate: real_front rows are exact copies of front rows; when one measures better than
    # every prediction, select hands it over as a real evaluation, and the CLI must say so (measured star)
    from map_merge.cli.runs import _where_picked

    result = mm.MAP(sampling="design", link="identity").fit(mm.FunctionObjective(quadratic_pair, 2, ["a", "b"]), 2)
    k = len(result.front) // 2
    best = result.front.metrics.max(axis=0) + 10.0  # measured far above any prediction on both metrics
    result.real_front = mm.ParetoFront(result.front.coeffs[[k]], best[None], ("a", "b"), result.senses, label="MAP real")
    handed, index = result.choice([1, 1])
    assert handed is not result.front  # the rule hands over the real evaluation
    chosen = result.select([1, 1])
    np.testing.assert_array_equal(chosen, result.front.coeffs[k])
    shown, handed, index, measured = _where_picked(result, chosen, [1, 1])
    assert measured and shown is result.front
    np.testing.assert_array_equal(handed.metrics[index], best)  # the star at the measured values


def test_a_model_objective_carries_which_of_its_tasks_are_noisy(tiny_models):
    import torch

    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts[:2])
    probe = torch.tensor([0, 1, 2, 3, 4])

    class Sampled:  # a task adapter that says its score is an estimate (as LMEvalTask does)
        noisy = True

        def __call__(self, model):
            return float(model(probe).sum())

    tasks = {"sum": Sampled(), "sq": mm.Task(lambda m: float((m(probe) ** 2).mean()), sense="min"),
             "flagged": mm.Task(lambda m: float(m(probe).mean()), noisy=True)}
    objective = mm.ModelObjective(base, tv, tasks, progress=False)
    assert objective.noisy == (True, False, True)
    rng = np.random.default_rng(0)
    samples = mm.Samples(rng.uniform(size=(8, 2)), rng.normal(size=(8, 3)))
    fitter = mm.MAP(sampling="design", link="identity", seed=0)
    result = fitter.fit_samples(samples, objective=objective, task_names=objective.task_names)
    assert result.noisy == (True, False, True)
    assert fitter.fit_samples(samples).noisy == (False, False, False)  # no objective: every metric exact
    assert fitter.fit_samples(samples, objective=objective, noisy=[False, True, False]).noisy == (False, True, False)
