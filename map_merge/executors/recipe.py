"""The job description a worker runs: a :class:`Recipe` is an evaluator in two parts, a heavy
``base`` (what builds the live model) and light ``parts`` bound to it (the tasks), with content
keys that let :class:`~map_merge.RayExecutor` ship each part to a worker once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

__all__ = ["Recipe", "as_recipe"]


class Recipe:
    """An evaluator in two parts: ``recipe(item) == run(base, parts, item)``.

    Args:
        run: ``run(base, parts, item) -> result``; a module-level function (pickled by name).
        base: the heavy part, e.g. a live model with its task vectors and merge method.
        parts: the light part bound to it, e.g. the tasks.
        ids: ``ids() -> (base_id, parts_id)``: picklable content that identifies ``base`` and
            ``parts`` (default: the parts themselves). Recipes with equal ``base_id`` share one
            base on a worker. Called only when the recipe is shipped, once.
        setup: ``setup(base)``, run once where a base arrives, before its first evaluation
            (e.g. builds the model); ``None``: nothing.

    Executors that run in this process just call it. :class:`RayExecutor` ships ``base`` and
    ``parts`` separately, each once, keyed by a hash of the pickled ids (:meth:`keys`).
    """

    def __init__(self, run: Callable[[Any, Any, Any], Any], base: Any, parts: Any = None,
                 ids: Callable[[], tuple[Any, Any]] | None = None, setup: Callable[[Any], Any] | None = None) -> None:
        self.run, self.base, self.parts, self.ids, self.setup = run, base, parts, ids, setup
        self._keys: tuple[str, str] | None = None

    def __call__(self, item: Any) -> Any:
        return self.run(self.base, self.parts, item)

    def keys(self) -> tuple[str, str]:
        """``(base_key, key)``: content fingerprints of the base, and of the whole recipe (base,
        parts, run and setup). Computed once per recipe object."""
        if self._keys is None:
            dumps = _dumps()
            base_id, parts_id = self.ids() if self.ids is not None else (self.base, self.parts)
            base_key = hashlib.blake2b(dumps(("base", base_id)), digest_size=16).hexdigest()
            whole = hashlib.blake2b(digest_size=16)
            for part in (base_key.encode(), dumps(self.run), dumps(self.setup), dumps(parts_id)):
                whole.update(len(part).to_bytes(8, "little"))
                whole.update(part)
            self._keys = (base_key, whole.hexdigest())
        return self._keys

    def __repr__(self) -> str:
        return f"Recipe({getattr(self.run, '__qualname__', self.run)!r}, base={type(self.base).__name__})"


def _dumps() -> Callable[[Any], bytes]:
    try:
        from ray import cloudpickle
    except ImportError:
        try:
            import cloudpickle
        except ImportError:
            import pickle

            return pickle.dumps
    return cloudpickle.dumps


def _call(fn: Callable[[Any], Any], _parts: Any, item: Any) -> Any:
    return fn(item)


def as_recipe(fn: Callable[[Any], Any]) -> Recipe:
    """``fn`` itself if it is a :class:`Recipe`, else a recipe whose base is ``fn``."""
    return fn if isinstance(fn, Recipe) else Recipe(_call, fn)
