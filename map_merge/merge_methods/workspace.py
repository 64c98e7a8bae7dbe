"""Scratch tensors an operator reuses from chunk to chunk.

A fresh multi-megabyte tensor per chunk and step costs page faults that can exceed the
arithmetic itself (on CPU, each new allocation of a chunk's size is mapped and touched again), so
operators keep their temporaries: one flat buffer per (thread, device, dtype, name), grown to the
largest chunk seen. Buffers never leave an operator: what :meth:`MergeMethod.transform` returns
is always the caller's (a new tensor, or for ``transform_`` the caller's own input).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

__all__ = ["Workspace"]


class Workspace:
    """Reusable scratch tensors, per thread and device (not copied or pickled)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined), the same memory on every call
        with the same ``name`` from this thread on this device."""
        numel = 1
        for size in shape:
            numel *= int(size)
        key = (threading.get_ident(), torch.device(device), dtype, name)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buffer
        return buffer[:numel].view(tuple(shape))

    def constant(self, name: str, numel: int, device: torch.device, make: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """A tensor whose first ``numel`` entries depend on nothing but their index (``make(size)``
        builds one of ``size``), shared by all threads and rebuilt only to grow."""
        key = (None, torch.device(device), None, name)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = make(numel)
            self._buffers[key] = buffer
        return buffer

    def __getstate__(self) -> dict:
        return {"_buffers": {}}

    def __deepcopy__(self, memo: dict) -> "Workspace":
        return Workspace()
