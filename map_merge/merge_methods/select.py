"""Exact order statistics of magnitudes over data seen as chunks: a radix select on fp32 bit
patterns whose histograms stay on the chunks' device.

The bit pattern of a non-negative fp32 value, read as an int32, is monotone in the value, so
the ``k``-th largest magnitude is found from two histograms: the top 16 bits pick the bin that
holds it, the low 16 bits of the entries in that bin give it exactly. The rows of a ``(T, n)``
chunk are counted in one ``bincount`` (row ``t`` offset by ``t * 65536``); memory is a few
``(T, 65536)`` int64 tables, never a ``(T, P)`` matrix; only the final thresholds go to the host.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

__all__ = ["kth_largest_magnitude", "magnitude_histogram", "magnitude_bits"]

BINS = 65536


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of ``|values|`` in fp32 (monotone in the magnitude)."""
    return values.to(torch.float32).abs().contiguous().view(torch.int32)


def magnitude_histogram(passes: Callable[[], Iterator[torch.Tensor]]) -> torch.Tensor | None:
    """``(T, 65536)`` int64 counts of the top 16 bits of ``|x|`` per row, over one pass of
    ``(T, n)`` chunks, on the chunks' device (``None`` when there is no chunk)."""
    counts = None
    for chunk in passes():
        bits = magnitude_bits(chunk)
        rows = bits.shape[0]
        if counts is None:
            counts = torch.zeros(rows * BINS, dtype=torch.int64, device=bits.device)
            offsets = torch.arange(rows, dtype=torch.int32, device=bits.device)[:, None] * BINS
        _count_into(counts, (bits.bitwise_right_shift(16) + offsets).reshape(-1))
    return None if counts is None else counts.view(-1, BINS)


def _count_into(counts: torch.Tensor, index: torch.Tensor) -> None:
    """``counts[i] += (index == i).sum()`` for every ``i``: a ``bincount`` for large chunks, a
    scatter for small ones (whose cost would be the length of ``counts``)."""
    if index.numel() >= counts.numel() // 4:
        counts += torch.bincount(index, minlength=counts.numel())
    else:
        counts.index_put_((index.to(torch.int64),), torch.ones((), dtype=counts.dtype, device=counts.device).expand(index.shape),
                          accumulate=True)


def _compact(device: torch.device) -> bool:
    """Count a bin's entries by selecting them (CPU) rather than through a sentinel bin (other
    devices: no host synchronisation)."""
    return device.type == "cpu"


def _largest_bin(at_least: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per ``(t, k)``: the largest bin ``b`` with ``at_least[t, b] >= ranks[t, k]`` (``at_least``
    is non-increasing along bins, so that is the number of such bins minus one)."""
    return (at_least[:, None, :] >= ranks[:, :, None]).sum(-1) - 1


def kth_largest_magnitude(passes: Callable[[], Iterator[torch.Tensor]], keep: torch.Tensor) -> torch.Tensor:
    """Exact ``keep[t]``-th largest ``|x|`` of each row ``t`` over data seen as chunks.

    Args:
        passes: each call yields the data again as ``(T, n)`` chunks (two calls are made).
        keep: ``(T,)`` ranks (1 = the largest), or ``(T, K)`` for ``K`` ranks per row at no extra
            pass; each at least 1 and at most the row's number of elements.
    Returns: float32 thresholds of ``keep``'s shape, on the CPU (the entries ``>=`` a threshold
        are the top ``keep``, ties included).
    """
    keep = torch.as_tensor(keep).to(torch.int64)
    single = keep.ndim == 1
    ranks = keep[:, None] if single else keep
    if ranks.ndim != 2:
        raise ValueError(f"keep must be (T,) or (T, K) ranks, got shape {tuple(keep.shape)}")
    if bool((ranks < 1).any()):
        raise ValueError(f"ranks start at 1 (the largest), got {keep.tolist()}")
    counts = magnitude_histogram(passes)
    if counts is None:
        raise ValueError("no data to select from")
    rows, num_ranks = ranks.shape
    device = counts.device
    ranks = ranks.to(device)
    at_least = counts.flip(1).cumsum(1).flip(1)  # at_least[t, b] = entries of row t with top bits >= b
    if bool((ranks > at_least[:, :1]).any()):
        raise ValueError(f"a rank exceeds the number of entries per row ({at_least[:, 0].tolist()}): {keep.tolist()}")
    hi = _largest_bin(at_least, ranks)  # (T, K)
    above = torch.where(hi < BINS - 1, at_least.gather(1, (hi + 1).clamp_max(BINS - 1)), torch.zeros_like(hi))
    need = ranks - above  # rank within bin hi
    low = torch.zeros(rows * num_ranks * BINS + 1, dtype=torch.int64, device=device)
    sentinel = rows * num_ranks * BINS
    offsets = (torch.arange(rows, device=device)[:, None] * num_ranks + torch.arange(num_ranks, device=device)) * BINS  # (T, K)
    hi32 = hi.to(torch.int32)
    for chunk in passes():
        bits = magnitude_bits(chunk)
        top = bits.bitwise_right_shift(16)
        bottom = bits.bitwise_and(BINS - 1)
        for k in range(num_ranks):
            in_bin = top == hi32[:, k : k + 1]
            if _compact(device):  # few entries fall in the bin: count just those
                index = (bottom + offsets[:, k : k + 1])[in_bin]
            else:  # no host synchronisation: entries outside the bin go to a sentinel bin
                index = torch.where(in_bin, bottom + offsets[:, k : k + 1], sentinel).reshape(-1)
            _count_into(low, index)
    at_least_low = low[:-1].view(rows, num_ranks, BINS).flip(2).cumsum(2).flip(2)
    lo = (at_least_low >= need[:, :, None]).sum(-1) - 1
    result = ((hi << 16) | lo).to(torch.int32).view(torch.float32).cpu()
    return result[:, 0] if single else result
