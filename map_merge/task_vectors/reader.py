"""Reading the raw chunks a streamed task-arithmetic merge needs, ahead of the arithmetic.

For task arithmetic only the pretrained chunk and each whole fine-tuned chunk with a non-zero
coefficient are read (LoRA factors are in memory). :class:`ChunkReader` reads them with
``pread`` into reused byte buffers, and :meth:`ChunkReader.ahead` reads the next chunk in a
thread while the caller computes this one (``pread`` releases the GIL): reading and arithmetic
overlap, and resident memory stays at two sets of chunk buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import merge_methods
from .lora import MatchedLora
from .sources import Weights

__all__ = ["ChunkReader", "RawChunks"]

RawChunks = tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]
"""``(pretrained chunk, [(c_i, chunk of task i)])`` in their stored dtypes."""


class ChunkReader:
    """Reads raw chunks of the pretrained weights and the whole task tensors (full fine-tunes and
    tensors adapters save whole), in their stored dtypes.

    Args:
        base: the pretrained weights.  full: ``(task index, weights)`` of full fine-tunes.
        lora: ``(task index, adapter)`` of LoRA tasks.  keys: the merged keys (to size the buffers).
    """

    def __init__(self, base: Weights, full: Sequence[tuple[int, Weights]], lora: Sequence[tuple[int, MatchedLora]],
                 keys: Sequence[str]) -> None:
        self.base, self.full, self.lora = base, list(full), list(lora)
        self._keys = list(keys)
        self._slots: list[list[torch.Tensor]] = []

    def _buffers(self) -> list[list[torch.Tensor]]:
        """Two sets (double buffering) of one byte buffer per checkpoint, for chunk reads."""
        sources = [self.base] + [w for _, w in self.full]
        itemsize = max((torch.empty((), dtype=w.tensors[k][0]).element_size() for w in sources for k in self._keys), default=4)
        size = merge_methods.CHUNK * itemsize
        if not self._slots or self._slots[0][0].numel() < size:
            self._slots = [[torch.empty(size, dtype=torch.uint8) for _ in sources] for _ in range(2)]
        return self._slots

    def read(self, key: str, start: int, stop: int, c: np.ndarray, slot: list[torch.Tensor] | None = None) -> RawChunks:
        """The pretrained chunk and ``(c_i, chunk)`` of every whole tensor with ``c_i != 0``, read into
        the byte buffers of ``slot`` (one per checkpoint) when given."""
        buffers = iter(slot) if slot is not None else None

        def take() -> torch.Tensor | None:
            return next(buffers) if buffers is not None else None

        base = self.base.read(key, start, stop, take())
        whole = [(float(c[i]), w.read(key, start, stop, take())) for i, w in self.full if c[i] != 0]
        whole += [(float(c[i]), lora.full[key].reshape(-1)[start:stop]) for i, lora in self.lora if key in lora.full and c[i] != 0]
        return base, whole

    def ahead(self, work: Sequence[tuple[str, int, int]], c_of: Callable[[str], np.ndarray]) -> Iterator[RawChunks]:
        """The raw chunks of each ``(key, start, stop)`` of ``work`` in order (``c_of(key)``: that
        tensor's coefficients ``(T,)``), each read in a thread while the previous one is being used
        (a yielded chunk is valid until the next is asked for)."""
        if len(work) < 2:
            for key, start, stop in work:
                yield self.read(key, start, stop, c_of(key))
            return
        slots = self._buffers()
        pool = ThreadPoolExecutor(1)
        try:
            turn = 0
            pending = pool.submit(self.read, *work[0], c_of(work[0][0]), slots[turn])
            for index in range(len(work)):
                raw = pending.result()
                if index + 1 < len(work):
                    turn = 1 - turn  # the other slot: the chunk in hand is still being used from this one
                    pending = pool.submit(self.read, *work[index + 1], c_of(work[index + 1][0]), slots[turn])
                yield raw
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
