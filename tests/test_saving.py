"""Saves never lose data: sources are never written, existing outputs need overwrite=True, a crash
leaves the old folder whole, and no stale shard survives a new save."""

import json

import pytest
import torch

import map_merge as mm
from map_merge.task_vectors import base as tv_base

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


@pytest.fixture
def folders(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "base", max_shard_size="8KB")
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    for i in range(2):
        model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (i + 1))
        model.save_pretrained(tmp_path / f"ft{i}", max_shard_size="8KB")
    return tmp_path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_existing_folder_needs_overwrite_and_overwrite_leaves_no_stale_shards(folders):
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0", folders / "ft1"])
    out = tv.save_merged(folders / "out", [0.5, 0.5], max_shard_size="8KB")
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").exists() and (out / "generation_config.json").exists()
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"out already exists; pass overwrite=True"):
        tv.save_merged(folders / "out", [1.0, 0.0])
    assert snapshot(out) == before  # untouched
    tv.save_merged(folders / "out", [1.0, 0.0], max_shard_size="1GB", overwrite=True)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # no shard of the first save left
    assert not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "map_merge.json").read_text())["coefficients"] == {"task0": 1.0, "task1": 0.0}
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out)
    ft0 = transformers.LlamaForCausalLM.from_pretrained(folders / "ft0")
    for key, value in ft0.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    assert not [p for p in folders.iterdir() if p.name.startswith(".")]  # no temporary left beside it
    (folders / "empty").mkdir()
    tv.save_merged(folders / "empty", [0.2, 0.2])  # an empty folder is no data to lose
    with pytest.raises(FileExistsError):
        tv.save_merged(folders / "out" / "model.safetensors", [0.2, 0.2])  # an existing file too


def test_sources_are_refused_even_with_overwrite(folders):
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0", folders / "ft1"])
    before = snapshot(folders / "base")
    for target, relation in [(folders / "base", "is"), (folders / "ft1" / "merged", "lies inside"), (folders, "holds"),
                             (folders / "base" / "m.safetensors", "lies inside")]:
        with pytest.raises(ValueError, match=rf"refusing to save into .*: it {relation} .*a source of these task vectors"):
            tv.save_merged(target, [0.5, 0.5], overwrite=True)
    assert snapshot(folders / "base") == before
    again = mm.TaskVectors.from_models(folders / "base", [folders / "ft0", folders / "ft1"])  # still loads
    assert again.num_params == tv.num_params
    # adapters are sources too
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(folders / "base"),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(folders / "adapter")
    adapters = mm.TaskVectors.from_models(folders / "base", [folders / "adapter"])
    with pytest.raises(ValueError, match="a source of these task vectors"):
        adapters.save_merged_adapter(folders / "adapter", [1.0], overwrite=True)
    adapters.save_merged_adapter(folders / "merged-adapter", [1.0])
    with pytest.raises(FileExistsError):
        adapters.save_merged_adapter(folders / "merged-adapter", [0.5])


def test_a_crash_mid_save_leaves_the_old_folder_whole(folders, monkeypatch):
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0", folders / "ft1"])
    out = tv.save_merged(folders / "out", [0.5, 0.5], max_shard_size="8KB")
    before = snapshot(out)
    real = tv_base.write_safetensors
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(tv_base, "write_safetensors", crashing)
    with pytest.raises(OSError, match="disk full"):
        tv.save_merged(folders / "out", [1.0, 1.0], max_shard_size="8KB", overwrite=True)
    assert calls["n"] == 2 and snapshot(out) == before
    with pytest.raises(OSError, match="disk full"):
        calls["n"] = 1
        tv.save_merged(folders / "new", [1.0, 1.0], max_shard_size="8KB")
    assert not (folders / "new").exists()
    assert not [p for p in folders.iterdir() if p.name.startswith(".")]


