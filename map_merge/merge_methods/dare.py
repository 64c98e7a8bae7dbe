"""DARE: drop entries at random, rescale the survivors; optionally followed by TIES."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import ChunkSource, InPlaceMethod, tiled_
from .masks import random_words
from .ties import Ties

__all__ = ["Dare"]


@dataclass(frozen=True)
class Dare(InPlaceMethod):
    """DARE: random drop with probability ``p``, rescale by ``1/(1-p)``; optionally then TIES.

    The drop mask of entry ``i`` of tensor ``key`` for task ``t`` is a function of
    ``(seed, key, t, i)`` alone (a counter-based hash, :mod:`map_merge.merge_methods.masks`),
    computed on the device the chunk lives on: the same seed gives the same merged model on any
    device, storage, chunking and order of work, and a chunk draws only its own entries.

    Args:
        p: drop probability in [0, 1) (entry dropped when its 32-bit word falls in the lowest
            ``round(p * 2**32)`` of the ``2**32`` values).
        seed: seed of the drop masks (the same seed gives the same merged model).
        ties: ``None`` for plain DARE, or a :class:`Ties` applied to the rescaled vectors.
    """

    p: float = 0.5
    seed: int = 0
    ties: Ties | None = None
    name = "dare"
    _elementwise = True

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"Dare.p is a drop probability and must lie in [0, 1); got {self.p}")

    @property
    def spec(self) -> dict[str, Any]:
        # "draw" names the mask scheme: results stored under earlier schemes (a CPU generator per
        # tensor block) are not reused for these masks
        return {"name": self.name, "p": self.p, "seed": self.seed, "ties": None if self.ties is None else self.ties.spec,
                "draw": "index-hash-v1"}

    @property
    def _threshold(self) -> int:
        """Words below this (signed int32) are dropped: ``round(p * 2**32)`` of the 2**32 values."""
        return min(round(float(self.p) * 2**32) - 2**31, 2**31 - 1)

    def keep_mask(self, key: str, start: int, num_tasks: int, num: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``(T, num)`` bool mask of kept entries for elements ``[start, start + num)`` of ``key``."""
        return random_words(self.seed, "dare", key, start, num, num_tasks, device) >= self._threshold

    def _drop_(self, key: str, start: int, deltas: torch.Tensor) -> torch.Tensor:
        """Dropped and rescaled ``deltas``, in place."""
        if self.p > 0:
            work = self._scratch()
            words = random_words(self.seed, "dare", key, start, deltas.shape[1], deltas.shape[0], deltas.device, work)
            keep = torch.ge(words, self._threshold, out=work.get("dare_keep", deltas.shape, deltas.dtype, deltas.device))
            deltas.mul_(keep)  # 1.0 for kept entries: they are exactly x / (1 - p) below
        return deltas.div_(1.0 - self.p)

    def _drop_tiles_(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        def apply(key: str, start: int, tile: torch.Tensor) -> torch.Tensor:
            out = self._drop_(key, start, tile)
            return self.ties.transform_(key, start, out, state) if self.ties is not None else out  # a tile: applied at once

        return tiled_(apply, key, start, deltas)

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
        if self.ties is None:
            return None
        return self.ties.fit(lambda keys=None: ((k, s, tiled_(self._drop_, k, s, d.clone())) for k, s, d in chunks(keys)), sizes, shapes)

    def _map_(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        return self._drop_tiles_(key, start, deltas, state)
