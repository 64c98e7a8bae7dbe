"""One key map between checkpoint files, live modules and adapters.

Task vectors are always held in the **checkpoint layout**: the keys and shapes that
``save_pretrained`` writes (tied weights once, per-expert MoE tensors unfused). A live
transformers model may differ from it in three ways, all handled here and nowhere else:

- **renames** (``block_sparse_moe`` -> ``mlp``, a ``base_model_prefix`` added or dropped);
- **fused tensors**: transformers 5 stacks per-expert checkpoint tensors into one live tensor
  (``experts.*.w1/w3.weight`` -> ``experts.gate_up_proj``);
- **tied weights**: one tensor under several live names (``lm_head.weight`` is the embedding).

The conversions come from transformers itself (``get_model_conversion_mapping``,
``rename_source_key``, the converters' ``convert``; :func:`checkpoint_state` uses
``remove_tied_weights_from_state_dict`` and ``revert_weight_conversion``), so every family
transformers loads is covered without rules of our own. Those conversions are linear
re-arrangements, so converting a merged delta equals merging converted deltas: merges run in the
checkpoint layout and :class:`LivePlan` writes them into a live model.

Adapters name live modules (with or without PEFT's ``base_model.model.`` prefix);
:func:`adapter_key` maps them to checkpoint keys.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LivePlan", "Group", "checkpoint_state", "skeleton", "adapter_key", "check_materialized", "PEFT_PREFIX", "aliases_by_storage",
           "natural_order", "preview"]

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


def preview(keys: Sequence[str], limit: int = 5) -> str:
    """``['a', 'b', ...] (N in all)`` for messages."""
    shown = ", ".join(repr(k) for k in list(keys)[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return False
    return isinstance(model, PreTrainedModel)


def natural_order(keys: Iterable[str]) -> list[str]:
    """Keys in transformers' loading order (numbers compared as numbers: ``experts.2`` < ``experts.10``);
    fused converters stack their sources in this order."""
    return sorted(keys, key=lambda k: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in k.split(".")])


def check_materialized(state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the first parameter that lives on the meta device (offloaded by accelerate's
    ``device_map``, or not loaded at all): its values are not in this process."""
    meta = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.device.type == "meta"]
    if meta:
        raise ValueError(
            f"parameter {meta[0]!r} of {what} is on the meta device ({len(meta)} in all): its weights are not in memory "
            "(offloaded with accelerate's device_map, or never loaded). Load the model fully (no disk/CPU offload), or give "
            "its checkpoint folder instead of the module"
        )


def aliases_by_storage(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor is the same storage, shape and strides as an earlier key's (tied)."""
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for key, tensor in state.items():
        if tensor.numel() == 0 or tensor.device.type == "meta":
            continue
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)
        if ident in seen:
            out[key] = seen[ident]
        else:
            seen[ident] = key
    return out


def checkpoint_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A module's tensors in the checkpoint layout, and its tied aliases.

    Returns ``(state, aliases)``: ``state`` maps checkpoint keys to tensors (views where possible;
    tied weights once, fused tensors split back as ``save_pretrained`` would write them);
    ``aliases`` maps each dropped live key of a tied weight to the checkpoint key holding it.
    Raises ValueError naming a parameter on the meta device (offloaded)."""
    live = module.state_dict()
    check_materialized(live, f"{type(module).__name__}")
    aliases = aliases_by_storage(live)
    if not _is_hf(module):
        return {k: v for k, v in live.items() if k not in aliases}, aliases
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    kept = remove_tied_weights_from_state_dict(dict(live), module)
    # the key transformers keeps for each tied group (ours: the first by storage)
    ident = {}
    for key, tensor in kept.items():
        ident.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)), key)
    dropped = {}
    for key in live:
        if key not in kept:
            tensor = live[key]
            holder = ident.get((tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)))
            if holder is not None:
                dropped[key] = holder
    state = revert_weight_conversion(module, kept)
    # an alias is reported only when its holder kept its name through the conversion
    return dict(state), {k: v for k, v in dropped.items() if v in state}


def skeleton(folder: str | Path) -> nn.Module | None:
    """The model class named by a Hugging Face folder's ``config.json`` built on the meta device
    (no memory, no weights), or ``None`` when there is no such config or class."""
    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(folder))
        names = list(getattr(config, "architectures", None) or [])
        cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        with torch.device("meta"):
            if cls is not None:
                return cls(config)
            return transformers.AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - an unknown or custom architecture: fall back to the files' own keys
        log.debug("no model skeleton for %s", folder, exc_info=True)
        return None


@dataclass
class Group:
    """Checkpoint tensors that a transformers converter turns into live tensors (fused experts)."""

    sources: list[str]  # checkpoint keys in loading order
    patterns: list[str]  # the converter's source pattern each one matched
    converter: Any  # a fresh transformers WeightConverter (deep-copied per use)
    targets: dict[str, tuple[int, ...]] = field(default_factory=dict)  # live key -> shape

    def convert(self, tensors: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Live tensors from the group's checkpoint tensors, by transformers' own operations."""
        converter = copy.deepcopy(self.converter)
        first = next(iter(self.targets))
        for key, pattern in zip(self.sources, self.patterns):
            converter.add_tensor(first, key, pattern, tensors[key])
        out = converter.convert(first, model=model, config=getattr(model, "config", None))
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


