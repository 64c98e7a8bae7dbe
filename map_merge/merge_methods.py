"""Merge operators: how task vectors are prepared before per-task coefficients scale them.

Every operator maps task vectors to prepared vectors ``V'`` once per model; a merge is then
always linear in the coefficients::

    theta(c) = theta_0 + sum_i c_i V'_i            c: (T,)

so one preparation serves every coefficient vector (MAP evaluates hundreds).

Operators work on *chunks*: a flat element range ``[start, start + n)`` of one tensor ``key``,
with the deltas of all tasks as ``(T, n)`` fp32. Whole-model statistics (TIES's magnitude
threshold) come from :meth:`MergeMethod.fit`, which may stream over every chunk as often as it
needs; :meth:`MergeMethod.transform` then maps one chunk. The in-memory and the streamed
storages of :class:`~map_merge.TaskVectors` feed the same chunks (flat ranges aligned to
:data:`CHUNK` elements), so both give the same merged model.

- :class:`TaskArithmetic`: ``V' = V``.
- :class:`Ties`: trim each task vector to its top-``k`` fraction of entries by magnitude (over
  the whole model, ``scope="global"``, as the TIES paper does, or per tensor, ``scope="tensor"``,
  as mergekit does), elect a sign per entry by the summed mass of the trimmed vectors, keep the
  entries that agree and divide by the number of agreeing tasks (the disjoint mean). With every
  ``c_i = lam`` this is TIES-merging with scaling ``lam``. The threshold is exact in both scopes:
  a two-pass radix select over the fp32 bit patterns of the magnitudes (memory: two
  ``(T, 65536)`` histograms, never a ``(T, P)`` matrix).
- :class:`Dare`: drop each entry with probability ``p`` and rescale survivors by
  ``1 / (1 - p)``, optionally followed by :class:`Ties`. Drop masks are drawn per tensor and per
  :data:`CHUNK`-element block from a generator seeded by ``(seed, key, block)`` on the CPU, so they
  do not depend on the storage, the device or the order of work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["MergeMethod", "TaskArithmetic", "Ties", "Dare", "resolve_method", "CHUNK", "ChunkSource", "kth_largest_magnitude"]

CHUNK = 1 << 20
"""Elements per unit of streamed work: flat ranges of a tensor start at multiples of this."""

ChunkSource = Callable[[Sequence[str] | None], Iterator[tuple[str, int, torch.Tensor]]]
"""``chunks(keys)`` yields ``(key, start, deltas (T, n) fp32)`` over the given keys (``None``: all),
a fresh pass on every call."""


class MergeMethod:
    """Base class of merge operators. Subclasses implement :meth:`transform` (and :meth:`fit`
    when they need statistics of the whole model)."""

    name: str = "base"

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int]) -> Any:
        """Statistics of all task vectors the transform needs (default: none).

        Args:
            chunks: a fresh pass over every chunk per call (see :data:`ChunkSource`).
            sizes: ``key -> number of elements`` of every tensor, in order.
        """
        return None

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        """Prepared deltas ``(T, n)`` of one chunk ``deltas: (T, n)`` (may return the input)."""
        raise NotImplementedError

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        """Prepared ``(T, P)`` of a whole ``(T, P)`` matrix, taken as a single tensor."""
        if vectors.ndim != 2:
            raise ValueError(f"{type(self).__name__}.prepare expects task vectors of shape (T, P); got {tuple(vectors.shape)}")
        state = self.fit(lambda keys=None: iter([("", 0, vectors)]), {"": vectors.shape[1]})
        return self.transform("", 0, vectors, state)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description: name and settings (used in fingerprints and metadata)."""
        settings = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        for key, value in list(settings.items()):
            if isinstance(value, MergeMethod):
                settings[key] = value.spec
            elif isinstance(getattr(self, key), MergeMethod):
                settings[key] = getattr(self, key).spec
        return {"name": self.name, **settings}

    @property
    def is_identity(self) -> bool:
        return False


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Plain task arithmetic: the task vectors are used as they are."""

    name = "task_arithmetic"

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        return deltas

    @property
    def is_identity(self) -> bool:
        return True


def _bits(magnitude: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns of non-negative fp32 values (monotone in the value)."""
    return magnitude.to(torch.float32).contiguous().view(torch.int32)


