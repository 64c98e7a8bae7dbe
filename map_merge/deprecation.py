"""Old names kept for one release after a rename: a module ``__getattr__`` that serves them with a
:class:`DeprecationWarning` naming the new one."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["renamed"]


def renamed(namespace: Mapping[str, Any], old_to_new: Mapping[str, str], note: str = "") -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``namespace`` (the module's ``globals()``): ``old`` gives the
    object now called ``old_to_new[old]``, with a DeprecationWarning (``note`` says why); any other
    missing name raises AttributeError."""
    module = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            new = old_to_new[name]
            warnings.warn(f"{module}.{name} is now {new}{f' ({note})' if note else ''}; the old name goes in the next release",
                          DeprecationWarning, stacklevel=2)
            return namespace[new]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
