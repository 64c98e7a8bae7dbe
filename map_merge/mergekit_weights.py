"""mergekit ``weight`` settings as coefficient groups, both ways (plain data; used by
:mod:`map_merge.mergekit_config`).

A model's ``weight`` in mergekit 0.1.5 (``mergekit/config.py``: ``evaluate_setting``) is one of

- a number: the same everywhere;
- a list of numbers, a gradient: at a tensor of layer ``l`` of ``L``, ``t = l / (L - 1)`` (tensors
  outside the layers: ``t = 0``) and the value is the linear interpolation of the knots at ``t``;
- a list of ``{filter, value}`` conditions (a single one alone too): the first whose ``filter`` is a
  substring of the tensor's name (or is missing or ``"*"``) gives the value, itself a number or a
  gradient evaluated at the tensor's ``t`` over the whole model (not over the layers it matches).

Numbers may be numeric strings (``'1e-1'``: YAML 1.1 reads it as a string, mergekit as 0.1) or
booleans (pydantic reads ``true`` as 1.0, ``false`` as 0.0; the *string* ``'true'`` is refused).

Where a model's conditions match no filter (none is a catch-all) or its ``weight`` is an empty list,
mergekit takes the recipe's top-level ``parameters: weight`` (``mergekit/parameter_resolver.py``:
the model's own setting, then the shared one; only a value none of them gives is an error): read
here as the model's conditions followed by the shared setting's (``fallback``). A condition that
can never be the first match (its filter contains an earlier one's) is dropped.
Models of one recipe may use different forms. Read, they become one :class:`~map_merge.Groups`
for all models: none (all numbers), depth knots (gradients), substring patterns (conditions), or
both (``Groups(patterns, knots=K)``: conditions with a gradient anywhere); a number is then the
same in every group, a gradient the same in every pattern. Models whose conditions name different
filters (or the same in another order) give the cells of the joint partition as patterns
(:mod:`map_merge.mergekit_filters`). Exact: per tensor every model's value is mergekit's. Refused,
naming the problem: gradients of different lengths.

Filters carry no names: read, a group is named after its filter (``rest`` for the catch-all). So
that groups keep their names (and the store keys made of them) through a recipe, a recipe written
here carries them in a top-level field mergekit ignores, ``map_merge: {groups: {name: pattern}}``
(:func:`names_field`); read back, the groups take those names and patterns where they still fit
the filters (:func:`named_groups`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Union

import numpy as np

from .groups import LAYER_PATTERN, Groups
from .mergekit_filters import conjunction_filters, joint_cells
from .numeric import parse_number

__all__ = ["read_weights", "weight_setting", "per_knot_normalising_is_inexact", "names_field", "named_groups"]

Value = Union[float, list]  # a number or a gradient (list of numbers)
_FORMS = "a number, a per-layer list of numbers (a gradient), or a list of {filter, value}"


def read_weights(weights: list[Any], labels: list[str], fallback: Any = None) -> tuple[Groups | None, np.ndarray]:
    """``(groups, (T, G) coefficients)`` of the models' ``weight`` settings (``labels`` name the
    models in messages); ``fallback``: the recipe's top-level ``weight`` (None: none), for what a
    model's own conditions leave unmatched. Raises ValueError starting ``field 'weight' ...``."""
    shared = None if fallback is None else _setting(fallback, "the top-level parameters")
    if shared == ():  # an empty list: no value there either
        shared = None
    settings = [_with_fallback(_setting(w, label), shared, label) for w, label in zip(weights, labels)]
    lengths = sorted({len(v) for s in settings for v in _values(s) if isinstance(v, list)})
    if len(lengths) > 1:
        raise ValueError(f"field 'weight' gradients of different lengths {lengths}; give every model the same number of knots")
    knots = lengths[0] if lengths else None
    conditioned = [s for s in settings if isinstance(s, tuple)]
    if not conditioned and knots is None:
        return None, np.asarray([[s] for s in settings], dtype=np.float64)
    patterns, cells = joint_cells([[f for f, _ in s] for s in conditioned]) if conditioned else (None, [()])
    groups = Groups(patterns, knots=knots)
    rows, which = [], 0
    for s in settings:
        if isinstance(s, tuple):  # per cell, the condition this model picks there
            per_pattern, which = [s[cell[which]][1] for cell in cells], which + 1
        else:
            per_pattern = [s] * len(cells)
        rows.append(np.concatenate([np.broadcast_to(np.asarray(v, dtype=np.float64), (knots or 1,)) for v in per_pattern]))
    return groups, np.stack(rows)


