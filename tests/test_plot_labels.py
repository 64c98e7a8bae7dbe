"""Plots read on their own: each plot kind rendered at a tiny setting and checked through
matplotlib's objects (axis labels, legend entries, artists' positions, limits, z-order), never pixels."""

import json

import matplotlib
import numpy as np
import pytest
import torch
from conftest import TinyNet, quadratic_pair, quadratic_three

matplotlib.use("Agg")

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402
from map_merge.metric_labels import MetricLabel, axis_label, resolve_labels  # noqa: E402
from map_merge.plot_marks import Mark, pick_mark  # noqa: E402

LOSS = [MetricLabel(n, "held-out loss", "nats/token", "min") for n in ("code", "medical", "legal")]


def _losses2(c):
    return 1.0 - quadratic_pair(c)  # losses: lower is better


def _losses3(c):
    return 1.0 - quadratic_three(c)


def _legend_texts(fig) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _offsets_of(ax, label: str) -> np.ndarray:
    found = [c for c in ax.collections if c.get_label() == label]
    assert len(found) == 1, f"no single artist labelled {label!r}: {[c.get_label() for c in ax.collections]}"
    return np.asarray(found[0].get_offsets())


def _inside(ax, point) -> bool:
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    return x0 < point[0] < x1 and y0 < point[1] < y1


@pytest.fixture(scope="module")
def map2():
    objective = mm.FunctionObjective(_losses2, 2, ["code", "medical"], senses=["min", "min"])
    result = mm.MAP(link="identity", seed=0, final_model="quadratic", max_front_points=200).fit(objective, 2)
    result.reevaluate(objective, max_points=5)
    return result


@pytest.fixture(scope="module")
def map3():
    objective = mm.FunctionObjective(_losses3, 3, ["code", "medical", "legal"], senses=["min"] * 3)
    result = mm.MAP(link="identity", seed=0, final_model="quadratic", max_front_points=200).fit(objective, 3)
    result.reevaluate(objective, max_points=5)
    return result


def test_axis_label_names_task_metric_unit_and_direction():
    assert axis_label("code", metric="held-out loss", unit="nats/token", sense="min") == "code: held-out loss (nats/token), lower is better"
    assert axis_label("arc", "lm-eval accuracy", None, "max") == "arc: lm-eval accuracy, higher is better"
    assert axis_label("a") == "a" and MetricLabel("a", sense="max").axis == "a, higher is better"
    filled = resolve_labels(2, [MetricLabel("a", "accuracy"), "b"], senses=["max", "min"])  # a label without a sense takes the plot's
    assert [lab.axis for lab in filled] == ["a: accuracy, higher is better", "b, lower is better"]
    with pytest.raises(ValueError, match="sense must be 'max' or 'min'"):
        MetricLabel("a", sense="up")


def test_objectives_expose_their_metric_labels(tiny_models):
    class Tokenizer:  # what HeldOutLoss / Classification call: tokenizer(texts, ...) -> input ids (+ mask)
        def __call__(self, texts, **options):
            ids = [[1 + (ord(ch) % 4) for ch in t] for t in texts]
            if options.get("return_tensors") == "pt":
                return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), len(ids[0]), dtype=torch.long)}
            return {"input_ids": ids}

    base, fts = tiny_models
    tv = mm.TaskVectors.from_models(base, fts)
    tasks = {"code": mm.HeldOutLoss(["abcd", "bcda"], Tokenizer()),
             "ppl": mm.HeldOutLoss(["abcd"], Tokenizer(), perplexity=True),
             "topic": mm.Classification(["abc", "cba"], [0, 1], Tokenizer(), torch.nn.Linear(3, 2)),
             "topic_ce": mm.Classification(["abc", "cba"], [0, 1], Tokenizer(), torch.nn.Linear(3, 2), metric="loss"),
             "own": mm.Task(lambda m: 0.0, sense="min", metric_name="distance", metric_unit="m"),
             "bare": lambda m: 0.0}
    objective = mm.ModelObjective(TinyNet(), tv, tasks, progress=False)
    assert [lab.axis for lab in objective.metric_labels] == [
        "code: held-out loss (nats/token), lower is better", "ppl: held-out perplexity, lower is better",
        "topic: accuracy, higher is better", "topic_ce: cross-entropy (nats), lower is better", "own: distance (m), lower is better",
        "bare, higher is better"]
    assert [lab.axis for lab in objective.for_tasks(["topic"]).metric_labels] == ["topic: accuracy, higher is better"]
    function = mm.FunctionObjective(_losses2, 2, ["a", "b"], senses=["min", "max"])
    assert [lab.axis for lab in function.metric_labels] == ["a, lower is better", "b, higher is better"]
    lm_eval = mm.LMEvalTask.__new__(mm.LMEvalTask)  # its metric is read from lm-eval at construction; the label from the metric
    lm_eval.metric = "acc"
    assert (lm_eval.metric_name, lm_eval.metric_unit) == ("lm-eval accuracy", None)
    lm_eval.metric = "bits_per_byte"
    assert (lm_eval.metric_name, lm_eval.metric_unit) == ("lm-eval bits per byte", "bits/byte")


