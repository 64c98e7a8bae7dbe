"""Task vectors held densely in memory: the fast path for models that fit.

The pretrained weights ``theta_0`` are one flat vector ``base: (P,)`` and the task vectors
``tau_i = theta_i - theta_0`` one contiguous matrix ``vectors: (T, P)`` (P = floating-point
entries, tied tensors counted once). A merge is a single ``addmv``: ``theta_0 + V'^T c`` (see
:mod:`map_merge.merge_methods` for ``V'``). Integer buffers (position ids, counters) are not
task-vector material: they are copied from the pretrained model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RecipeError
from ..groups import Groups
from ..merge_methods import MergeMethod, resolve_method
from .base import TaskVectors, chunk_ranges
from .binding import LiveWriter, set_tensor, writable_state
from .keymap import LivePlan
from .sources import MemoryWeights, ModelSource, SourceInfo, Weights, check_finite, open_weights, preview, tensor_bytes, warn_zero_tasks

__all__ = ["DenseTaskVectors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Slot:
    """Where one floating-point tensor lives in the flat vector."""

    key: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: torch.dtype  # dtype of the original tensor (for saving)


@dataclass
class _Binding:
    """A model whose merged tensors are views of one flat ``buffer`` (its dtype and device)."""

    buffer: torch.Tensor | None  # None: the model mixes dtypes/devices; tensors are written one by one
    scratch: torch.Tensor | None  # fp32 result when it cannot be written into buffer directly
    targets: dict[str, torch.Tensor]  # checkpoint key -> live tensor (buffer None only)
    plan: LivePlan
    views: dict[str, int]  # live key -> element offset of its view in buffer


class DenseTaskVectors(TaskVectors, kind="dense"):
    """Pretrained weights plus stacked task vectors in memory.

    Attributes (besides :class:`TaskVectors`'):
        base: ``(P,)`` flat pretrained weights.  vectors: ``(T, P)`` task vectors (row i = theta_i - theta_0).
    """

    storage = "dense"

    def __init__(
        self,
        base: torch.Tensor,
        vectors: torch.Tensor,
        slots: Sequence[_Slot],
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
        self._bound: "weakref.WeakKeyDictionary[nn.Module, _Binding]" = weakref.WeakKeyDictionary()
        self._fingerprint: str | None = None
        self._slot_of: dict[str, _Slot] | None = None

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
        base_weights = open_weights(pretrained, "the pretrained model", stream=False)
        base_sd = {k: base_weights.tensor(k) for k in base_weights.tensors}
        if not base_sd:
            raise ValueError("the pretrained model has no tensors")
        slots: list[_Slot] = []
        frozen: dict[str, torch.Tensor] = {}
        offset = 0
        for key, tensor in base_sd.items():
            if tensor.dtype.is_floating_point:
                check_finite(tensor, key, "pretrained model")
                slots.append(_Slot(key, tuple(tensor.shape), offset, tensor.numel(), tensor.dtype))
                offset += tensor.numel()
            elif tensor.dtype.is_complex:
                raise ValueError(f"tensor {key!r} of the pretrained model is complex ({tensor.dtype}); not supported")
            else:
                frozen[key] = tensor.detach().to(device=device, copy=True)
        if not slots:
            raise ValueError("the pretrained model has no floating-point tensors to merge")
        num_params = offset
        base = torch.empty(num_params, device=device, dtype=dtype)
        for slot in slots:
            base[slot.offset : slot.offset + slot.numel] = base_sd[slot.key].detach().reshape(-1).to(device=device, dtype=dtype)

        vectors = torch.empty(len(models), num_params, device=device, dtype=dtype)
        expected = set(base_sd)
        sources = []
        for row, (name, model) in enumerate(zip(names, models)):
            weights = open_weights(model, f"fine-tuned model {name!r}", stream=False)
            sd = {k: weights.tensor(k) for k in weights.tensors}
            keys = set(sd)
            # integer buffers are copied from the pretrained model anyway (non-persistent in some versions)
            missing = sorted(k for k in expected - keys if k not in frozen)
            extra = sorted(k for k in keys - expected if sd[k].dtype.is_floating_point)
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing keys {preview(missing)}")
                if extra:
                    parts.append(f"unexpected keys {preview(extra)}")
                raise ValueError(f"fine-tuned model {name!r} does not match the pretrained model: " + "; ".join(parts))
            for key, frozen_tensor in frozen.items():
                if key not in sd:
                    continue
                other = sd[key]
                if other.dtype.is_floating_point:
                    raise ValueError(
                        f"tensor {key!r} is {frozen_tensor.dtype} in the pretrained model but {other.dtype} "
                        f"in fine-tuned model {name!r}"
                    )
                if tuple(other.shape) != tuple(frozen_tensor.shape):
                    raise ValueError(
                        f"shape mismatch for {key!r}: pretrained {tuple(frozen_tensor.shape)}, "
                        f"fine-tuned model {name!r} {tuple(other.shape)}"
                    )
            for slot in slots:
                tensor = sd[slot.key]
                if tuple(tensor.shape) != slot.shape:
                    raise ValueError(
                        f"shape mismatch for {slot.key!r}: pretrained {slot.shape}, fine-tuned model {name!r} {tuple(tensor.shape)}"
                    )
                if not tensor.dtype.is_floating_point:
                    raise ValueError(
                        f"tensor {slot.key!r} of fine-tuned model {name!r} has non-floating dtype {tensor.dtype} "
                        f"(pretrained: {slot.dtype})"
                    )
                check_finite(tensor, slot.key, f"fine-tuned model {name!r}")
                vectors[row, slot.offset : slot.offset + slot.numel] = tensor.detach().reshape(-1).to(device=device, dtype=dtype)
            sources.append(SourceInfo.of(weights))
            del sd, weights
        vectors.sub_(base)
        warn_zero_tasks(names, [not bool(row.any()) for row in vectors])
        log.info("task vectors: %d tasks x %d entries on %s (%s)", len(models), num_params, device, dtype)
        return cls(base, vectors, slots, names, aliases=base_weights.aliases, frozen=frozen, base_weights=SourceInfo.of(base_weights),
                   sources=sources)

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

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None, groups: Groups | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` into ``model`` in place and return it.

        On first use the model's merged tensors are re-pointed to views of one flat buffer of
        the model's own dtype on its own device (a bf16 model stays bf16). Each call is then one
        fused ``addmv`` on the task vectors' device: straight into that buffer when the model is
        in the vectors' dtype and device (no allocation), else into an fp32 scratch vector that is
        copied (and cast) into it. Keys are matched through :class:`~map_merge.task_vectors.keymap.LivePlan`
        (renames, tied weights once); fused tensors (stacked MoE experts) are converted from the
        buffer after each merge by transformers' own operations."""
        binding = self._bound.get(model)
        if binding is None or not self._still_bound(model, binding):
            binding = self._bind(model)
        if binding.scratch is None:
            self.merge_flat(coeffs, method, out=binding.buffer, groups=groups)
        else:
            self.merge_flat(coeffs, method, out=binding.scratch, groups=groups)
            with torch.no_grad():
                if binding.buffer is not None:
                    binding.buffer.copy_(binding.scratch)
                else:
                    for key, target in binding.targets.items():
                        slot = self._slot(key)
                        target.copy_(binding.scratch[slot.offset : slot.offset + slot.numel].view(slot.shape))
        if binding.plan.has_groups:
            flat = binding.buffer if binding.buffer is not None else binding.scratch
            writer = LiveWriter(model, binding.plan, {s.key: s.numel for s in self._slots})
            with torch.no_grad():
                for group in binding.plan.groups:
                    for key in group.sources:
                        slot = self._slot(key)
                        writer.write(key, 0, flat[slot.offset : slot.offset + slot.numel])
        return model

    def _slot(self, key: str) -> _Slot:
        if not hasattr(self, "_slot_of") or self._slot_of is None:
            self._slot_of = {s.key: s for s in self._slots}
        return self._slot_of[key]

    def _bind(self, model: nn.Module) -> _Binding:
        shapes = {s.key: s.shape for s in self._slots}
        shapes.update({k: tuple(t.shape) for k, t in self._frozen.items()})
        plan = LivePlan(model, shapes, [s.key for s in self._slots])
        state = writable_state(model)
        with torch.no_grad():
            for key, live in plan.frozen.items():
                set_tensor(model, live, self._frozen[key].to(state[live].device, copy=True))
        state = model.state_dict(keep_vars=True)
        direct = [s for s in self._slots if s.key in plan.direct]
        kinds = {(state[plan.direct[s.key]].dtype, state[plan.direct[s.key]].device) for s in direct}
        kinds |= {(state[t].dtype, state[t].device) for g in plan.groups for t in g.targets}
        if len(kinds) > 1:  # mixed dtypes or devices: keep the model's tensors, write each one
            targets = {s.key: _data(state[plan.direct[s.key]]) for s in direct}
            binding = _Binding(None, torch.empty_like(self.base), targets, plan, {})
        else:
            dtype, device = kinds.pop()
            buffer = torch.empty(self.num_params, dtype=dtype, device=device)
            views: dict[str, int] = {}
            with torch.no_grad():
                for slot in direct:
                    live = plan.direct[slot.key]
                    set_tensor(model, live, buffer[slot.offset : slot.offset + slot.numel].view(slot.shape))
                    views[live] = slot.offset
                for alias, holder in plan.aliases.items():
                    if holder in views:
                        slot = self._slot(plan.checkpoint_of(holder))
                        set_tensor(model, alias, buffer[slot.offset : slot.offset + slot.numel].view(slot.shape))
                        views[alias] = slot.offset
            direct_write = dtype == self.dtype and device == self.device
            binding = _Binding(buffer, None if direct_write else torch.empty_like(self.base), {}, plan, views)
        self._bound[model] = binding
        return binding

    def _still_bound(self, model: nn.Module, binding: _Binding) -> bool:
        state = model.state_dict(keep_vars=True)
        if binding.buffer is None:
            return all(state.get(binding.plan.direct[k]) is not None and state[binding.plan.direct[k]].data_ptr() == t.data_ptr()
                       for k, t in binding.targets.items())
        base_ptr = binding.buffer.data_ptr()
        size = binding.buffer.element_size()
        for live, offset in binding.views.items():
            tensor = state.get(live)
            if tensor is None or tensor.data_ptr() != base_ptr + offset * size:
                return False
        return True

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


def _data(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor
