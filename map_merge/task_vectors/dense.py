"""Task vectors held densely in memory: the fast path for models that fit.

The pretrained weights ``theta_0`` are one flat vector ``base: (P,)`` and the task vectors
``tau_i = theta_i - theta_0`` one contiguous matrix ``vectors: (T, P)`` (P = floating-point
entries, tied tensors counted once). A merge is a single ``addmv``: ``theta_0 + V'^T c`` (see
:mod:`map_merge.merge_methods` for ``V'``). Integer buffers (position ids, counters) are not
task-vector material: they are copied from the pretrained model.

Loading is in :mod:`.dense_load`, writing merges into live models in :mod:`.dense_binding`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from ..groups import Groups
from ..merge_methods import MergeMethod, resolve_method
from .base import TaskVectors, chunk_ranges
from .dense_binding import Binding, DenseBinding
from .dense_load import Slot, load_dense
from .sources import MemoryWeights, ModelSource, SourceInfo, Weights, tensor_bytes, warn_zero_tasks

__all__ = ["DenseTaskVectors"]

log = logging.getLogger(__name__)


class DenseTaskVectors(DenseBinding, TaskVectors, kind="dense"):
    """Pretrained weights plus stacked task vectors in memory.

    Attributes (besides :class:`TaskVectors`'):
        base: ``(P,)`` flat pretrained weights.  vectors: ``(T, P)`` task vectors (row i = theta_i - theta_0).
    """

    storage = "dense"

    def __init__(
        self,
        base: torch.Tensor,
        vectors: torch.Tensor,
        slots: Sequence[Slot],
        names: Sequence[str],
        aliases: Mapping[str, str] | None = None,
        frozen: Mapping[str, torch.Tensor] | None = None,
        base_weights: Weights | None = None,
        sources: Sequence[Any] = (),
    ) -> None:
        if vectors.ndim != 2 or base.ndim != 1 or vectors.shape[1] != base.shape[0]:
            raise ValueError(f"vectors must be (T, P) and base (P,); got {tuple(vectors.shape)} and {tuple(base.shape)}")
        if len(names) != vectors.shape[0]:
            raise ValueError(f"{len(names)} names for {vectors.shape[0]} task vectors")
        self.base = base
        self.vectors = vectors
        self.names = tuple(names)
        self._slots = tuple(slots)
        self._aliases = dict(aliases or {})  # alias key -> key stored in a slot
        self._frozen = dict(frozen or {})  # non-floating tensors copied from the pretrained model
        self._base_source = base_weights if base_weights is not None else MemoryWeights({}, "the pretrained model")
        self._sources = list(sources)  # Weights / adapters each task came from (paths and identities)
        self._prepared: tuple[str, torch.Tensor] | None = None  # one-entry cache: (method key, V')
        self._bound: "weakref.WeakKeyDictionary[nn.Module, Binding]" = weakref.WeakKeyDictionary()
        self._fingerprint: str | None = None
        self._slot_of: dict[str, Slot] | None = None

    def __getstate__(self) -> dict:
        # bindings to live models (weak references) stay behind; a copy binds its own models
        state = self.__dict__.copy()
        state["_bound"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bound = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, pretrained: ModelSource, models: Sequence[ModelSource], names: Sequence[str], device: torch.device,
              dtype: torch.dtype) -> "DenseTaskVectors":
        """Load every model into memory and stack the task vectors (validated: keys, shapes,
        dtypes, finite values; messages name the key and the model)."""
        parts = load_dense(pretrained, models, names, device, dtype)
        warn_zero_tasks(names, [not bool(row.any()) for row in parts.vectors])
        log.info("task vectors: %d tasks x %d entries on %s (%s)", len(models), parts.base.numel(), device, dtype)
        return cls(parts.base, parts.vectors, parts.slots, names, aliases=parts.pretrained.aliases, frozen=parts.frozen,
                   base_weights=SourceInfo.of(parts.pretrained), sources=parts.sources)

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        return self.vectors.shape[1]

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vectors.dtype

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self._slots)

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**{s.key: s.shape for s in self._slots}, **{k: tuple(t.shape) for k, t in self._frozen.items()}}

    def slices(self) -> dict[str, tuple[slice, tuple[int, ...]]]:
        """``key -> (slice into the flat vector, shape)`` for each stored tensor."""
        return {s.key: (slice(s.offset, s.offset + s.numel), s.shape) for s in self._slots}

    def fingerprint(self) -> str:
        """Hash of the key layout, the pretrained weights and the task vectors (cached)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            layout = [(s.key, s.shape) for s in self._slots]
            digest.update(json.dumps([layout, list(self.names), sorted(self._aliases.items())]).encode())
            for tensor in (self.base, self.vectors):
                digest.update(tensor_bytes(tensor))  # raw bytes: bf16 / fp16 storage too
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def cosine_similarity(self) -> np.ndarray:
        """``(T, T)`` cosine similarities between task vectors."""
        gram = torch.stack([(self.vectors.double() @ row.double()) for row in self.vectors])
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return (gram / norms[:, None] / norms[None, :]).cpu().numpy()

    def _base_weights(self) -> Weights:
        return self._base_source

    def source_paths(self) -> list[Path]:
        return [p for w in [self._base_source, *self._sources] for p in w.paths()]

    def _task_references(self) -> dict[str, str]:
        out = {}
        for name, source in zip(self.names, self._sources):
            paths = source.paths()
            if not paths:
                raise RecipeError(f"task {name!r} is in memory; mergekit reads models from disk")
            path = Path(paths[0]).resolve()
            if (path / "adapter_config.json").exists():  # an adapter on the base, as mergekit writes it
                base = self._base_source.paths()
                if not base:
                    raise RecipeError("the pretrained model is in memory; mergekit reads models from disk")
                out[name] = f"{Path(base[0]).resolve()}+{path}"
            else:
                out[name] = str(path)
        return out

    def _source_identities(self) -> list[Any]:
        return [{"pretrained": self._base_source.describe()}] + [{n: w.describe()} for n, w in zip(self.names, self._sources)]

    # ------------------------------------------------------------------ chunks
    def delta_chunks(self, keys: Sequence[str] | None = None, device: torch.device | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
        by_key = {s.key: s for s in self._slots}
        for key in self.keys if keys is None else keys:
            slot = by_key[key]
            for start, stop in chunk_ranges(slot.shape):
                chunk = self.vectors[:, slot.offset + start : slot.offset + stop]
                yield key, start, chunk if device is None else chunk.to(device)

    def base_tensor(self, key: str) -> torch.Tensor:
        sl, shape = self.slices()[key]
        return self.base[sl].view(shape)

    def deltas(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        sl, shape = self.slices()[key]
        return self.base[sl].view(shape), self.vectors[:, sl].reshape((self.num_tasks,) + tuple(shape))

    # ------------------------------------------------------------------ merging
    def prepared(self, method: str | MergeMethod | None = None) -> torch.Tensor:
        """Prepared task vectors ``V': (T, P)`` for a merge method (the last one is cached)."""
        method = resolve_method(method)
        if method.is_identity:
            return self.vectors
        key = json.dumps(method.spec, sort_keys=True)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None  # free the old one first
            sizes = {s.key: s.numel for s in self._slots}
            state = method.fit(lambda keys=None: self.delta_chunks(keys), sizes, {s.key: s.shape for s in self._slots})
            out = torch.empty_like(self.vectors)
            offsets = {s.key: s.offset for s in self._slots}
            for key_, start, chunk in self.delta_chunks():
                out[:, offsets[key_] + start : offsets[key_] + start + chunk.shape[1]] = method.transform(key_, start, chunk, state)
            self._prepared = (key, out)
        return self._prepared[1]

    def prepare(self, method: str | MergeMethod | None = None) -> None:
        self.prepared(method)

    def merge_flat(self, coeffs: Any, method: str | MergeMethod | None = None, out: torch.Tensor | None = None,
                   groups: Groups | None = None) -> torch.Tensor:
        """Merged weights as a flat ``(P,)`` vector: ``base + V'^T c`` in one fused op. With ``groups``,
        one fused op per run of consecutive tensors that share their coefficients."""
        prepared = self.prepared(method)
        matrix, per_key = self.coefficients_by_key(coeffs, groups)
        if per_key is None or np.array_equal(matrix, np.repeat(matrix[:, :1], matrix.shape[1], axis=1)):  # one per task everywhere
            c = torch.as_tensor(matrix[:, 0]).to(device=self.device, dtype=self.dtype)
            return torch.addmv(self.base, prepared.T, c, out=out)
        out = torch.empty_like(self.base) if out is None else out
        for start, stop, c in self._runs(per_key):
            c = torch.as_tensor(c).to(device=self.device, dtype=self.dtype)
            torch.addmv(self.base[start:stop], prepared[:, start:stop].T, c, out=out[start:stop])
        return out

    def _runs(self, per_key: dict[str, np.ndarray]) -> list[tuple[int, int, np.ndarray]]:
        """``(start, stop, c (T,))`` over maximal runs of consecutive slots with the same coefficients."""
        runs: list[tuple[int, int, np.ndarray]] = []
        for slot in self._slots:
            c = per_key[slot.key]
            if runs and runs[-1][1] == slot.offset and np.array_equal(runs[-1][2], c):
                runs[-1] = (runs[-1][0], slot.offset + slot.numel, c)
            else:
                runs.append((slot.offset, slot.offset + slot.numel, c))
        return runs

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None, dtype: torch.dtype | None = None,
              groups: Groups | None = None) -> dict[str, torch.Tensor]:
        """Merged state dict for ``coeffs: (T,)`` in the checkpoint layout: views of one new flat
        buffer in :attr:`dtype` (or in ``dtype``, when given).

        Tied keys map to the same tensor; integer buffers are copies of the pretrained ones."""
        flat = self.merge_flat(coeffs, method, groups=groups)
        if dtype is not None:
            flat = flat.to(dtype)
        state: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            state[slot.key] = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        for alias, target in self._aliases.items():
            state[alias] = state[target]
        for key, tensor in self._frozen.items():
            state[key] = tensor.clone()
        return state

    # ------------------------------------------------------------------ saving
    def _output_entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        entries = [(s.key, s.dtype, s.shape) for s in self._slots]
        return entries + [(k, t.dtype, tuple(t.shape)) for k, t in self._frozen.items()]

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod, groups: Groups | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        flat = self.merge_flat(coeffs, method, groups=groups)
        for slot in self._slots:
            yield slot.key, flat[slot.offset : slot.offset + slot.numel].to(slot.dtype)
        for key, tensor in self._frozen.items():
            yield key, tensor

