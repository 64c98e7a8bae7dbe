"""The run report (issue 28): a run's out/report.md answers what the user got, how sure it is and how
it compares with the base, the experts, uniform merging and their recipe; `save` prints the same
block for the model it saved. Ground truth: the tiny own-models config of test_plots_cli, whose
metrics are analytic quadratics of the merged weight."""

import json

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_plots_cli import _own_models

from map_merge.cli import main
from map_merge.cli.report_text import number

TARGETS = np.array([[1.0, 0.0], [0.0, 1.0]])  # user.py's targets of tasks a and b
B = np.array([0.0, 0.5])  # expert b's weight here (a: (1, 0)): the uniform merges' scores then have one best


def _truth(w):
    """user.py's evaluate: 1 - |w - target|^2 per task, at the merged weight w."""
    w = np.asarray(w, dtype=float)
    return np.array([1.0 - ((w - t) ** 2).sum() for t in TARGETS])


def _merged(c):
    return c[0] * np.array([1.0, 0.0]) + c[1] * B


def _setup(folder, **fields):
    config = {**_own_models(folder), "out": str(folder / "out"), **fields}
    save_file({"weight": torch.tensor([B.tolist()], dtype=torch.float32)}, str(folder / "b.safetensors"))
    path = folder / "run.json"
    path.write_text(json.dumps(config))
    return path


def _summary(capsys):
    return json.loads(capsys.readouterr().out.split("\npreference")[0].split("\nwrote")[0])


def _rows(report):
    return {row["kind"] if row["kind"] in ("base", "recipe") else row["model"]: row for row in report["comparison"]["rows"]}


def _weight(path):
    return load_file(str(path))["weight"].numpy().reshape(-1).astype(float)


def test_a_run_writes_a_report_of_its_pick_and_the_comparison(tmp_path, capsys):
    config = _setup(tmp_path, preference=[1, 3], budget=8)
    assert main(["map", "--config", str(config)]) == 0
    summary = _summary(capsys)
    out = tmp_path / "out"
    text = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    c = np.array(summary["coeffs"])
    # the pick's coefficients, named per task
    assert report["pick"]["coefficients"] == {"a": c[0], "b": c[1]}
    assert f"Coefficients: a: {number(c[0])}; b: {number(c[1])}." in text
    # the saved weights, evaluated for real: the quadratic at the weights in merged/
    saved = _truth(_weight(out / "merged" / "model.safetensors"))
    np.testing.assert_allclose(report["pick"]["saved"]["metrics"], saved, atol=1e-6)
    np.testing.assert_allclose(report["pick"]["merged_in_memory"]["metrics"], _truth(_merged(c)), atol=1e-6)
    assert report["pick"]["agreement"]["agrees"] is True
    assert "| a, higher is better | " in text and f"| {number(saved[0])} |" in text and f"| {number(saved[1])} |" in text
    # the prediction and its uncertainty (the run's model at the pick)
    predicted = report["pick"]["predicted"]
    assert len(predicted["mean"]) == 2 and all(s > 0 for s in predicted["std"])
    assert f"{number(predicted['mean'][0])} ± {number(predicted['std'][0])}" in text
    # the comparison: base, each expert, the best uniform merge, by hand
    w = np.array([0.25, 0.75])
    rows = _rows(report)
    np.testing.assert_allclose(rows["base"]["metrics"], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(rows["expert a (c = e_a)"]["metrics"], _truth([1.0, 0.0]), atol=1e-6)  # (1, -1)
    np.testing.assert_allclose(rows["expert b (c = e_b)"]["metrics"], _truth(B), atol=1e-6)  # (-0.25, 0.75)
    lambdas = [0.2, 0.4, 0.6, 0.8, 1.0]
    scores = [_truth(_merged([lam, lam])) @ w for lam in lambdas]
    best = lambdas[int(np.argmax(scores))]
    chosen = [row for row in report["comparison"]["rows"] if row.get("best")]
    assert len(chosen) == 1 and chosen[0]["lambda"] == best
    np.testing.assert_allclose(chosen[0]["metrics"], _truth(_merged([best, best])), atol=1e-6)
    np.testing.assert_allclose(chosen[0]["score"], max(scores), atol=1e-6)
    assert f"| best uniform (c = {best:g} for every coefficient) | {best:g}, {best:g} | " in text
    for row in report["comparison"]["rows"]:  # dominated by the pick's saved weights, by hand
        o = np.array(row["metrics"])
        assert row["dominated_by_pick"] == bool((saved >= o).all() and (saved > o).any()), row
    # what was run, the front plot, the files; the extra evaluations counted apart from the budget
    assert "map-merge map --config" in text and "![front](front.png)" in text and "budget 8" in text
    assert summary["models_evaluated"] == 8 and summary["report"]["models_evaluated"] > 0
    # a rerun evaluates nothing (the saved weights' result is in the store under their bytes' digest)
    assert main(["map", "--config", str(config), "--overwrite"]) == 0
    again = _summary(capsys)
    assert again["report"]["models_evaluated"] == 0 and again["models_evaluated"] == 0
    # save prints the same block for the model it saved, and writes nothing into the run's out/
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith("evaluations.sqlite-")}
    assert main(["save", "--config", str(config), "--preference", "1,1", "--out", str(tmp_path / "pick")]) == 0
    printed = capsys.readouterr().out
    picked = _truth(_weight(tmp_path / "pick" / "model.safetensors"))
    assert "## Your model" in printed and "## Compared" in printed and "Preference (normalised to sum 1): a 0.5, b 0.5." in printed
    assert "| a, higher is better | " in printed and f"| {number(picked[0])} |" in printed and f"| {number(picked[1])} |" in printed
    assert "± " in printed  # a point of the run's predicted front: its prediction and std
    assert f"| expert b (c = e_b) | 0, 1 | {number(-0.25)} | {number(0.75)} |" in printed  # from the run's store
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.name.startswith("evaluations.sqlite-")} == before
    assert sorted(p.name for p in (tmp_path / "pick").iterdir()) == ["map_merge.json", "model.safetensors"]
    # --coeffs: no prediction off the front, the saved weights evaluated for real
    assert main(["save", "--config", str(config), "--coeffs", "0.2,0.4", "--out", str(tmp_path / "c.safetensors")]) == 0
    printed = capsys.readouterr().out
    truth = _truth(_merged([0.2, 0.4]))
    assert "Predicted: none" in printed and f"| {number(truth[0])} |" in printed and f"| {number(truth[1])} |" in printed


