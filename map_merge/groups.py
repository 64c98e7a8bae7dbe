"""Coefficient groups: different coefficients for different parts of a model.

With ``G`` groups a coefficient vector has ``T x G`` entries, ordered task-major and named
``task/group``: entry ``i * G + g`` is task ``i``'s coefficient in group ``g``. Every merged tensor
``k`` has a weight row ``w_k: (G,)`` and merges with the per-task coefficients ``c_k = C @ w_k``
(``C: (T, G)``). Two kinds, as mergekit users write them:

- :class:`Groups` of regular expressions over tensor names (``{"attn": r"self_attn", "mlp":
  r"\\.mlp\\.", "rest": r".*"}``): the first pattern that matches a name wins (``re.search``);
  ``w_k`` is one-hot. Every tensor must match exactly one group (checked, naming the tensor).
- :meth:`Groups.by_depth`: ``knots`` values interpolated linearly over the layer index, like a
  mergekit gradient (``weight: [0.2, 0.5, 0.8]``): layer ``l`` of ``L`` sits at
  ``t = l / (L - 1)`` and takes the two nearest knots; tensors outside the layers (embeddings,
  final norm, head) take ``t = 0`` (the first knot), as mergekit does.

- both (``Groups(patterns, knots=K)``): each pattern's tensors get their own ``K`` depth knots
  (``G = P x K``, named ``group.knotj``), a mergekit filter whose value is a gradient
  (``{filter: self_attn, value: [0.2, 0.8]}``): the first matching pattern picks the block of
  columns, the tensor's depth ``t`` (over the whole model, as above) the interpolation within it.

With one group, everything is exactly the ungrouped merge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["Groups", "coefficient_names", "as_matrix", "LAYER_PATTERN"]

LAYER_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."
"""Where a tensor name gives its layer index (``model.layers.3.``, ``encoder.layer.3.``, ``transformer.h.3.``)."""


class Groups:
    """Named coefficient groups over a model's tensors (see the module docstring).

    Args:
        patterns: ``group name -> regular expression`` in order; the first that matches a tensor's
            name (``re.search``) owns it.
        knots: depth knots (:meth:`by_depth`); with ``patterns`` too, ``knots`` per pattern.
    """

    def __init__(self, patterns: Mapping[str, str] | None = None, *, knots: int | None = None, layer_pattern: str = LAYER_PATTERN) -> None:
        if patterns is None and knots is None:
            raise ValueError("Groups takes regex patterns (group -> pattern), knots= (use Groups.by_depth), or both")
        self.patterns: dict[str, str] = {}
        self.knots = None if knots is None else int(knots)
        self.layer_pattern = layer_pattern
        if patterns is not None:
            if not patterns:
                raise ValueError("Groups needs at least one group -> pattern")
            for name, pattern in patterns.items():
                if "/" in str(name):
                    raise ValueError(f"group name {name!r} may not contain '/' (coefficients are named task/group)")
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"group {name!r}: {pattern!r} is not a regular expression ({error})") from None
                self.patterns[str(name)] = str(pattern)
        if self.knots is not None and self.knots < 1:
            raise ValueError(f"Groups.by_depth needs at least one knot, got {knots}")
        try:
            self._layer = re.compile(layer_pattern)
        except re.error as error:
            raise ValueError(f"layer_pattern {layer_pattern!r} is not a regular expression ({error})") from None

    @classmethod
    def by_depth(cls, knots: int, layer_pattern: str = LAYER_PATTERN) -> "Groups":
        """``knots`` coefficients per task interpolated linearly over the layer index (a mergekit gradient)."""
        return cls(knots=knots, layer_pattern=layer_pattern)

    @property
    def names(self) -> tuple[str, ...]:
        """The G group names (``knot0`` ... for depth knots; ``attn.knot0`` ... for both)."""
        if self.knots is None:
            return tuple(self.patterns)
        knots = tuple(f"knot{j}" for j in range(self.knots))
        return tuple(f"{p}.{k}" for p in self.patterns for k in knots) if self.patterns else knots

    @property
    def size(self) -> int:
        """G."""
        return len(self.names)

    def layer_of(self, key: str) -> int | None:
        match = self._layer.search(key)
        return int(match.group(1)) if match else None

    def weights(self, keys: Sequence[str]) -> np.ndarray:
        """``(len(keys), G)`` weights ``w_k`` (rows sum to 1). Raises ValueError naming a tensor no
        pattern matches."""
        keys = list(keys)
        owner = self._owners(keys) if self.patterns else np.zeros(len(keys), dtype=int)
        if self.knots is None:
            out = np.zeros((len(keys), self.size))
            out[np.arange(len(keys)), owner] = 1.0
            return out
        out = np.zeros((len(keys), max(len(self.patterns), 1), self.knots))
        layers = [self.layer_of(k) for k in keys]
        count = max((l for l in layers if l is not None), default=-1) + 1
        for row, layer in enumerate(layers):
            t = 0.0 if layer is None else (layer / (count - 1) if count > 1 else 1.0)
            out[row, owner[row]] = interpolation(t, self.knots)
        return out.reshape(len(keys), self.size)

    def _owners(self, keys: list[str]) -> np.ndarray:
        """``(len(keys),)`` the index of the first pattern matching each key; ValueError naming unmatched ones."""
        compiled = [re.compile(p) for p in self.patterns.values()]
        owner = np.zeros(len(keys), dtype=int)
        unmatched = []
        for row, key in enumerate(keys):
            index = next((j for j, pattern in enumerate(compiled) if pattern.search(key)), None)
            if index is None:
                unmatched.append(key)
            else:
                owner[row] = index
        if unmatched:
            shown = ", ".join(repr(k) for k in unmatched[:5])
            raise ValueError(f"tensor(s) [{shown}{', ...' if len(unmatched) > 5 else ''}] ({len(unmatched)} in all) match no group "
                             f"of {list(self.patterns)}; add a catch-all group such as {{'rest': '.*'}}")
        return owner

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description (fingerprints, ``map_merge.json``)."""
        if self.knots is None:
            return {"patterns": dict(self.patterns)}
        return {**({"patterns": dict(self.patterns)} if self.patterns else {}), "knots": self.knots, "layer_pattern": self.layer_pattern}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> "Groups | None":
        if spec is None:
            return None
        if "knots" in spec:
            return cls(spec.get("patterns"), knots=int(spec["knots"]), layer_pattern=spec.get("layer_pattern", LAYER_PATTERN))
        return cls(spec["patterns"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Groups) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(repr(sorted(self.spec.items())))

    def __repr__(self) -> str:
        if self.knots is None:
            return f"Groups({self.patterns!r})"
        return f"Groups({self.patterns!r}, knots={self.knots})" if self.patterns else f"Groups.by_depth(knots={self.knots})"


def interpolation(t: float, knots: int) -> np.ndarray:
    """``(knots,)`` weights of linear interpolation at ``t`` in [0, 1] (mergekit's gradient rule)."""
    out = np.zeros(knots)
    scaled = t * (knots - 1)
    low = int(scaled)
    high = min(knots - 1, low + 1)
    frac = scaled - low
    out[low] += 1.0 - frac
    out[high] += frac
    return out


def coefficient_names(task_names: Sequence[str], groups: Groups | None) -> tuple[str, ...]:
    """Names of the ``T x G`` coefficients, task-major: ``task/group`` (just ``task`` without groups)."""
    if groups is None:
        return tuple(task_names)
    return tuple(f"{t}/{g}" for t in task_names for g in groups.names)


def as_matrix(coeffs: Any, num_tasks: int, groups: Groups | None) -> np.ndarray:
    """``coeffs`` of length ``T*G`` (task-major) or shape ``(T, G)`` as a finite float64 ``(T, G)``
    matrix (``(T, 1)`` without groups), or a ValueError naming the expected shape."""
    size = 1 if groups is None else groups.size
    c = np.asarray(coeffs.detach().cpu().numpy() if hasattr(coeffs, "detach") else coeffs, dtype=np.float64)
    if c.shape == (num_tasks, size):
        matrix = c
    elif c.ndim == 1 and c.shape[0] == num_tasks * size:
        matrix = c.reshape(num_tasks, size)
    else:
        what = "one per task" if groups is None else f"one per task and group: T x G = {num_tasks} x {size}, task-major, or shape ({num_tasks}, {size})"
        raise ValueError(f"expected {num_tasks * size} coefficients ({what}), got shape {tuple(c.shape)}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"coefficients must be finite, got {c.tolist()}")
    return matrix
