"""Checking checkpoint files before anything is read from them: safetensors headers and the
``model.safetensors.index.json`` of sharded folders.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of a UTF-8 JSON
object, then the data. Each header entry but ``__metadata__`` (a ``str -> str`` object) is a
tensor: ``{"dtype": one of SAFETENSORS_BITS, "shape": [non-negative ints], "data_offsets":
[begin, end]}`` with offsets relative to the start of the data. :func:`read_checked_header`
refuses what the ``safetensors`` library refuses (a header that is no JSON object, a field of the
wrong type, a byte range before the data, past the file's end, not the tensor's size, or
overlapping another tensor's), with a :class:`CheckpointFileError` naming the file and the entry,
instead of a raw ``TypeError``/``KeyError`` or a tensor read from the header's own bytes. Like
the library, unknown extra fields of an entry are ignored; unlike it, gaps between tensors and
bytes after the last one are allowed (nothing is read from them).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointFileError

__all__ = ["CheckpointFileError", "HeaderEntry", "SAFETENSORS_BITS", "MAX_HEADER_BYTES", "read_checked_header", "check_header",
           "read_checked_index"]

SAFETENSORS_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
"""Bits per element of every dtype the safetensors format knows (its ``Dtype`` enum, 0.8)."""

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's bound on the header length."""


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a checked header: ``dtype`` (a safetensors name), ``shape``, and its byte
    range ``[begin, end)`` relative to the start of the data."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def check_header(raw: bytes, data_size: int, path: str | os.PathLike) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """``(key -> HeaderEntry, metadata)`` of the header bytes ``raw`` of ``path`` whose data part
    holds ``data_size`` bytes; raises :class:`CheckpointFileError` on anything malformed."""
    where = f"{path} is not a valid safetensors file"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{where}: its header is not valid UTF-8 JSON ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(f"{where}: its header is a JSON {type(header).__name__}, not an object of tensors")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFileError(f"{where}: '__metadata__' must map strings to strings, got {str(metadata)[:200]}")
    entries: dict[str, HeaderEntry] = {}
    for key, entry in header.items():
        bad = f"{where}: tensor {key!r}"
        if not isinstance(entry, dict):
            raise CheckpointFileError(f"{bad} is a JSON {type(entry).__name__}, not an object with dtype, shape and data_offsets")
        missing = [field for field in ("dtype", "shape", "data_offsets") if field not in entry]
        if missing:
            raise CheckpointFileError(f"{bad} has no {' and no '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_BITS:
            raise CheckpointFileError(f"{bad} has dtype {dtype!r}, which is not a safetensors dtype ({', '.join(SAFETENSORS_BITS)})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise CheckpointFileError(f"{bad} has shape {shape!r}; expected a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise CheckpointFileError(f"{bad} has data_offsets {offsets!r}; expected two integers [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointFileError(f"{bad}: byte range [{begin}, {end}) lies outside the file's {data_size} data bytes "
                                      "(need 0 <= begin <= end <= data size; a truncated file?)")
        numel = 1
        for s in shape:
            numel *= s
        bits = numel * SAFETENSORS_BITS[dtype]
        if bits % 8 or end - begin != bits // 8:
            raise CheckpointFileError(f"{bad}: byte range [{begin}, {end}) holds {end - begin} bytes but shape {shape} of "
                                      f"{dtype} needs {bits / 8:g}")
        entries[key] = HeaderEntry(key, dtype, tuple(shape), begin, end)
    previous: HeaderEntry | None = None
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if previous is not None and entry.begin < previous.end:
            raise CheckpointFileError(f"{where}: tensor {entry.key!r} (bytes [{entry.begin}, {entry.end})) overlaps tensor "
                                      f"{previous.key!r} (bytes [{previous.begin}, {previous.end}))")
        if previous is None or entry.end >= previous.end:
            previous = entry
    return entries, dict(metadata)


def read_checked_header(path: str | os.PathLike) -> tuple[int, dict[str, HeaderEntry], dict[str, str]]:
    """``(header length N, key -> HeaderEntry, metadata)`` of one ``.safetensors`` file, checked by
    :func:`check_header` (reads only the header). The data starts at byte ``8 + N``."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            first = handle.read(8)
            if len(first) != 8:
                raise CheckpointFileError(f"{path} is not a valid safetensors file: {size} bytes is shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", first)
            if length > MAX_HEADER_BYTES:
                raise CheckpointFileError(f"{path} is not a valid safetensors file: header length {length} is over "
                                          f"{MAX_HEADER_BYTES} bytes (not a safetensors file?)")
            if 8 + length > size:
                raise CheckpointFileError(f"{path} is not a valid safetensors file: header length {length} runs past the end of "
                                          f"the file ({size} bytes; truncated?)")
            raw = handle.read(length)
    except OSError as error:
        raise CheckpointFileError(f"{path} could not be read: {error}") from error
    entries, metadata = check_header(raw, size - 8 - length, path)
    return length, entries, metadata


def read_checked_index(path: str | os.PathLike) -> dict[str, str]:
    """The ``weight_map`` (tensor key -> shard file name) of a ``model.safetensors.index.json``:
    a non-empty ``str -> str`` object whose names are relative paths inside that folder."""
    path = Path(path)
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointFileError(f"{path} is not a readable JSON index: {error}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointFileError(f"{path} has no 'weight_map' object of tensor names to shard files")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not Path(name).name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointFileError(f"{path}: tensor {key!r} is mapped to {name!r}, not a shard file inside that folder")
    return dict(weight_map)