def test_the_saved_weights_not_the_coefficients_are_evaluated(tmp_path, capsys, monkeypatch):
    """A save that wrote other weights than the pick's merge: the report scores what was saved and
    says the two differ."""
    import map_merge.cli.runs as runs

    original = runs._save_pick

    def shifted(objective, zoo, coeffs, path):
        return original(objective, zoo, (np.asarray(coeffs) + [0.1, -0.2]).tolist(), path)

    monkeypatch.setattr(runs, "_save_pick", shifted)
    config = _setup(tmp_path, preference=[3, 1], samples_per_stage=6)
    assert main(["nested", "--config", str(config)]) == 0
    c = np.array(_summary(capsys)["coeffs"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    np.testing.assert_allclose(report["pick"]["saved"]["metrics"], _truth(_merged(c + [0.1, -0.2])), atol=1e-6)
    np.testing.assert_allclose(report["pick"]["merged_in_memory"]["metrics"], _truth(_merged(c)), atol=1e-6)
    assert report["pick"]["agreement"]["agrees"] is False and report["pick"]["predicted"] is None
    assert "The saved weights and the merge in memory DIFFER" in (tmp_path / "out" / "report.md").read_text()


def test_a_run_from_a_mergekit_recipe_compares_the_recipe(tmp_path, capsys):
    _own_models(tmp_path)
    for name, w in {"base": [0.0, 0.0], "a": [1.0, 0.0], "b": B.tolist()}.items():  # folders: the task names are their names
        (tmp_path / name).mkdir()
        save_file({"weight": torch.tensor([w])}, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 0.3}}, {"model": "b", "parameters": {"weight": 0.9}}]}))
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"evaluator": "user.py:evaluate", "model": "user.py:build", "out": str(tmp_path / "out"),
                                  "preference": [1, 1], "budget": 7}))
    assert main(["map", "--config", str(config), "--mergekit", str(tmp_path / "recipe.yaml")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    recipe = _rows(report)["recipe"]
    truth = _truth(_merged([0.3, 0.9]))  # (1 - 0.49 - 0.2025, 1 - 0.09 - 0.3025) = (0.3075, 0.6075)
    assert recipe["coeffs"] == [0.3, 0.9]
    np.testing.assert_allclose(recipe["metrics"], truth, atol=1e-6)
    np.testing.assert_allclose(recipe["score"], truth.mean(), atol=1e-6)
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"| your mergekit recipe | 0.3, 0.9 | {number(truth[0])} | {number(truth[1])} | {number(truth.mean())} |" in text
    assert "--mergekit" in text and "your recipe's merge" in text


def test_evaluate_saved_scores_the_file_s_bytes_once(tmp_path):
    import map_merge as mm
    from map_merge.saved_eval import evaluate_saved

    for name, w in {"base": [0.0, 0.0], "a": [1.0, 0.0], "b": [0.0, 1.0], "saved": [0.3, 0.2]}.items():
        save_file({"weight": torch.tensor([w])}, str(tmp_path / f"{name}.safetensors"))
    tv = mm.TaskVectors.from_models(tmp_path / "base.safetensors", {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"})
    calls = []

    def metric(task):
        def score(model):
            calls.append(task)
            return float(_truth(model.weight.detach().reshape(-1).numpy())[task])
        return score

    objective = mm.ModelObjective(torch.nn.Linear(2, 1, bias=False), tv, {"a": metric(0), "b": metric(1)}, store=mm.EvaluationStore(),
                                  progress=False)
    first = evaluate_saved(objective, tmp_path / "saved.safetensors")
    np.testing.assert_allclose(first.metrics, _truth([0.3, 0.2]), atol=1e-6)  # the file's weights, not any merge
    assert not first.from_store and calls == [0, 1]
    again = evaluate_saved(objective, tmp_path / "saved.safetensors")
    assert again.from_store and again.digest == first.digest and calls == [0, 1]
    save_file({"weight": torch.tensor([[0.5, 0.5]])}, str(tmp_path / "saved.safetensors"))  # other bytes: scored afresh
    other = evaluate_saved(objective, tmp_path / "saved.safetensors")
    assert not other.from_store and len(calls) == 4
    np.testing.assert_allclose(other.metrics, _truth([0.5, 0.5]), atol=1e-6)


def test_save_counts_what_its_block_read_from_the_store(tmp_path, capsys):
    """save evaluates only the saved weights it has not seen; every row of its block and table read
    from the run's store is counted as answered by it (T = 2: the merge in memory, the saved bytes,
    the base, 2 experts and 5 uniform merges = 10), not just the saved weights."""
    config = _setup(tmp_path, preference=[1, 1], budget=7)
    assert main(["map", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["save", "--config", str(config), "--preference", "1,1", "--out", str(tmp_path / "pick")]) == 0
    printed = capsys.readouterr().out
    assert "Not known" not in printed  # every row was in the store (the run's report evaluated them)
    assert "Evaluations for this block and table: 0 model(s) evaluated, 10 answered by the store" in printed


def test_save_with_another_operator_shows_no_prediction_of_the_run_s(tmp_path, capsys):
    """The run's model predicts its own operator's merges (task arithmetic here): a save under
    --method dare of the front point for a preference is another model, so no prediction is shown
    for it (it showed the task-arithmetic prediction beside DARE's real metrics)."""
    config = _setup(tmp_path, preference=[1, 1], budget=7)
    assert main(["map", "--config", str(config)]) == 0
    capsys.readouterr()
    assert main(["save", "--config", str(config), "--preference", "1,1", "--method", "{name: dare, p: 0.5}",
                 "--out", str(tmp_path / "dare")]) == 0
    printed = capsys.readouterr().out
    assert "| your model (predicted ± std) |" not in printed and "Predicted: none" in printed
    assert main(["save", "--config", str(config), "--preference", "1,1", "--method", "task_arithmetic",
                 "--out", str(tmp_path / "ta")]) == 0  # the run's own operator, named: its prediction stands
    assert "| your model (predicted ± std) |" in capsys.readouterr().out


def test_a_prediction_far_from_the_real_value_is_flagged():
    """The report says when the real value of the saved model lies more than 3 predictive std from
    the run's prediction (hand-made numbers: a is 50 std off, b 0.2 std)."""
    from map_merge.cli.report_text import _missed

    labels = [{"task": "a", "axis": "a: accuracy"}, {"task": "b", "axis": "b: accuracy"}]
    text = _missed({"mean": [1.0, 2.0], "std": [0.01, 0.5]}, [1.5, 2.1], labels)
    assert text.startswith("a: real 1.5, predicted 1 ± 0.01, 50 std apart") and "b:" not in text
    assert _missed({"mean": [1.0, 2.0], "std": None}, [1.5, 2.1], labels) == ""  # no std, no verdict
    assert _missed({"mean": [1.0, 2.0], "std": [0.0, 0.0]}, [1.0, 2.0], labels) == ""  # exact, even at std 0
