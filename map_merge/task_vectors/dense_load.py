"""Loading dense task vectors: every model into memory, validated (keys, shapes, dtypes, finite
values; messages name the key and the model), the pretrained weights as one flat vector and the
task vectors stacked (:func:`load_dense`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sources import MemoryWeights, ModelSource, SourceInfo, check_finite, open_weights, preview

__all__ = ["Slot", "DenseParts", "load_dense"]


@dataclass(frozen=True)
class Slot:
    """Where one floating-point tensor lives in the flat vector."""

    key: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    dtype: torch.dtype  # dtype of the original tensor (for saving)



@dataclass
class DenseParts:
    """What :func:`load_dense` read: ``base (P,)``, ``vectors (T, P)`` (row i = theta_i - theta_0),
    the floating tensors' :class:`Slot` s, the other (frozen) tensors, the pretrained weights and
    what each task came from."""

    base: torch.Tensor
    vectors: torch.Tensor
    slots: list[Slot]
    frozen: dict[str, torch.Tensor]
    pretrained: MemoryWeights
    sources: list[SourceInfo]


def load_dense(pretrained: ModelSource, models: Sequence[ModelSource], names: Sequence[str], device: torch.device,
               dtype: torch.dtype) -> DenseParts:
    """Load every model into memory (on ``device`` in ``dtype``) and stack the task vectors."""
    base_weights = open_weights(pretrained, "the pretrained model", stream=False)
    base_sd = {k: base_weights.tensor(k) for k in base_weights.tensors}
    if not base_sd:
        raise ValueError("the pretrained model has no tensors")
    slots: list[Slot] = []
    frozen: dict[str, torch.Tensor] = {}
    offset = 0
    for key, tensor in base_sd.items():
        if tensor.dtype.is_floating_point:
            check_finite(tensor, key, "pretrained model")
            slots.append(Slot(key, tuple(tensor.shape), offset, tensor.numel(), tensor.dtype))
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
    return DenseParts(base, vectors, slots, frozen, base_weights, sources)
