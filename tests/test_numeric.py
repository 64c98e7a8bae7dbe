"""Numbers as YAML users write them: ``1e-1`` is a string in YAML 1.1, a number to mergekit and to us;
a run config's preference and the CLI's lists use the same parser; config errors ask for what is missing."""

import numpy as np
import pytest
import yaml

from map_merge.config import ConfigError, load_config
from map_merge.numeric import parse_number


def test_parse_number_reads_numeric_strings_and_names_the_rest():
    assert yaml.safe_load("x: 1e-1")["x"] == "1e-1"  # why: PyYAML's floats need a dot
    for text, value in (("1e-1", 0.1), (" .5 ", 0.5), ("+2E3", 2000.0), ("1_000", 1000.0), ("5.", 5.0), (3, 3.0), (np.float32(0.25), 0.25)):
        assert parse_number(text) == value
    for bad, message in (("abc", "the string 'abc', which is not a number"), (True, "a boolean"), ("nan", "not a number"),
                         (float("inf"), "not a finite number"), ("0x10", "not a number"), ("\u0661", "not a number"), (None, "not a number")):
        with pytest.raises(ValueError, match=message):
            parse_number(bad)


def _config(tmp_path, text):
    for name in ("base.safetensors", "a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"")
    path = tmp_path / "run.yaml"
    path.write_text("pretrained: base.safetensors\nfinetuned: {a: a.safetensors, b: b.safetensors}\nevaluator: user.py:evaluate\n" + text)
    return path


def test_a_preference_may_be_written_1e_1(tmp_path):
    assert load_config(_config(tmp_path, "preference: [1e-1, 0.5]\n"))["preference"] == [0.1, 0.5]
    with pytest.raises(ConfigError, match=r"field 'preference' must be non-negative numbers.*the string 'much'"):
        load_config(_config(tmp_path, "preference: [much, 0.5]\n"))
    with pytest.raises(ConfigError, match=r"field 'preference' must be non-negative"):
        load_config(_config(tmp_path, "preference: [-1e-1, 0.5]\n"))


def test_the_cli_parses_lists_with_the_same_parser():
    from map_merge.cli import _parse_floats

    assert _parse_floats("1e-1, 0.5", "--preference") == [0.1, 0.5]
    with pytest.raises(ValueError, match=r"--coeffs must be comma-separated numbers.*the string 'nan', which is not a number"):
        _parse_floats("0.5,nan", "--coeffs")


def test_a_missing_pretrained_asks_for_no_evaluator_when_tasks_score(tmp_path):
    import json

    path = tmp_path / "run.json"
    path.write_text(json.dumps({"finetuned": {"a": "a"}, "tasks": {"a": {"kind": "loss", "data": "a.jsonl"}}}))
    with pytest.raises(ConfigError, match="field 'pretrained' is required") as error:
        load_config(path)
    assert "evaluator" not in str(error.value) and "metric specs under 'tasks'" in str(error.value)
    path.write_text(json.dumps({"finetuned": {"a": "a"}}))
    with pytest.raises(ConfigError, match="field 'pretrained' is required.*'evaluator'"):  # without specs: still named
        load_config(path)


def test_bounds_read_numbers_as_the_preference_does(tmp_path):
    """The config's own numbers use the one parser: 'bounds: [-5e-1, 1.5]' (a string in YAML 1.1)
    is -0.5; a word is named as a string; a boolean is no bound."""
    assert load_config(_config(tmp_path, "bounds: [-5e-1, 1.5]\n"))["bounds"] == [-0.5, 1.5]
    with pytest.raises(ConfigError, match=r"field 'bounds' must be \[low, high\].*the string 'big'"):
        load_config(_config(tmp_path, "bounds: [0, big]\n"))
    with pytest.raises(ConfigError, match=r"field 'bounds' must be \[low, high\].*a boolean"):
        load_config(_config(tmp_path, "bounds: [false, 1]\n"))
