"""Checkpoint-file validation (map_merge.task_vectors.checkfile) against the ``safetensors``
library: files written by hand (struct + json) that the library refuses are refused with a clear
error naming the file and the entry, by every reader; files the library writes pass."""

import json
import struct

import pytest
import torch

from map_merge.task_vectors.checkfile import CheckpointFileError, read_checked_header
from map_merge.task_vectors.safetensors_io import SafetensorsCheckpoint
from map_merge.task_vectors.sources import load_state_dict

safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def write_raw(path, header, data=b"", length=None):
    """A safetensors file as the format states: 8-byte little-endian length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw) if length is None else length))
        handle.write(raw)
        handle.write(data)
    return path


def library_refuses(path, read=True):
    try:
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                if read:
                    handle.get_tensor(key)
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


F32_ONE = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
FOUR = b"\x00\x00\x80\x3f"  # 1.0 in fp32

# (id, header, data, what the message must say)
MALFORMED = [
    ("list-header", [], b"", r"header is a JSON list, not an object"),
    ("no-dtype", {"w": {"shape": [1], "data_offsets": [0, 4]}}, FOUR, r"tensor 'w' has no dtype"),
    ("string-offsets", {"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, FOUR, r"tensor 'w' has data_offsets"),
    ("negative-offsets", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-8, -4]}}, FOUR, r"tensor 'w': byte range \[-8, -4\)"),
    ("past-the-end", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, FOUR, r"tensor 'w': byte range \[0, 8\) lies outside"),
    ("wrong-size", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, FOUR, r"tensor 'w'.* holds 4 bytes but shape \[2\]"),
    ("overlap", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
     FOUR + b"\0\0", r"tensor 'b' \(bytes \[2, 6\)\) overlaps tensor 'a'"),
    ("unknown-dtype", {"w": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, FOUR, r"tensor 'w' has dtype 'F17'"),
    ("negative-shape", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, FOUR, r"tensor 'w' has shape \[-1\]"),
    ("bool-shape", {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, FOUR, r"tensor 'w' has shape \[True\]"),
    ("three-offsets", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, FOUR, r"tensor 'w' has data_offsets"),
    ("entry-not-object", {"w": [0, 4]}, FOUR, r"tensor 'w' is a JSON list"),
    ("metadata-int", {"__metadata__": {"format": 1}, "w": F32_ONE}, FOUR, r"'__metadata__' must map strings to strings"),
    ("not-json", b"{not json", b"", r"header is not valid UTF-8 JSON"),
    ("not-utf8", b"\xff\xfe{}", b"", r"header is not valid UTF-8 JSON"),
]


@pytest.mark.parametrize("header,data,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_headers_are_refused_with_the_file_and_entry(tmp_path, header, data, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data)
    assert library_refuses(path)  # ground truth: the safetensors library refuses the same file
    with pytest.raises(CheckpointFileError, match=rf"bad\.safetensors is not a valid safetensors file: .*{message}"):
        SafetensorsCheckpoint(path)
    assert issubclass(CheckpointFileError, ValueError)


def test_negative_offsets_no_longer_read_the_header_itself(tmp_path):
    # the old reader took begin=-8 as 8 bytes before the data: the tensor was the header's own bytes
    header = {"w": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}
    path = write_raw(tmp_path / "neg.safetensors", header, b"")
    assert library_refuses(path)
    with pytest.raises(CheckpointFileError, match=r"tensor 'w': byte range \[-4, 0\) lies outside the file's 0 data bytes"):
        load_state_dict(path)


@pytest.mark.parametrize("length,raw,message", [
    (None, b"", r"header is not valid UTF-8 JSON"),
    (10_000, b"{}", r"header length 10000 runs past the end of the file"),
    (2**40, b"{}", r"header length 1099511627776 is over 100000000 bytes"),
], ids=["empty-header", "length-past-end", "huge-length"])
def test_header_lengths_are_checked(tmp_path, length, raw, message):
    path = write_raw(tmp_path / "len.safetensors", raw, b"", length=length)
    assert library_refuses(path)
    with pytest.raises(CheckpointFileError, match=message):
        SafetensorsCheckpoint(path)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert library_refuses(short)
    with pytest.raises(CheckpointFileError, match="shorter than the 8-byte header length"):
        SafetensorsCheckpoint(short)


def test_files_written_by_safetensors_pass_and_read_alike(tmp_path):
    tensors = {"a": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, -2], dtype=torch.int64),
               "c": torch.ones(3, dtype=torch.bfloat16), "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float16)}
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    length, entries, metadata = read_checked_header(path)
    assert metadata == {"format": "pt"} and set(entries) == set(tensors)
    assert entries["a"].shape == (2, 3) and entries["a"].dtype == "F32" and entries["scalar"].shape == ()
    checkpoint = SafetensorsCheckpoint(path)
    with safe_open(str(path), "pt") as handle:
        for key in tensors:
            assert torch.equal(checkpoint.read(key).view(checkpoint.tensors[key].shape), handle.get_tensor(key)), key
    checkpoint.close()
    # sub-byte and new dtypes are known to the format (map_merge says it cannot read them, not that the file is bad)
    write_raw(tmp_path / "f4.safetensors", {"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0")
    assert not library_refuses(tmp_path / "f4.safetensors", read=False)  # the library opens it too
    assert read_checked_header(tmp_path / "f4.safetensors")[1]["w"].end == 2
    with pytest.raises(ValueError, match="has dtype F4, which map_merge cannot read"):
        SafetensorsCheckpoint(tmp_path / "f4.safetensors")


@pytest.mark.parametrize("index,message", [
    ([], r"has no 'weight_map' object"),
    ({"weight_map": {"w": 3}}, r"tensor 'w' is mapped to 3"),
    ({"weight_map": {"w": "../elsewhere.safetensors"}}, r"tensor 'w' is mapped to '\.\./elsewhere\.safetensors'"),
], ids=["list", "int-name", "outside-folder"])
def test_malformed_shard_index_is_named(tmp_path, index, message):
    save_file({"w": torch.ones(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointFileError, match=rf"model\.safetensors\.index\.json.*{message}"):
        SafetensorsCheckpoint(tmp_path)


def test_a_malformed_adapter_file_is_refused_by_the_lora_reader(tmp_path):
    from map_merge.task_vectors.lora import LoraAdapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    write_raw(tmp_path / "adapter_model.safetensors", {"base_model.model.x.lora_A.weight": {"shape": [2, 2], "data_offsets": [0, 16]}},
              b"\0" * 16)
    with pytest.raises(CheckpointFileError, match=r"adapter_model\.safetensors is not a valid .* tensor 'base_model\.model\.x\.lora_A\.weight' has no dtype"):
        LoraAdapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointFileError, match=r"adapter_config\.json is not a JSON object"):
        LoraAdapter(tmp_path)