def test_files_a_source_links_to_and_a_module_s_folder_are_sources_too(folders):
    """A Hugging Face cache snapshot links each file into ``blobs/``; a module remembers the folder
    ``from_pretrained`` loaded it from. Neither may be replaced, even with overwrite=True."""
    import os
    import shutil

    def cache_like(source, name):
        repo = folders / name
        (repo / "blobs").mkdir(parents=True)
        snapshot = repo / "snapshots" / "abc"
        snapshot.mkdir(parents=True)
        for file in source.iterdir():
            shutil.copy(file, repo / "blobs" / file.name)
            os.symlink(repo / "blobs" / file.name, snapshot / file.name)
        return repo / "blobs", snapshot

    (folders / "base" / "model.onnx").write_bytes(b"stale pretrained weights")
    base_blobs, base = cache_like(folders / "base", "models--base")
    lora = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(base),
                               peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(folders / "adapter")
    adapter_blobs, adapter = cache_like(folders / "adapter", "models--adapter")
    before = {blobs: snapshot(blobs) for blobs in (base_blobs, adapter_blobs)}
    for storage in ("auto", "dense"):
        tv = mm.TaskVectors.from_models(base, [adapter], storage=storage)
        for blobs in (base_blobs, adapter_blobs):
            with pytest.raises(ValueError, match="holds .*a source of these task vectors"):
                tv.save_merged(blobs, [1.0], overwrite=True)
    dense = mm.TaskVectors.from_models(base, [folders / "ft0"], storage="dense")
    with pytest.raises(ValueError, match="a source of these task vectors"):
        dense.save_merged(base_blobs, [1.0], overwrite=True)
    assert {blobs: snapshot(blobs) for blobs in before} == before
    # a module loaded from a folder: that folder is a source
    modules = mm.TaskVectors.from_models(transformers.LlamaForCausalLM.from_pretrained(folders / "base"),
                                         [transformers.LlamaForCausalLM.from_pretrained(folders / "ft0")])
    ft0 = snapshot(folders / "ft0")
    with pytest.raises(ValueError, match=r"it is .*ft0, a source of these task vectors"):
        modules.save_merged(folders / "ft0", [0.5], overwrite=True)
    assert snapshot(folders / "ft0") == ft0
    out = modules.save_merged(folders / "merged", [0.5])
    assert json.loads((out / "map_merge.json").read_text())["sources"][0] == {"pretrained": "in memory"}
    # weights of other formats in the pretrained folder are never copied beside the merged ones
    out = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"]).save_merged(folders / "merged2", [0.5])
    assert (out / "tokenizer_config.json").exists() and not (out / "model.onnx").exists()


def test_what_a_killed_save_left_is_reported(folders, caplog):
    """A save killed between its two renames leaves the old folder under a hidden name, one killed
    while writing a partial folder: the next save into that destination names both."""
    import logging
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (folders / f".out.old-{dead}-0123abcd").mkdir()
    (folders / f".out.old-{dead}-0123abcd" / "model.safetensors").write_bytes(b"the previous merge")
    (folders / f".out.partial-{dead}-4567ef01").mkdir()
    (folders / f".out.partial-{__import__('os').getpid()}-89abcdef").mkdir()  # a save under way in a live process: not reported
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    with caplog.at_level(logging.WARNING, logger="map_merge.task_vectors.saving"):
        tv.save_merged(folders / "out", [0.5])
    messages = [r.getMessage() for r in caplog.records]
    assert any(f".out.old-{dead}-0123abcd holds the previous contents of" in m for m in messages), messages
    assert any(f".out.partial-{dead}-4567ef01 is an unfinished save" in m for m in messages), messages
    assert len(messages) == 2
    assert (folders / f".out.old-{dead}-0123abcd" / "model.safetensors").read_bytes() == b"the previous merge"  # never removed


