"""Second review of issue 27: a save never replaces a command line run's results (result.json,
front.png, report.md/json) nor, without overwrite=True, a model another save finished while it ran;
and the manifest's own temporary, left by a save killed while it recorded a file, is removed by the
next save (it neither survives nor blocks the overwrite of a folder map_merge wrote)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import map_merge as mm
from map_merge.task_vectors import base as tv_base


@pytest.fixture
def sources(tmp_path):
    paths = []
    for i, name in enumerate(["base", "ft0"]):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2,), float(i))}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
        paths.append(tmp_path / name)
    return tmp_path, mm.TaskVectors.from_models(paths[0], paths[1:], storage="streamed")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_save_never_replaces_a_run_s_results(sources):
    """`map-merge save --out out/front.png --overwrite` (or --emit-mergekit out/result.json) replaced
    the run's plot with a model folder (its result.json with a recipe): the run's results are
    written by the run only, even though map_merge wrote them."""
    from map_merge.cli.outputs import atomic_write, check_out, write_recipe
    from map_merge.task_vectors.manifest import mark_run

    root, tv = sources
    out = root / "out"
    out.mkdir()
    mark_run(out)
    for name in ("result.json", "front.png", "report.md"):
        atomic_write(out / name, lambda temp, name=name: temp.write_text(name))
    before = _files(out)
    for name in ("result.json", "front.png", "report.md", "report.json"):
        with pytest.raises(ValueError, match=f"{name}.*result of the command line run"):
            tv.save_merged(out / name, [0.5], overwrite=True)
    with pytest.raises(ValueError, match="result of the command line run"):
        tv.save_merged(out / "result.json", [0.5])
    assert _files(out) == before
    # the pick's folder in the run's folder stays a save destination, and the run itself still replaces its results
    tv.save_merged(out / "merged", [0.5])
    tv.save_merged(out / "merged", [1.0], overwrite=True)
    config = {"pretrained": str(root / "base"), "finetuned": {"a": str(root / "ft0")}, "out": str(out)}
    check_out(config, out, overwrite=True)
    write_recipe({"merge_method": "linear"}, out / "mergekit.yaml")
    atomic_write(out / "result.json", lambda temp: temp.write_text("new"))
    assert (out / "result.json").read_text() == "new"


def test_a_save_without_overwrite_never_replaces_a_model_finished_meanwhile(sources, monkeypatch):
    """Two saves into the same new folder, neither with overwrite=True: the one that finishes second
    must not replace the first one's model (it was free when it started)."""
    root, tv = sources
    target = root / "merged"
    real = tv_base.write_side_files

    def racing(*args, **kwargs):
        monkeypatch.setattr(tv_base, "write_side_files", real)
        tv.save_merged(target, [1.0])  # another save, finished while this one writes
        return real(*args, **kwargs)

    monkeypatch.setattr(tv_base, "write_side_files", racing)
    with pytest.raises(FileExistsError, match="merged"):
        tv.save_merged(target, [0.25])
    assert json.loads((target / "map_merge.json").read_text())["coefficients"] == {"task0": 1.0}
    assert load_file(str(target / "model.safetensors"))["w"].tolist() == [1.0, 1.0]  # 0 + 1.0 * (1 - 0)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    shutil.rmtree(target)
    monkeypatch.setattr(tv_base, "write_side_files", racing)  # with overwrite=True the later save wins
    tv.save_merged(target, [0.25], overwrite=True)
    assert load_file(str(target / "model.safetensors"))["w"].tolist() == [0.25, 0.25]


def test_the_manifest_temporary_of_a_killed_save_is_removed_by_the_next_save(sources):
    root, tv = sources
    dead = _dead_pid()
    (root / "files").mkdir()
    leftover = root / "files" / f".map_merge.json.partial-{dead}"
    leftover.write_text("{")
    tv.save_merged(root / "files" / "one.safetensors", [0.5])
    assert sorted(p.name for p in (root / "files").iterdir()) == ["map_merge.json", "one.safetensors"]
    tv.save_merged(root / "merged", [0.5])
    (root / "merged" / f".map_merge.json.partial-{dead}").write_text("{")
    tv.save_merged(root / "merged", [1.0], overwrite=True)  # the folder is still all map_merge's
    assert sorted(p.name for p in (root / "merged").iterdir()) == ["config.json", "map_merge.json", "model.safetensors"]
    live = root / "merged" / f".map_merge.json.partial-{os.getpid()}"  # a live process's: never touched
    live.write_text("{")
    with pytest.raises(FileExistsError, match="partial"):
        tv.save_merged(root / "merged", [1.0], overwrite=True)
    assert live.exists()


@pytest.mark.parametrize("content, what", [(b"", "empty"), (b"no pickle at all" * 4, "garbage"), (None, "a dict of epochs")])
@pytest.mark.parametrize("storage", ["dense", "streamed"])
def test_a_bad_pytorch_checkpoint_is_refused_naming_the_file(sources, content, what, storage):
    """An empty or corrupt .bin / .pt (an interrupted download) raised a bare EOFError (no message,
    no file) or torch's UnpicklingError, which the command line printed as a traceback; a pickle that
    is no state dict (a training checkpoint) failed later with an unrelated error."""
    from map_merge.task_vectors.checkfile import CheckpointFileError

    root, _ = sources
    bad = root / "bad.pt"
    if content is None:
        torch.save({"epoch": 3, "state_dict": {"w": torch.zeros(2)}}, bad)
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointFileError, match=r"bad\.pt is not a PyTorch state dict"):
        mm.TaskVectors.from_models(root / "base", [bad], storage=storage)
