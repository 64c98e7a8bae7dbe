"""How close two merged weight sets are (``bench_mergekit_conformance.py``): the largest
differences, absolute and in bfloat16 ulps of each entry's scale, the shares that differ, and the
entries over one ulp sorted by cause (a tie at a trimming cut, a zero sign sum, or unexplained)."""

from __future__ import annotations

from pathlib import Path

import torch

import map_merge as mm


def load_raw(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``*.safetensors`` files, in its stored dtype."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict:
    """Largest difference, over all entries and over the entries both sides keep or both drop
    (``merged != base``); shares of entries that differ and of keep/drop decisions that differ.
    fp32 rounding of entries of size ~1 (norm weights) is ~1e-7."""
    worst, worst_agreeing, differing, decisions, total = 0.0, 0.0, 0, 0, 0
    for key, value in theirs.items():
        mine = ours[key].float().reshape(value.shape)
        diff = (mine - value).abs()
        disagree = (mine != base[key]) != (value != base[key])
        worst = max(worst, float(diff.max()))
        worst_agreeing = max(worst_agreeing, float(diff[~disagree].max()))
        differing += int((diff > 0).sum())
        decisions += int(disagree.sum())
        total += value.numel()
    return {"max_abs_diff": worst, "max_abs_diff_same_decisions": worst_agreeing, "share_differing": differing / total,
            "share_decisions_differing": decisions / total}


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """One bfloat16 unit in the last place at ``|x|`` (8 significant bits; subnormals: 2^-133)."""
    _, exponent = torch.frexp(x.float().abs())  # |x| = m 2^e, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), (exponent - 8).clamp_min(-133))


def compare_files(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], base: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Largest difference, absolute and in bf16 ulps of the entry's scale ``max(|base|, |ours|,
    |mergekit|)`` (fp32 arithmetic rounds relative to its operands: where the merge cancels to ~0
    the result's own ulp would count fp32 noise of 1e-10 as hundreds of ulps); the share of entries
    over one such ulp; the share whose mergekit value, rounded to ``dtype``, differs from ours."""
    if set(ours) != set(theirs):
        raise AssertionError(f"tensor names differ: ours only {sorted(set(ours) - set(theirs))[:5]}, mergekit only {sorted(set(theirs) - set(ours))[:5]}")
    worst, worst_ulps, over, rounded_differ, total, worst_key = 0.0, 0.0, 0, 0, 0, None
    for key, value in theirs.items():
        mine = ours[key].float()
        diff = (mine - value.float()).abs()
        scale = torch.maximum(torch.maximum(mine.abs(), value.float().abs()), base[key].float().abs())
        ulps = diff / bf16_ulp(scale)
        if float(ulps.max()) > worst_ulps:
            worst_ulps, worst_key = float(ulps.max()), key
        worst = max(worst, float(diff.max()))
        over += int((ulps > 1).sum())
        rounded_differ += int((value.to(dtype) != ours[key].to(dtype)).sum())
        total += value.numel()
    return {"max_abs_diff": worst, "max_bf16_ulps": worst_ulps, "worst_tensor": worst_key, "share_over_one_ulp": over / total,
            "entries_over_one_ulp": over, "share_differing_after_rounding": rounded_differ / total, "entries": total}


def cut_ranks(method: mm.MergeMethod | None, n: int) -> list[int]:
    """1-based magnitude ranks where ours or mergekit's trimming of an ``n``-entry tensor cuts."""
    if isinstance(method, mm.Ties):
        return sorted({max(1, int(method.k * n)), max(1, round(method.k * n))})  # mergekit int(k n), ours round(k n)
    if isinstance(method, mm.Breadcrumbs):
        from map_merge.merge_methods.breadcrumbs import breadcrumb_counts

        top, kept = breadcrumb_counts(method.density, method.gamma, n)
        return [r for r in (top, top + 1, top + kept, top + kept + 1) if 1 <= r <= n]
    return []


def explain(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], folders: list[Path], method: mm.MergeMethod | None) -> dict:
    """Entries over one bf16 ulp, by cause: a task's ``|delta|`` equals a magnitude where either side
    cuts (tied magnitudes split differently, or TIES' ``round`` against ``int`` count); else a zero
    sum of the task vectors (mergekit's sign election picks ``+``, ours none); else unexplained."""
    base, fts = load_raw(folders[0]), [load_raw(f) for f in folders[1:]]
    counts = {"at_a_cut": 0, "zero_sign_sum": 0, "unexplained": 0}
    for key, value in theirs.items():
        mine, b0 = ours[key].float(), base[key].float()
        scale = torch.maximum(torch.maximum(mine.abs(), value.float().abs()), b0.abs())
        bad = ((mine - value.float()).abs() / bf16_ulp(scale) > 1).reshape(-1)
        if not bad.any():
            continue
        deltas = [(f[key].float() - b0).reshape(-1) for f in fts]
        at_cut = torch.zeros_like(bad)
        for d in deltas:
            ranked = d.abs().sort(descending=True).values
            for rank in cut_ranks(method, d.numel()):
                at_cut |= d.abs() == ranked[rank - 1]
        zero = sum(deltas) == 0
        counts["at_a_cut"] += int((bad & at_cut).sum())
        counts["zero_sign_sum"] += int((bad & ~at_cut & zero).sum())
        counts["unexplained"] += int((bad & ~at_cut & ~zero).sum())
    return counts
