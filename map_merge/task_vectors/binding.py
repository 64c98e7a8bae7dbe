"""Writing merged checkpoint-layout tensors into a live model, in its own dtype and device.

A :class:`~map_merge.task_vectors.keymap.LivePlan` says where each checkpoint tensor goes;
:class:`LiveWriter` takes merged pieces (flat element ranges, fp32) and puts them there:
renamed tensors are written in place piece by piece; the sources of a fused tensor (stacked
experts) are gathered until complete, converted by transformers' own operations, and copied in.
Tied tensors are written once. Both storages use it (dense for fused tensors only, streamed for
everything).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .keymap import Group, LivePlan

__all__ = ["LiveWriter", "set_tensor", "writable_state"]


def set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Point the parameter or buffer ``key`` of ``model`` at ``value`` (no copy)."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters and module._parameters[attr] is not None:
        module._parameters[attr].data = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{key!r} is neither a parameter nor a buffer of {type(model).__name__}")


def writable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)``, after replacing tensors that code under
    ``torch.inference_mode()`` put into the model (transformers' ``tie_weights`` called by an
    evaluator, say) with normal copies: inference tensors cannot be written in place."""
    state = model.state_dict(keep_vars=True)
    stale = {v.data_ptr(): v for v in state.values() if isinstance(v, torch.Tensor) and v.is_inference()}
    if not stale:
        return state
    with torch.inference_mode(False):
        fresh = {ptr: tensor.detach().clone() for ptr, tensor in stale.items()}
    for key, value in state.items():
        if value.data_ptr() in fresh and value.is_inference():
            set_tensor(model, key, fresh[value.data_ptr()])
    return model.state_dict(keep_vars=True)


def _data(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor


class LiveWriter:
    """Writes merged pieces of checkpoint tensors into one live model (see :class:`LivePlan`).

    Args:
        model: the live model.  plan: its plan.  numel: ``checkpoint key -> number of elements``.
    """

    def __init__(self, model: nn.Module, plan: LivePlan, numel: Mapping[str, int]) -> None:
        self.model = model
        self.plan = plan
        state = writable_state(model)
        self._flat: dict[str, torch.Tensor] = {}
        for key, live in plan.direct.items():
            tensor = _data(state[live])
            if not tensor.is_contiguous():
                raise ValueError(f"tensor {live!r} of the model is not contiguous; make the model's parameters contiguous first")
            self._flat[key] = tensor.view(-1)
        self._frozen = {key: _data(state[live]) for key, live in plan.frozen.items()}
        self._targets = {live: _data(state[live]) for group in plan.groups for live in group.targets}
        self._numel = numel
        self._gathered: dict[int, dict[str, torch.Tensor]] = {}  # id(group) -> source key -> merged tensor
        self._filled: dict[str, int] = {}

    def device_of(self, key: str) -> torch.device:
        """Where the piece of checkpoint tensor ``key`` is best computed: its live target's device."""
        if key in self._flat:
            return self._flat[key].device
        if key in self._frozen:
            return self._frozen[key].device
        group = self.plan.group_of[key]
        return self._targets[next(iter(group.targets))].device

    def write(self, key: str, start: int, piece: torch.Tensor) -> None:
        """Elements ``[start, start + n)`` of merged checkpoint tensor ``key`` (any float dtype)."""
        flat = self._flat.get(key)
        if flat is not None:
            flat[start : start + piece.numel()].copy_(piece)
            return
        group = self.plan.group_of[key]
        target = self._targets[next(iter(group.targets))]
        gathered = self._gathered.setdefault(id(group), {})
        buffer = gathered.get(key)
        if buffer is None:
            buffer = gathered[key] = torch.empty(self._numel[key], dtype=target.dtype, device=target.device)
        buffer[start : start + piece.numel()].copy_(piece)
        self._filled[key] = self._filled.get(key, 0) + piece.numel()
        if all(self._filled.get(k, 0) >= self._numel[k] for k in group.sources):
            self._flush(group, gathered)

    def write_whole(self, key: str, tensor: torch.Tensor) -> None:
        """A whole checkpoint tensor: a frozen (non-floating) buffer copied from the base, or a merged one."""
        frozen = self._frozen.get(key)
        if frozen is not None:
            frozen.copy_(tensor.reshape(frozen.shape))
            return
        self.write(key, 0, tensor.reshape(-1))

    def _flush(self, group: Group, gathered: dict[str, torch.Tensor]) -> None:
        shapes = self.plan.shapes
        converted = group.convert({k: gathered[k].view(shapes[k]) for k in group.sources}, self.model)
        for live, value in converted.items():
            self._targets[live].copy_(value)
        del self._gathered[id(group)]
        for k in group.sources:
            self._filled.pop(k, None)

    def finish(self) -> None:
        """Check that every fused tensor was written whole (an interrupted merge leaves none half-done)."""
        if self._gathered:
            raise RuntimeError("a merge ended before every source of a fused tensor was written")
