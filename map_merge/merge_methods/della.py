"""DELLA (MagPrune): drop entries at random with keep probabilities that grow with the magnitude."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import base
from .base import ChunkSource, InPlaceMethod, check_scope, scope_units
from .consensus import check_consensus, sign_consensus_
from .masks import random_words, uniform24
from .rescale import l1_match_scales
from .select import BINS, magnitude_bits, magnitude_histogram

__all__ = ["Della", "row_length", "rank_stride"]

RESCALES = (None, "l1", "inverse")


def row_length(shape: tuple[int, ...]) -> int:
    """Entries per row of a tensor: its trailing dimensions (a 0-d or 1-d tensor is one row)."""
    size = 1
    for dim in shape[1:] if len(shape) >= 2 else shape:
        size *= int(dim)
    return size


def rank_stride(shape: tuple[int, ...]) -> int:
    """The distance between entries ranked together: mergekit ranks along dimension 1, so entry
    ``[i, j, k...]`` is ranked among ``[i, :, k...]``, which lie ``prod(shape[2:])`` apart in a row
    (1 for 0-d, 1-d and 2-d tensors)."""
    size = 1
    for dim in shape[2:]:
        size *= int(dim)
    return size


def _chunk_elements() -> int:
    return int(base.CHUNK)  # read at call time: tests make chunks small (map_merge.merge_methods.CHUNK sets it)


def row_rank_norm(deltas: torch.Tensor, row: int, stride: int = 1) -> torch.Tensor:
    """``(T, n)`` normalised ranks ``(rank - 1) / (m - 1)`` of ``|x|`` within each row of ``row``
    consecutive entries, among the ``m = row / stride`` entries ``stride`` apart (mergekit's ranks
    along dimension 1 of a tensor; ``stride``: :func:`rank_stride`). Rank 1 = the smallest, ties in
    index order; 0.5 where ``m`` is 1."""
    num_tasks, num = deltas.shape
    count = row // stride
    if count == 1:
        return torch.full((num_tasks, num), 0.5, dtype=torch.float32, device=deltas.device)
    magnitude = deltas.abs().reshape(num_tasks, num // row, count, stride)
    order = magnitude.sort(dim=2, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(2, order, torch.arange(count, device=deltas.device).view(1, 1, count, 1).expand_as(order))
    # a tensor divisor: true division on every device (as mergekit's (ranks - min) / (max - min))
    return ranks.to(torch.float32).div_(torch.tensor(float(count - 1), device=deltas.device)).reshape(num_tasks, num)


@dataclass(frozen=True)
class Della(InPlaceMethod):
    """DELLA-merging's MagPrune (Deep et al., 2024), as mergekit 0.1.5's ``della``.

    Entries of a task vector are ranked by ``|x|`` along dimension 1 of their tensor, as mergekit's
    ``della_magprune`` does (entry ``[i, j, k...]`` among ``[i, :, k...]``: a row of a 2-d weight,
    the whole of a 1-d tensor, a column of each expert's matrix in a 3-d tensor ``(E, rows,
    cols)``); entry ``i`` is kept with probability
    ``(density - epsilon) + rank_norm_i * 2 * epsilon`` (``rank_norm`` from 0 for the smallest to
    1 for the largest of those it is ranked among; 0.5 where that is one entry, where mergekit
    fails), by a seeded mask (:mod:`map_merge.merge_methods.masks`: the same on every device,
    storage and chunking).
    ``scope="global"`` ranks over each whole task vector instead (``rank_norm`` from a histogram of
    65536 magnitude bins, interpolated within a bin).

    ``rescale``: ``"l1"`` (mergekit's default: the pruned vector is scaled to the unpruned L1 norm,
    per tensor or per task vector by scope); ``"inverse"`` (the DELLA paper: kept entries divided
    by their keep probability, so the expected vector is the unpruned one); ``None``.
    ``consensus="sum"`` and ``normalize=True`` (mergekit's defaults) keep the entries that agree
    with the sign of the summed pruned vectors (a zero sum elects ``+``) and divide by the number
    that agree: with every ``c_i = lam`` this is mergekit's ``della`` with ``weight: 1,
    lambda: lam``; ``consensus=None, normalize=False`` is mergekit's ``della_linear`` with
    ``weight: c_i`` (see :mod:`map_merge.merge_methods.consensus`).

    Args:
        density: mean keep probability, in (0, 1] (1 keeps everything).
        epsilon: half-width of the keep probabilities, with ``0 < density - epsilon`` and
            ``density + epsilon < 1`` when ``density < 1``.
        seed: seed of the masks.
        scope: ``"tensor"`` (per row, mergekit) or ``"global"``.
        rescale: ``"l1"``, ``"inverse"`` or ``None``.
        consensus: ``"sum"`` or ``None``.  normalize: see above (needs consensus).
    """

    density: float = 0.5
    epsilon: float = 0.15
    seed: int = 0
    scope: str = "tensor"
    rescale: str | None = "l1"
    consensus: str | None = "sum"
    normalize: bool = True
    name = "della"
    _needs_state = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"Della.density is the mean keep probability and must lie in (0, 1]; got {self.density}")
        if self.density < 1 and not (self.epsilon >= 0 and self.density - self.epsilon > 0 and self.density + self.epsilon < 1):
            raise ValueError(f"Della.epsilon must keep density +/- epsilon inside (0, 1); got density {self.density}, "
                             f"epsilon {self.epsilon}")
        check_scope("Della", self.scope)
        if self.rescale not in RESCALES:
            raise ValueError(f"Della.rescale must be one of {list(RESCALES)}, got {self.rescale!r}")
        check_consensus("Della", self.consensus, self.normalize)

    @property
    def spec(self) -> dict[str, Any]:
        return {**super().spec, "draw": "index-hash-v1", "rank": "dim1"}  # "rank": ranked along dimension 1 (not rows)

    # ------------------------------------------------------------------ statistics
    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
        """Row lengths, ranks of rows longer than a chunk, the global magnitude histogram, and the
        L1 factors (``rescale="l1"``)."""
        if shapes is None:
            raise ValueError("Della ranks magnitudes per row and needs the tensors' shapes: call fit(chunks, sizes, shapes)")
        missing = [key for key in sizes if key not in shapes]
        if missing:
            raise ValueError(f"Della.fit: no shape for tensors {missing[:5]}")
        state: dict[str, Any] = {"rows": {key: row_length(tuple(shapes[key])) for key in sizes},
                                 "strides": {key: rank_stride(tuple(shapes[key])) for key in sizes}, "ranks": {}, "cdf": None,
                                 "scale": {}}
        if self.density >= 1:
            return state
        if self.scope == "global":
            counts = magnitude_histogram(lambda: (d for _, _, d in chunks(None)))
            if counts is not None:
                counts = counts.to(torch.float64)
                below = counts.cumsum(1) - counts  # entries in lower bins
                state["cdf"] = (below, counts, (counts.sum(1, keepdim=True) - 1).clamp_min(1))
        else:
            chunk = _chunk_elements()
            for key, row in state["rows"].items():
                if row > chunk:  # rows cut across chunks: rank the whole tensor now, keep its ranks
                    whole = torch.cat([d for _, _, d in chunks([key])], dim=1)
                    state["ranks"][key] = row_rank_norm(whole, row, state["strides"][key])
        if self.rescale == "l1":
            for unit, keys, _ in scope_units(self.scope, sizes):
                state["scale"][unit] = l1_match_scales(chunks, keys, lambda key, start, deltas: self._keep(key, start, deltas, state)[0])
        return state

    def keep_probabilities(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        """``(T, n)`` fp32 keep probabilities of the chunk ``deltas: (T, n)`` at ``[start, start + n)`` of ``key``."""
        num_tasks, num = deltas.shape
        if self.density >= 1:
            return torch.ones(num_tasks, num, dtype=torch.float32, device=deltas.device)
        if self.scope == "global":
            if state["cdf"] is None:
                raise ValueError("Della was fitted on no data")
            below, counts, last = (t.to(deltas.device) for t in state["cdf"])
            bits = magnitude_bits(deltas)
            top = bits.bitwise_right_shift(16).to(torch.int64)
            within = bits.bitwise_and(BINS - 1).to(torch.float64) / BINS
            rank = below.gather(1, top) + counts.gather(1, top) * within
            rank_norm = (rank / last).clamp_(0, 1).to(torch.float32)
        else:
            if key not in state["rows"]:
                raise KeyError(f"Della was fitted without tensor {key!r}; fit it on the same task vectors")
            row = state["rows"][key]
            if start % row == 0 and num % row == 0:
                rank_norm = row_rank_norm(deltas, row, state["strides"][key])
            elif key in state["ranks"]:
                rank_norm = state["ranks"][key][:, start : start + num].to(deltas.device)
            else:
                raise ValueError(f"Della ranks whole rows: chunk [{start}, {start + num}) of {key!r} cuts a row of {row} entries")
        # mergekit's order of operations: (density - epsilon) + rank_norm * 2 * epsilon, in fp32
        return rank_norm.mul(2).mul_(self.epsilon).add_(self.density - self.epsilon)  # rank_norm may be state

    def _keep(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep (T, n): 1.0 kept / 0.0 dropped, keep probabilities (T, n))`` of a chunk."""
        probabilities = self.keep_probabilities(key, start, deltas, state)
        if self.density >= 1:
            return torch.ones_like(probabilities), probabilities
        work = self._scratch()
        words = random_words(self.seed, "della", key, start, deltas.shape[1], deltas.shape[0], deltas.device, work)
        bound = probabilities * float(1 << 24)  # u < p  <=>  u * 2**24 < p * 2**24 (both exact in fp32)
        return torch.lt(uniform24(words), bound, out=bound), probabilities

    # ------------------------------------------------------------------ the map
    def _map_(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        keep, probabilities = self._keep(key, start, deltas, state)
        deltas.mul_(keep)
        if self.density < 1:
            if self.rescale == "l1":
                scale = state["scale"].get(None if self.scope == "global" else key)
                if scale is not None:
                    deltas.mul_(scale.to(device=deltas.device, dtype=deltas.dtype)[:, None])
            elif self.rescale == "inverse":
                deltas.div_(probabilities.to(deltas.dtype))
        if self.consensus is not None:
            sign_consensus_(deltas, normalize=self.normalize, zero_elects_positive=True, work=self._scratch())
        return deltas
