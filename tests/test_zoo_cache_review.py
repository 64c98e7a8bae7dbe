"""Two processes building or rebuilding one zoo cache (two test workers share one): every reader
gets the files of a single build. Builds are told apart by their values (build A all ones, B all
zeros); the interleavings are forced by hooking the writer and the reader."""

from pathlib import Path

import pytest
import torch

from map_merge.zoo.base import load_zoo_weights, save_zoo_weights


def _build(value: float):
    """A zoo's weights whose every value is ``value``: (pretrained, fine-tuned, heads)."""
    pretrained, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for module in (pretrained, head):
        torch.nn.init.constant_(module.weight, value)
        torch.nn.init.constant_(module.bias, value)
    return pretrained, {"a": {"w": torch.full((3,), value)}}, {"a": head}


def _values(folder: Path) -> set[float]:
    """The distinct values of everything the cache in ``folder`` loads (one build: one value)."""
    pretrained, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    finetuned = load_zoo_weights(folder, pretrained, ["a"], {"a": head})
    tensors = [finetuned["a"]["w"], *pretrained.state_dict().values(), *head.state_dict().values()]
    return {float(v) for t in tensors for v in t.reshape(-1)}


@pytest.mark.parametrize("replace", [True, False])
def test_a_build_finishing_while_another_writes_never_mixes_their_files(tmp_path, monkeypatch, replace):
    """B writes the whole cache while A is between its files: the folder ends with one build's files."""
    import safetensors.torch

    folder, real, returned = tmp_path / "zoo", safetensors.torch.save_file, {}
    keep = {} if replace else {"replace": False}  # replacing is the default

    def interleaved(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        if "heads" in Path(path).name and "B" not in returned:  # A has written its experts: B builds the same zoo meanwhile
            returned["B"] = None
            returned["B"] = save_zoo_weights(folder, *_build(0.0), {"build": "B"}, **keep)

    monkeypatch.setattr(safetensors.torch, "save_file", interleaved)
    returned["A"] = save_zoo_weights(folder, *_build(1.0), {"build": "A"}, **keep)
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    # replace (a rebuild): A's build replaces B's whole; else B's, finished first, is kept and A told so
    assert returned == ({"A": True, "B": True} if replace else {"A": False, "B": True})
    assert _values(folder) == ({1.0} if replace else {0.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]  # no temporary left
    assert sorted(p.name for p in folder.iterdir()) == ["finetuned-a.safetensors", "heads.safetensors", "info.json", "pretrained.safetensors"]


def test_a_rebuild_renamed_in_while_a_reader_loads_never_mixes_builds(tmp_path):
    """A reader has read the cache of build A when a rebuild (B) takes its place: it gets A's
    weights whole (or nothing to load), never A's encoder with B's heads and experts."""
    folder = tmp_path / "zoo"
    save_zoo_weights(folder, *_build(1.0), {"build": "A"})

    class Swapping(torch.nn.Linear):
        def load_state_dict(self, *args, **kwargs):
            save_zoo_weights(folder, *_build(0.0), {"build": "B"})  # the rebuild, renamed into place now
            return super().load_state_dict(*args, **kwargs)

    pretrained, head = Swapping(2, 2), torch.nn.Linear(2, 2)
    finetuned = load_zoo_weights(folder, pretrained, ["a"], {"a": head})
    if finetuned is not None:
        tensors = [finetuned["a"]["w"], *pretrained.state_dict().values(), *head.state_dict().values()]
        assert {float(v) for t in tensors for v in t.reshape(-1)} == {1.0}
    assert _values(folder) == {0.0}  # the rebuild is in place, whole
