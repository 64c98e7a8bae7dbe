"""Counter-based random numbers for drop masks: a hash of ``(seed, stream, key, task, element
index)``, computed with vectorised int32 operations on whatever device the chunk lives on.

The random 32-bit word of element ``i`` (flat index within tensor ``key``) of task ``t`` is::

    s = blake2b(seed, stream, key, t, i >> 31)[:4]          (a 32-bit seed, host side, per tensor)
    x = (i mod 2**31) * 0x9e3779b9 + s                        (mod 2**32)
    x ^= x >> 16;  x *= 0x7feb352d;  x ^= x >> 15;  x *= 0x846ca68b   (mod 2**32, logical shifts)

(the first four steps of Chris Wellons' ``lowbias32`` integer hash; the masks read its top bits).
The word depends on nothing but these five values, so a mask is the same whatever the chunk
boundaries, the order of work, the storage or the device (CPU, CUDA: integer arithmetic is
exact everywhere), and any sub-range is drawn without drawing anything else. Integer
multiplication wraps modulo ``2**32`` in torch's int32 kernels; a test checks the words against
a pure-Python evaluation of the formula.
"""

from __future__ import annotations

import hashlib

import torch

from .workspace import Workspace

__all__ = ["random_words", "uniform24"]

_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)  # as a signed int32
_GOLDEN = 0x9E3779B9 - (1 << 32)  # odd: spreads consecutive indices over all 32 bits
_WINDOW = 1 << 31  # element indices per seed window (int32 holds the index within a window)


def _seed32(seed: int, stream: str, key: str, task: int, window: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{stream}\x00{key}\x00{task}\x00{window}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little", signed=True)


def _mix_(words: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The hash steps on int32 ``words`` in place (logical shifts: arithmetic shift, then mask)."""
    scratch = torch.empty_like(words) if scratch is None else scratch
    torch.bitwise_right_shift(words, 16, out=scratch)
    words.bitwise_xor_(scratch.bitwise_and_(0xFFFF))
    words.mul_(_MUL1)
    torch.bitwise_right_shift(words, 15, out=scratch)
    words.bitwise_xor_(scratch.bitwise_and_(0x1FFFF))
    return words.mul_(_MUL2)


def random_words(seed: int, stream: str, key: str, start: int, num: int, num_tasks: int,
                 device: torch.device | str | None = None, work: Workspace | None = None) -> torch.Tensor:
    """``(T, num)`` int32 random words for elements ``[start, start + num)`` of tensor ``key``.

    Each word is uniform over the 2**32 int32 values; words of different elements, tasks, keys,
    seeds or streams are (pseudo-)independent. ``stream`` separates the uses of one seed (DARE's
    masks, DELLA's masks). ``work``: a :class:`Workspace` whose buffers hold the words (valid
    until its next use) instead of new tensors."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = (num_tasks, num)
    out = work.get("words", shape, torch.int32, device) if work is not None else torch.empty(shape, dtype=torch.int32, device=device)
    scratch = work.get("words_scratch", shape, torch.int32, device) if work is not None else None
    position, stop = start, start + num
    while position < stop:
        window = position // _WINDOW
        end = min(stop, (window + 1) * _WINDOW)
        first, count = position - window * _WINDOW, end - position
        steps = _golden_steps(count, device, work)[:count]  # j * golden for j < count
        for task in range(num_tasks):  # (first + j) * golden + s = j * golden + (first * golden + s), mod 2**32
            offset = _int32(first * (_GOLDEN % 2**32) + _seed32(int(seed), stream, key, task, window))
            torch.add(steps, offset, out=out[task, position - start : end - start])
        block = out[:, position - start : end - start]
        if count == num:
            _mix_(block, scratch)
        else:  # a chunk that crosses a window boundary (tensors of more than 2**31 entries)
            block.copy_(_mix_(block.contiguous()))
        position = end
    return out


def _int32(value: int) -> int:
    """``value`` modulo 2**32 as a signed int32."""
    value %= 1 << 32
    return value - (1 << 32) if value >> 31 else value


def _golden_steps(count: int, device: torch.device, work: Workspace | None) -> torch.Tensor:
    """``arange(count) * golden`` (int32, wrapping); kept in ``work`` (its contents never change)."""
    make = lambda size: torch.arange(size, dtype=torch.int32, device=device).mul_(_GOLDEN)  # noqa: E731
    return work.constant("golden-steps", count, device, make) if work is not None else make(count)


def uniform24(words: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of ``words`` as int32 in ``[0, 2**24)``: ``u * 2**-24`` is uniform on [0, 1)."""
    return words.bitwise_right_shift(8).bitwise_and_(0xFFFFFF)
