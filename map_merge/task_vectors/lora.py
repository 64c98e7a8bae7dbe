"""PEFT LoRA adapters as task vectors, kept as factors (never densified up front).

``tau = scaling * B @ A`` per adapted module, with PEFT's scaling rules. An adapter names live
modules; :func:`~map_merge.task_vectors.keymap.adapter_key` finds the checkpoint key each
belongs to (renames and tied weights of the base's architecture, adapters saved with or without
PEFT's ``base_model.model.`` prefix). :func:`merged_adapter_tensors` writes the exact
task-arithmetic merge of adapters as one adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointFileError
from .keymap import PEFT_PREFIX, LivePlan, adapter_key
from .safetensors_io import load_checkpoint

__all__ = ["LoraAdapter", "LoraFactors", "MatchedLora", "merged_adapter_tensors"]


@dataclass(frozen=True)
class LoraFactors:
    """``delta = scale * left @ right`` for one weight: ``left: (rows, r)``, ``right: (r, cols)``
    with ``rows * cols`` the weight's size in its stored layout."""

    module: str
    left: torch.Tensor
    right: torch.Tensor
    scale: float
    transposed: bool = False  # the weight stores (B @ A)^T (a Conv1D layer, or fan_in_fan_out without a known architecture)

    @property
    def rank(self) -> int:
        return self.left.shape[1]


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the module's dotted path end."""
    for pattern, value in patterns.items():
        if pattern == module or re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) as a
    task vector: ``tau = scaling * B @ A`` per target module, kept as factors.

    ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with PEFT's
    ``rank_pattern`` / ``alpha_pattern`` overrides; layers stored transposed (``fan_in_fan_out``,
    GPT-2's Conv1D) and embeddings (``lora_embedding_A/B``) are handled as PEFT merges them.
    Tensors the adapter saves whole (``modules_to_save``, trained biases, an adapted embedding's
    ``base_layer``) replace the base's: their task vector is ``saved - pretrained`` (plus the LoRA
    product where the module also has factors).

    Args:
        path: the adapter folder.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()  # once: a later os.chdir changes nothing
        config_file = self.path / "adapter_config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{self.path} is not a PEFT adapter folder: no adapter_config.json")
        try:
            self.config = json.loads(config_file.read_text())
        except (UnicodeDecodeError, ValueError) as error:
            raise CheckpointFileError(f"{config_file} is not valid JSON: {error}") from None
        if not isinstance(self.config, dict):
            raise CheckpointFileError(f"{config_file} is not a JSON object (PEFT writes one of the adapter's settings)")
        weights = self.path / "adapter_model.safetensors"
        if not weights.exists():
            if (self.path / "adapter_model.bin").exists():
                raise ValueError(f"{self.path}: only adapter_model.safetensors is read; re-save the adapter with safe_serialization=True")
            raise FileNotFoundError(f"{self.path}: adapter_config.json but no adapter_model.safetensors")
        self.file = weights
        peft_type = str(self.config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise ValueError(f"{config_file}: peft_type {peft_type} is not a LoRA adapter")
        for flag in ("use_dora", "lora_bias", "use_qalora"):
            if self.config.get(flag):
                raise ValueError(f"{config_file}: '{flag}' adapters are not supported (their update is not scale * B @ A)")
        if self.config.get("trainable_token_indices"):
            raise ValueError(f"{config_file}: 'trainable_token_indices' adapters are not supported")
        self.r = int(self.config.get("r", 8))
        self.alpha = float(self.config.get("lora_alpha", self.r))
        self.use_rslora = bool(self.config.get("use_rslora", False))
        self.fan_in_fan_out = bool(self.config.get("fan_in_fan_out", False))
        self.base_model = self.config.get("base_model_name_or_path")
        state = load_checkpoint(weights)
        self._lora: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": , "B": , "kind": }
        self.full: dict[str, torch.Tensor] = {}  # adapter key (module path + param) -> whole tensor
        self._base_layers: set[str] = set()  # keys of self.full saved as an adapted layer's base_layer
        for key, value in state.items():
            name = key.removeprefix(PEFT_PREFIX)  # transformers' save_pretrained(save_peft_format=False) writes none
            match = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", name)
            if match:
                module = match.group(1) or match.group(3)
                part = match.group(2) or match.group(4)
                entry = self._lora.setdefault(module, {})
                entry[part[-1]] = value
                entry["kind"] = "embedding" if "embedding" in part else "linear"
            elif ".lora_" in name:
                raise ValueError(f"{weights}: LoRA tensor {key!r} is of a kind map_merge does not merge")
            else:
                self.full[name.replace(".base_layer.", ".")] = value
                if ".base_layer." in name:  # an adapted layer's own weight (save_embedding_layers): loaded in place
                    self._base_layers.add(name.replace(".base_layer.", "."))
        for module, entry in self._lora.items():
            if "A" not in entry or "B" not in entry:
                raise ValueError(f"{weights}: LoRA module {module!r} has only one of its two factors")
            if entry["A"].ndim != 2 or entry["B"].ndim != 2:
                raise ValueError(f"{weights}: LoRA module {module!r} is not a linear or embedding layer (factors of shape "
                                 f"{tuple(entry['A'].shape)}, {tuple(entry['B'].shape)}); convolution LoRA is not supported")
        if not self._lora and not self.full:
            raise ValueError(f"{weights} holds no LoRA tensors")
        self._identity = hashlib.blake2b(json.dumps([self.config, sorted((k, list(v.shape)) for k, v in state.items())],
                                                    sort_keys=True, default=str).encode(), digest_size=16)
        for value in state.values():
            self._identity.update(memoryview(value.contiguous().view(torch.uint8).numpy().reshape(-1)))

    @property
    def modules(self) -> tuple[str, ...]:
        """LoRA-adapted module paths as PEFT names them (inside the wrapped model)."""
        return tuple(self._lora)

    def is_embedding(self, module: str) -> bool:
        """Whether the module's factors are an embedding's (``lora_embedding_A/B``)."""
        return self._lora[module]["kind"] == "embedding"

    def scaling(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA), honouring per-module patterns."""
        alpha = float(_pattern_value(self.config.get("alpha_pattern") or {}, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def resolve(self, base: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], plan: LivePlan | None = None
                ) -> tuple[dict[str, "LoraFactors"], dict[str, torch.Tensor]]:
        """``(weight key -> factors, weight key -> whole saved tensor)``: see :meth:`match`."""
        factors, full, _ = self.match(base, plan)
        return factors, full

    def match(self, base: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], plan: LivePlan | None = None
              ) -> tuple[dict[str, "LoraFactors"], dict[str, torch.Tensor], dict[str, list[str]]]:
        """Match the adapter to the pretrained tensors ``key -> (dtype, shape)`` (checkpoint layout).

        ``plan``: the base architecture's :class:`~map_merge.task_vectors.keymap.LivePlan`, which maps
        the live module paths the adapter names to checkpoint keys (renames, tied weights).
        Returns ``(weight key -> factors, weight key -> whole saved tensor, weight key -> the live
        names the adapter saved that tensor under)``. Two adapted modules
        that are one tied tensor (an adapted embedding and LM head) add up on it.
        Raises ValueError naming the module when it is absent from the base or its shape does not fit
        (an adapter trained on another base)."""
        factors: dict[str, LoraFactors] = {}
        for module, entry in self._lora.items():
            key = adapter_key(module, "weight", base, plan)
            if key is None:
                raise ValueError(f"LoRA module {module!r} of adapter {self.path} matches no weight of the pretrained model "
                                 f"(adapter for another base {self.base_model!r}?)")
            a, b = entry["A"], entry["B"]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise ValueError(f"LoRA module {module!r} of adapter {self.path}: lora_A has rank {rank} but lora_B {b.shape[1]}")
            transposed = entry["kind"] == "linear" and self._transposed(module, key, plan)
            if entry["kind"] == "embedding" or transposed:
                left, right = a.T, b.T  # the weight stores the transpose of B @ A
            else:
                left, right = b, a
            shape = base[key][1]
            rows, cols = shape[0] if shape else 1, math.prod(shape[1:]) if len(shape) > 1 else 1
            if len(shape) != 2 or (left.shape[0], right.shape[1]) != (rows, cols):
                raise ValueError(
                    f"LoRA module {module!r} of adapter {self.path} gives a delta of shape {(left.shape[0], right.shape[1])} "
                    f"but the pretrained weight {key!r} has shape {tuple(shape)} (adapter for another base {self.base_model!r}?)"
                )
            found = LoraFactors(module, left.contiguous(), right.contiguous(), self.scaling(module, rank), transposed)
            if key in factors:  # tied: both modules adapt one tensor
                other = factors[key]
                dtype = torch.promote_types(other.left.dtype, found.left.dtype)
                found = LoraFactors(other.module, torch.cat([other.left.to(dtype) * other.scale, found.left.to(dtype) * found.scale], 1),
                                    torch.cat([other.right.to(dtype), found.right.to(dtype)], 0), 1.0, other.transposed)
            factors[key] = found
        full: dict[str, torch.Tensor] = {}
        names: dict[str, list[str]] = {}
        for name, tensor in self.full.items():
            module, _, suffix = name.rpartition(".")
            key = adapter_key(module, suffix, base, plan) if module else (name if name in base else None)
            if key is None:
                raise ValueError(f"tensor {name!r} saved whole in adapter {self.path} (modules_to_save or a bias) matches no tensor "
                                 "of the pretrained model (adapter for another base?)")
            if tuple(tensor.shape) != tuple(base[key][1]):
                raise ValueError(f"tensor {name!r} saved whole in adapter {self.path} has shape {tuple(tensor.shape)}, the "
                                 f"pretrained {key!r} {tuple(base[key][1])}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {name!r} of adapter {self.file} has NaN/inf values")
            if key in full and not torch.equal(full[key], tensor):
                raise ValueError(f"adapter {self.path} saves two different tensors for the tied weight {key!r}")
            full[key] = tensor
            names.setdefault(key, []).append(name)
        for key, saved in names.items():  # PEFT copies a module it saves whole: saving one of tied modules unties them
            tied = plan.tied_names(key) if plan is not None else []
            if tied and not all(name in self._base_layers for name in saved) and len(saved) < len(tied):
                raise ValueError(f"adapter {self.path} saves {saved} whole (modules_to_save), which PEFT unties from the "
                                 f"tied {sorted(set(tied) - set(saved))}; task vectors keep tied weights as one tensor: save all of "
                                 f"{sorted(tied)} in the adapter, or none")
        for key, f in factors.items():
            for t in (f.left, f.right):
                if not torch.isfinite(t).all():
                    raise ValueError(f"LoRA factors of module {f.module!r} in {self.file} have NaN/inf values")
        return factors, full, names

    def _transposed(self, module: str, key: str, plan: LivePlan | None) -> bool:
        """Whether a linear LoRA module's weight stores ``(B @ A)^T``. PEFT decides by the layer, not
        by the config: a Conv1D (GPT-2) always, an ``nn.Linear`` never (it overrides a wrong
        ``fan_in_fan_out``, with a warning, and saves the config of the last layer it created); the
        config's ``fan_in_fan_out`` only when the architecture is unknown."""
        kind = plan.module_kind(module.removeprefix(PEFT_PREFIX), key) if plan is not None else None
        return kind == "conv1d" if kind is not None else self.fan_in_fan_out

    def identity(self) -> Any:
        return ["lora", str(self.path.resolve()), self._identity.hexdigest()]

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self._lora)}, r={self.r}, alpha={self.alpha:g})"