def _setting(weight: Any, label: str) -> Value | tuple:
    """A number, a gradient (list of 2+ numbers) or a tuple of ``(filter or None, number or gradient)``."""
    if isinstance(weight, Mapping):
        weight = [weight]  # one condition alone: mergekit 0.1.5 reads it as a list of one
    if not isinstance(weight, list):
        return _scalar(weight, label)
    if not weight:
        return ()  # no value anywhere: the shared weight's, if there is one
    conditions = [isinstance(c, Mapping) for c in weight]
    if not any(conditions):
        return _gradient(weight, label)
    if not all(conditions):
        raise ValueError(f"field 'weight' of {label} mixes numbers and {{filter, value}} entries: {weight!r}; expected {_FORMS}")
    out = []
    for condition in weight:
        unknown = sorted(set(condition) - {"filter", "value"})
        if unknown or "value" not in condition:
            raise ValueError(f"field 'weight' of {label}: condition {dict(condition)!r} needs 'value' (and optionally 'filter'), nothing else")
        f = condition.get("filter")
        if f is not None and not isinstance(f, str):
            raise ValueError(f"field 'weight' of {label}: filter {f!r} must be a string (a substring of tensor names)")
        value = condition["value"]
        out.append((None if f in (None, "*", "") else f, _gradient(value, label) if isinstance(value, list) else _scalar(value, label)))
    return _plain(_reachable(out))


def _plain(conditions: tuple) -> Value | tuple:
    """One unfiltered condition is its value (the same for every tensor); other conditions as they are."""
    return conditions[0][1] if len(conditions) == 1 and conditions[0][0] is None else conditions


def _reachable(conditions: list) -> tuple:
    """The conditions that can be a tensor's first match: up to the first unfiltered one (mergekit
    stops there), without those whose filter contains an earlier filter (that one matches first)."""
    out: list = []
    for f, value in conditions:
        if f is not None and any(earlier in f for earlier, _ in out):  # an earlier filter matches wherever this one does
            continue
        out.append((f, value))
        if f is None:
            break
    return tuple(out)


def _with_fallback(setting: Value | tuple, shared: Value | tuple | None, label: str) -> Value | tuple:
    """A model's setting, its unmatched tensors taking the shared one's value (mergekit's precedence)."""
    if not isinstance(setting, tuple) or setting and setting[-1][0] is None:
        return setting  # a value for every tensor
    if shared is None:
        if not setting:
            raise ValueError(f"field 'weight' of {label} is an empty list and the recipe has no top-level weight; expected {_FORMS}")
        return setting  # tensors no filter matches have no weight: refused when merged, as mergekit does
    rest = shared if isinstance(shared, tuple) else ((None, shared),)
    return _plain(_reachable([*setting, *rest]))


def _scalar(value: Any, label: str) -> float:
    try:
        return parse_number(value, bools=True)
    except ValueError as error:
        raise ValueError(f"field 'weight' of {label} must be {_FORMS}: {error}") from None


def _gradient(values: list, label: str) -> Value:
    try:
        numbers = [parse_number(v, bools=True) for v in values]
    except ValueError as error:
        raise ValueError(f"field 'weight' of {label}: a gradient must be numbers: {error} (in {values!r})") from None
    if not numbers:
        raise ValueError(f"field 'weight' of {label} has an empty gradient; expected {_FORMS}")
    return numbers if len(numbers) > 1 else numbers[0]  # one knot: the same value everywhere


def _values(setting: Value | tuple) -> list[Value]:
    return [v for _, v in setting] if isinstance(setting, tuple) else [setting]


def per_knot_normalising_is_inexact(groups: Groups | None, total: np.ndarray) -> bool:
    """Whether dividing by ``total: (G,)`` (the models' summed weights per group) knot by knot
    differs from mergekit's per-tensor division: with depth knots, when the total varies over one
    pattern's knots (interpolated weights over an interpolated total is no interpolation)."""
    if groups is None or groups.knots is None:
        return False
    per_pattern = np.asarray(total, dtype=np.float64).reshape(-1, groups.knots)
    return not np.allclose(per_pattern, per_pattern[:, :1])


