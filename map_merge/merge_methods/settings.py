"""Operators from plain data: a name (``"ties"``: the default settings) or a mapping of a name and
settings (``{"name": "ties", "k": 0.6, "scope": "tensor"}``), as a config file or a command line
gives them. Every key and value is checked before anything is built; errors name the bad key or
value and list the accepted ones.

Settings per operator (the dataclass fields; see each class for their meaning):

- ``task_arithmetic``: none.
- ``ties``: ``k`` (share of entries kept, in (0, 1]), ``scope`` (``global`` / ``tensor``).
- ``dare``: ``p`` (drop probability, in [0, 1)), ``seed``, ``ties`` (TIES after the drop: ``true``
  for the default, or a mapping of ``ties`` settings).
- ``breadcrumbs``: ``density``, ``gamma``, ``scope``, ``rescale`` (``l1`` / null), ``consensus``
  (``sum`` / null), ``normalize``.
- ``della``: ``density``, ``epsilon``, ``seed``, ``scope``, ``rescale`` (``l1`` / ``inverse`` /
  null), ``consensus``, ``normalize``.

``rescale: true`` means ``l1`` and ``false`` null, as mergekit writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..numeric import parse_number
from .base import MergeMethod, TaskArithmetic
from .breadcrumbs import Breadcrumbs
from .dare import Dare
from .della import Della
from .ties import Ties

__all__ = ["OPERATORS", "method_from_settings", "method_settings"]

OPERATORS: dict[str, type[MergeMethod]] = {"task_arithmetic": TaskArithmetic, "ties": Ties, "dare": Dare, "breadcrumbs": Breadcrumbs,
                                           "della": Della}
"""Operator name -> class: the names a config's ``method`` takes."""

_CHOICES = {"scope": ("global", "tensor"), "consensus": (None, "sum")}


def method_settings(name: str) -> dict[str, Any]:
    """``setting -> default`` of operator ``name`` (what a mapping may set besides ``name``)."""
    cls = _operator(name)
    return {f.name: f.default for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _operator(name: Any) -> type[MergeMethod]:
    if not isinstance(name, str) or name.lower() not in OPERATORS:
        raise ValueError(f"unknown merge method {name!r}; choose one of {list(OPERATORS)}")
    return OPERATORS[name.lower()]


def method_from_settings(spec: str | Mapping[str, Any] | MergeMethod | None) -> MergeMethod:
    """The operator ``spec`` describes: ``None`` (task arithmetic), a name, a mapping
    ``{"name": ..., setting: value, ...}`` or an operator (returned as it is).

    Raises ValueError naming the bad key or value and the accepted ones, e.g.
    ``method 'ties' has no setting 'p'; its settings: ['k', 'scope']``."""
    if spec is None:
        return TaskArithmetic()
    if isinstance(spec, MergeMethod):
        return spec
    if isinstance(spec, str):
        return _operator(spec)()
    if not isinstance(spec, Mapping):
        raise ValueError(f"must be a method name or a mapping {{name: ..., setting: value}}, got {spec!r}")
    if "name" not in spec:
        raise ValueError(f"a mapping needs 'name' (one of {list(OPERATORS)}), got {dict(spec)!r}")
    name = spec["name"]
    cls = _operator(name)
    allowed = method_settings(name)
    values = {}
    for key, value in spec.items():
        if key == "name":
            continue
        if key not in allowed:
            raise ValueError(f"method {name!r} has no setting {key!r}; its settings: {sorted(allowed) or 'none'}")
        values[key] = _value(name, key, value, allowed[key])
    try:
        return cls(**values)
    except ValueError as error:
        raise ValueError(f"method {name!r}: {error}") from None


def _value(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` of setting ``key`` checked against the type of its default."""
    where = f"method {name!r} setting {key!r}"
    if key == "ties":  # Dare: TIES after the drop
        if value is None or value is False:
            return None
        if value is True:
            return Ties()
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be true, false or a mapping of ties settings (k, scope), got {value!r}")
        return method_from_settings({"name": "ties", **value})
    if key == "rescale":
        if value is True:
            return "l1"
        if value is False:
            return None
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where} must be 'l1'{', inverse' if name == 'della' else ''}, true (l1) or false / null, got {value!r}")
        return value
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            raise ValueError(f"{where} must be one of {list(_CHOICES[key])}, got {value!r}")
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    try:
        return parse_number(value)
    except ValueError as error:
        raise ValueError(f"{where} must be a number: {error}") from None