class LivePlan:
    """Where each checkpoint tensor goes in one live model.

    Attributes:
        direct: ``checkpoint key -> live key`` for tensors that are only renamed.
        groups: fused tensors (:class:`Group`), written after all their sources are merged.
        group_of: ``checkpoint key -> its Group``.
        aliases: live keys that share a written tensor's storage (tied), ``-> the live key written``.
        frozen: ``checkpoint key -> live key`` of non-floating buffers (copied from the base).
        heads: checkpoint keys left out because ``model`` is the bare base model of the checkpoint's
            architecture (``AutoModel`` over a ``...ForCausalLM`` checkpoint: ``lm_head.weight``).
    """

    def __init__(self, model: nn.Module, shapes: Mapping[str, tuple[int, ...]], floating: Iterable[str],
                 what: str = "the model", names_only: bool = False) -> None:
        """Match checkpoint tensors ``shapes: key -> shape`` (``floating``: the keys that are merged;
        the others are copied) to ``model``'s live tensors.

        ``names_only``: the plan only maps names (a meta-device skeleton of the architecture, used to
        place adapters), so meta parameters are allowed; it must not be used to write.

        Raises ValueError naming keys: checkpoint tensors with no place in the model ("unexpected"),
        live floating tensors nothing writes ("missing"), shape mismatches, meta parameters."""
        state = model.state_dict(keep_vars=True)
        if not names_only:
            check_materialized(state, f"{what} ({type(model).__name__})")
        floating = set(floating)
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.direct: dict[str, str] = {}
        self.frozen: dict[str, str] = {}
        self.groups: list[Group] = []
        self.group_of: dict[str, Group] = {}
        self.heads: list[str] = []
        renamings, converters = _conversions(model)
        by_target: dict[str, Group] = {}
        unexpected = []
        prefix = getattr(model, "base_model_prefix", None) if _is_hf(model) else None
        # a bare base model (AutoModel) over a checkpoint of a model with a head (``model.*`` plus
        # ``lm_head.*``): the head's tensors have no place in it and are not needed by it
        bare = bool(prefix) and getattr(model, "base_model", None) is model and any(k.startswith(f"{prefix}.") for k in shapes)
        for key in natural_order(shapes):
            live, pattern = _rename(key, renamings, converters, prefix, state)
            if live not in state:
                if bare and not key.startswith(f"{prefix}."):
                    self.heads.append(key)
                elif key in floating:  # an integer buffer the model does not keep (position ids) is no loss
                    unexpected.append(key)
                continue
            if pattern is None:
                (self.direct if key in floating else self.frozen)[key] = live
                continue
            group = by_target.get(live)
            if group is None:
                group = by_target[live] = Group([], [], next(c for c in converters if pattern in c.source_patterns))
                self.groups.append(group)
            group.sources.append(key)
            group.patterns.append(pattern)
            self.group_of[key] = group
        for group in self.groups:  # live names and shapes from a conversion of meta tensors
            first = _rename(group.sources[0], renamings, converters, prefix, state)[0]
            group.targets = {first: ()}
            metas = {k: torch.empty(shapes[k], device="meta") for k in group.sources}
            try:
                out = group.convert(metas, model)
            except Exception as error:  # noqa: BLE001 - shapes that do not fit the converter
                raise ValueError(f"checkpoint tensors {preview(group.sources)} do not convert to {what}'s {first!r}: {error}") from error
            group.targets = {k: tuple(v.shape) for k, v in out.items()}
            unexpected += [k for k in group.targets if k not in state]
        if unexpected:
            raise ValueError(f"{what} ({type(model).__name__}) does not match the task vectors: unexpected keys {preview(unexpected)} "
                             "(tensors of the checkpoints with no place in the model)")
        written = {live: shapes[key] for key, live in self.direct.items()}
        for group in self.groups:
            written.update(group.targets)
        for live, shape in written.items():
            if tuple(state[live].shape) != tuple(shape):
                raise ValueError(f"shape mismatch for {live!r}: model {tuple(state[live].shape)}, task vectors {tuple(shape)}")
            if not state[live].dtype.is_floating_point:
                raise ValueError(f"tensor {live!r} of the model is {state[live].dtype}, not floating point")
        storage = {_storage_id(state[k]): k for k in written}
        self.aliases = {}
        missing = []
        for live, tensor in state.items():
            if live in written or live in self.frozen.values() or not tensor.dtype.is_floating_point:
                continue
            holder = storage.get(_storage_id(tensor))
            if holder is not None:
                self.aliases[live] = holder
            else:
                missing.append(live)
        if missing:
            raise ValueError(f"{what} ({type(model).__name__}) does not match the task vectors: missing keys {preview(missing)} "
                             "(tensors of the model no checkpoint tensor writes)")
        self._checkpoint_of = {live: key for key, live in self.direct.items()}
        self._kinds = _layer_kinds(model)
        if self.heads:
            log.info("%s (%s) is a bare base model: the checkpoint's head tensors %s are not written", what, type(model).__name__,
                     preview(self.heads))

    def module_kind(self, module: str, key: str | None = None) -> str | None:
        """``"conv1d"`` (transformers' Conv1D: the weight is stored transposed) or ``"linear"`` for the
        live module ``module`` (else the module holding checkpoint tensor ``key``), ``None`` otherwise."""
        if module in self._kinds:
            return self._kinds[module]
        live = self.direct.get(key) if key is not None else None
        return self._kinds.get(live.rpartition(".")[0]) if live is not None else None

    def tied_names(self, key: str) -> list[str]:
        """The live names of checkpoint tensor ``key`` when it is tied (its own and its aliases'), else ``[]``."""
        live = self.direct.get(key)
        aliases = [alias for alias, holder in self.aliases.items() if holder == live] if live is not None else []
        return [live, *aliases] if aliases else []

    def writes(self, key: str) -> bool:
        """Whether checkpoint tensor ``key`` has a place in the model (renamed or fused)."""
        return key in self.direct or key in self.group_of

    @property
    def has_groups(self) -> bool:
        return bool(self.groups)

    def checkpoint_of(self, live: str) -> str | None:
        """The checkpoint key a live key reads from when it is only renamed (or tied to one)."""
        return self._checkpoint_of.get(self.aliases.get(live, live))


