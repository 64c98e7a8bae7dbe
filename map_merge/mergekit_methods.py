"""mergekit's ``merge_method`` and its per-model settings as map_merge's operator (plain data;
used by :mod:`map_merge.mergekit_config`, whose module docstring says how the methods map)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .merge_methods import Breadcrumbs, Dare, Della, MergeMethod, TaskArithmetic, Ties
from .numeric import parse_number

__all__ = ["operator_for"]


def _one(values: list[Any], field: str) -> Any:
    distinct = {repr(v) for v in values}
    if len(distinct) > 1:
        raise ValueError(f"field {field!r} differs between models ({sorted(distinct)}); map_merge's operators take one value for all tasks")
    return values[0]


def operator_for(name: str, entries: list[tuple[str, Mapping[str, Any]]], rescale: bool | None, normalize: bool) -> MergeMethod:
    """Our operator for mergekit's ``name``; ``entries``: ``(path, parameters)`` of the models;
    ``rescale``: the recipe's (None: not set); ``normalize``: the recipe's (mergekit's default
    filled in). Without consensus normalising is a choice of coefficients, never the operator's.
    Raises ValueError starting ``field '...'`` (a density that differs between models...)."""
    def shared(key: str, default: Any) -> float:
        raw = [p.get(key, default) for _, p in entries]
        try:
            values = [parse_number(v, bools=True) for v in raw]
        except ValueError as error:
            raise ValueError(f"field {key!r} must be a number for {name!r} (per-layer or filtered densities are not supported): "
                             f"{error} (in {raw})") from None
        return _one(values, key)

    if name in ("task_arithmetic", "linear"):
        return TaskArithmetic()
    if name == "ties":
        if not normalize:
            return Breadcrumbs(density=float(shared("density", 1.0)), gamma=0.0, scope="tensor",
                               rescale="l1" if rescale else None, consensus="sum", normalize=False)
        return Ties(k=float(shared("density", 1.0)), scope="tensor")
    if name in ("breadcrumbs", "breadcrumbs_ties"):
        consensus = name == "breadcrumbs_ties"
        return Breadcrumbs(density=float(shared("density", 1.0)), gamma=float(shared("gamma", 0.01)), scope="tensor",
                           rescale="l1" if (rescale if rescale is not None else False) else None,
                           consensus="sum" if consensus else None, normalize=consensus and normalize)
    if name in ("della", "della_linear"):
        consensus = name == "della"
        return Della(density=float(shared("density", 1.0)), epsilon=float(shared("epsilon", 0.15)), scope="tensor",
                     rescale="l1" if (rescale if rescale is not None else True) else None, consensus="sum" if consensus else None,
                     normalize=consensus and normalize)
    density = float(shared("density", 1.0))
    ties = Ties(k=1.0, scope="tensor") if name == "dare_ties" else None
    return Dare(p=1.0 - density, ties=ties)
