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

from ..merge_methods import MergeMethod, resolve_method
from .base import TaskVectors, chunk_ranges
from .sources import ModelSource, check_finite, load_state_dict, preview, warn_zero_tasks

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
    targets: dict[str, torch.Tensor]


class DenseTaskVectors(TaskVectors):
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
        folder: Path | None = None,
        config: Any = None,
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
        self._folder = folder
        self._config = config
        self._prepared: tuple[str, torch.Tensor] | None = None  # one-entry cache: (method key, V')
        self._bound: "weakref.WeakKeyDictionary[nn.Module, _Binding]" = weakref.WeakKeyDictionary()
        self._fingerprint: str | None = None

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
        base_sd = load_state_dict(pretrained)
        if not base_sd:
            raise ValueError("the pretrained model has no tensors")
        aliases = _find_aliases(base_sd)
        slots: list[_Slot] = []
        frozen: dict[str, torch.Tensor] = {}
        offset = 0
        for key, tensor in base_sd.items():
            if key in aliases:
                continue
            if tensor.dtype.is_floating_point:
                check_finite(tensor, key, "pretrained")
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
        for row, (name, model) in enumerate(zip(names, models)):
            sd = load_state_dict(model)
            keys = set(sd)
            # tied keys may be absent from a saved file (HF drops them), and integer buffers are
            # copied from the pretrained model anyway (non-persistent in some versions): accept both
            missing = sorted(k for k in expected - keys if k not in aliases and k not in frozen)
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
            del sd
        vectors.sub_(base)
        warn_zero_tasks(names, [not bool(row.any()) for row in vectors])
        log.info("task vectors: %d tasks x %d entries on %s (%s)", len(models), num_params, device, dtype)
        folder = Path(pretrained) if isinstance(pretrained, (str, Path)) and Path(pretrained).is_dir() else None
        config = getattr(pretrained, "config", None) if isinstance(pretrained, nn.Module) else None
        return cls(base, vectors, slots, names, aliases=aliases, frozen=frozen, folder=folder, config=config)

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
                array = tensor.detach().to("cpu").contiguous().numpy()
                digest.update(memoryview(array.reshape(-1).view(np.uint8)))
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def cosine_similarity(self) -> np.ndarray:
        """``(T, T)`` cosine similarities between task vectors."""
        gram = torch.stack([(self.vectors.double() @ row.double()) for row in self.vectors])
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return (gram / norms[:, None] / norms[None, :]).cpu().numpy()

    def _source_folder(self) -> Path | None:
        return self._folder

    def _source_config(self) -> Any:
        return self._config

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

    def _coeffs(self, coeffs: Any) -> torch.Tensor:
        return torch.as_tensor(self.check_coeffs(coeffs)).to(device=self.device, dtype=self.dtype)

    def merge_flat(self, coeffs: Any, method: str | MergeMethod | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Merged weights as a flat ``(P,)`` vector: ``base + V'^T c`` in one fused op."""
        c = self._coeffs(coeffs)
        return torch.addmv(self.base, self.prepared(method).T, c, out=out)

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None) -> dict[str, torch.Tensor]:
        """Merged state dict for ``coeffs: (T,)`` (tensors are views of one new flat buffer).

        Tied keys map to the same tensor; integer buffers are copies of the pretrained ones."""
        flat = self.merge_flat(coeffs, method)
        state: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            state[slot.key] = flat[slot.offset : slot.offset + slot.numel].view(slot.shape)
        for alias, target in self._aliases.items():
            state[alias] = state[target]
        for key, tensor in self._frozen.items():
            state[key] = tensor.clone()
        return state

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` into ``model`` in place and return it.

        On first use the model's merged tensors are re-pointed to views of one flat buffer of
        the model's own dtype on its own device (a bf16 model stays bf16). Each call is then one
        fused ``addmv`` on the task vectors' device: straight into that buffer when the model is
        in the vectors' dtype and device (no allocation), else into an fp32 scratch vector that is
        copied (and cast) into it."""
        binding = self._bound.get(model)
        if binding is None or not self._still_bound(model, binding):
            binding = self._bind(model)
        if binding.scratch is None:
            self.merge_flat(coeffs, method, out=binding.buffer)
            return model
        self.merge_flat(coeffs, method, out=binding.scratch)
        with torch.no_grad():
            if binding.buffer is not None:
                binding.buffer.copy_(binding.scratch)
            else:
                for slot in self._slots:
                    binding.targets[slot.key].copy_(binding.scratch[slot.offset : slot.offset + slot.numel].view(slot.shape))
        return model

    def _bind(self, model: nn.Module) -> _Binding:
        state = model.state_dict(keep_vars=True)
        expected = set(self.keys) | set(self._aliases)
        missing = sorted(expected - set(state))
        extra = sorted(k for k in set(state) - expected - set(self._frozen) if state[k].dtype.is_floating_point)
        if missing or extra:
            parts = ([f"missing keys {preview(missing)}"] if missing else []) + ([f"unexpected keys {preview(extra)}"] if extra else [])
            raise ValueError(f"model {type(model).__name__} does not match the task vectors: " + "; ".join(parts))
        for slot in self._slots:
            if tuple(state[slot.key].shape) != slot.shape:
                raise ValueError(f"shape mismatch for {slot.key!r}: model {tuple(state[slot.key].shape)}, task vectors {slot.shape}")
            if not state[slot.key].dtype.is_floating_point:
                raise ValueError(f"tensor {slot.key!r} of the model is {state[slot.key].dtype}, not floating point")
        kinds = {(state[s.key].dtype, state[s.key].device) for s in self._slots}
        with torch.no_grad():
            for key, tensor in self._frozen.items():
                if key in state:
                    _set_tensor(model, key, tensor.to(state[key].device, copy=True))
            if len(kinds) > 1:  # mixed dtypes or devices: keep the model's tensors, write each one
                targets = {s.key: state[s.key].data if isinstance(state[s.key], nn.Parameter) else state[s.key] for s in self._slots}
                binding = _Binding(None, torch.empty_like(self.base), targets)
            else:
                dtype, device = kinds.pop()
                buffer = torch.empty(self.num_params, dtype=dtype, device=device)
                by_key = {slot.key: slot for slot in self._slots}
                for key in list(by_key) + list(self._aliases):
                    slot = by_key[self._aliases.get(key, key)]
                    _set_tensor(model, key, buffer[slot.offset : slot.offset + slot.numel].view(slot.shape))
                direct = dtype == self.dtype and device == self.device
                binding = _Binding(buffer, None if direct else torch.empty_like(self.base), {})
        self._bound[model] = binding
        return binding

    def _still_bound(self, model: nn.Module, binding: _Binding) -> bool:
        state = model.state_dict(keep_vars=True)
        if binding.buffer is None:
            return all(state.get(s.key) is not None and state[s.key].data_ptr() == binding.targets[s.key].data_ptr() for s in self._slots)
        base_ptr = binding.buffer.data_ptr()
        size = binding.buffer.element_size()
        for slot in self._slots:
            tensor = state.get(slot.key)
            if tensor is None or tensor.data_ptr() != base_ptr + slot.offset * size:
                return False
        return True

    # ------------------------------------------------------------------ saving
    def _output_entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        entries = [(s.key, s.dtype, s.shape) for s in self._slots]
        return entries + [(k, t.dtype, tuple(t.shape)) for k, t in self._frozen.items()]

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod) -> Iterator[tuple[str, torch.Tensor]]:
        flat = self.merge_flat(coeffs, method)
        for slot in self._slots:
            yield slot.key, flat[slot.offset : slot.offset + slot.numel].to(slot.dtype)
        for key, tensor in self._frozen.items():
            yield key, tensor


def _find_aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor shares storage, shape and strides with an earlier key (tied weights)."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        ident = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
    return aliases


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters and module._parameters[attr] is not None:
        module._parameters[attr].data = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{key!r} is neither a parameter nor a buffer of {type(model).__name__}")