def kth_largest_magnitude(passes: Callable[[], Iterator[torch.Tensor]], keep: torch.Tensor) -> torch.Tensor:
    """Exact ``keep[t]``-th largest ``|x|`` of each row ``t`` over data seen as chunks.

    Two passes of a radix select on the fp32 bit patterns: the top 16 bits find the bin that
    holds the answer, the low 16 bits within that bin give it exactly.

    Args:
        passes: each call yields the data again as ``(T, n)`` chunks.
        keep: ``(T,)`` ranks (1 = the largest), each at most the row's number of elements.
    Returns: ``(T,)`` float32 thresholds (entries ``>=`` them are the top ``keep``, ties included).
    """
    keep = keep.to(torch.int64).cpu()
    num_rows = keep.shape[0]
    high = torch.zeros(num_rows, 65536, dtype=torch.int64)
    for chunk in passes():
        bits = _bits(chunk.abs())
        for row in range(num_rows):
            high[row] += torch.bincount(bits[row] >> 16, minlength=65536).cpu()
    at_least = high.flip(1).cumsum(1).flip(1)  # at_least[t, b] = count of entries with high bits >= b
    rows = torch.arange(num_rows)
    hi = ((at_least >= keep[:, None]).to(torch.int64) * torch.arange(65536)).amax(1)  # largest such bin
    above = torch.where(hi < 65535, at_least[rows, (hi + 1).clamp_max(65535)], torch.zeros_like(hi))
    need = keep - above
    low = torch.zeros(num_rows, 65536, dtype=torch.int64)
    for chunk in passes():
        bits = _bits(chunk.abs())
        for row in range(num_rows):
            in_bin = bits[row][(bits[row] >> 16) == int(hi[row])]
            if in_bin.numel():
                low[row] += torch.bincount(in_bin & 0xFFFF, minlength=65536).cpu()
    at_least_low = low.flip(1).cumsum(1).flip(1)
    lo = ((at_least_low >= need[:, None]).to(torch.int64) * torch.arange(65536)).amax(1)
    return ((hi << 16) | lo).to(torch.int32).view(torch.float32)


