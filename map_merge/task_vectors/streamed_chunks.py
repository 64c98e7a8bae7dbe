"""Reading a streamed storage's chunks (:class:`StreamedChunks`, a part of
:class:`~map_merge.task_vectors.streamed.StreamedTaskVectors`): the pretrained chunk and every
task's delta in fp32 on the merge's device, in work buffers reused from chunk to chunk, and the
fused task-arithmetic chunk (full fine-tunes weighted, adapters' factors in one product)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import merge_methods
from .base import chunk_ranges
from .lora import MatchedLora
from .reader import ChunkReader, RawChunks
from .sources import Weights

__all__ = ["StreamedChunks"]


class StreamedChunks:
    """Chunk reading for :class:`~map_merge.task_vectors.streamed.StreamedTaskVectors`, which sets
    the attributes below (tensor order, shapes, sources, reader, buffers)."""

    num_tasks: int
    _base: Weights
    _tasks: list[Weights | MatchedLora]
    _full: list[tuple[int, Weights]]
    _lora: list[tuple[int, MatchedLora]]
    _keys: tuple[str, ...]
    _shapes: dict[str, tuple[int, ...]]
    _device: torch.device
    _dtype: torch.dtype
    _reader: ChunkReader
    _work: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]
    _blocks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]

    def _work_buffers(self, device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 work vectors of ``numel`` on ``device``, allocated once per device and reused
        (a merged chunk handed out is consumed before the next one is computed)."""
        size = merge_methods.CHUNK
        buffers = self._work.get(device)
        if buffers is None or buffers[0].numel() < size:
            buffers = (torch.empty(size, dtype=torch.float32, device=device), torch.empty(size, dtype=torch.float32, device=device))
            self._work[device] = buffers
        return buffers[0][:numel], buffers[1][:numel]

    def _block_buffers(self, device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(base (numel,), deltas (T, numel))`` on ``device``, allocated once per device and
        reused by merges with an operator (a chunk's deltas are consumed before the next is read)."""
        size = merge_methods.CHUNK
        buffers = self._blocks.get(device)
        if buffers is None or buffers[0].numel() < size:
            buffers = (torch.empty(size, dtype=torch.float32, device=device),
                       torch.empty(self.num_tasks * size, dtype=torch.float32, device=device))
            self._blocks[device] = buffers
        return buffers[0][:numel], buffers[1][: self.num_tasks * numel].view(self.num_tasks, numel)

    def _read_base(self, key: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The pretrained chunk as a new fp32 tensor on ``device`` (safe to modify)."""
        raw = self._base.read(key, start, stop)
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
        out.copy_(raw)
        return out

    def _delta(self, index: int, key: str, start: int, stop: int, base: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Task ``index``'s delta chunk in fp32 on ``device`` (``None``: zero)."""
        task = self._tasks[index]
        if isinstance(task, Weights):
            out = task.read(key, start, stop).to(device=device, dtype=torch.float32, copy=True)
            return out.sub_(base)
        return task.delta(key, start, stop, base, device)

    def _delta_block(self, key: str, start: int, stop: int, device: torch.device, raw: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, deltas (T, n))`` in fp32 on ``device``: new tensors, or (``raw``: the chunks
        the reader read ahead for every task) the reused :meth:`_block_buffers`."""
        if raw is None:
            base = self._read_base(key, start, stop, device)
            deltas = torch.zeros(self.num_tasks, stop - start, dtype=torch.float32, device=device)
        else:
            base, deltas = self._block_buffers(device, stop - start)
            base.copy_(raw[0])
            for (index, _), (_, chunk) in zip(self._full, raw[1]):  # full fine-tunes come first, in order
                deltas[index].copy_(chunk).sub_(base)
        for index, task in enumerate(self._tasks):
            if raw is not None and isinstance(task, Weights):
                continue
            delta = self._delta(index, key, start, stop, base, device)
            if delta is not None:
                deltas[index] = delta
            elif raw is not None:
                deltas[index].zero_()
        return base, deltas

    def delta_chunks(self, keys: Sequence[str] | None = None, device: torch.device | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
        device = torch.device(device) if device is not None else self._device
        for key in self._keys if keys is None else keys:
            for start, stop in chunk_ranges(self._shapes[key]):
                _, deltas = self._delta_block(key, start, stop, device)
                yield key, start, deltas.to(self._dtype)

    def base_tensor(self, key: str) -> torch.Tensor:
        return self._base.read(key).to(device=self._device, dtype=self._dtype).reshape(self._shapes[key])

    def _task_arithmetic_chunk(self, key: str, start: int, stop: int, c: np.ndarray, device: torch.device,
                               raw: RawChunks | None = None) -> torch.Tensor:
        """``(1 - sum_i c_i) theta_0 + sum_i c_i theta_i`` over whole tensors (full fine-tunes and
        tensors an adapter saves whole) plus one product over every adapter's factors."""
        base_raw, whole = raw if raw is not None else self._reader.read(key, start, stop, c)
        out, scratch = self._work_buffers(device, stop - start)
        out.copy_(base_raw)
        base_weight = 1.0 - sum(weight for weight, _ in whole)
        if base_weight != 1.0:
            out.mul_(base_weight)
        for weight, tensor in whole:
            tensor = tensor.to(device)
            if tensor.dtype != torch.float32:  # cast first: a mixed-dtype add_ is several times slower
                tensor = scratch.copy_(tensor)
            out.add_(tensor, alpha=weight)
        rows = [lora.rows(key, start, stop, device, float(c[i]))
                for i, lora in self._lora if key in lora.factors and c[i] != 0]
        if rows:
            offset, cols = rows[0][2], rows[0][3]
            left = torch.cat([r[0] for r in rows], dim=1)
            right = torch.cat([r[1] for r in rows], dim=0)
            if offset == 0 and (stop - start) % cols == 0:  # whole rows: accumulate in place, no temporary
                out.view(-1, cols).addmm_(left, right)
            else:
                out.add_((left @ right).reshape(-1)[offset : offset + stop - start])
        return out

    def _raise_nonfinite(self, key: str, start: int, stop: int, c: np.ndarray) -> None:
        for weights in [self._base] + [w for _, w in self._full]:
            if not bool(torch.isfinite(weights.read(key, start, stop)).all()):
                raise ValueError(f"tensor {key!r} of {weights.where(key)} has NaN/inf value(s)")
        raise ValueError(f"merging tensor {key!r} with coefficients {c.tolist()} overflowed to NaN/inf")

    def validate(self) -> Any:
        """Read every tensor of every checkpoint once and raise on NaN/inf, naming file and key."""
        for key in tqdm(self._keys, desc="validating", leave=False, unit="tensor"):
            for start, stop in chunk_ranges(self._shapes[key]):
                if not bool(torch.isfinite(self._base.read(key, start, stop)).all()):
                    raise ValueError(f"tensor {key!r} of {self._base.where(key)} has NaN/inf value(s)")
                for _, task in self._full:
                    if not bool(torch.isfinite(task.read(key, start, stop)).all()):
                        raise ValueError(f"tensor {key!r} of {task.where(key)} has NaN/inf value(s)")
        return self
