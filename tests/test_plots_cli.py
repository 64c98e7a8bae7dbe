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
    result = json.loads((tmp_path / "out" / "map_result.json").read_text())
    assert result["num_evaluations"] == 12 and len(result["real_front"]["coeffs"]) == 10
    assert (tmp_path / "out" / "front.png").exists()
    assert "coefficients" in capsys.readouterr().out
    assert main(["map", "--config", str(tmp_path / "missing.yaml")]) == 2
    with pytest.raises(SystemExit):
        main(["--help"])