@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: trim to the top ``k`` fraction by magnitude per task, elect signs, disjoint mean.

    Args:
        k: fraction of entries kept per task vector, in (0, 1]. The TIES paper's default is 0.2.
        scope: ``"global"`` (the top ``k`` of each task vector over the whole model, as in the
            TIES paper) or ``"tensor"`` (the top ``k`` of each tensor, as mergekit trims).
    """

    k: float = 0.2
    scope: str = "global"
    name = "ties"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.k) <= 1.0:
            raise ValueError(f"Ties.k is the fraction of entries kept and must lie in (0, 1]; got {self.k}")
        if self.scope not in ("global", "tensor"):
            raise ValueError(f"Ties.scope must be 'global' or 'tensor', got {self.scope!r}")

    @property
    def spec(self) -> dict[str, Any]:
        spec = {"name": self.name, "k": self.k}
        if self.scope != "global":  # the default keeps the fingerprints of earlier results
            spec["scope"] = self.scope
        return spec

    def _threshold(self, chunks: ChunkSource, keys: Sequence[str] | None, total: int) -> torch.Tensor | None:
        keep = max(1, int(round(self.k * total)))
        if keep >= total:
            return None  # keep everything
        num_tasks = None
        for _, _, deltas in chunks(keys):
            num_tasks = deltas.shape[0]
            break
        if num_tasks is None:
            return None
        return kth_largest_magnitude(lambda: (d for _, _, d in chunks(keys)), torch.full((num_tasks,), keep))

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int]) -> Any:
        if self.scope == "global":
            return self._threshold(chunks, None, sum(sizes.values()))
        return {key: self._threshold(chunks, [key], size) for key, size in sizes.items()}

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        if deltas.ndim != 2:
            raise ValueError(f"Ties expects task vectors of shape (T, n); got {tuple(deltas.shape)}")
        threshold = state.get(key) if isinstance(state, dict) else state
        if threshold is None:
            trimmed = deltas.clone()
        else:
            threshold = threshold.to(device=deltas.device, dtype=deltas.dtype)[:, None]
            trimmed = deltas * (deltas.abs() >= threshold)
        # row by row: a reduction over the (short) task dimension is several times slower
        total = trimmed[0].clone()
        for row in trimmed[1:]:
            total += row
        agree = (trimmed * torch.sign(total)) > 0  # same sign as the elected one, and not trimmed
        trimmed.mul_(agree)
        count = agree[0].to(deltas.dtype)
        for row in agree[1:]:
            count += row
        return trimmed.div_(count.clamp_min_(1))


def _block_seed(seed: int, key: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Dare(MergeMethod):
    """DARE: random drop with probability ``p``, rescale by ``1/(1-p)``; optionally then TIES.

    Args:
        p: drop probability in [0, 1).
        seed: seed of the drop masks (the same seed gives the same merged model).
        ties: ``None`` for plain DARE, or a :class:`Ties` applied to the rescaled vectors.
    """

    p: float = 0.5
    seed: int = 0
    ties: Ties | None = None
    name = "dare"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"Dare.p is a drop probability and must lie in [0, 1); got {self.p}")

    @property
    def spec(self) -> dict[str, Any]:
        # "draw" marks the per-tensor, per-block masks (results stored under the earlier
        # whole-matrix draw are not reused for them)
        return {"name": self.name, "p": self.p, "seed": self.seed, "ties": None if self.ties is None else self.ties.spec,
                "draw": "per-tensor-block"}

    def keep_mask(self, key: str, start: int, num_tasks: int, num: int) -> torch.Tensor:
        """``(T, num)`` bool mask of kept entries for elements ``[start, start + num)`` of ``key``."""
        pieces = []
        position, stop = start, start + num
        while position < stop:
            block = position // CHUNK
            block_end = min((block + 1) * CHUNK, stop)
            generator = torch.Generator().manual_seed(_block_seed(int(self.seed), key, block))
            # draw the whole block (up to where it is needed) so any split of it sees the same numbers
            # laid out (element, task) so a prefix of the block draws the same numbers
            draws = torch.rand(block_end - block * CHUNK, num_tasks, generator=generator)
            pieces.append(draws[position - block * CHUNK :].T >= self.p)
            position = block_end
        return torch.cat(pieces, dim=1) if len(pieces) != 1 else pieces[0]

    def _drop(self, key: str, start: int, deltas: torch.Tensor) -> torch.Tensor:
        keep = self.keep_mask(key, start, deltas.shape[0], deltas.shape[1]).to(deltas.device)
        out = deltas * keep.to(deltas.dtype)
        return out.div_(1.0 - self.p)

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int]) -> Any:
        if self.ties is None:
            return None
        return self.ties.fit(lambda keys=None: ((k, s, self._drop(k, s, d)) for k, s, d in chunks(keys)), sizes)

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        out = self._drop(key, start, deltas)
        return self.ties.transform(key, start, out, state) if self.ties is not None else out


_BY_NAME = {"task_arithmetic": TaskArithmetic, "ta": TaskArithmetic, "ties": Ties, "dare": Dare}


def resolve_method(method: str | MergeMethod | None) -> MergeMethod:
    """Turn ``"task_arithmetic" | "ties" | "dare" | MergeMethod | None`` into a :class:`MergeMethod`."""
    if method is None:
        return TaskArithmetic()
    if isinstance(method, MergeMethod):
        return method
    if isinstance(method, str):
        try:
            return _BY_NAME[method.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown merge method {method!r}; choose one of {sorted(set(_BY_NAME) - {'ta'})} "
                "or pass a MergeMethod instance such as Ties(k=0.1)"
            ) from None
    raise TypeError(f"method must be a string or a MergeMethod, not {type(method).__name__}")
