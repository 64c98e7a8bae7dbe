"""The command line as a new user meets it: operator settings in the config (checked before any
model loads, keyed in the store, written into mergekit recipes), a help per command, negative
coefficients, paths relative to the config, a rerun that loads no model, a save's progress bar."""

import io
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import map_merge as mm
from map_merge.cli import build_parser, main

_USER = '''
import os
from torch import nn


def build():
    with open(os.environ["MM_BUILDS"], "a") as handle:  # one line per live model built
        handle.write("build\\n")
    return nn.Linear(4, 1, bias=False)


def evaluate(model, task):
    w = model.weight.reshape(-1)
    return float(-((w - 0.5) ** 2).sum()) if task == "a" else float(-(w ** 2).sum())
'''

# the task vectors of the hand check (pretrained weights zero)
A = [1.0, 0.5, -0.2, 0.6]
B = [0.3, -1.0, 0.4, 0.8]


@pytest.fixture
def four(tmp_path, monkeypatch):
    """A config on weights of four entries: base 0, task vectors A and B; the base is a folder of
    weights without config.json, so a saved merge needs no live model."""
    (tmp_path / "user.py").write_text(_USER)
    (tmp_path / "base").mkdir()
    save_file({"weight": torch.zeros(1, 4)}, str(tmp_path / "base" / "model.safetensors"))
    for name, w in {"a": A, "b": B}.items():
        save_file({"weight": torch.tensor([w])}, str(tmp_path / f"{name}.safetensors"))
    monkeypatch.setenv("MM_BUILDS", str(tmp_path / "builds.txt"))
    fields = {"pretrained": "base", "finetuned": {"a": "a.safetensors", "b": "b.safetensors"}, "evaluator": "user.py:evaluate",
              "model": "user.py:build", "out": str(tmp_path / "out"), "num_samples": 6}
    return tmp_path, fields


