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
    # two tasks per model, counted inside the evaluator: the run's models and the report's (outside the budget)
    assert (summary["models_evaluated"] + summary["report"]["models_evaluated"]) * 2 == len(calls)
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


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_what_map_merge_did_not_write(own, capsys, monkeypatch):
    """`save --out DIR --overwrite` refuses a folder of someone else's files, another run's output
    folder and the run's own default store (no 'out' in the config); `map --overwrite` keeps the
    files in 'out' it did not write and refuses to replace a result.json it did not write."""
    folder, config, base = own
    monkeypatch.chdir(folder)
    default = folder / "default.json"  # no 'out': outputs/map, relative to the working directory
    default.write_text(json.dumps({k: v for k, v in base.items() if k != "out"}))
    assert main(["map", "--config", str(default)]) == 0
    capsys.readouterr()
    run = _files(folder / "outputs" / "map")
    assert "evaluations.sqlite" in run and "result.json" in run and "front.png" in run
    (folder / "precious" / "sub").mkdir(parents=True)
    (folder / "precious" / "notes.txt").write_text("hi")
    for cfg, out, message in [(default, "outputs/map", "holds"), (config, "outputs/map", "the output folder of a command line run"),
                              (config, "precious", "map_merge did not write")]:
        assert main(["save", "--config", str(cfg), "--coeffs", "0.5,0.5", "--out", out, "--overwrite"]) == 2
        assert message in capsys.readouterr().err
    assert _files(folder / "outputs" / "map") == run
    assert (folder / "precious" / "notes.txt").read_text() == "hi" and (folder / "precious" / "sub").is_dir()
    # the run's own folder: foreign files are kept, a foreign result is not replaced
    (folder / "outputs" / "map" / "notes.txt").write_text("mine")
    assert main(["map", "--config", str(default), "--overwrite"]) == 0
    assert (folder / "outputs" / "map" / "notes.txt").read_text() == "mine"
    (folder / "out").mkdir()
    (folder / "out" / "result.json").write_text('{"mine": true}')
    assert main(["map", "--config", str(config), "--overwrite"]) == 2
    assert "map_merge did not write it" in capsys.readouterr().err
    assert (folder / "out" / "result.json").read_text() == '{"mine": true}'


_STOPPING = '''
import os
import torch
from torch import nn

CALLS = []


def build():
    return nn.Linear(2, 1, bias=False)


def evaluate(model, task):
    CALLS.append(task)
    if len(CALLS) > int(os.environ["MM_STOP_AFTER"]):
        raise KeyboardInterrupt  # the user's Ctrl-C, in the middle of an evaluation
    return float(-(model.weight.reshape(-1) ** 2).sum())
'''


def test_ctrl_c_reports_the_stored_evaluations_and_how_to_resume(own, capsys, monkeypatch):
    folder, config, base = own
    (folder / "stopping.py").write_text(_STOPPING)
    config.write_text(json.dumps({**base, "evaluator": "stopping.py:evaluate", "model": "stopping.py:build"}))
    monkeypatch.setenv("MM_STOP_AFTER", "4")  # two models of two tasks, then Ctrl-C
    try:
        code = main(["map", "--config", str(config)])
    except KeyboardInterrupt:
        pytest.fail("a raw KeyboardInterrupt (a traceback) escaped map-merge")
    err = capsys.readouterr().err
    assert code == 130
    assert f"evaluation store {folder / 'out' / 'evaluations.sqlite'} keeps 4 task evaluation(s)" in err, err
    assert f"map-merge map --config {config}" in err and "Traceback" not in err
    monkeypatch.setenv("MM_STOP_AFTER", "1000000")
    assert main(["map", "--config", str(config)]) == 0  # the same command resumes
    assert _summary(capsys)["from_store"] >= 2
    # a save interrupted while writing: nothing left behind
    import map_merge.task_vectors.base as tv_base

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tv_base, "write_safetensors", interrupted)
    assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5", "--out", str(folder / "pick.safetensors")]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not (folder / "pick.safetensors").exists() and not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_ctrl_c_after_the_save_says_the_model_was_saved(own, capsys, monkeypatch):
    """save prints its report block after the model is written (an evaluation: minutes for a
    language model); a Ctrl-C then must not claim that nothing was written (the user would save
    again and meet 'already exists'): it names the saved folder."""
    folder, config, _ = own
    import map_merge.cli.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "save_report", interrupted)
    assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5", "--out", str(folder / "pick")]) == 130
    err = capsys.readouterr().err
    assert "nothing was written" not in err and f"the merged model was saved to {folder / 'pick'}" in err, err
    assert load_file(str(folder / "pick" / "model.safetensors"))["weight"].tolist() == [[0.5, 0.5]]


def test_a_file_system_error_is_one_line_not_a_traceback(own, capsys, monkeypatch):
    """Permission denied, a full disk, a path through a file: the command says what and where in
    one line (exit 1), as it does for a bad config, instead of a traceback."""
    folder, config, base = own
    (folder / "denying.py").write_text(
        "from torch import nn\n"
        "def build():\n    return nn.Linear(2, 1, bias=False)\n"
        "def evaluate(model, task):\n    raise PermissionError(13, 'Permission denied', '/data/scores.csv')\n")
    config.write_text(json.dumps({**base, "evaluator": "denying.py:evaluate", "model": "denying.py:build"}))
    code = main(["map", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "map-merge map: error: PermissionError: [Errno 13] Permission denied: '/data/scores.csv'" in err, err
