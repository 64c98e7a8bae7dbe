"""Opening the sources of streamed task vectors, checked: the pretrained weights, each full
fine-tune (keys, shapes and dtypes against the pretrained ones) and each LoRA adapter (its modules
matched to the pretrained checkpoint's keys); values in memory are checked for NaN/inf here, those
on disk as they are read."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .keymap import LivePlan
from .lora import LoraAdapter, MatchedLora
from .sources import CheckpointWeights, MemoryWeights, Weights, check_finite, open_weights, preview

__all__ = ["open_base", "open_finetune", "match_adapter", "adapter_plan", "is_zero_task"]

log = logging.getLogger(__name__)


def open_base(pretrained: Any) -> Weights:
    """The pretrained weights (streamed from safetensors on disk), checked: some floating-point
    tensors, none complex, finite where in memory."""
    base = open_weights(pretrained, "the pretrained model", stream=True)
    if not base.tensors:
        raise ValueError("the pretrained model has no tensors")
    for key, (tdtype, _) in base.tensors.items():
        if tdtype.is_complex:
            raise ValueError(f"tensor {key!r} of the pretrained model is complex ({tdtype}); not supported")
    if not any(d.is_floating_point for d, _ in base.tensors.values()):
        raise ValueError("the pretrained model has no floating-point tensors to merge")
    _check_finite_in_memory(base, base.tensors)
    return base


def open_finetune(model: Any, name: str, base: Weights) -> Weights:
    """Task ``name``'s full fine-tune, checked against ``base`` (and finite where in memory)."""
    weights = open_weights(model, f"fine-tuned model {name!r}", stream=True)
    _check_matches(base, weights)
    _check_finite_in_memory(weights, base.tensors)
    return weights


def match_adapter(model: Any, name: str, base: Weights, plan: LivePlan | None) -> MatchedLora:
    """Task ``name``'s LoRA adapter (a folder or a :class:`~.lora.LoraAdapter`) matched to the
    pretrained keys (``plan``: :func:`adapter_plan`); the tensors it saves whole must be floating point."""
    adapter = model if isinstance(model, LoraAdapter) else LoraAdapter(model)
    factors, full, saved_as = adapter.match(base.tensors, plan)
    for key, tensor in full.items():
        if not tensor.dtype.is_floating_point or not base.tensors[key][0].is_floating_point:
            raise ValueError(f"tensor {key!r} saved in adapter {adapter.path} for task {name!r} is not floating point")
    return MatchedLora(adapter, factors, full, saved_as)


def _check_finite_in_memory(weights: Weights, keys: Any) -> None:
    """NaN/inf in the floating-point tensors of ``keys`` that ``weights`` holds in memory, named."""
    if isinstance(weights, MemoryWeights):
        for key, (tdtype, _) in weights.tensors.items():
            if tdtype.is_floating_point and key in keys:
                check_finite(weights.tensor(key), key, weights.owner.removeprefix('the '))


def adapter_plan(base: Weights) -> LivePlan | None:
    """How the live module paths adapters name map to the pretrained checkpoint keys (``None``: the
    keys themselves, when no Hugging Face architecture is known)."""
    model = base.live_model()
    if model is None:
        return None
    floating = [k for k, (d, _) in base.tensors.items() if d.is_floating_point]
    try:
        return LivePlan(model, {k: s for k, (_, s) in base.tensors.items()}, floating, what="the pretrained architecture",
                        names_only=True)
    except Exception:  # noqa: BLE001 - the files do not fit the architecture their config names: map by the keys alone
        log.debug("no key plan for the pretrained model", exc_info=True)
        return None


def is_zero_task(base: Weights, task: Weights | MatchedLora) -> bool:
    """A cheap test for a zero task vector: the same files as the pretrained model, the same
    tensors in memory, or an adapter whose factors are all zero (PEFT's initialisation)."""
    if isinstance(task, MatchedLora):
        return task.is_zero(base.read)
    if isinstance(task, CheckpointWeights) and isinstance(base, CheckpointWeights):
        return task.checkpoint.identity() == base.checkpoint.identity()
    if isinstance(task, MemoryWeights) and isinstance(base, MemoryWeights):
        return all(torch.equal(task.tensor(k), base.tensor(k)) for k, (d, _) in base.tensors.items() if d.is_floating_point)
    return False


def _check_matches(base: Weights, other: Weights) -> None:
    """Keys, shapes and floating-ness of a full fine-tune against the pretrained model."""
    frozen = {k for k, (d, _) in base.tensors.items() if not d.is_floating_point}
    missing = sorted(k for k in base.tensors if k not in other.tensors and k not in frozen)
    extra = sorted(k for k, (d, _) in other.tensors.items() if k not in base.tensors and d.is_floating_point)
    if missing or extra:
        parts = ([f"missing keys {preview(missing)}"] if missing else []) + ([f"unexpected keys {preview(extra)}"] if extra else [])
        where = other.checkpoint.path if isinstance(other, CheckpointWeights) else "memory"
        raise ValueError(f"{other.owner} ({where}) does not match the pretrained model: " + "; ".join(parts))
    for key, (dtype, shape) in base.tensors.items():
        if key not in other.tensors:
            continue
        odtype, oshape = other.tensors[key]
        if tuple(oshape) != tuple(shape):
            raise ValueError(f"shape mismatch for {key!r}: pretrained {tuple(shape)}, {other.where(key)} {tuple(oshape)}")
        if dtype.is_floating_point and not odtype.is_floating_point:
            raise ValueError(f"tensor {key!r} of {other.where(key)} has non-floating dtype {odtype} (pretrained: {dtype})")
        if not dtype.is_floating_point and odtype.is_floating_point:
            raise ValueError(f"tensor {key!r} is {dtype} in the pretrained model but {odtype} in {other.where(key)}")
