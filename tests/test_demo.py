"""The main job's code path (``map-merge demo``), run on the vision zoo in under a minute, with its
report checked against numbers recomputed from the report's own raw runs."""

import json

import numpy as np
import pytest

from map_merge.demo import run_demo


def _hypervolume_2d(points: np.ndarray, ref: np.ndarray) -> float:
    """Exact area dominated by ``points`` (maximised) above ``ref``: a sweep in descending x."""
    area, top = 0.0, ref[1]
    for x, y in sorted(points.tolist(), key=lambda p: (-p[0], -p[1])):
        if x > ref[0] and y > top:
            area += (x - ref[0]) * (y - top)
            top = y
    return area


def _non_dominated(points: np.ndarray) -> np.ndarray:
    keep = [not any(np.all(q >= p) and np.any(q > p) for q in points) for p in points]
    return points[np.array(keep)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out=out, zoo="vision", tasks2=("rotated", "inverted"), tasks3=("rotated", "inverted", "mirrored_parity"),
             val_examples=100, moe_steps=5, progress=False)
    return out, json.loads((out / "report.json").read_text())


def test_demo_writes_report_and_plots(report):
    out, data = report
    for name in ("report.md", "front_T2.png", "front_T3.png", "cost_T2.png", "parity_T2.png"):
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# map_merge demo report") and "Vision zoo" in markdown
    for method in ("MAP", "Bayesian MAP", "qNEHVI", "TIES", "DARE", "PWE-MoE (LS)"):
        assert f"| {method} |" in markdown
    assert "nested merging" in data["experiments"]["T3"]["scores"]


def test_demo_scores_match_a_recomputation_from_its_raw_runs(report):
    _, data = report
    experiment = data["experiments"]["T2"]
    runs = {name: np.array(run["metrics"]) for name, run in experiment["runs"].items()}
    pooled = np.concatenate(list(runs.values()))
    assert len(pooled) == experiment["reference"]["pooled_evaluations"]
    reference = _non_dominated(pooled)
    ref_point = pooled.min(axis=0)
    np.testing.assert_allclose(experiment["reference"]["ref_point"], ref_point)
    assert {tuple(p) for p in reference} == {tuple(p) for p in experiment["reference"]["front"]}
    total = _hypervolume_2d(reference, ref_point)
    equal = np.full(2, 0.5)
    for name, metrics in runs.items():
        score = experiment["scores"][name]
        assert score["hv_ratio"] == pytest.approx(_hypervolume_2d(metrics, ref_point) / total, abs=1e-9), name
        best = (pooled @ equal).max() - (metrics @ equal).max()
        assert score["regret_equal_preference"] == pytest.approx(best, abs=1e-9), name
    # budgeted methods spent exactly the budget, and their metrics are real: re-evaluate MAP's first runs
    assert len(runs["MAP"]) == len(runs["Bayesian MAP"]) == experiment["budget_per_method"]
    from map_merge.zoo import load_vision_zoo

    zoo = load_vision_zoo(["rotated", "inverted", "mirrored_parity"], progress=False)
    objective = zoo.objective(["rotated", "inverted"], split=zoo.limit_split("val", 100), progress=False)
    inputs = np.array(experiment["runs"]["MAP"]["inputs"][:3])
    np.testing.assert_allclose(objective(inputs), runs["MAP"][:3], atol=1e-12)


def test_demo_on_the_tiny_language_model_zoo(tmp_path):
    """The default demo's path (the LM zoo, at its tiny size): held-out losses are minimised, the
    zoo table is written, and MAP's pick saved as a Hugging Face folder is the model evaluated in
    memory: lm-eval's own loader gives the same accuracies, and the folder loaded by transformers
    gives the report's test losses."""
    pytest.importorskip("lm_eval")
    import torch
    from transformers import AutoModelForCausalLM

    from map_merge.zoo import load_zoo

    out = tmp_path / "demo"
    run_demo(out=out, zoo="lm", tasks2=("code", "medical"), tasks3=(), moe_steps=5, progress=False, zoo_options={"size": "tiny"},
             skip=("Bayesian MAP", "qNEHVI", "DARE"))  # GP searches are covered on the vision zoo; seconds matter here
    data = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert "## Zoo (test split)" in markdown and "| CMA-ES |" in markdown and "| PWE-MoE (LS) |" in markdown
    assert [row["domain"] for row in data["zoo_table"]] == ["code", "medical"]
    experiment = data["experiments"]["T2"]
    assert experiment["senses"] == ["min", "min"]
    # regret on losses: the best equal-weight loss on the reference front is never beaten by a method
    assert all(score["regret_equal_preference"] >= -1e-12 for score in experiment["scores"].values())
    saved = experiment["saved_pick"]
    assert saved["lm_eval_from_folder"] == pytest.approx(saved["lm_eval_in_memory"], abs=1e-12)
    zoo = load_zoo("lm", ["code", "medical"], progress=False, size="tiny")
    model = AutoModelForCausalLM.from_pretrained(saved["folder"], dtype=torch.bfloat16).eval()
    losses = [zoo.loss(model, name, "test") for name in ("code", "medical")]
    assert losses == pytest.approx(experiment["equal_preference_test"]["MAP (surrogate pick)"], abs=1e-9)
    # the pick differs from the pretrained model: its test losses are not the base's
    base = [row["base_loss"] for row in data["zoo_table"][:2]]
    assert not np.allclose(losses, base)


def test_lm_zoo_table_cache_is_per_task_set(tmp_path):
    """The LM zoo table cached in a demo folder is reused only for the same zoo build and domains:
    a rerun on other domains in the same folder gets their table, not the earlier run's."""
    from types import SimpleNamespace

    from map_merge.demo import _lm_zoo_table

    calls = []

    def zoo_of(names):
        def table(split, lm_eval):
            calls.append(tuple(names))
            return [{"domain": n, "base_loss": 1.0} for n in names]

        return SimpleNamespace(info={"key": "k1"}, task_names=tuple(names), table=table)

    assert [r["domain"] for r in _lm_zoo_table(zoo_of(["code", "medical"]), tmp_path)] == ["code", "medical"]
    assert [r["domain"] for r in _lm_zoo_table(zoo_of(["code", "legal", "arithmetic"]), tmp_path)] == ["code", "legal", "arithmetic"]
    assert [r["domain"] for r in _lm_zoo_table(zoo_of(["code", "medical"]), tmp_path)] == ["code", "medical"]
    assert calls == [("code", "medical"), ("code", "legal", "arithmetic")]  # the third came from the cache