def test_an_empty_folder_is_filled_in_place_and_a_failed_rename_leaves_nothing(folders, monkeypatch):
    """An existing empty folder (a volume mounted there, permissions set up for it) is kept: the save
    fills it. A destination that cannot be renamed (a mount point: EBUSY) fails with the old folder
    whole and no temporary copy of the model left beside it."""
    import errno
    import os

    from map_merge.task_vectors import saving

    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    (folders / "mount").mkdir()
    os.chmod(folders / "mount", 0o750)
    inode = os.stat(folders / "mount").st_ino
    out = tv.save_merged(folders / "mount", [0.5], max_shard_size="8KB")
    assert os.stat(out).st_ino == inode and (os.stat(out).st_mode & 0o777) == 0o750
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).state_dict()
    for key, value in tv.merge([0.5]).items():
        torch.testing.assert_close(reloaded[key], value)
    before = snapshot(out)
    real = os.replace

    def busy(src, dst):
        if os.path.abspath(src) == str(out.resolve()):
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real(src, dst)

    monkeypatch.setattr(saving.os, "replace", busy)
    with pytest.raises(OSError, match="busy"):
        tv.save_merged(out, [1.0], overwrite=True)
    assert snapshot(out) == before
    assert not [p for p in folders.iterdir() if p.name.startswith(".")]  # was: the whole new model left as .mount.partial-*


def _dead_pid():
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()


def test_overwrite_replaces_only_what_map_merge_wrote(folders):
    """overwrite=True never deletes a file map_merge did not write: a folder holding one (a user's
    notes, a stranger's model under the name a save would write) is refused, naming it; a folder
    map_merge saved is replaced, until someone adds a file of their own to it."""
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    precious = folders / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("hi")
    (precious / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"precious: it holds 2 item\(s\) map_merge did not write \(notes.txt, sub"):
        tv.save_merged(precious, [0.5], overwrite=True)
    assert (precious / "notes.txt").read_text() == "hi" and (precious / "sub" / "data.csv").read_text() == "1,2"
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt", "sub"]
    (folders / "stranger").mkdir()
    (folders / "stranger" / "model.safetensors").write_bytes(b"somebody's model")
    (folders / "theirs.safetensors").write_bytes(b"somebody's single file")
    for target in (folders / "stranger", folders / "stranger" / "model.safetensors", folders / "theirs.safetensors"):
        with pytest.raises(FileExistsError, match="map_merge did not write"):
            tv.save_merged(target, [0.5], overwrite=True)
    assert (folders / "stranger" / "model.safetensors").read_bytes() == b"somebody's model"
    assert (folders / "theirs.safetensors").read_bytes() == b"somebody's single file"
    # what map_merge wrote is replaced ...
    out = tv.save_merged(folders / "out", [0.5])
    tv.save_merged(out, [1.0], overwrite=True)
    single = tv.save_merged(folders / "one.safetensors", [0.5])
    tv.save_merged(single, [1.0], overwrite=True)
    # ... but not a file someone added to it
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds 1 item\(s\) map_merge did not write \(notes.txt"):
        tv.save_merged(out, [0.0], overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "map_merge.json").read_text())["coefficients"] == {"task0": 1.0}


@pytest.mark.parametrize("storage", ["streamed", "dense", "module"])
def test_relative_source_paths_are_resolved_when_opened(folders, monkeypatch, storage):
    """Sources given as relative paths keep naming the files they named when opened: after an
    os.chdir (a notebook's %cd) into another experiment with the same layout, the merge still reads
    the first one's files (pickled copies too), and its pretrained folder is still refused as a
    destination."""
    import pickle
    import shutil

    other = folders / "other"
    other.mkdir()
    shutil.copytree(folders / "base", other / "base")
    shutil.copytree(folders / "ft1", other / "ft0")  # the same layout, other weights
    monkeypatch.chdir(folders)
    if storage == "module":
        tv = mm.TaskVectors.from_models(transformers.LlamaForCausalLM.from_pretrained("base"),
                                        [transformers.LlamaForCausalLM.from_pretrained("ft0")])
    else:
        tv = mm.TaskVectors.from_models("base", ["ft0"], storage=storage)
    monkeypatch.chdir(other)
    expected = transformers.LlamaForCausalLM.from_pretrained(folders / "ft0").state_dict()
    for copy in (tv, pickle.loads(pickle.dumps(tv))):
        for key, value in copy.merge([1.0]).items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)
    before = snapshot(folders / "base")
    with pytest.raises(ValueError, match="a source of these task vectors"):
        tv.save_merged(folders / "base", [1.0], overwrite=True)
    assert snapshot(folders / "base") == before
    assert all(p.is_absolute() for p in tv.source_paths())