def test_front_2d_names_metrics_marks_pick_and_recipe_and_zooms_inside(map2):
    pick = pick_mark(map2.front, [1, 1], "MAP pick (predicted)")
    recipe_coeffs = np.array([0.4, 1.6])  # outside the searched box [0, 1]
    recipe = _losses2(recipe_coeffs)[0] + 0.3  # and its metrics far from the front
    grid = _losses2(np.stack(np.meshgrid(np.linspace(0, 1, 6), np.linspace(0, 1, 6)), -1).reshape(-1, 2))
    reference = grid[mm.pareto_mask(-grid)]
    fig = plots.plot_front_2d({"MAP predicted": map2.front, "MAP real": map2.real_front, "grid": grid}, reference=reference[np.argsort(reference[:, 0])],
                              labels=LOSS[:2], pick=pick, marks={"your recipe": Mark(recipe, recipe_coeffs)}, zoom=True)
    main, zoomed = fig.axes
    for ax in (main, zoomed):
        assert ax.get_xlabel() == "code: held-out loss (nats/token), lower is better"
        assert ax.get_ylabel() == "medical: held-out loss (nats/token), lower is better"
    texts = _legend_texts(fig)
    assert "MAP pick (predicted), preference (1, 1) (c = " in texts[-2] and texts[-1] == "your recipe (c = 0.4, 1.6)"
    assert {"MAP predicted", "MAP real", "grid", "reference front (dense grid)"} <= set(texts)
    index = map2.front.select_index([1, 1])
    np.testing.assert_allclose(_offsets_of(main, texts[-2]), map2.front.metrics[index][None])  # the star sits on the pick
    assert _inside(main, recipe) and _inside(main, pick.metrics[0])
    (x0, x1), (y0, y1) = main.get_xlim(), main.get_ylim()
    (u0, u1), (v0, v1) = zoomed.get_xlim(), zoomed.get_ylim()
    assert x0 < u0 < u1 < x1 and y0 < v0 < v1 < y1  # the zoom zooms
    real = [a.get_zorder() for a in main.get_children() if a.get_label() in ("MAP real", "grid")]
    predicted = [a.get_zorder() for a in main.get_children() if a.get_label() == "MAP predicted"]
    assert real and predicted and min(real) > max(predicted)


def test_front_2d_old_call_reads_direction_from_the_front(map2):
    fig = plots.plot_front_2d({"pred": map2.front, "real": map2.real_front})  # the old signature: task names and senses from the front
    ax = fig.axes[0]
    assert ax.get_xlabel() == "code, lower is better" and ax.get_ylabel() == "medical, lower is better"


