"""mergekit models' ``filter`` lists as one set of coefficient groups (plain data; used by
:mod:`map_merge.mergekit_weights` and :mod:`map_merge.mergekit_config`).

In mergekit 0.1.5 each model's conditions are read on their own: a tensor takes, per model, the
value of the first of *that model's* filters that is a substring of its name. Models may filter
differently (one ``self_attn``, another ``mlp``; the same filters in another order; different
fallbacks), so the groups are the cells of the joint partition: the tensors every model's filters
treat alike, one cell per tuple ``(i_1, ..., i_M)`` of the condition each model picks.

A cell's regular expression asks only for the filters its models pick (``self_attn``; two at once:
``^(?=.*self_attn)(?=.*layers\\.1\\.)``, named ``self_attn&layers_1``; none: ``.*``, named
``rest``). In lexicographic order of the tuples the first cell whose filters a name contains is the
name's own cell (a later tuple asks for a filter at or after each model's first match), so
:class:`~map_merge.Groups`' first-match rule reproduces mergekit's per-model rule for any name.
Cells no name can fall into (a filter a model passes over is part of one it picks) are left out;
with the base checkpoint's tensor names at hand, :func:`drop_unused` also drops those no tensor of
this model falls into (``self_attn&mlp`` on a Llama). With the same filters for every model the
cells are the filters themselves, named after them.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .groups import Groups

__all__ = ["joint_cells", "drop_unused", "checkpoint_tensor_names", "conjunction_filters", "MAX_CELLS"]

log = logging.getLogger(__name__)

MAX_CELLS = 4096
"""More cells than this is refused (filters per model multiply)."""

_CONJUNCTION = re.compile(r"\^((?:\(\?=\.\*(?:[^()\\]|\\.)+\))+)$")


def joint_cells(filter_lists: Sequence[Sequence[Optional[str]]]) -> tuple[dict[str, str], list[tuple[int, ...]]]:
    """``(group name -> regex, in order; per group the condition index each model picks)`` for the
    models' reachable filter lists (``None``: an unfiltered catch-all, last if present; a model
    without one leaves the names none of its filters matches in no group). Raises ValueError past
    :data:`MAX_CELLS` cells."""
    cells: list[tuple[tuple[int, ...], list[str]]] = []

    def visit(prefix: tuple[int, ...], required: list[str], excluded: list[str]) -> None:
        if len(prefix) == len(filter_lists):
            cells.append((prefix, required))
            if len(cells) > MAX_CELLS:
                raise ValueError(f"field 'weight' filters of the models make more than {MAX_CELLS} groups (the tensors every model's "
                                 "filters treat alike); give the models fewer or the same filters")
            return
        filters = filter_lists[len(prefix)]
        for i, f in enumerate(filters):
            need = required if f is None else [*required, f]
            passed = [*excluded, *(g for g in filters[:i] if g is not None)]
            if not any(e in r for e in passed for r in need):  # else: a name holding `need` holds a passed-over filter too
                visit((*prefix, i), need, passed)

    visit((), [], [])
    patterns: dict[str, str] = {}
    out: list[tuple[int, ...]] = []
    seen: set[frozenset[str]] = set()
    for index, required in cells:
        needed = _essential(required)
        if frozenset(needed) in seen:  # the same names as an earlier cell: never a first match
            continue
        seen.add(frozenset(needed))
        patterns[_unique(_name(needed, len(patterns)), patterns)] = _pattern(needed)
        out.append(index)
    return patterns, out


def _essential(required: list[str]) -> list[str]:
    """The filters a name must hold, in order, without those inside another (implied) or repeated."""
    out: list[str] = []
    for f in required:
        if f not in out and not any(f in g for g in required if g != f):
            out.append(f)
    return out


def _pattern(needed: list[str]) -> str:
    if not needed:
        return ".*"
    if len(needed) == 1:
        return re.escape(needed[0])
    return "^" + "".join(f"(?=.*{re.escape(f)})" for f in needed)


def _name(needed: list[str], position: int) -> str:
    if not needed:
        return "rest"
    return "&".join(re.sub(r"\W+", "_", f).strip("_") or f"group{position}" for f in needed)


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    """``name``, or ``name_2``, ``name_3``... when a group already has it (filters ``self_attn`` and ``self.attn``)."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def conjunction_filters(pattern: str) -> list[str] | None:
    """The filters a cell's regex (from :func:`joint_cells`) asks for together, or None for any other regex."""
    match = _CONJUNCTION.fullmatch(pattern)
    if match is None:
        return None
    return [re.sub(r"\\(.)", r"\1", f) for f in re.findall(r"\(\?=\.\*((?:[^()\\]|\\.)+)\)", match.group(1))]


def drop_unused(groups: Groups | None, coeffs: np.ndarray, keys: Sequence[str]) -> tuple[Groups | None, np.ndarray, list[str]]:
    """``(groups, (T, G') coefficients, dropped group names)`` without the pattern groups that own
    none of ``keys`` (first match wins; ``coeffs: (T, G)``); a lone catch-all left is no group.
    Keys no group matches are left to the merge to refuse; so are groups that would all go."""
    if groups is None or not groups.patterns:
        return groups, coeffs, []
    compiled = [re.compile(p) for p in groups.patterns.values()]
    owned: set[int] = set()
    for key in keys:
        index = next((j for j, pattern in enumerate(compiled) if pattern.search(key)), None)
        if index is not None:
            owned.add(index)
    names = list(groups.patterns)
    if not owned or len(owned) == len(names):
        return groups, coeffs, []
    keep = sorted(owned)
    width = groups.knots or 1
    columns = [j * width + k for j in keep for k in range(width)]
    patterns = {names[j]: groups.patterns[names[j]] for j in keep}
    kept = np.asarray(coeffs)[:, columns]
    dropped = [n for j, n in enumerate(names) if j not in owned]
    if list(patterns.values()) == [".*"]:
        if groups.knots is None:
            return None, kept, dropped
        return Groups(knots=groups.knots, layer_pattern=groups.layer_pattern), kept, dropped
    return Groups(patterns, knots=groups.knots, layer_pattern=groups.layer_pattern), kept, dropped


def checkpoint_tensor_names(path: str | os.PathLike) -> list[str] | None:
    """The floating-point tensor names of a local checkpoint (a folder of ``.safetensors`` files or
    one such file), from the files' headers; None where there is none to read (a hub name, ``.bin``
    files, a broken header: the merge reports those)."""
    from .task_vectors.safetensors_io import read_header

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" and path.is_file() else []
    names: list[str] = []
    try:
        for file in files:
            names += [key for key, info in read_header(file)[0].items() if info.dtype.is_floating_point]
    except (OSError, ValueError) as error:
        log.debug("no tensor names from %s: %s", path, error)
        return None
    return names or None
