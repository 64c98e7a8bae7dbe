"""Merge operators: how task vectors are prepared before per-task coefficients scale them.

Every operator maps the stacked task vectors ``V: (T, P)`` to prepared vectors ``V': (T, P)``
once; a merge is then always linear in the coefficients::

    theta(c) = theta_0 + sum_i c_i V'_i            c: (T,)

so one prepared matrix serves every coefficient vector (MAP evaluates hundreds).

- :class:`TaskArithmetic`: ``V' = V``.
- :class:`Ties`: trim each task vector to its top-``k`` fraction of entries by magnitude, elect
  a sign per entry by the summed mass of the trimmed vectors, keep only entries that agree
  with it and divide by the number of agreeing tasks (the disjoint mean). With every
  ``c_i = lam`` this is TIES-merging with scaling ``lam``.
- :class:`Dare`: drop each entry with probability ``p`` and rescale survivors by
  ``1 / (1 - p)`` (seeded), optionally followed by :class:`Ties`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["MergeMethod", "TaskArithmetic", "Ties", "Dare", "resolve_method"]


class MergeMethod:
    """Base class of merge operators. Subclasses implement :meth:`prepare`."""

    name: str = "base"

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        """Map task vectors ``(T, P)`` to prepared vectors ``(T, P)`` (may return the input)."""
        raise NotImplementedError

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description: name and settings (used in fingerprints and metadata)."""
        settings = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        for key, value in list(settings.items()):
            if isinstance(value, MergeMethod):
                settings[key] = value.spec
        return {"name": self.name, **settings}

    @property
    def is_identity(self) -> bool:
        return False


@dataclass(frozen=True)
class TaskArithmetic(MergeMethod):
    """Plain task arithmetic: the task vectors are used as they are."""

    name = "task_arithmetic"

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

    @property
    def is_identity(self) -> bool:
        return True


@dataclass(frozen=True)
class Ties(MergeMethod):
    """TIES: trim to the top ``k`` fraction by magnitude per task, elect signs, disjoint mean.

    Args:
        k: fraction of entries kept per task vector, in (0, 1]. The TIES paper's default is 0.2.
    """

    k: float = 0.2
    name = "ties"

    def __post_init__(self) -> None:
        if not 0.0 < float(self.k) <= 1.0:
            raise ValueError(f"Ties.k is the fraction of entries kept and must lie in (0, 1]; got {self.k}")

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        if vectors.ndim != 2:
            raise ValueError(f"Ties.prepare expects task vectors of shape (T, P); got {tuple(vectors.shape)}")
        num_entries = vectors.shape[1]
        keep = max(1, int(round(self.k * num_entries)))
        magnitude = vectors.abs()
        if keep < num_entries:
            # threshold per task = keep-th largest magnitude = (P - keep + 1)-th smallest
            threshold = magnitude.kthvalue(num_entries - keep + 1, dim=1, keepdim=True).values
            trimmed = torch.where(magnitude >= threshold, vectors, torch.zeros((), dtype=vectors.dtype, device=vectors.device))
        else:
            trimmed = vectors.clone()
        elected = torch.sign(trimmed.sum(dim=0, keepdim=True))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agree.sum(dim=0, keepdim=True).clamp_min(1).to(vectors.dtype)
        trimmed.mul_(agree).div_(count)
        return trimmed


@dataclass(frozen=True)
class Dare(MergeMethod):
    """DARE: random drop with probability ``p``, rescale by ``1/(1-p)``; optionally then TIES.

    Args:
        p: drop probability in [0, 1).
        seed: seed of the drop masks (the same seed gives the same merged model).
        ties: ``None`` for plain DARE, or a :class:`Ties` applied to the rescaled vectors.
    """

    p: float = 0.5
    seed: int = 0
    ties: Ties | None = None
    name = "dare"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.p) < 1.0:
            raise ValueError(f"Dare.p is a drop probability and must lie in [0, 1); got {self.p}")

    def prepare(self, vectors: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=vectors.device).manual_seed(int(self.seed))
        keep = torch.rand(vectors.shape, generator=generator, device=vectors.device) >= self.p
        out = vectors * keep.to(vectors.dtype)
        out.div_(1.0 - self.p)
        if self.ties is not None:
            out = self.ties.prepare(out)
        return out


_BY_NAME = {"task_arithmetic": TaskArithmetic, "ta": TaskArithmetic, "ties": Ties, "dare": Dare}


def resolve_method(method: str | MergeMethod | None) -> MergeMethod:
    """Turn ``"task_arithmetic" | "ties" | "dare" | MergeMethod | None`` into a :class:`MergeMethod`."""
    if method is None:
        return TaskArithmetic()
    if isinstance(method, MergeMethod):
        return method
    if isinstance(method, str):
        try:
            return _BY_NAME[method.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown merge method {method!r}; choose one of {sorted(set(_BY_NAME) - {'ta'})} "
                "or pass a MergeMethod instance such as Ties(k=0.1)"
            ) from None
    raise TypeError(f"method must be a string or a MergeMethod, not {type(method).__name__}")
