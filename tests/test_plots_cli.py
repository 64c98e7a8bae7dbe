import json

import numpy as np
import pytest
from conftest import quadratic_pair, quadratic_three

import map_merge as mm
from map_merge import plots
from map_merge.cli import ConfigError, load_config, main


def test_plots_write_pngs(tmp_path):
    obj = mm.FunctionObjective(quadratic_pair, 2, ["a", "b"])
    result = mm.MAP(link="identity").fit(obj, 2)
    result.reevaluate(obj, max_points=8)
    figs = [
        plots.plot_front_2d({"pred": result.front, "real": result.real_front}, samples=result.samples.metrics,
                            reference=quadratic_pair(np.random.default_rng(0).uniform(size=(50, 2))), path=tmp_path / "f.png"),
        plots.plot_parity(result, path=tmp_path / "p.png"),
        plots.plot_landscape(result, path=tmp_path / "l.png"),
    ]
    obj3 = mm.FunctionObjective(quadratic_three, 3, ["a", "b", "c"])
    r3 = mm.MAP(link="identity").fit(obj3, 3)
    figs.append(plots.plot_pairwise({"pred": r3.front}, r3.task_names, path=tmp_path / "pw.png"))
    figs.append(plots.plot_parallel(r3.front, highlight=[0], path=tmp_path / "pc.png"))
    for name in ["f", "p", "l", "pw", "pc"]:
        data = (tmp_path / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert all(len(f.axes) >= 1 for f in figs)


@pytest.mark.parametrize(
    "text, message",
    [
        ("zoo: vision\nnum_samples: many\n", "field 'num_samples' must be a int"),
        ("zoo: vision\ncoefs: [1]\n", "unknown field 'coefs'"),
        ("zoo: audio\n", r"field 'zoo' must be one of \['lm', 'text', 'vision'\]"),
        ("zoo: vision\nbounds: [1, 0]\n", "field 'bounds'"),
        ("zoo: vision\nacquisition: ucb\n", "field 'acquisition' must be one of"),
        ("zoo: vision\nmoe_steps: 0\n", "field 'moe_steps' must be a positive integer"),
        ("zoo: vision\npreference: [0, 0]\n", "field 'preference'"),
        ("zoo: vision\nbudget: 12\nnum_samples: 16\n", "field 'num_samples' is the older name of budget; they disagree"),
    ],
)
def test_config_errors_name_the_field(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_cli_map_on_vision_zoo(tmp_path, monkeypatch, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"zoo": "vision", "tasks": ["rotated", "mirrored_parity"], "out": str(tmp_path / "out"), "preference": [1, 1]}))
    assert main(["map", "--config", str(config)]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    # budget (default (T+1)(T+2) = 12) is the total: the average merge (T = 2), the experts and Sobol points,
    # proposals, and last the model's pick for the config's preference
    assert result["num_evaluations"] == 12 and "real_front" not in result
    assert result["settings"]["sampling"] == "adaptive" and result["settings"]["final"] == 1
    np.testing.assert_allclose(result["samples"]["coeffs"][:3], [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    assert (tmp_path / "out" / "front.png").exists()
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    assert summary == result["summary"]  # what is printed is what is written
    used = np.array(result["samples"]["coeffs"])
    assert len(summary["coeffs"]) == 2 and summary["evaluations"] == len(np.unique(used, axis=0)) == summary["models_evaluated"] == 12
    assert main(["map", "--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        main(["--help"])


def test_cli_bayes_nested_moe_on_vision_zoo(tmp_path, capsys):
    from safetensors.torch import load_file

    from map_merge.zoo import load_vision_zoo

    tasks = ["rotated", "inverted", "mirrored_parity"]
    base = {"zoo": "vision", "tasks": tasks, "out": str(tmp_path / "out"), "preference": [1, 1, 2]}
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**base, "budget": 14}))
    assert main(["bayes", "--config", str(config)]) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["num_evaluations"] == 14  # budget: the total
    capsys.readouterr()
    config.write_text(json.dumps({**base, "samples_per_stage": 6}))
    assert main(["nested", "--config", str(config)]) == 2  # the earlier run's results are kept ...
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["nested", "--config", str(config), "--overwrite"]) == 0  # ... unless replaced on purpose
    nested = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(nested["stages"]) == 2 and len(nested["coeffs"]) == 3
    # every stage's model is counted (the stages evaluate on subset objectives, not the run's own)
    counts = nested["summary"]
    assert counts["models_evaluated"] > 0 and counts["models_evaluated"] + counts["from_store"] == counts["evaluations"]
    capsys.readouterr()
    config.write_text(json.dumps({**base, "moe_steps": 5, "tasks": tasks[:2], "preference": [3, 1]}))
    assert main(["moe", "--config", str(config), "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    # the saved dense model is the MoE unloaded for the normalised preference (3/4, 1/4)
    zoo = load_vision_zoo(tasks[:2], progress=False)
    moe, _ = zoo.fit_moe(tasks[:2], steps=5, checkpoint=tmp_path / "out")
    expected = moe.unload([0.75, 0.25]).state_dict()
    saved = load_file(f"{summary['saved']}/model.safetensors")
    assert set(saved) == set(expected) and all(np.allclose(saved[k].numpy(), expected[k].numpy()) for k in saved)
    config.write_text(json.dumps({**base, "preference": [1, 1]}))
    assert main(["nested", "--config", str(config)]) == 2  # two weights for three tasks
    assert "field 'preference' has 2 weights for 3 tasks" in capsys.readouterr().err


_USER_CODE = '''
import torch
from torch import nn

TARGETS = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}


def build():
    return nn.Linear(2, 1, bias=False)


def evaluate(model, task):
    # exactly quadratic in the merged weight w = (c_a, c_b): 1 - |w - target|^2
    w = model.weight.reshape(-1)
    return float(1.0 - ((w - TARGETS[task]) ** 2).sum())


def loss(model, task):
    return 1.0 - evaluate(model, task)


def train_loss(model, task):
    # the same quadratic, through the model's forward (as PWE-MoE needs): |model(I) - target|^2
    return ((model(torch.eye(2)).reshape(-1) - TARGETS[task]) ** 2).sum()


def float_loss(model, task):
    return float(train_loss(model, task))
'''


def _own_models(folder):
    import torch
    from safetensors.torch import save_file

    (folder / "user.py").write_text(_USER_CODE)
    for name, w in {"base": [0.0, 0.0], "a": [1.0, 0.0], "b": [0.0, 1.0]}.items():
        save_file({"weight": torch.tensor([w])}, str(folder / f"{name}.safetensors"))
    return {"pretrained": "base.safetensors", "finetuned": {"a": "a.safetensors", "b": "b.safetensors"},
            "evaluator": "user.py:evaluate", "model": "user.py:build"}


@pytest.mark.parametrize(
    "command, preference, expected, extra",
    [("map", [1, 1], [0.5, 0.5], {}), ("nested", [3, 1], [0.75, 0.25], {}),
     ("map", [1, 3], [0.25, 0.75], {"evaluator": "user.py:loss", "sense": "min"}),
     ("nested", [3, 1], [0.75, 0.25], {"evaluator": "user.py:loss", "sense": "min"})],
)
def test_cli_on_own_models_finds_the_analytic_optimum(tmp_path, capsys, command, preference, expected, extra):
    from safetensors.torch import load_file

    # preference p: maximise p_a (1 - (c_a-1)^2 - c_b^2) + p_b (1 - c_a^2 - (c_b-1)^2)  =>  c = p / sum(p)
    # (the same with the loss 1 - score minimised)
    config = tmp_path / "run.yaml"
    fields = {**_own_models(tmp_path), "out": str(tmp_path / "out"), "preference": preference, **extra}
    config.write_text(json.dumps(fields))  # JSON is valid YAML
    assert main([command, "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0].split("\nwrote")[0])
    np.testing.assert_allclose(summary["coeffs"], expected, atol=0.03)
    saved = load_file(f"{summary['saved']}/model.safetensors")["weight"].numpy().reshape(-1)
    np.testing.assert_allclose(saved, summary["coeffs"], atol=1e-6)  # the saved model is the merge of the pick
    assert (tmp_path / "out" / "evaluations.sqlite").exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"evaluator": None}, "field 'evaluator' is required"),
        ({"finetuned": {"a": "a.safetensors", "b": "nowhere.safetensors"}}, "field 'finetuned.b' points to 'nowhere.safetensors', which does not exist"),
        ({"zoo": "vision"}, "field 'pretrained' belongs to a run on your own models"),
        ({"moe_steps": 10}, "field 'moe_steps' needs 'train_loss'"),
        ({"upcycle": "all"}, "field 'upcycle' needs 'train_loss'"),
        ({"train_loss": "user.loss"}, "field 'train_loss' must be 'module:function'"),
        ({"tasks": ["a", "c"]}, r"field 'tasks' names \['c'\]"),
        ({"evaluator": "user.evaluate"}, "field 'evaluator' must be 'module:function'"),
        ({"sense": "up"}, "field 'sense' must be one of"),
    ],
)
def test_own_model_config_errors_name_the_field(tmp_path, fields, message):
    config = {**_own_models(tmp_path), **fields}
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def _segment_point(preference, method):
    """Ground truth: the routed weight w = (t, 1 - t) for preference r. Task i's training loss is
    |w - e_i|^2; linear scalarisation minimises sum_i r_i L_i (t = r_1), EPO balances r_1 L_1 =
    r_2 L_2 on the Pareto segment (t = sqrt(r_1) / (sqrt(r_1) + sqrt(r_2)))."""
    r = np.asarray(preference, dtype=float) / np.sum(preference, axis=-1, keepdims=True)
    t = r[..., 0] if method == "ls" else np.sqrt(r[..., 0]) / (np.sqrt(r[..., 0]) + np.sqrt(r[..., 1]))
    return np.stack([t, 1 - t], -1)


@pytest.mark.parametrize("method", ["ls", "epo"])
def test_cli_moe_on_own_models_routes_to_the_analytic_optimum(tmp_path, capsys, method):
    from safetensors.torch import load_file

    config = tmp_path / "run.json"
    fields = {**_own_models(tmp_path), "out": str(tmp_path / "out"), "preference": [3, 1], "train_loss": "user.py:train_loss",
              "upcycle": "all", "moe_steps": 1000, "moe_method": method}
    config.write_text(json.dumps(fields))
    assert main(["moe", "--config", str(config), "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    # the saved dense model for [3, 1]: LS w = (0.75, 0.25), EPO w = (0.634, 0.366)
    np.testing.assert_allclose(load_file(f"{summary['saved']}/model.safetensors")["weight"].numpy().reshape(-1),
                               _segment_point([3, 1], method), atol=0.05)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    # the unloaded front, scored by the evaluator 1 - |w - e_i|^2 (the routers see the simplex's
    # corners rarely, so the test holds them to interior preferences)
    prefs, metrics = np.array(result["preferences"]), np.array(result["metrics"])
    inner = prefs.min(axis=1) > 0.05
    w = _segment_point(prefs[inner], method)
    truth = 1.0 - np.stack([((w - np.eye(2)[i]) ** 2).sum(-1) for i in range(2)], -1)
    np.testing.assert_allclose(metrics[inner], truth, atol=0.08)
    # a second run reuses the trained routers
    assert main(["moe", "--config", str(config), "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.split("\npreference")[0])["fit"]["cached"] is True


def test_own_model_moe_needs_a_differentiable_train_loss(tmp_path, capsys):
    fields = {**_own_models(tmp_path), "out": str(tmp_path / "out"), "upcycle": "all", "moe_steps": 3}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(fields))
    with pytest.raises(ConfigError, match="field 'moe_steps' needs 'train_loss'"):
        load_config(path)
    path.write_text(json.dumps({**fields, "train_loss": "user.py:float_loss"}))
    assert main(["moe", "--config", str(path)]) == 2
    assert "training loss of task 'a' must be a scalar torch.Tensor, got float" in capsys.readouterr().err
    path.write_text(json.dumps({k: v for k, v in fields.items() if k not in ("upcycle", "moe_steps")}))
    assert main(["moe", "--config", str(path)]) == 2
    assert "field 'train_loss' is required by 'moe'" in capsys.readouterr().err
    path.write_text(json.dumps({**fields, "train_loss": "user.py:train_loss", "upcycle": "mlp"}))
    assert main(["moe", "--config", str(path)]) == 2
    assert "field 'upcycle' ('mlp'): no transformer MLP blocks recognised in Linear" in capsys.readouterr().err


def test_own_model_evaluator_that_does_not_exist_is_reported(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**_own_models(tmp_path), "evaluator": "user.py:score"}))
    assert main(["map", "--config", str(path)]) == 2
    assert "has no callable 'score'" in capsys.readouterr().err


def test_front_lines_follow_the_metrics_senses():
    """A front of losses is drawn through its lowest points, an array's through the senses given."""
    from map_merge.pareto import ParetoFront

    points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [3.0, 3.0], [2.5, 2.5]])  # (3, 3) is the worst, (2.5, 2.5) dominated
    losses = ParetoFront(np.zeros((5, 2)), points, ["a", "b"], ("min", "min"))
    for fronts, senses in (({"losses": losses}, None), ({"losses": points}, ["min", "min"]), ({"scores": points}, None)):
        fig = plots.plot_front_2d(fronts, lines={k: True for k in fronts}, senses=senses)
        line = fig.axes[0].get_lines()[0]
        drawn = np.column_stack([line.get_xdata(), line.get_ydata()])
        expected = points[:3] if senses or isinstance(next(iter(fronts.values())), ParetoFront) else points[[3]]
        np.testing.assert_array_equal(drawn, expected)