def test_an_interrupted_save_leaves_no_temporary_file(folders, monkeypatch):
    """A Ctrl-C (KeyboardInterrupt) in the middle of writing removes what was written: no hidden
    partial file (was: '.one.safetensors.partial-<pid>-<tag>.partial', as large as what was written)."""
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    real = type(tv)._output_pieces

    def interrupted(self, *args, **kwargs):
        for number, piece in enumerate(real(self, *args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(type(tv), "_output_pieces", interrupted)
    for target in (folders / "one.safetensors", folders / "out"):
        with pytest.raises(KeyboardInterrupt):
            tv.save_merged(target, [0.5], max_shard_size="8KB")
        assert not target.exists()
        assert not [p.name for p in folders.iterdir() if p.name.startswith(".")]


def test_the_next_save_removes_what_a_killed_save_left(folders, caplog):
    """A SIGKILLed save leaves its partial file or folder (no code of its own runs): the next save
    into that destination removes those of processes that are gone, the old naming included, and
    the previous contents a killed save had moved away once the save that replaced them is in place."""
    import logging

    dead = _dead_pid()
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    out = tv.save_merged(folders / "out", [0.5])
    meta = json.loads((out / "map_merge.json").read_text())
    tag = meta["_manifest"]["tag"] = f"{dead}-0badc0de"  # as if a process now gone had written out
    (out / "map_merge.json").write_text(json.dumps(meta))
    leftovers = [folders / f".out.partial-{dead}-0123abcd", folders / f".one.partial-{dead}-4567ef01.safetensors",
                 folders / f".one.safetensors.partial-{dead}-89abcdef.partial", folders / f".out.old-{tag}"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"x" * 1000)
    for item in leftovers[1:3]:
        item.write_bytes(b"x" * 1000)
    leftovers[3].mkdir()  # moved away by the save that wrote out (as if it were killed before removing it)
    kept = folders / f".out.old-{dead}-fedcba98"  # moved away by a save that never finished: maybe the only copy
    kept.mkdir()
    (folders / "mount").mkdir()
    inside = folders / "mount" / f".partial-{dead}-aaaaaaaa"  # a save into an empty folder
    inside.mkdir()
    with caplog.at_level(logging.WARNING, logger="map_merge.task_vectors.saving"):
        tv.save_merged(out, [1.0], overwrite=True)
        tv.save_merged(folders / "one.safetensors", [1.0])
        tv.save_merged(folders / "mount", [1.0])
    assert not [item for item in [*leftovers, inside] if item.exists()]
    assert kept.exists() and any("holds the previous contents of" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in folders.iterdir() if p.name.startswith(".")) == [kept.name]


def test_files_reach_the_disk_before_they_are_renamed_into_place(folders, monkeypatch):
    """Crash safety against a power loss: every file written (and its folder) is fsynced before the
    rename that exposes it, and the destination's folder after."""
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc to name a file descriptor")
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for target in (folders / "out", folders / "one.safetensors"):
        events.clear()
        tv.save_merged(target, [0.5], max_shard_size="8KB")
        rename = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
        temp = events[rename][1]
        synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
        inside = [str(p).replace(str(target), temp, 1) for p in target.rglob("*")] if target.is_dir() else []
        written = {temp, *inside}  # the temporary and everything in it, as named before the rename
        assert written <= synced, sorted(written - synced)
        assert ("fsync", str(folders)) in events[rename:]