def _write(folder, fields, name="run.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(fields))
    return path


def _merged(path):
    return load_file(str(path))["weight"].numpy().reshape(-1)


# ---------------------------------------------------------------------- 3. operator settings
def test_method_settings_in_a_config_merge_like_the_operator(four, capsys):
    folder, fields = four
    config = _write(folder, {**fields, "method": {"name": "ties", "k": 0.6}})
    assert main(["save", "--config", str(config), "--coeffs", "1,1", "--out", str(folder / "ties.safetensors")]) == 0
    # by hand: k = 0.6 keeps int(0.6 * 4) = 2 entries per task vector: A -> [1, 0, 0, 0.6], B -> [0, -1, 0, 0.8];
    # signs elected per entry, the agreeing entries averaged (entry 3: (0.6 + 0.8) / 2)
    np.testing.assert_allclose(_merged(folder / "ties.safetensors"), [1.0, -1.0, 0.0, 0.7], atol=1e-6)
    tv = mm.TaskVectors.from_models(folder / "base", [folder / "a.safetensors", folder / "b.safetensors"])
    np.testing.assert_allclose(_merged(folder / "ties.safetensors"), tv.merge(np.ones(2), mm.Ties(0.6))["weight"].numpy().reshape(-1), atol=1e-7)
    # the plain name keeps today's defaults (k = 0.2: one entry per task vector)
    config = _write(folder, {**fields, "method": "ties"})
    assert main(["save", "--config", str(config), "--coeffs", "1,1", "--out", str(folder / "plain.safetensors")]) == 0
    np.testing.assert_allclose(_merged(folder / "plain.safetensors"), [1.0, -1.0, 0.0, 0.0], atol=1e-6)
    # and --method takes the same form
    assert main(["save", "--config", str(config), "--coeffs", "1,1", "--out", str(folder / "flag.safetensors"),
                 "--method", "{name: ties, k: 0.6}"]) == 0
    np.testing.assert_allclose(_merged(folder / "flag.safetensors"), [1.0, -1.0, 0.0, 0.7], atol=1e-6)


@pytest.mark.parametrize("method, message", [
    ({"name": "ties", "p": 0.5}, "method 'ties' has no setting 'p'; its settings: ['k', 'scope']"),
    ({"name": "ties", "k": 1.5}, "Ties.k is the fraction of entries kept and must lie in (0, 1]"),
    ({"name": "dare", "p": "much"}, "method 'dare' setting 'p' must be a number"),
    ({"name": "della", "rescale": "l2"}, "Della.rescale must be one of"),
    ({"k": 0.6}, "a mapping needs 'name'"),
    ("slerp", "unknown merge method 'slerp'; choose one of ['task_arithmetic', 'ties', 'dare', 'breadcrumbs', 'della']"),
])
def test_a_bad_method_setting_is_refused_before_any_model_loads(four, capsys, monkeypatch, method, message):
    import map_merge.config

    folder, fields = four
    config = _write(folder, {**fields, "method": method})

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config error was found")

    monkeypatch.setattr(map_merge.config, "build_task_vectors", no_loading)
    monkeypatch.setattr(map_merge.config, "_build_model", no_loading)
    assert main(["map", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "field 'method'" in err and message in err, err
    assert not (folder / "out").exists()


def test_the_store_keys_results_by_the_method_settings(four):
    from map_merge.config import build_objective, load_config

    folder, fields = four
    keys = {}
    for label, method in [("k6", {"name": "ties", "k": 0.6}), ("k6 again", {"name": "ties", "k": 0.6}), ("k2", {"name": "ties", "k": 0.2}),
                          ("name", "ties"), ("dare", {"name": "dare", "p": 0.3}), ("dare seed", {"name": "dare", "p": 0.3, "seed": 1})]:
        objective, _, _ = build_objective(load_config(_write(folder, {**fields, "method": method})), progress=False)
        assert objective.method.spec == mm.merge_methods.resolve_method(method).spec
        keys[label] = objective.fingerprint()
    assert keys["k6"] == keys["k6 again"]
    assert keys["k2"] == keys["name"]  # the name is the default settings: the same merges, the same stored results
    assert len({keys[k] for k in ("k6", "k2", "dare", "dare seed")}) == 4


def test_the_emitted_recipe_carries_the_method_settings(four, capsys):
    folder, fields = four
    config = _write(folder, {**fields, "method": {"name": "della", "density": 0.6, "epsilon": 0.1, "rescale": False}})
    recipe = folder / "recipe.yaml"
    assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5", "--out", str(folder / "m"), "--emit-mergekit", str(recipe)]) == 0
    written = yaml.safe_load(recipe.read_text())
    assert written["merge_method"] == "della"
    assert written["parameters"] == {"rescale": False, "normalize": True, "lambda": 0.5}
    assert [m["parameters"] for m in written["models"]] == [{"weight": 1.0, "density": 0.6, "epsilon": 0.1}] * 2
    config = _write(folder, {**fields, "method": {"name": "ties", "k": 0.6, "scope": "tensor"}})
    assert main(["save", "--config", str(config), "--coeffs", "0.5,0.5", "--out", str(folder / "t"), "--emit-mergekit",
                 str(folder / "ties.yaml")]) == 0
    written = yaml.safe_load((folder / "ties.yaml").read_text())
    assert written["merge_method"] == "ties" and [m["parameters"]["density"] for m in written["models"]] == [0.6, 0.6]


# ---------------------------------------------------------------------- 4. help, negative numbers, paths
def _help(capsys, *args):
    with pytest.raises(SystemExit):
        main([*args, "--help"])
    return capsys.readouterr().out


def test_each_command_s_help_starts_with_its_own_options_and_has_an_example(capsys):
    save = _help(capsys, "save")
    groups = [line for line in save.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert groups[0] == "save options:" and "shared options:" in groups
    assert save.index("--coeffs") < save.index("--config") < save.index("examples:")
    assert "map-merge save --config run.yaml --coeffs" in save and "relative to the config file's folder" in save
    assert "samples_per_stage:" not in save  # the config reference is the run commands' help
    texts = {command: _help(capsys, command) for command in ("map", "bayes", "nested", "moe")}
    for command, text in texts.items():
        assert text.index(f"{command} options:") < text.index("shared options:") < text.index("example:") < text.index("pretrained:")
        assert f"map-merge {command} --config" in text
    assert "num_samples:" in texts["map"].split("map options:")[0] and "budget:" in texts["bayes"].split("bayes options:")[0]
    assert len({text.split("options:")[0] for text in texts.values()}) == 4  # each its own description


@pytest.mark.parametrize("argv, field, value", [
    (["save", "--config", "run.yaml", "--coeffs", "-5,1"], "coeffs", "-5,1"),
    (["save", "--config", "run.yaml", "--coeffs", "-.5,-1e-1"], "coeffs", "-.5,-1e-1"),
    (["save", "text", "--preference", "-1,2", "--out", "x"], "preference", "-1,2"),
    (["save", "--coeffs=-5,1", "--config", "run.yaml"], "coeffs", "-5,1"),
])
def test_negative_coefficients_parse_without_an_equals_sign(argv, field, value):
    assert getattr(build_parser().parse_args(argv), field) == value


def test_relative_out_store_and_data_follow_the_config_not_the_working_directory(four, capsys, monkeypatch, tmp_path_factory):
    folder, fields = four
    config = _write(folder, {**fields, "out": "results/run", "store": "stores/evals.sqlite"})
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    monkeypatch.chdir(elsewhere)
    from map_merge.config import load_config

    loaded = load_config(config)
    assert (loaded["out"], loaded["store"]) == (str(folder / "results" / "run"), str(folder / "stores" / "evals.sqlite"))
    assert main(["save", "--config", str(config), "--coeffs", "-0.5,1"]) == 0  # default --out: <out>/merged
    np.testing.assert_allclose(_merged(folder / "results" / "run" / "merged" / "model.safetensors"),
                               -0.5 * np.array(A) + np.array(B), atol=1e-6)
    assert not list(elsewhere.iterdir())
    # no 'out': outputs/<command> beside the config
    no_out = _write(folder, {k: v for k, v in fields.items() if k != "out"}, "plain.yaml")
    assert main(["save", "--config", str(no_out), "--coeffs", "0.5,0.5"]) == 0
    assert (folder / "outputs" / "map" / "merged" / "model.safetensors").exists() and not list(elsewhere.iterdir())


# ---------------------------------------------------------------------- 5. the cached rerun, the save's progress
def test_a_fully_cached_rerun_builds_no_live_model(four, capsys):
    folder, fields = four
    config = _write(folder, fields)
    assert main(["map", "--config", str(config)]) == 0
    first = json.loads(capsys.readouterr().out.split("\npreference")[0])
    assert first["models_evaluated"] > 0 and (folder / "builds.txt").read_text().split() == ["build"]
    assert main(["map", "--config", str(config), "--overwrite"]) == 0
    again = json.loads(capsys.readouterr().out.split("\npreference")[0])
    assert again["models_evaluated"] == 0 and again["coeffs"] == first["coeffs"]
    assert (folder / "builds.txt").read_text().split() == ["build"]  # every evaluation from the store: no model built
    np.testing.assert_allclose(_merged(folder / "out" / "merged" / "model.safetensors"),
                               again["coeffs"][0] * np.array(A) + again["coeffs"][1] * np.array(B), atol=1e-6)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("progress, terminal, shown", [(True, True, True), (False, True, False), (True, False, False)])
def test_a_save_shows_progress_on_a_terminal_only(tmp_path, monkeypatch, progress, terminal, shown):
    import map_merge.task_vectors.base as tv_base

    save_file({"w": torch.zeros(64, 64), "v": torch.zeros(64)}, str(tmp_path / "base.safetensors"))
    save_file({"w": torch.ones(64, 64), "v": torch.ones(64)}, str(tmp_path / "a.safetensors"))
    tv = mm.TaskVectors.from_models(tmp_path / "base.safetensors", [tmp_path / "a.safetensors"])
    monkeypatch.setattr(tv_base, "SAVE_PROGRESS_DELAY", 0.0)  # the bar appears after this many seconds (1 by default)
    stream = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    tv.save_merged(tmp_path / "out", [0.5], progress=progress)
    assert ("saving out" in stream.getvalue()) is shown, stream.getvalue()
    np.testing.assert_allclose(load_file(str(tmp_path / "out" / "model.safetensors"))["w"].numpy(), 0.5)


def test_noisy_in_a_config_reaches_the_evaluators_tasks_and_is_checked(four):
    """``noisy: true`` says the evaluator's score is a noisy estimate: every task of the objective carries it (MAP's
    picks then score real evaluations by the model); a wrong type, a zoo run or metric specs are refused by name."""
    from map_merge.config import ConfigError, build_objective, load_config

    folder, fields = four
    for flag, expected in ((True, (True, True)), (False, (False, False)), (None, (False, False))):
        config = load_config(_write(folder, {**fields, "noisy": flag} if flag is not None else fields))
        assert build_objective(config, progress=False)[0].noisy == expected, flag
    for bad, message in (({**fields, "noisy": "yes"}, "field 'noisy' must be a bool, got 'yes'"),
                         ({"zoo": "vision", "tasks": ["rotated", "inverted"], "noisy": True}, "field 'noisy' belongs to a run on your own"),
                         ({k: v for k, v in fields.items() if k != "evaluator"} | {"noisy": True, "tasks": {"a": {"kind": "loss", "data": "a.txt"}}},
                          "field 'noisy' is the evaluator's")):
        with pytest.raises(ConfigError, match=message):
            load_config(_write(folder, bad))
