"""Dense merges written into a live model (:class:`DenseBinding`, a part of
:class:`~map_merge.task_vectors.dense.DenseTaskVectors`): on first use the model's merged tensors
become views of one flat buffer, so that each merge is one fused ``addmv`` into it."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..groups import Groups
from ..merge_methods import MergeMethod
from .binding import LiveWriter, set_tensor, writable_state
from .dense_load import Slot
from .keymap import LivePlan

__all__ = ["DenseBinding", "Binding"]


@dataclass
class Binding:
    """A model whose merged tensors are views of one flat ``buffer`` (its dtype and device)."""

    buffer: torch.Tensor | None  # None: the model mixes dtypes/devices; tensors are written one by one
    scratch: torch.Tensor | None  # fp32 result when it cannot be written into buffer directly
    targets: dict[str, torch.Tensor]  # checkpoint key -> live tensor (buffer None only)
    plan: LivePlan
    views: dict[str, int]  # live key -> element offset of its view in buffer



class DenseBinding:
    """:meth:`merge_into` for :class:`~map_merge.task_vectors.dense.DenseTaskVectors` (which sets
    the attributes below and merges flat vectors, ``merge_flat``)."""

    base: torch.Tensor
    num_params: int
    dtype: torch.dtype
    device: torch.device
    _slots: Sequence[Slot]
    _frozen: dict[str, torch.Tensor]
    _bound: "weakref.WeakKeyDictionary[nn.Module, Binding]"
    _slot_of: dict[str, Slot] | None

    def merge_flat(self, coeffs: Any, method: str | MergeMethod | None = None, out: torch.Tensor | None = None,
                   groups: Groups | None = None) -> torch.Tensor:
        raise NotImplementedError

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

    def _slot(self, key: str) -> Slot:
        if not hasattr(self, "_slot_of") or self._slot_of is None:
            self._slot_of = {s.key: s for s in self._slots}
        return self._slot_of[key]

    def _bind(self, model: nn.Module) -> Binding:
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
            binding = Binding(None, torch.empty_like(self.base), targets, plan, {})
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
            binding = Binding(buffer, None if direct_write else torch.empty_like(self.base), {}, plan, views)
        self._bound[model] = binding
        return binding

    def _still_bound(self, model: nn.Module, binding: Binding) -> bool:
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


def _data(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.data if isinstance(tensor, nn.Parameter) else tensor
