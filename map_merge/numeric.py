"""Numbers as users write them in YAML: one parser for weights, coefficients and preferences.

YAML 1.1 (PyYAML) reads ``1e-1`` as the *string* ``'1e-1'`` (its floats need a dot: ``1.0e-1``);
mergekit (pydantic) and a Python ``float()`` read it as 0.1. :func:`parse_number` accepts what
both accept: numbers and decimal numeric strings (``'1e-1'``, ``' .5 '``, ``'1_000'``), finite;
never booleans, other strings, or ``nan`` / ``inf``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

__all__ = ["parse_number", "is_number"]

_DECIMAL = re.compile(r"[+-]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?", re.ASCII)


def is_number(value: Any) -> bool:
    """Whether :func:`parse_number` accepts ``value``."""
    try:
        parse_number(value)
    except ValueError:
        return False
    return True


def parse_number(value: Any) -> float:
    """``value`` as a finite float: an int or float (not a bool), or a decimal numeric string.

    Raises ValueError saying what ``value`` is instead (a string, a boolean, not finite, ...)."""
    if isinstance(value, bool):
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