class MatchedLora:
    """One adapter matched to the pretrained tensors: ``factors`` (checkpoint key -> LoRA factors),
    ``full`` (checkpoint key -> tensor the adapter saves whole) and ``names`` (checkpoint key -> the
    live names the adapter saved that tensor under, several for tied modules; default: the key)."""

    def __init__(self, adapter: LoraAdapter, factors: dict[str, LoraFactors], full: dict[str, torch.Tensor],
                 names: Mapping[str, Sequence[str]] | None = None) -> None:
        self.adapter = adapter
        self.factors = factors
        self.full = full
        self.names = {key: list((names or {}).get(key, [key])) for key in full}
        self._on: dict[torch.device, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def factors_on(self, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of ``key`` on ``device`` in their stored dtype (copied once per device;
        no copy where they are). Callers cast the rows they use to fp32 and apply the scale."""
        f = self.factors[key]
        if f.left.device == device:
            return f.left, f.right
        cache = self._on.setdefault(device, {})
        if key not in cache:
            cache[key] = (f.left.to(device), f.right.to(device))
        return cache[key]

    def rows(self, key: str, start: int, stop: int, device: torch.device, scale: float = 1.0
             ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(scale * s * left rows, right, offset, cols)``: the rows of ``left @ right`` that cover
        flat elements ``[start, stop)`` start ``offset`` elements into the product."""
        left, right = self.factors_on(key, device)
        cols = right.shape[1]
        row0, row1 = start // cols, -(-stop // cols)
        scale = scale * self.factors[key].scale
        return left[row0:row1].to(torch.float32) * scale, right.to(torch.float32), start - row0 * cols, cols

    def delta(self, key: str, start: int, stop: int, base: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """The adapter's delta for elements ``[start, stop)`` of ``key`` in fp32 (``None``: zero)."""
        out = None
        if key in self.full:
            out = self.full[key].reshape(-1)[start:stop].to(device=device, dtype=torch.float32, copy=True).sub_(base)
        if key in self.factors:
            left, right, offset, _ = self.rows(key, start, stop, device)
            product = (left @ right).reshape(-1)[offset : offset + stop - start]
            out = product if out is None else out.add_(product)
        return out

    def is_zero(self, read_base: Any) -> bool:
        """Whether the adapter changes nothing (PEFT's zero initialisation of B, and whole tensors equal
        to the pretrained ones read by ``read_base(key)``)."""
        factors_zero = all(not bool(f.left.any()) or not bool(f.right.any()) for f in self.factors.values())
        return factors_zero and all(torch.equal(t.reshape(-1).to(torch.float32), read_base(k).to(torch.float32))
                                    for k, t in self.full.items())


def merged_adapter_tensors(adapters: Sequence[MatchedLora], coeffs: Mapping[str, np.ndarray], keys: Sequence[str],
                           shapes: Mapping[str, tuple[int, ...]], read_base: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The exact task-arithmetic merge of adapters as one PEFT adapter: ``(tensors, adapter_config)``.

    ``sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_T s_T B_T] @ [A_1; ...; A_T]``: factors are
    concatenated (rank = the sum of the ranks, zero-padded to one rank for all modules, ``lora_alpha
    = r`` so the scaling is 1); tensors saved whole (``modules_to_save``) are merged and saved whole.
    ``coeffs``: checkpoint key -> its per-task coefficients ``(T,)`` (coefficient groups may differ
    per key); ``keys``: checkpoint keys in order; ``read_base(key)``: the pretrained tensor, flat."""
    adapted = [k for k in keys if any(k in lora.factors for lora in adapters)]
    rank = max(sum(lora.factors[k].rank for lora in adapters if k in lora.factors) for k in adapted) if adapted else 1
    tensors: dict[str, torch.Tensor] = {}
    targets, to_save = [], []
    cpu = torch.device("cpu")
    for key in adapted:
        lefts, rights, module, embedding = [], [], None, False
        transposed = {lora.factors[key].transposed for lora in adapters if key in lora.factors}
        if len(transposed) > 1:
            raise ValueError(f"the adapters disagree on fan_in_fan_out for {key!r}; they cannot be saved as one adapter")
        for lora, weight in zip(adapters, coeffs[key]):
            if key not in lora.factors:
                continue
            left, right = lora.factors_on(key, cpu)
            lefts.append(left.to(torch.float32) * (lora.factors[key].scale * float(weight)))
            rights.append(right.to(torch.float32))
            module = lora.factors[key].module
            embedding = embedding or (module in lora.adapter.modules and lora.adapter.is_embedding(module))
        left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
        pad = rank - left.shape[1]
        left = torch.nn.functional.pad(left, (0, pad))
        right = torch.nn.functional.pad(right, (0, 0, 0, pad))
        dtype = next(lora.factors[key].left.dtype for lora in adapters if key in lora.factors)  # the adapters' own
        module = module.removeprefix(PEFT_PREFIX)
        if embedding:
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = left.T.contiguous().to(dtype)
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = right.T.contiguous().to(dtype)
        elif transposed == {True}:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = left.T.contiguous().to(dtype)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = right.T.contiguous().to(dtype)
        else:
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = right.contiguous().to(dtype)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = left.contiguous().to(dtype)
        targets.append(module)
    whole = [k for k in keys if any(k in lora.full for lora in adapters)]
    for key in whole:
        base = read_base(key).to(torch.float32)
        merged = base.clone()
        for lora, weight in zip(adapters, coeffs[key]):
            if key in lora.full:
                merged.add_(lora.full[key].reshape(-1).to(torch.float32) - base, alpha=float(weight))
        if key in adapted:  # an adapted module's base_layer: the adapter's own base must be the pretrained one
            if not torch.equal(merged, base):
                raise ValueError(f"adapters replace the base layer of LoRA module {key!r}; no single adapter holds that merge")
            continue
        dtype = next(lora.full[key].dtype for lora in adapters if key in lora.full)
        for name in next(lora.names[key] for lora in adapters if key in lora.full):  # the live names PEFT loads it under
            tensors[f"{PEFT_PREFIX}{name}"] = merged.view(shapes[key]).to(dtype)
            to_save.append(name.rsplit(".", 1)[0])
    config = dict(adapters[0].adapter.config)
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                   "target_modules": sorted(set(targets)),
                   "modules_to_save": sorted(set(to_save)) or None, "init_lora_weights": True})
    return tensors, config
