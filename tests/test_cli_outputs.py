"""The command line on your own models: a loadable folder for the pick, outputs never replaced
without --overwrite, nothing created for a config error, counts that agree, and `save`."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from map_merge.cli import build_parser, main
from map_merge.config import FIELDS

_USER = '''
import os
import torch
from torch import nn

TARGETS = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}


def build():
    return nn.Linear(2, 1, bias=False)


def evaluate(model, task):
    with open(os.environ["MM_CALLS"], "a") as handle:  # one line per (model, task) evaluation
        handle.write(task + "\\n")
    w = model.weight.reshape(-1)
    return float(1.0 - ((w - TARGETS[task]) ** 2).sum())
'''


@pytest.fixture
def own(tmp_path, monkeypatch):
    import torch

    (tmp_path / "user.py").write_text(_USER)
    for name, w in {"base": [0.0, 0.0], "a": [1.0, 0.0], "b": [0.0, 1.0]}.items():
        save_file({"weight": torch.tensor([w])}, str(tmp_path / f"{name}.safetensors"))
    monkeypatch.setenv("MM_CALLS", str(tmp_path / "calls.txt"))
    fields = {"pretrained": "base.safetensors", "finetuned": {"a": "a.safetensors", "b": "b.safetensors"},
              "evaluator": "user.py:evaluate", "model": "user.py:build", "out": str(tmp_path / "out"), "num_samples": 8}
    config = tmp_path / "run.json"
    config.write_text(json.dumps(fields))
    return tmp_path, config, fields


def _summary(capsys):
    return json.loads(capsys.readouterr().out.split("\npreference")[0].split("\nwrote")[0])


def test_help_lists_every_config_field_and_the_data_format(capsys):
    with pytest.raises(SystemExit):
        main(["map", "--help"])
    text = capsys.readouterr().out
    missing = [field for field in FIELDS if f"{field}:" not in text]
    assert not missing, missing
    for key in ("kind: loss", "kind: lm_eval", '{"text":', ".jsonl", "--overwrite", "merged/"):
        assert key in text, key
    with pytest.raises(SystemExit):
        main(["save", "--help"])
    text = capsys.readouterr().out
    for key in ("--config", "--coeffs", "--preference", "--overwrite"):
        assert key in text, key


def test_counts_agree_and_outputs_need_overwrite(own, capsys):
    folder, config, _ = own
    assert main(["map", "--config", str(config)]) == 0
    summary = _summary(capsys)
    result = json.loads((folder / "out" / "result.json").read_text())
    assert result["summary"] == summary
    calls = (folder / "calls.txt").read_text().split()
    assert summary["models_evaluated"] * 2 == len(calls)  # two tasks per model, counted inside the evaluator
    used = np.concatenate([result["samples"]["coeffs"], result["real_front"]["coeffs"]])
    assert summary["evaluations"] == len(np.unique(used, axis=0)) == summary["models_evaluated"]
    assert summary["from_store"] == summary["samples"] + summary["reevaluated"] - summary["evaluations"]
    merged = load_file(str(folder / "out" / "merged" / "model.safetensors"))["weight"].numpy().reshape(-1)
    np.testing.assert_allclose(merged, summary["coeffs"], atol=1e-6)
    before = {p.name: p.read_bytes() for p in (folder / "out").iterdir() if p.is_file()}
    assert main(["nested", "--config", str(config)]) == 2
    assert "holds the results of an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (folder / "out").iterdir() if p.is_file()} == before
    # --overwrite replaces the results; the store answers every model already evaluated
    assert main(["map", "--config", str(config), "--overwrite"]) == 0
    again = _summary(capsys)
    assert again["models_evaluated"] == 0 and again["coeffs"] == summary["coeffs"]
    assert len((folder / "calls.txt").read_text().split()) == len(calls)


@pytest.mark.parametrize("fields, message", [
    ({"preference": [1, 2, 3]}, "field 'preference' has 3 weights for 2 tasks"),
    ({"model": "user.py:nothing"}, "has no callable 'nothing'"),
])
def test_a_config_error_creates_nothing(own, capsys, fields, message):
    folder, config, base = own
    config.write_text(json.dumps({**base, **fields}))
    assert main(["map", "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (folder / "out").exists() and not (folder / "calls.txt").exists()


@pytest.mark.parametrize("command, fields, message", [
    ("moe", {}, "field 'train_loss' is required by 'moe'"),  # was: found after the models loaded, out/ and a store left behind
    ("moe", {"train_loss": "user.py:evaluate", "upcycle": "mlp("}, "field 'upcycle'"),
    ("map", {"evaluator": "missing.py:evaluate"}, "field 'evaluator' names missing.py, which does not exist"),
])
def test_command_needs_are_checked_before_any_model_loads(own, capsys, monkeypatch, command, fields, message):
    import map_merge.config

    folder, config, base = own
    config.write_text(json.dumps({**base, **fields}))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was found")

    monkeypatch.setattr(map_merge.config, "build_task_vectors", no_loading)
    monkeypatch.setattr(map_merge.config, "_build_model", no_loading)
    assert main([command, "--config", str(config)]) == 2
    assert message in capsys.readouterr().err
    assert not (folder / "out").exists()


def test_save_never_replaces_the_run_s_own_files(own, capsys):
    """Not the config, its code or data, nor the evaluation store, even with --overwrite."""
    folder, config, base = own
    (folder / "out").mkdir()
    (folder / "out" / "evaluations.sqlite").write_bytes(b"hours of evaluations")
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for out, what in [(folder / "run.json", "is"), (folder / "user.py", "is"), (folder / "out", "holds")]:
        assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5", "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert f"it {what} {out.resolve() if what == 'is' else out.resolve() / 'evaluations.sqlite'}, an input of this run" in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert (folder / "out" / "evaluations.sqlite").read_bytes() == b"hours of evaluations"


def test_out_inside_a_source_is_refused(own, capsys, tmp_path):
    import shutil

    folder, config, base = own
    (folder / "base_dir").mkdir()
    shutil.copy(folder / "base.safetensors", folder / "base_dir" / "model.safetensors")
    config.write_text(json.dumps({**base, "pretrained": "base_dir", "out": str(folder / "base_dir" / "run")}))
    assert main(["map", "--config", str(config), "--overwrite"]) == 2
    assert "a source of these task vectors" in capsys.readouterr().err
    assert sorted(p.name for p in (folder / "base_dir").iterdir()) == ["model.safetensors"]


def test_save_for_coefficients_or_a_preference(own, capsys):
    folder, config, _ = own
    assert main(["save", "--config", str(config), "--coeffs", "0.25,0.5"]) == 0
    saved = load_file(str(folder / "out" / "merged" / "model.safetensors"))["weight"].numpy().reshape(-1)
    np.testing.assert_allclose(saved, [0.25, 0.5], atol=1e-7)
    assert json.loads((folder / "out" / "merged" / "map_merge.json").read_text())["coefficients"] == {"a": 0.25, "b": 0.5}
    assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5"]) == 2  # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["save", "--config", str(config), "--preference", "1,3", "--out", str(folder / "pick")]) == 2
    assert "does not exist" in capsys.readouterr().err  # no finished run yet
    assert main(["map", "--config", str(config), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["save", "--config", str(config), "--preference", "1,3", "--out", str(folder / "pick")]) == 0
    pick = load_file(str(folder / "pick" / "model.safetensors"))["weight"].numpy().reshape(-1)
    np.testing.assert_allclose(pick, [0.25, 0.75], atol=0.05)  # the analytic optimum p / sum(p)
    assert main(["save", "--config", str(config), "--coeffs", "1", "--overwrite"]) == 2
    assert "expected 2 coefficients" in capsys.readouterr().err


def test_groups_in_a_config(own, capsys):
    folder, config, base = own
    config.write_text(json.dumps({**base, "groups": {"w": "weight"}, "num_samples": 8}))
    assert main(["map", "--config", str(config)]) == 0
    summary = _summary(capsys)
    merged = load_file(str(folder / "out" / "merged" / "model.safetensors"))["weight"].numpy().reshape(-1)
    np.testing.assert_allclose(merged, summary["coeffs"], atol=1e-6)  # one group: the ungrouped merge
    meta = json.loads((folder / "out" / "merged" / "map_merge.json").read_text())
    assert set(meta["coefficients"]) == {"a/w", "b/w"} and meta["groups"] == {"patterns": {"w": "weight"}}
    config.write_text(json.dumps({**base, "groups": {"b": "bias"}, "out": str(folder / "out2")}))
    assert main(["map", "--config", str(config)]) == 2
    assert "match no group" in capsys.readouterr().err and not (folder / "out2").exists()
    config.write_text(json.dumps({**base, "groups": {"knots": 0}}))
    assert main(["map", "--config", str(config)]) == 2
    assert "field 'groups'" in capsys.readouterr().err
