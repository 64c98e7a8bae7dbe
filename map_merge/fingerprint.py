"""Content fingerprints: hashes of full tensor bytes, arrays and plain data.

They key the evaluation store (a task adapter's data) and the objectives shipped to workers.
Equal content gives the same fingerprint in any process; a tensor or array is hashed by its
dtype, shape and every byte, never by its (abbreviated) repr.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["content_digest"]


def content_digest(*parts: Any, size: int = 12) -> str:
    """Hex digest (``size`` bytes) of ``parts``: tensors, arrays, mappings, sequences, numbers,
    strings, bytes and paths, nested freely; an ``nn.Module`` by its state dict; any other
    object by its pickle."""
    digest = hashlib.blake2b(digest_size=size)
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _tag(digest: Any, tag: str, payload: bytes = b"") -> None:
    digest.update(tag.encode())
    digest.update(len(payload).to_bytes(8, "little"))
    digest.update(payload)


def _feed(digest: Any, obj: Any) -> None:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        _tag(digest, "j", json.dumps(obj).encode())
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _tag(digest, "b", bytes(obj))
    elif isinstance(obj, torch.Tensor):
        flat = obj.detach().to("cpu").contiguous().reshape(-1)
        _tag(digest, "t", f"{flat.dtype}|{tuple(obj.shape)}".encode())
        _tag(digest, "tb", flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(obj, np.ndarray):
        if obj.dtype == object:
            _tag(digest, "ao", str(obj.shape).encode())
            for item in obj.reshape(-1):
                _feed(digest, item)
        else:
            _tag(digest, "a", f"{obj.dtype.str}|{obj.shape}".encode())
            _tag(digest, "ab", np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, np.generic):
        _feed(digest, obj.item())
    elif isinstance(obj, torch.nn.Module):
        _tag(digest, "m", type(obj).__qualname__.encode())
        _feed(digest, obj.state_dict())
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
        _tag(digest, "d", str(len(items)).encode())
        for key, value in items:
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        _tag(digest, "l", str(len(obj)).encode())
        for item in obj:
            _feed(digest, item)
    elif isinstance(obj, (set, frozenset)):
        _tag(digest, "s", str(len(obj)).encode())
        for item in sorted(content_digest(x) for x in obj):
            _tag(digest, "si", item.encode())
    elif isinstance(obj, os.PathLike):
        _tag(digest, "p", os.fspath(obj).encode())
    else:
        try:
            payload = pickle.dumps(obj, protocol=4)
        except Exception as error:  # noqa: BLE001 - name the object that cannot be fingerprinted
            raise TypeError(f"cannot fingerprint a {type(obj).__qualname__}: it is neither data nor picklable ({error})") from None
        _tag(digest, "o:" + type(obj).__qualname__, payload)