def weight_setting(row: np.ndarray, groups: Groups | None) -> Any:
    """The ``weight`` mergekit reads as ``row: (G,)`` under ``groups``: a number, a gradient, or a list
    of ``{filter, value}`` (values numbers or gradients). Raises ValueError where a group is no
    substring filter or the last group no catch-all."""
    row = np.asarray(row, dtype=np.float64)
    if groups is None or groups.size == 1 and groups.knots is not None:
        if groups is None and row.shape[0] != 1:
            raise ValueError(f"{row.shape[0]} coefficients per model but no groups")
        return float(row[0])
    if groups.knots is not None and groups.layer_pattern != LAYER_PATTERN:
        raise ValueError("depth knots over a custom layer_pattern cannot be written for mergekit (it finds layers itself)")
    if not groups.patterns:
        return [float(v) for v in row]
    values = row.reshape(len(groups.patterns), groups.knots or 1)
    if groups.knots is not None:  # patterns and knots: the simplest setting mergekit reads the same
        if np.all(values == values[:1]):
            return _compact(values[0])
    conditions = []
    for (name, pattern), value in zip(groups.patterns.items(), values):
        literal = _literal(pattern)
        together = conjunction_filters(pattern) if literal is None else None
        if together is not None:
            raise ValueError(f"group {name!r} holds the tensors whose names contain {'both' if len(together) == 2 else 'all of'} "
                             f"{' and '.join(repr(f) for f in together)} (a cell of models' differing filters): no mergekit filter "
                             "selects them alone, so their coefficients cannot be written as per-model filters")
        if literal is None:
            raise ValueError(f"group {name!r} ({pattern!r}) is not a plain substring; mergekit filters match substrings "
                             "(use a literal such as 'self_attn', or '.*' for the last, catch-all group)")
        setting = _compact(value) if groups.knots is not None else float(value[0])
        conditions.append({"value": setting} if literal == "" else {"filter": literal, "value": setting})
    if "filter" in conditions[-1]:
        raise ValueError("the last group must be a catch-all ('.*') for a mergekit recipe (mergekit has no 'no match' error)")
    return conditions


def _compact(knots: np.ndarray) -> Value:
    """A gradient, or one number when its knots are equal."""
    return float(knots[0]) if np.all(knots == knots[0]) else [float(v) for v in knots]


def _literal(pattern: str) -> str | None:
    """The substring a regex matches literally ('' for '.*'), or None when it is a real pattern."""
    if pattern in (".*", ".+", ""):
        return ""
    unescaped = re.sub(r"\\(.)", r"\1", pattern)
    return unescaped if re.escape(unescaped) == pattern or re.fullmatch(r"[\w]+", pattern) else None


def names_field(groups: Groups | None, weights: Iterable[Any]) -> dict[str, Any] | None:
    """The ``map_merge`` field of a recipe whose models' ``weight`` settings are ``weights`` (from
    :func:`weight_setting` under ``groups``): the groups' names and patterns, where some setting is
    a list of filters (else there is nothing to name: ``None``)."""
    if groups is None or not groups.patterns:
        return None
    if not any(isinstance(w, list) and w and isinstance(w[0], Mapping) for w in weights):
        return None
    return {"groups": dict(groups.patterns)}


def named_groups(groups: Groups | None, field: Any) -> tuple[Groups | None, str | None]:
    """``(groups, note)``: ``groups`` read from a recipe's filters, renamed after the recipe's
    ``map_merge`` field (:func:`names_field`), each group taking the name and pattern of the group
    written as its filter; unchanged, with a note saying why, when the field does not fit them
    (the recipe was edited after map_merge wrote it). ``field``: ``None`` when the recipe has none."""
    if field is None or groups is None or not groups.patterns:  # no filters to name
        return groups, None
    written = field.get("groups") if isinstance(field, Mapping) else None
    unfit = "field 'map_merge' (the names of the groups map_merge wrote this recipe with) {}: the groups are named after their filters"
    if not isinstance(written, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in written.items()):
        return groups, unfit.format("is not {groups: {name: pattern}}")
    by_filter = {}
    for name, pattern in written.items():
        literal = _literal(pattern)
        if literal is not None:
            by_filter[".*" if literal == "" else re.escape(literal)] = (name, pattern)
    read = list(groups.patterns.values())
    if any(p not in by_filter for p in read) or len({by_filter[p][0] for p in read}) < len(read):
        return groups, unfit.format(f"names {list(written)}, which do not fit the recipe's filters")
    try:
        return Groups(dict(by_filter[p] for p in read), knots=groups.knots, layer_pattern=groups.layer_pattern), None
    except ValueError as error:
        return groups, unfit.format(f"is not valid ({error})")
