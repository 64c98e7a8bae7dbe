"""TIES-merging: trim each task vector to its largest entries, elect signs, disjoint mean."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import ChunkSource, InPlaceMethod, check_scope, num_tasks_of, scope_units, tiled_
from .consensus import sign_consensus_
from .select import kth_largest_magnitude

__all__ = ["Ties"]


@dataclass(frozen=True)
class Ties(InPlaceMethod):
    """TIES: trim to the top ``k`` fraction by magnitude per task, elect signs, disjoint mean.

    With every ``c_i = lam`` this is TIES-merging with scaling ``lam``. The threshold is exact in
    both scopes: a radix select over the fp32 bit patterns of the magnitudes (entries equal to
    the threshold are all kept). A zero summed mass elects no sign (the paper's ``sgn(0) = 0``).

    Args:
        k: fraction of entries kept per task vector, in (0, 1]: the top ``int(k * n)`` (at least
            one), the count mergekit and the TIES authors' code keep. The TIES paper's default is 0.2.
        scope: ``"global"`` (the top ``k`` of each task vector over the whole model, as in the
            TIES paper) or ``"tensor"`` (the top ``k`` of each tensor, as mergekit trims).
    """

    k: float = 0.2
    scope: str = "global"
    name = "ties"
    _elementwise = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.k) <= 1.0:
            raise ValueError(f"Ties.k is the fraction of entries kept and must lie in (0, 1]; got {self.k}")
        check_scope("Ties", self.scope)

    @property
    def spec(self) -> dict[str, Any]:
        # "count": the kept entries are int(k n), mergekit's count (round(k n) before): another merge, so
        # results stored for the old count are never reused for the new one
        spec = {"name": self.name, "k": self.k, "count": "int"}
        if self.scope != "global":
            spec["scope"] = self.scope
        return spec

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
        """Thresholds ``(T,)`` (global) or ``{key: (T,) | None}`` (``None``: keep everything)."""
        thresholds = {}
        for unit, keys, total in scope_units(self.scope, sizes):
            keep = max(1, int(self.k * total))  # mergekit's (and the TIES authors') count: int(k * n)
            num_tasks = num_tasks_of(chunks, keys) if keep < total else None
            if num_tasks is None:
                thresholds[unit] = None
                continue
            thresholds[unit] = kth_largest_magnitude(lambda keys=keys: (d for _, _, d in chunks(keys)), torch.full((num_tasks,), keep))
        return thresholds[None] if self.scope == "global" else thresholds

    def _map_(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        threshold = state.get(key) if isinstance(state, dict) else state
        if threshold is not None:
            threshold = threshold.to(device=deltas.device, dtype=deltas.dtype)[:, None]
        work = self._scratch()

        def apply(key: str, start: int, tile: torch.Tensor) -> torch.Tensor:
            if threshold is not None:
                keep = torch.abs(tile, out=work.get("ties_keep", tile.shape, tile.dtype, tile.device))
                tile.mul_(torch.ge(keep, threshold, out=keep))  # 1.0 where |x| >= threshold
            return sign_consensus_(tile, normalize=True, zero_elects_positive=False, work=work)

        return tiled_(apply, key, start, deltas)
