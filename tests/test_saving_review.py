"""Review of issue 27's overwrite rule: a manifest only vouches for the files as map_merge wrote
them (a file a user rewrote under the same name since is theirs), and what appears at the
destination while a save runs (another process, the user) is never replaced by its final rename."""

import json
import os

import pytest
import torch

import map_merge as mm
from map_merge.task_vectors import base as tv_base

transformers = pytest.importorskip("transformers")


@pytest.fixture
def folders(tmp_path):
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "ft0")
    return tmp_path


def _later(path):
    """As if ``path`` had been written a few seconds later (file systems with coarse timestamps)."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def test_overwrite_keeps_files_a_user_rewrote_under_the_names_map_merge_wrote(folders):
    """A user fine-tunes the merged model further and saves it in place (save_pretrained writes the
    same names: config.json, model.safetensors, ...), or writes their own file where a single-file
    save was: the manifest still lists those names, but the files are no longer map_merge's, so
    overwrite=True refuses instead of deleting them."""
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    out = tv.save_merged(folders / "out", [0.5])
    user = transformers.LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for p in user.parameters():
            p.mul_(2.0)
    user.save_pretrained(out)
    _later(out / "model.safetensors")
    theirs = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"map_merge did not write \(.*model.safetensors"):
        tv.save_merged(out, [1.0], overwrite=True)
    assert (out / "model.safetensors").read_bytes() == theirs
    single = tv.save_merged(folders / "one.safetensors", [0.5])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in user.state_dict().items() if k != "lm_head.weight"}, str(single))
    _later(single)
    theirs = single.read_bytes()
    with pytest.raises(FileExistsError, match="map_merge did not write it"):
        tv.save_merged(single, [1.0], overwrite=True)
    assert single.read_bytes() == theirs
    # what map_merge wrote, untouched, is still replaced; a file map_merge rewrote is its again
    again = tv.save_merged(folders / "again", [0.5])
    tv.save_merged(again, [1.0], overwrite=True)
    tv.save_merged(again, [0.0], overwrite=True)
    assert json.loads((again / "map_merge.json").read_text())["coefficients"] == {"task0": 0.0}
    tv.save_merged(folders / "two.safetensors", [0.5])
    tv.save_merged(folders / "two.safetensors", [1.0], overwrite=True)
    tv.save_merged(folders / "two.safetensors", [0.0], overwrite=True)


@pytest.mark.parametrize("empty", [False, True])
def test_what_appears_at_the_destination_during_a_save_is_never_replaced(folders, monkeypatch, empty):
    """The destination is checked when the save starts; a folder someone creates there while the
    weights are written (another process, the user) must not be deleted by the final rename, nor
    its files replaced when the save fills an empty folder."""
    tv = mm.TaskVectors.from_models(folders / "base", [folders / "ft0"])
    late = folders / "late"
    if empty:
        late.mkdir()
    real = tv_base.write_side_files

    def racing(*args, **kwargs):
        late.mkdir(exist_ok=True)
        (late / "notes.txt").write_text("mine")
        (late / "config.json").write_text('{"mine": true}')
        return real(*args, **kwargs)

    monkeypatch.setattr(tv_base, "write_side_files", racing)
    with pytest.raises(FileExistsError, match="late"):
        tv.save_merged(late, [0.5], overwrite=True)
    assert (late / "notes.txt").read_text() == "mine" and (late / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in late.iterdir()) == ["config.json", "notes.txt"]  # nothing of the save left in it
    assert not [p for p in folders.iterdir() if p.name.startswith(".")]  # nor beside it
