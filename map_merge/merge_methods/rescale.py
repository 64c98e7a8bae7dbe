"""mergekit's ``rescale``: a pruned task vector scaled so that its L1 norm matches the unpruned one
(``RescaleNorm.l1`` in ``mergekit/sparsify.py``: ``masked * |x|_1 / |masked|_1``, left unscaled
when either norm is below ``1e-7``). The norms are taken per task over a unit of statistics (a
tensor, as mergekit does, or a whole task vector)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import ChunkSource

__all__ = ["L1_EPS", "l1_match_scales"]

L1_EPS = 1e-7

KeepFn = Callable[[str, int, torch.Tensor], torch.Tensor]


def l1_match_scales(chunks: ChunkSource, keys: Sequence[str] | None, keep: KeepFn) -> torch.Tensor | None:
    """``(T,)`` float32 factors ``|x_t|_1 / |m_t * x_t|_1`` over the chunks of ``keys`` (``None``:
    all), with ``keep(key, start, deltas) -> (T, n)`` the masks; 1 where a norm is below 1e-7.
    Norms are summed in float64 on the chunks' device; ``None`` when there is no chunk."""
    before = after = None
    for key, start, deltas in chunks(keys):
        magnitude = deltas.abs().to(torch.float64)
        if before is None:
            before = torch.zeros(deltas.shape[0], dtype=torch.float64, device=deltas.device)
            after = torch.zeros_like(before)
        before += magnitude.sum(1)
        after += (magnitude * keep(key, start, deltas)).sum(1)
    if before is None:
        return None
    ok = (before >= L1_EPS) & (after >= L1_EPS)
    return torch.where(ok, before / torch.where(ok, after, 1.0), 1.0).to(torch.float32).cpu()
