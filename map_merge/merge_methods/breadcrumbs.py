"""Model Breadcrumbs: drop the largest and the smallest magnitudes of each task vector."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .base import ChunkSource, InPlaceMethod, check_scope, num_tasks_of, scope_units, tiled_
from .consensus import check_consensus, sign_consensus_
from .rescale import l1_match_scales
from .select import kth_largest_magnitude

__all__ = ["Breadcrumbs"]

_INF = float("inf")


def breadcrumb_counts(density: float, gamma: float, n: int) -> tuple[int, int]:
    """``(dropped from the top, kept)`` of ``n`` entries, as mergekit 0.1.5 counts them
    (``magnitude_outliers``): ``kept = int(density * n)``, ``int(gamma * n)`` largest dropped,
    fewer when the kept ones would not fit."""
    kept = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - kept - top)
    return n - bottom - kept, kept


@dataclass(frozen=True)
class Breadcrumbs(InPlaceMethod):
    """Model Breadcrumbs (Davari & Belilovsky, 2023), as mergekit 0.1.5's ``breadcrumbs``.

    Per task, over each tensor (``scope="tensor"``, mergekit and the paper) or the whole task
    vector (``scope="global"``) of ``n`` entries ranked by ``|x|``: the ``int(gamma * n)`` largest
    are dropped, then the smallest, leaving ``int(density * n)`` (fewer large ones are dropped when
    ``gamma + density > 1``). ``density >= 1`` keeps everything (gamma is then ignored, as in
    mergekit). Magnitudes tied at a cut are all dropped at the top cut and all kept at the
    bottom one (mergekit splits ties by sort position); the thresholds are exact (radix select).

    Options as in mergekit: ``rescale="l1"`` scales each pruned vector (per unit) to its unpruned
    L1 norm; ``consensus="sum"`` keeps entries whose sign agrees with the sign of the summed pruned
    vectors (a zero sum elects ``+``; mergekit's ``breadcrumbs_ties``), ``normalize=True`` then
    divides by the number of agreeing tasks. The merge is ``theta_0 + sum_i c_i V'_i``: mergekit's
    ``breadcrumbs`` with ``weight: c_i`` (no consensus), or with consensus and every ``c_i = lam``
    mergekit's with ``weight: 1, lambda: lam`` (see :mod:`map_merge.merge_methods.consensus`).

    Args:
        density: share of entries kept, in (0, 1].
        gamma: share of the largest entries dropped, in [0, 1).
        scope: ``"tensor"`` or ``"global"``.
        rescale: ``None`` (mergekit's default for breadcrumbs) or ``"l1"``.
        consensus: ``None`` (default) or ``"sum"``.
        normalize: divide by the number of agreeing tasks (needs ``consensus="sum"``).
    """

    density: float = 0.9
    gamma: float = 0.01
    scope: str = "tensor"
    rescale: str | None = None
    consensus: str | None = None
    normalize: bool = False
    name = "breadcrumbs"
    _elementwise = True
    _needs_state = True

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"Breadcrumbs.density is the share of entries kept and must lie in (0, 1]; got {self.density}")
        if not 0.0 <= float(self.gamma) < 1.0:
            raise ValueError(f"Breadcrumbs.gamma is the share of the largest entries dropped and must lie in [0, 1); got {self.gamma}")
        check_scope("Breadcrumbs", self.scope)
        if self.rescale not in (None, "l1"):
            raise ValueError(f"Breadcrumbs.rescale must be None or 'l1', got {self.rescale!r}")
        check_consensus("Breadcrumbs", self.consensus, self.normalize)

    def fit(self, chunks: ChunkSource, sizes: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None = None) -> Any:
        """Per unit (``None`` = global, or a key): ``(low (T,), high (T,), scale (T,) | None)``,
        entries kept where ``low <= |x| < high``; ``None`` keeps everything."""
        state: dict[str | None, Any] = {}
        for unit, keys, total in scope_units(self.scope, sizes):
            num_tasks = num_tasks_of(chunks, keys) if self.density < 1 and total > 0 else None
            if num_tasks is None:
                state[unit] = None
                continue
            top, kept = breadcrumb_counts(self.density, self.gamma, total)
            ranks = [r for r in (top, top + kept) if 1 <= r]
            found = iter(kth_largest_magnitude(lambda keys=keys: (d for _, _, d in chunks(keys)),
                                               torch.tensor([ranks] * num_tasks)).unbind(1)) if ranks else iter(())
            high = next(found) if top >= 1 else torch.full((num_tasks,), _INF)
            low = next(found) if kept >= 1 else torch.full((num_tasks,), _INF)
            state[unit] = (low, high, None)
            if self.rescale == "l1":
                scale = l1_match_scales(chunks, keys, lambda key, start, deltas, unit=unit: self._keep(state[unit], deltas))
                state[unit] = (low, high, scale)
        return state

    def _keep(self, unit_state: tuple[torch.Tensor, torch.Tensor, Any], deltas: torch.Tensor) -> torch.Tensor:
        """``(T, n)`` 1.0 where ``low <= |x| < high``, else 0.0 (in this operator's scratch)."""
        low, high, _ = unit_state
        work = self._scratch()
        magnitude = torch.abs(deltas, out=work.get("breadcrumbs_magnitude", deltas.shape, deltas.dtype, deltas.device))
        keep = torch.ge(magnitude, low.to(device=deltas.device, dtype=deltas.dtype)[:, None],
                        out=work.get("breadcrumbs_keep", deltas.shape, deltas.dtype, deltas.device))
        return keep.mul_(torch.lt(magnitude, high.to(device=deltas.device, dtype=deltas.dtype)[:, None], out=magnitude))

    def _map_(self, key: str, start: int, deltas: torch.Tensor, state: Any) -> torch.Tensor:
        name = None if self.scope == "global" else key
        if name not in state:
            raise KeyError(f"Breadcrumbs was fitted without tensor {key!r}; fit it on the same task vectors")
        unit = state[name]
        scale = unit[2].to(device=deltas.device, dtype=deltas.dtype)[:, None] if unit is not None and unit[2] is not None else None

        def apply(key: str, start: int, tile: torch.Tensor) -> torch.Tensor:
            if unit is not None:
                tile.mul_(self._keep(unit, tile))
                if scale is not None:
                    tile.mul_(scale)
            if self.consensus is not None:
                sign_consensus_(tile, normalize=self.normalize, zero_elects_positive=True, work=self._scratch())
            return tile

        return tiled_(apply, key, start, deltas)
