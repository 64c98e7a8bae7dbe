"""Sign consensus over the tasks of one chunk: elect a sign per entry, keep the entries that agree
with it, optionally divide by how many agree (TIES's disjoint mean).

With per-task coefficients the merge stays linear: the election and the count use the prepared
vectors with unit weights, and the coefficients scale the result (``theta_0 + sum_i c_i V'_i``).
With every ``c_i = lam`` this is mergekit's consensus with ``weight: 1`` and ``lambda: lam``;
mergekit elects with the weighted vectors and divides by the sum of the agreeing weights, which
differs only when the coefficients differ.
"""

from __future__ import annotations

import torch

from .workspace import Workspace

__all__ = ["CONSENSUS", "check_consensus", "sign_consensus_"]

CONSENSUS = (None, "sum")


def check_consensus(owner: str, consensus: str | None, normalize: bool) -> None:
    if consensus not in CONSENSUS:
        raise ValueError(f"{owner}.consensus must be None or 'sum', got {consensus!r}")
    if normalize and consensus is None:
        raise ValueError(f"{owner}.normalize divides by the number of agreeing tasks and needs consensus='sum'; "
                         "without consensus, normalising is a choice of coefficients (c_i / sum_j c_j)")


def sign_consensus_(vectors: torch.Tensor, normalize: bool, zero_elects_positive: bool, work: Workspace | None = None) -> torch.Tensor:
    """Keep the entries of ``vectors: (T, n)`` whose sign agrees with the sign of their sum over
    tasks (in place; returned), divided by the number of agreeing tasks when ``normalize``.

    ``zero_elects_positive``: a zero sum elects ``+`` (mergekit's ``sum`` consensus) instead of no
    sign (the TIES paper's ``sgn(0) = 0``: nothing agrees). Zero entries never agree.
    ``work``: where the temporaries live (new tensors without one)."""
    num_tasks, num = vectors.shape
    dtype, device = vectors.dtype, vectors.device

    def scratch(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return work.get(name, shape, dtype, device) if work is not None else torch.empty(shape, dtype=dtype, device=device)

    # row by row: a reduction over the (short) task dimension is several times slower
    total = scratch("consensus_total", (num,)).copy_(vectors[0])
    for row in vectors[1:]:
        total += row
    sign = scratch("consensus_sign", (num,))
    if zero_elects_positive:
        torch.ge(total, 0, out=sign).mul_(2).sub_(1)
    else:
        torch.sign(total, out=sign)
    agree = torch.mul(vectors, sign, out=scratch("consensus_agree", (num_tasks, num)))
    torch.gt(agree, 0, out=agree)  # 1.0 where the entry has the elected sign (and is not zero)
    vectors.mul_(agree)
    if normalize:
        count = total.copy_(agree[0])
        for row in agree[1:]:
            count += row
        vectors.div_(count.clamp_min_(1))
    return vectors
