"""The operator protocol: whole-model statistics (:meth:`MergeMethod.fit`) and a per-chunk map
(:meth:`MergeMethod.transform`), plus plain task arithmetic."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .workspace import Workspace

__all__ = ["CHUNK", "ChunkSource", "MergeMethod", "InPlaceMethod", "TaskArithmetic", "SCOPES", "TILE_ELEMENTS", "tile_columns", "tiled_"]

CHUNK = 1 << 20
"""Elements per unit of streamed work: tensors are cut into flat ranges of whole rows of about
this many elements (rows longer than this into pieces of it). Read at call time, set through the
package (``map_merge.merge_methods.CHUNK``, a view of this one)."""

ChunkSource = Callable[[Sequence[str] | None], Iterator[tuple[str, int, torch.Tensor]]]
"""``chunks(keys)`` yields ``(key, start, deltas (T, n) fp32)`` over the given keys (``None``: all),
a fresh pass on every call."""

SCOPES = ("global", "tensor")
"""Where magnitude statistics are taken: over each whole task vector, or per tensor."""


class MergeMethod:
    """Base class of merge operators. Subclasses implement :meth:`transform` (and :meth:`fit`
    when they need statistics of the whole model)."""

    name: str = "base"

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
        """Statistics of all task vectors the transform needs (default: none).

        Args:
            chunks: a fresh pass over every chunk per call (see :data:`ChunkSource`).
            sizes: ``key -> number of elements`` of every tensor, in order.
            shapes: ``key -> shape`` of every tensor (operators that work per row need it;
                storages pass it).
        """
        return None

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        """Prepared deltas ``(T, n)`` of one chunk ``deltas: (T, n)`` (may return the input, never
        modifies it: a dense storage passes views of its task vectors)."""
        raise NotImplementedError

    def transform_(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        """:meth:`transform` for a caller whose ``deltas`` are scratch: the operator may overwrite
        them and return them (the built-in operators do: no new chunk-sized tensor per call)."""
        return self.transform(key, start, deltas, state)

    def _scratch(self) -> Workspace:
        """This operator's reusable temporaries (created on first use; not pickled)."""
        work = self.__dict__.get("_workspace")
        if work is None:
            work = Workspace()
            object.__setattr__(self, "_workspace", work)  # frozen dataclasses too
        return work

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_workspace", None)
        return state

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        """Prepared ``(T, P)`` of a whole ``(T, P)`` matrix, taken as a single tensor (one row)."""
        if vectors.ndim != 2:
            raise ValueError(f"{type(self).__name__}.prepare expects task vectors of shape (T, P); got {tuple(vectors.shape)}")
        state = self.fit(lambda keys=None: iter([("", 0, vectors)]), {"": vectors.shape[1]}, {"": (vectors.shape[1],)})
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

    @property
    def elementwise(self) -> bool:
        """Whether :meth:`transform` maps each entry (column of ``deltas``) on its own, given the
        state: a caller may then cut a chunk into any column ranges (tiles) and transform each."""
        return False



class InPlaceMethod(MergeMethod):
    """An operator that maps a chunk's deltas in place: :meth:`transform` maps a copy,
    :meth:`transform_` checks the chunk (and the state, where :meth:`fit` gives one the map needs)
    and calls :meth:`_map_`. Class settings: ``_elementwise`` (see :attr:`elementwise`) and
    ``_needs_state`` (``transform`` without the state from ``fit`` is refused, naming both)."""

    _elementwise = False
    _needs_state = False

    @property
    def elementwise(self) -> bool:
        return self._elementwise

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        return self.transform_(key, start, deltas.clone(), state)

    def transform_(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        owner = type(self).__name__
        if deltas.ndim != 2:
            raise ValueError(f"{owner} expects task vectors of shape (T, n); got {tuple(deltas.shape)}")
        if state is None and self._needs_state:
            raise ValueError(f"{owner}.transform needs the state from {owner}.fit")
        return self._map_(key, start, deltas, state)

    def _map_(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        """The prepared ``deltas (T, n)`` of one chunk, computed in place (``deltas`` are scratch)."""
        raise NotImplementedError

@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Plain task arithmetic: the task vectors are used as they are."""

    name = "task_arithmetic"

    def transform(self, key: str, start: int, deltas: torch.Tensor, state: Any = None) -> torch.Tensor:
        return deltas

    @property
    def is_identity(self) -> bool:
        return True

    @property
    def elementwise(self) -> bool:
        return True


TILE_ELEMENTS = 1 << 19
"""Entries (over all tasks) an elementwise operator maps at a time on the CPU: its temporaries then
stay in the core's cache instead of streaming through memory once per step."""


def tile_columns(num_tasks: int) -> int:
    """Columns of a ``(T, n)`` chunk per CPU tile (see :data:`TILE_ELEMENTS`)."""
    return max(1024, TILE_ELEMENTS // max(num_tasks, 1))


def tiled_(apply: Callable[[str, int, torch.Tensor], torch.Tensor], key: str, start: int, deltas: torch.Tensor) -> torch.Tensor:
    """Apply an elementwise in-place map ``apply(key, start, deltas (T, n))`` to column tiles of
    ``deltas`` (on the CPU; in one go elsewhere) and return ``deltas``."""
    num_tasks, num = deltas.shape
    step = tile_columns(num_tasks)
    if deltas.device.type != "cpu" or num <= step:
        return apply(key, start, deltas)
    for offset in range(0, num, step):
        apply(key, start + offset, deltas[:, offset : offset + step])
    return deltas


def check_scope(owner: str, scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"{owner}.scope must be 'global' or 'tensor', got {scope!r}")


def scope_units(scope: str, sizes: Mapping[str, int]) -> list[tuple[str | None, list[str] | None, int]]:
    """``(unit name, keys, number of elements)`` per unit of statistics: one unit ``None`` over
    every key (``scope="global"``), or one per tensor."""
    if scope == "global":
        return [(None, None, int(sum(sizes.values())))]
    return [(key, [key], int(size)) for key, size in sizes.items()]


def num_tasks_of(chunks: ChunkSource, keys: Sequence[str] | None) -> int | None:
    """T from the first chunk of ``keys`` (``None`` when there is none)."""
    for _, _, deltas in chunks(keys):
        return int(deltas.shape[0])
    return None