def _layer_kinds(model: nn.Module) -> dict[str, str]:
    """``module path -> "conv1d" | "linear"`` for the model's Conv1D and ``nn.Linear`` layers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        Conv1D = ()  # noqa: N806
    out = {}
    for name, module in model.named_modules():
        if Conv1D and isinstance(module, Conv1D):
            out[name] = "conv1d"
        elif isinstance(module, nn.Linear):
            out[name] = "linear"
    return out


def _storage_id(tensor: torch.Tensor) -> tuple:
    if tensor.device.type == "meta":  # meta storages have no address: tied parameters are one object
        return ("meta", id(tensor))
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers' renamings and converters for ``model`` (none for a plain module)."""
    if not _is_hf(model):
        return [], []
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model)
    return ([m for m in mapping if isinstance(m, WeightRenaming)], [m for m in mapping if isinstance(m, WeightConverter)])


def _rename(key: str, renamings: list, converters: list, prefix: str | None, state: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(live key, converter source pattern or None)`` of a checkpoint key, as ``from_pretrained`` renames it."""
    if not renamings and not converters and prefix is None:
        return key, None
    from transformers.core_model_loading import rename_source_key

    live, pattern = rename_source_key(key, renamings, converters, prefix, state)
    if live not in state and key in state:
        live, pattern = rename_source_key(key, [], [], prefix, state)
    return live, pattern


def adapter_key(module: str, suffix: str, shapes: Mapping[str, Any], plan: LivePlan | None) -> str | None:
    """The checkpoint key an adapter's tensor ``<module>.<suffix>`` belongs to.

    ``module`` is a live module path as PEFT (``base_model.model.`` prefix) or transformers'
    ``add_adapter`` (no prefix) writes it. Tried in turn: the checkpoint key itself; the live key
    mapped by ``plan`` (renames, tied weights); the key with leading components dropped (an adapter
    trained on ``XForCausalLM`` over a bare ``XModel``); the unique key ending in it."""
    name = module.removeprefix(PEFT_PREFIX) + "." + suffix
    if name in shapes:
        return name
    if plan is not None:
        found = plan.checkpoint_of(name)
        if found is not None:
            return found
        if any(name in g.targets for g in plan.groups):
            raise ValueError(f"adapter tensor {name!r} targets a fused tensor (stacked experts); adapters on fused tensors "
                             "are not supported")
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        candidate = ".".join(parts[i:])
        if candidate in shapes:
            return candidate
    ending = [k for k in shapes if k.endswith("." + name)]
    return ending[0] if len(ending) == 1 else None


def strip_peft_prefix(key: str) -> str:
    """An adapter file key without PEFT's ``base_model.model.`` prefix (keys written by
    transformers' own ``save_pretrained`` after ``add_adapter`` have none)."""
    return key.removeprefix(PEFT_PREFIX)

