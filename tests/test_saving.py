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