def test_pairwise_three_tasks_has_one_full_panel_per_pair_reals_above_the_cloud(map3):
    pick = pick_mark(map3.front, [1, 1, 1], "MAP pick (predicted)")
    recipe = _losses3(np.array([0.4, 1.0, 1.6]))[0]
    fig = plots.plot_pairwise({"MAP predicted": map3.front, "MAP samples": map3.samples.metrics}, labels=LOSS,
                              pick=pick, marks={"your recipe": recipe})
    grid = fig.axes[0].get_subplotspec().get_gridspec()
    assert len(fig.axes) == 3 and (grid.nrows, grid.ncols) == (1, 3)  # three pairs, three panels in a row: no empty slot
    pairs = [(0, 1), (0, 2), (1, 2)]
    for ax, (i, j) in zip(fig.axes, pairs):
        assert ax.collections and ax.get_xlabel() == f"{LOSS[i].task}: held-out loss (nats/token)\nlower is better"
        assert ax.get_ylabel() == f"{LOSS[j].task}: held-out loss (nats/token)\nlower is better"
        assert _offsets_of(ax, "MAP samples").shape == (len(map3.samples), 2)
        assert _offsets_of(ax, "MAP predicted").shape == (len(map3.front), 2)
        assert _inside(ax, recipe[[i, j]]) and _inside(ax, pick.metrics[0, [i, j]])
        np.testing.assert_allclose(_offsets_of(ax, pick.legend()), pick.metrics[:, [i, j]])
        zorder = {c.get_label(): c.get_zorder() for c in ax.collections}
        assert zorder["MAP samples"] > zorder["MAP predicted"] and zorder[pick.legend()] > zorder["MAP samples"]
    assert {"MAP predicted", "MAP samples", pick.legend(), "your recipe"} <= set(_legend_texts(fig))


def test_front_3d_labels_every_axis_and_draws_reals_above_the_cloud(map3):
    pick = pick_mark(map3.front, [1, 1, 1], "pick")
    fig = plots.plot_front_3d({"MAP predicted": map3.front, "MAP real": map3.real_front}, labels=LOSS, pick=pick)
    ax = fig.axes[0]
    assert not ax.computed_zorder  # zorder is honoured, not recomputed from depth
    for get in (ax.get_xlabel, ax.get_ylabel, ax.get_zlabel):
        assert "held-out loss (nats/token)" in get() and "lower is better" in get()
    zorder = {c.get_label(): c.get_zorder() for c in ax.collections}
    assert zorder["MAP real"] > zorder["MAP predicted"]
    assert {"MAP predicted", "MAP real", pick.legend()} <= set(_legend_texts(fig))


def test_parallel_labels_every_line_and_says_the_direction_per_axis(map3):
    pick = pick_mark(map3.front, [1, 1, 1], "MAP pick (predicted)")
    recipe = _losses3(np.array([0.4, 1.0, 1.6]))[0]
    fig = plots.plot_parallel(map3.front, highlight=[0], labels=LOSS, pick=pick, marks={"your recipe": recipe}, max_lines=40)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) == 3 and all("held-out loss (nats/token)" in t and "lower is better" in t for t in ticks)
    texts = _legend_texts(fig)
    assert pick.legend() in texts and "your recipe" in texts and any(t.startswith("front points (") for t in texts)
    assert any(t.startswith("front point 0 (c = ") for t in texts)
    entries = {(line.get_label(), matplotlib.colors.to_hex(line.get_color())) for line in ax.lines}
    legend_colors = {matplotlib.colors.to_hex(line.get_color()) for line in ax.lines if line.get_label() in texts}
    for label, color in entries:  # every line has an entry: its own, or its family's (the front's many thin lines)
        assert label in texts or (label.startswith("_") and color in legend_colors), label
    # the pick's line: the top (1) is the front's best, lower losses drawn higher
    best, worst = map3.front.metrics.min(axis=0), map3.front.metrics.max(axis=0)
    line = next(line for line in ax.lines if line.get_label() == pick.legend())
    np.testing.assert_allclose(line.get_ydata(), (worst - pick.metrics[0]) / (worst - best))


