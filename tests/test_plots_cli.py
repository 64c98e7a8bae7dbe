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
        ("zoo: audio\n", "field 'zoo' must be 'text' or 'vision'"),
        ("zoo: vision\nbounds: [1, 0]\n", "field 'bounds'"),
        ("zoo: vision\nacquisition: ucb\n", "field 'acquisition' must be one of"),
        ("zoo: vision\nmoe_steps: 0\n", "field 'moe_steps' must be a positive integer"),
        ("zoo: vision\npreference: [0, 0]\n", "field 'preference'"),
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
    assert result["num_evaluations"] == 12 and len(result["real_front"]["coeffs"]) == 10
    assert (tmp_path / "out" / "front.png").exists()
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    assert len(summary["coeffs"]) == 2 and summary["evaluations"] == 22
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
    assert json.loads((tmp_path / "out" / "result.json").read_text())["num_evaluations"] == 14
    capsys.readouterr()
    config.write_text(json.dumps({**base, "samples_per_stage": 6}))
    assert main(["nested", "--config", str(config)]) == 0
    nested = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(nested["stages"]) == 2 and len(nested["coeffs"]) == 3
    capsys.readouterr()
    config.write_text(json.dumps({**base, "moe_steps": 5, "tasks": tasks[:2], "preference": [3, 1]}))
    assert main(["moe", "--config", str(config)]) == 0
    summary = json.loads(capsys.readouterr().out.split("\npreference")[0])
    # the saved dense model is the MoE unloaded for the normalised preference (3/4, 1/4)
    zoo = load_vision_zoo(tasks[:2], progress=False)
    moe, _ = zoo.fit_moe(tasks[:2], steps=5, checkpoint=tmp_path / "out")
    expected = moe.unload([0.75, 0.25]).state_dict()
    saved = load_file(summary["saved"])
    assert set(saved) == set(expected) and all(np.allclose(saved[k].numpy(), expected[k].numpy()) for k in saved)
    config.write_text(json.dumps({**base, "preference": [1, 1]}))
    assert main(["nested", "--config", str(config)]) == 2  # two weights for three tasks
    assert "field 'preference' has 2 weights for 3 tasks" in capsys.readouterr().err
