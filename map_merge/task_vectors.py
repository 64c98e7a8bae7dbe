"""Task vectors: validated, stored once and contiguously, merged in one fused op.

``TaskVectors`` holds the pretrained weights ``theta_0`` as a flat vector ``base: (P,)`` and the
task vectors ``tau_i = theta_i - theta_0`` as one contiguous matrix ``vectors: (T, P)`` (P =
number of floating-point entries, tied tensors counted once). A merge is a single
matrix-vector product ``theta_0 + V'^T c`` (see :mod:`map_merge.merge_methods` for ``V'``).
Integer buffers (position ids, counters) are not task-vector material: they are copied from
the pretrained model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from .merge_methods import MergeMethod, resolve_method

__all__ = ["TaskVectors", "load_state_dict", "ModelSource"]

log = logging.getLogger(__name__)

ModelSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]


def load_state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    """Load a state dict from an ``nn.Module``, a mapping, a ``.safetensors`` file, a ``.bin``/``.pt``
    file, or a Hugging Face model folder (its ``*.safetensors`` shards, else ``pytorch_model.bin``).
    Tensors are returned as they are (no copy for modules and mappings)."""
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        out = {}
        for key, value in source.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"state dict entry {key!r} is a {type(value).__name__}, not a torch.Tensor")
            out[str(key)] = value
        return out
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"model path does not exist: {path}")
        if path.is_dir():
            shards = sorted(path.glob("*.safetensors"))
            if shards:
                return _load_safetensors(shards)
            for name in ("pytorch_model.bin", "model.pt", "model.bin"):
                if (path / name).exists():
                    return torch.load(path / name, map_location="cpu", weights_only=True)
            raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin weights in model folder {path}")
        if path.suffix == ".safetensors":
            return _load_safetensors([path])
        if path.suffix in (".bin", ".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        raise ValueError(f"cannot load weights from {path}: expected a folder, .safetensors, .bin, .pt or .pth")
    raise TypeError(
        "a model must be an nn.Module, a state dict, a .safetensors file or a Hugging Face model folder; "
        f"got {type(source).__name__}"
    )


def _load_safetensors(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for path in paths:
        out.update(load_file(str(path)))
    return out


@dataclass(frozen=True)
class _Slot:
    """Where one floating-point tensor lives in the flat vector."""

    key: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: torch.dtype  # dtype of the original tensor (for saving)


class TaskVectors:
    """Pretrained weights plus stacked task vectors, ready to merge with per-task coefficients.

    Build with :meth:`from_models`. Attributes:
        names: task names, length T.
        base: ``(P,)`` flat pretrained weights.
        vectors: ``(T, P)`` task vectors (row i = theta_i - theta_0).
        num_tasks: T.  num_params: P.
    """

    def __init__(
        self,
        base: torch.Tensor,
        vectors: torch.Tensor,
        slots: Sequence[_Slot],
        names: Sequence[str],
        aliases: Mapping[str, str] | None = None,
        frozen: Mapping[str, torch.Tensor] | None = None,
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
        self._prepared: tuple[str, torch.Tensor] | None = None  # one-entry cache: (method key, V')
        self._bound: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor]" = weakref.WeakKeyDictionary()
        self._fingerprint: str | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        pretrained: ModelSource,
        finetuned: Sequence[ModelSource] | Mapping[str, ModelSource],
        names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> "TaskVectors":
        """Validate the models and stack their task vectors.

        Args:
            pretrained: the pretrained model (module, state dict, ``.safetensors`` file or HF folder).
            finetuned: fine-tuned models, as a sequence or a ``name -> model`` mapping.
            names: task names for a sequence (default ``task0, task1, ...``).
            device: where the stacked vectors live (default: CPU).
            dtype: floating dtype of the stacked vectors (default: float32).

        Raises:
            ValueError: no fine-tuned model, duplicate names, missing/extra keys, shape or dtype
                mismatches, NaN/inf values (the message names the key and the model).
        """
        if isinstance(finetuned, Mapping):
            if names is not None:
                raise ValueError("pass names either as the keys of a finetuned mapping or as names=, not both")
            names = [str(n) for n in finetuned.keys()]
            models = list(finetuned.values())
        else:
            if isinstance(finetuned, (str, os.PathLike, nn.Module)) or not isinstance(finetuned, Sequence):
                raise TypeError("finetuned must be a sequence or a name->model mapping of fine-tuned models")
            models = list(finetuned)
            names = [f"task{i}" for i in range(len(models))] if names is None else [str(n) for n in names]
        if len(models) < 1:
            raise ValueError("need at least one fine-tuned model to build task vectors")
        if len(names) != len(models):
            raise ValueError(f"got {len(names)} names for {len(models)} fine-tuned models")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate task names: {dupes}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")

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
                _check_finite(tensor, key, "pretrained")
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
                    parts.append(f"missing keys {_preview(missing)}")
                if extra:
                    parts.append(f"unexpected keys {_preview(extra)}")
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
                _check_finite(tensor, slot.key, f"fine-tuned model {name!r}")
                vectors[row, slot.offset : slot.offset + slot.numel] = tensor.detach().reshape(-1).to(device=device, dtype=dtype)
            del sd
        vectors.sub_(base)
        log.info("task vectors: %d tasks x %d entries on %s (%s)", len(models), num_params, device, dtype)
        return cls(base, vectors, slots, names, aliases=aliases, frozen=frozen)

    # ------------------------------------------------------------------ properties
    @property
    def num_tasks(self) -> int:
        return self.vectors.shape[0]

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
        """Floating-point state-dict keys, in storage order (tied aliases excluded)."""
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
        gram = (self.vectors @ self.vectors.T).double() if self.dtype == torch.float64 else torch.stack(
            [(self.vectors.double() @ row.double()) for row in self.vectors]
        )
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return (gram / norms[:, None] / norms[None, :]).cpu().numpy()

    # ------------------------------------------------------------------ merging
    def prepared(self, method: str | MergeMethod | None = None) -> torch.Tensor:
        """Prepared task vectors ``V': (T, P)`` for a merge method (the last one is cached)."""
        method = resolve_method(method)
        if method.is_identity:
            return self.vectors
        key = json.dumps(method.spec, sort_keys=True)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = None  # free the old one first
            self._prepared = (key, method.prepare(self.vectors))
        return self._prepared[1]

    def _coeffs(self, coeffs: Any) -> torch.Tensor:
        c = torch.as_tensor(np.asarray(coeffs, dtype=np.float64) if not isinstance(coeffs, torch.Tensor) else coeffs)
        if c.ndim != 1 or c.shape[0] != self.num_tasks:
            raise ValueError(
                f"expected {self.num_tasks} coefficients (one per task: {list(self.names)}), got shape {tuple(c.shape)}"
            )
        if not torch.isfinite(c).all():
            raise ValueError(f"coefficients must be finite, got {c.tolist()}")
        return c.to(device=self.device, dtype=self.dtype)

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

        On first use the model's floating parameters and buffers are re-pointed to views of one
        flat buffer on the task vectors' device and dtype (the model moves there); after that
        each call is one fused ``addmv`` into that buffer, with no per-call allocation."""
        buffer = self._bound.get(model)
        if buffer is None or not self._still_bound(model, buffer):
            buffer = self._bind(model)
        self.merge_flat(coeffs, method, out=buffer)
        return model

    def _bind(self, model: nn.Module) -> torch.Tensor:
        state = model.state_dict(keep_vars=True)
        expected = set(self.keys) | set(self._aliases)
        missing = sorted(expected - set(state))
        extra = sorted(k for k in set(state) - expected - set(self._frozen) if state[k].dtype.is_floating_point)
        if missing or extra:
            parts = ([f"missing keys {_preview(missing)}"] if missing else []) + ([f"unexpected keys {_preview(extra)}"] if extra else [])
            raise ValueError(f"model {type(model).__name__} does not match the task vectors: " + "; ".join(parts))
        buffer = self.base.clone()
        with torch.no_grad():
            for slot in self._slots:
                if tuple(state[slot.key].shape) != slot.shape:
                    raise ValueError(f"shape mismatch for {slot.key!r}: model {tuple(state[slot.key].shape)}, task vectors {slot.shape}")
                view = buffer[slot.offset : slot.offset + slot.numel].view(slot.shape)
                _set_tensor(model, slot.key, view)
            by_key = {slot.key: slot for slot in self._slots}
            for alias, target in self._aliases.items():
                slot = by_key[target]
                _set_tensor(model, alias, buffer[slot.offset : slot.offset + slot.numel].view(slot.shape))
            for key, tensor in self._frozen.items():
                if key in state:
                    _set_tensor(model, key, tensor.clone())
        self._bound[model] = buffer
        return buffer

    def _still_bound(self, model: nn.Module, buffer: torch.Tensor) -> bool:
        base_ptr = buffer.data_ptr()
        size = buffer.element_size()
        state = model.state_dict(keep_vars=True)
        for slot in self._slots:
            tensor = state.get(slot.key)
            if tensor is None or tensor.data_ptr() != base_ptr + slot.offset * size:
                return False
        return True

    # ------------------------------------------------------------------ saving
    def save_merged(
        self,
        path: str | os.PathLike,
        coeffs: Any,
        method: str | MergeMethod | None = None,
        model: nn.Module | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save the merged model for ``coeffs: (T,)``.

        ``path`` ending in ``.safetensors``: one file, coefficients and method in its metadata.
        Otherwise a folder: ``model`` must have ``save_pretrained`` (a Hugging Face model of the
        pretrained architecture); the merged weights are written into it and saved there, with
        ``map_merge.json`` beside them holding the coefficients and method."""
        method = resolve_method(method)
        c = self._coeffs(coeffs).double().cpu().tolist()
        meta = {"coefficients": dict(zip(self.names, c)), "method": method.spec, "task_vectors": self.fingerprint()}
        meta.update(extra_metadata or {})
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            state = self.merge(c, method)
            for alias in self._aliases:  # safetensors refuses shared storage: keep one copy
                state.pop(alias)
            dtypes = {s.key: s.dtype for s in self._slots}
            state = {k: v.to(dtypes.get(k, v.dtype)).contiguous().cpu() for k, v in state.items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state, str(path), metadata={"map_merge": json.dumps(meta), "format": "pt"})
            return path
        if model is None or not hasattr(model, "save_pretrained"):
            raise ValueError("saving to a folder needs model= a Hugging Face model (with save_pretrained) of the pretrained architecture")
        self.merge_into(model, c, method)
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(path))
        (path / "map_merge.json").write_text(json.dumps(meta, indent=2))
        return path

    def __repr__(self) -> str:
        return f"TaskVectors(tasks={list(self.names)}, params={self.num_params:,}, device={self.device}, dtype={self.dtype})"


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


def _check_finite(tensor: torch.Tensor, key: str, owner: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {key!r} of the {owner} has {bad} NaN/inf value(s)")


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters and module._parameters[attr] is not None:
        module._parameters[attr].data = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{key!r} is neither a parameter nor a buffer of {type(model).__name__}")


def _preview(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"