def test_parity_and_landscape_name_the_metric_and_place_the_marks(map2):
    fig = plots.plot_parity(map2, labels=LOSS[:2])
    assert [ax.get_xlabel() for ax in fig.axes] == ["measured held-out loss (nats/token)"] * 2
    assert [ax.get_ylabel() for ax in fig.axes] == ["predicted held-out loss (nats/token)"] * 2
    assert "predicted = measured" in _legend_texts(fig)
    recipe = Mark(_losses2(np.array([0.4, 1.6]))[0], [0.4, 1.6], "your recipe")
    pick = pick_mark(map2.front, [1, 1], "pick")
    fig = plots.plot_landscape(map2, labels=LOSS[:2], pick=pick, marks={"your recipe": recipe}, resolution=8)
    ax, colorbar = fig.axes
    assert colorbar.get_ylabel() == "predicted code: held-out loss (nats/token), lower is better"
    assert _inside(ax, [0.4, 1.6])  # outside the searched box, still on the figure
    np.testing.assert_allclose(_offsets_of(ax, pick.legend()), pick.coeffs[None])
    assert {"samples", pick.legend(), recipe.legend(), "searched box [0, 1]"} <= set(_legend_texts(fig))


_EVAL = '''
def evaluate(model, task):
    target = {"code": 1.05, "chat": 0.95}[task]
    return float(((model.model.norm.weight.float() - target) ** 2).mean())
'''


def test_cli_front_marks_the_pick_and_a_recipe_outside_the_box(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    yaml = pytest.importorskip("yaml")
    from map_merge.cli import main

    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    for name, seed in (("code", 1), ("chat", 2)):
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        with torch.no_grad():
            model.model.norm.weight.add_(0.05 * torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        model.save_pretrained(tmp_path / name)
    (tmp_path / "user.py").write_text(_EVAL)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
        "models": [{"model": str(tmp_path / "code"), "parameters": {"weight": 0.4}}, {"model": str(tmp_path / "chat"), "parameters": {"weight": 1.6}}]}))
    (tmp_path / "run.json").write_text(json.dumps({"evaluator": "user.py:evaluate", "sense": "min", "out": str(tmp_path / "out"),
                                                   "num_samples": 8, "link": "identity", "preference": [1, 1]}))
    drawn = []
    original = plots.plot_front_2d
    monkeypatch.setattr(plots, "plot_front_2d", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    assert main(["map", "--config", str(tmp_path / "run.json"), "--mergekit", str(tmp_path / "recipe.yaml")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["samples"]["coeffs"][0] == [0.4, 1.6]  # the recipe, evaluated first
    recipe = np.array(result["samples"]["metrics"][0])
    ax = drawn[0].axes[0]
    assert ax.get_xlabel() == "code, lower is better" and ax.get_ylabel() == "chat, lower is better"
    texts = _legend_texts(drawn[0])
    # the pick: a predicted point, or a real evaluation that beats every prediction less one std (labelled so)
    assert "your recipe (evaluated) (c = 0.4, 1.6)" in texts and any(t.startswith(("your pick (predicted), preference (1, 1)",
                                                                                   "your pick (real evaluation), preference (1, 1)")) for t in texts)
    np.testing.assert_allclose(_offsets_of(ax, "your recipe (evaluated) (c = 0.4, 1.6)"), recipe[None])
    assert _inside(ax, recipe)


def test_zoom_frames_the_pick_when_the_reference_front_spans_the_whole_plot():
    """A quarter circle from (0, 1) to (1, 0) spans the main panel; the pick sits at its middle:
    the zoom frames the arc near the pick (within a quarter of the front's range), so each of its
    axes is at most about half the main panel's."""
    angle = np.linspace(0, np.pi / 2, 200)
    reference = np.column_stack([1 - np.cos(angle), 1 - np.sin(angle)])  # losses: lower is better, convex front
    middle = reference[100]
    pick = Mark(middle[None], np.array([0.5, 0.5]), "pick")
    fig = plots.plot_front_2d({"front": reference}, reference=reference, labels=LOSS[:2], pick=pick, zoom=True)
    main, zoomed = fig.axes
    (x0, x1), (y0, y1) = main.get_xlim(), main.get_ylim()
    (u0, u1), (v0, v1) = zoomed.get_xlim(), zoomed.get_ylim()
    assert u0 < middle[0] < u1 and v0 < middle[1] < v1  # the pick is in view
    assert (u1 - u0) < 0.55 * (x1 - x0) and (v1 - v0) < 0.55 * (y1 - y0)  # and the zoom zooms
