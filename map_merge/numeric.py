"""Numbers and booleans as users write them in YAML: one parser for weights, coefficients and
preferences, one for mergekit's true/false settings.

YAML 1.1 (PyYAML) reads ``1e-1`` as the *string* ``'1e-1'`` (its floats need a dot: ``1.0e-1``);
mergekit (pydantic) and a Python ``float()`` read it as 0.1. :func:`parse_number` accepts what
both accept: numbers and decimal numeric strings (``'1e-1'``, ``' .5 '``, ``'1_000'``), finite;
never other strings or ``nan`` / ``inf``; booleans only when asked (``bools=True``: mergekit's
numbers, where pydantic reads ``true`` as 1.0).

A quoted ``"false"`` is a (true) string to Python's ``bool``; mergekit reads its true/false
settings (``normalize``, ``rescale``, ``int8_mask``) with pydantic's lax ``bool``, and so does
:func:`parse_bool`: booleans, the numbers 0 and 1, and the strings ``0 off f false n no`` /
``1 on t true y yes`` in any case (no surrounding spaces); anything else is refused.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

__all__ = ["parse_number", "is_number", "parse_bool"]

_DECIMAL = re.compile(r"[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?", re.ASCII)


def is_number(value: Any) -> bool:
    """Whether :func:`parse_number` accepts ``value``."""
    try:
        parse_number(value)
    except ValueError:
        return False
    return True


def parse_number(value: Any, *, bools: bool = False) -> float:
    """``value`` as a finite float: an int or float, or a decimal numeric string; a bool only
    with ``bools=True`` (1.0 / 0.0, as mergekit reads ``weight: true``).

    Raises ValueError saying what ``value`` is instead (a string, a boolean, not finite, ...)."""
    if isinstance(value, bool):
        if bools:
            return float(value)
        raise ValueError(f"got {value!r}, a boolean, not a number")
    if isinstance(value, numbers.Real):  # Python and numpy ints and floats
        number = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            if not _DECIMAL.fullmatch(text):
                raise ValueError
            number = float(text)
        except ValueError:
            raise ValueError(f"got the string {value!r}, which is not a number") from None
    else:
        raise ValueError(f"got {value!r} ({type(value).__name__}), not a number")
    if not math.isfinite(number):
        raise ValueError(f"got {value!r}, not a finite number")
    return number


_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})


def parse_bool(value: Any) -> bool:
    """``value`` as pydantic's lax ``bool`` (mergekit's true/false settings) reads it: a bool, the
    numbers 0 / 1, or one of the strings ``0 off f false n no`` / ``1 on t true y yes`` (any case).

    Raises ValueError saying what ``value`` is instead."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and value in (0, 1):  # 0, 1, 0.0, 1.0 (pydantic: ints and whole floats)
        return bool(value)
    if isinstance(value, str) and value.lower() in _FALSE | _TRUE:
        return value.lower() in _TRUE
    shown = f"the string {value!r}" if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
    raise ValueError(f"got {shown}, not true or false (mergekit reads true/false, yes/no, on/off, t/f, y/n or 1/0)")
