"""Where weights come from: modules and state dicts in memory, safetensors checkpoints on disk
(read lazily, one range at a time), and PEFT LoRA adapters (kept as factors).

Each source answers the same questions: which tensors it has (``dtype``, ``shape``), and the
elements ``[start, stop)`` of one flattened tensor. Messages name the file a tensor lives in.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .safetensors_io import SafetensorsCheckpoint

__all__ = ["ModelSource", "load_state_dict", "Weights", "MemoryWeights", "CheckpointWeights", "LoraAdapter", "open_weights",
           "is_lora_adapter", "is_on_disk"]

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
            if any(path.glob("*.safetensors")):
                return _load_checkpoint(path)
            for name in ("pytorch_model.bin", "model.pt", "model.bin"):
                if (path / name).exists():
                    return torch.load(path / name, map_location="cpu", weights_only=True)
            raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin weights in model folder {path}")
        if path.suffix == ".safetensors":
            return _load_checkpoint(path)
        if path.suffix in (".bin", ".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        raise ValueError(f"cannot load weights from {path}: expected a folder, .safetensors, .bin, .pt or .pth")
    raise TypeError(
        "a model must be an nn.Module, a state dict, a .safetensors file or a Hugging Face model folder; "
        f"got {type(source).__name__}"
    )


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(path)
    try:
        return {key: checkpoint.read(key).view(info.shape) for key, info in checkpoint.tensors.items()}
    finally:
        checkpoint.close()


def check_finite(tensor: torch.Tensor, key: str, owner: str) -> None:
    """Raise naming the key and its owner (``"fine-tuned model 'x'"``) when ``tensor`` has NaN/inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {key!r} of the {owner} has {bad} NaN/inf value(s)")


def preview(keys: Sequence[str], limit: int = 5) -> str:
    """``['a', 'b', ...] (N in all)`` for messages."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} in all)"


def warn_zero_tasks(names: Sequence[str], zero: Sequence[bool]) -> None:
    """Warn, naming them, about tasks whose task vector is zero (a fine-tune identical to the
    pretrained model, or an untrained adapter): merging them changes nothing."""
    empty = [n for n, z in zip(names, zero) if z]
    if empty:
        warnings.warn(f"task(s) {empty}: the fine-tuned model is identical to the pretrained one (a zero task vector); "
                      "its coefficient changes nothing", UserWarning, stacklevel=4)


def is_lora_adapter(source: Any) -> bool:
    """Whether ``source`` is a PEFT adapter folder (``adapter_config.json`` inside)."""
    return isinstance(source, LoraAdapter) or (
        isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / "adapter_config.json").exists()
    )


def is_on_disk(source: Any) -> bool:
    """Whether ``source`` names weights on disk that can be streamed (safetensors)."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    path = Path(source)
    return path.suffix == ".safetensors" or (path.is_dir() and any(path.glob("*.safetensors")))


class Weights:
    """A set of named tensors, readable one flat element range at a time."""

    owner: str  # for messages: "the pretrained model", "fine-tuned model 'x'"
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    def read(self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the flattened tensor, in its stored dtype (``buffer``: a
        uint8 tensor the bytes may be read into, reused from chunk to chunk)."""
        raise NotImplementedError

    def where(self, key: str) -> str:
        """Where a tensor lives, for messages."""
        return self.owner

    def identity(self) -> Any:
        """A cheap JSON-able identity for fingerprints."""
        raise NotImplementedError

    @property
    def folder(self) -> Path | None:
        """The Hugging Face folder these weights came from, if any (config and tokenizer files)."""
        return None


class MemoryWeights(Weights):
    """Tensors already in memory (a module's state dict or a mapping); reads are views."""

    def __init__(self, state: Mapping[str, torch.Tensor], owner: str) -> None:
        self.owner = owner
        self._state = dict(state)
        self.tensors = {k: (v.dtype, tuple(v.shape)) for k, v in self._state.items()}
        self._identity: str | None = None

    def read(self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[key].detach().reshape(-1)[start:stop]

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def identity(self) -> Any:
        if self._identity is None:
            digest = hashlib.blake2b(digest_size=16)
            for key, value in self._state.items():
                digest.update(key.encode())
                array = value.detach().to("cpu").contiguous()
                digest.update(memoryview(array.view(torch.uint8).numpy().reshape(-1)) if array.numel() else b"")
            self._identity = digest.hexdigest()
        return ["memory", self._identity]


class CheckpointWeights(Weights):
    """Tensors in a safetensors file or sharded folder, read lazily with ``pread``."""

    def __init__(self, path: str | os.PathLike, owner: str) -> None:
        self.owner = owner
        self.checkpoint = SafetensorsCheckpoint(path)
        self.tensors = {k: (i.dtype, i.shape) for k, i in self.checkpoint.tensors.items()}

    def read(self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self.checkpoint.read(key, start, stop, buffer)

    def where(self, key: str) -> str:
        info = self.checkpoint.tensors.get(key)
        return f"{self.owner} ({info.file if info is not None else self.checkpoint.path})"

    def identity(self) -> Any:
        header = [(k, str(d), s) for k, (d, s) in self.tensors.items()]
        return ["checkpoint", self.checkpoint.identity(), hashlib.blake2b(json.dumps(header).encode(), digest_size=16).hexdigest()]

    @property
    def folder(self) -> Path | None:
        path = self.checkpoint.path
        return path if path.is_dir() else None


def open_weights(source: ModelSource, owner: str, stream: bool) -> Weights:
    """:class:`CheckpointWeights` for safetensors on disk when ``stream``, else
    :class:`MemoryWeights` (files are loaded)."""
    if stream and is_on_disk(source):
        return CheckpointWeights(source, owner)
    return MemoryWeights(load_state_dict(source), owner)


# ---------------------------------------------------------------------- LoRA
@dataclass(frozen=True)
class LoraFactors:
    """``delta = scale * left @ right`` for one weight: ``left: (rows, r)``, ``right: (r, cols)``
    with ``rows * cols`` the weight's size in its stored layout."""

    module: str
    left: torch.Tensor
    right: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.left.shape[1]


_PREFIX = "base_model.model."


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
        self.path = Path(path)
        config_file = self.path / "adapter_config.json"
        if not config_file.exists():
            raise FileNotFoundError(f"{self.path} is not a PEFT adapter folder: no adapter_config.json")
        self.config = json.loads(config_file.read_text())
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
        state = _load_checkpoint(weights)
        self._lora: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": , "B": , "kind": }
        self.full: dict[str, torch.Tensor] = {}  # adapter key (module path + param) -> whole tensor
        for key, value in state.items():
            if not key.startswith(_PREFIX):
                raise ValueError(f"{weights}: key {key!r} does not start with {_PREFIX!r}; not a PEFT LoRA adapter file")
            name = key[len(_PREFIX):]
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

    def resolve(self, base: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
        """Match the adapter to the pretrained tensors ``key -> (dtype, shape)``.

        Returns ``(weight key -> factors, weight key -> whole saved tensor)``.
        Raises ValueError naming the module when it is absent from the base or its shape does not fit
        (an adapter trained on another base)."""
        factors: dict[str, LoraFactors] = {}
        for module, entry in self._lora.items():
            key = _match_key(module + ".weight", base)
            if key is None:
                raise ValueError(f"LoRA module {module!r} of adapter {self.path} matches no weight of the pretrained model "
                                 f"(adapter for another base {self.base_model!r}?)")
            a, b = entry["A"], entry["B"]
            rank = a.shape[0]
            if b.shape[1] != rank:
                raise ValueError(f"LoRA module {module!r} of adapter {self.path}: lora_A has rank {rank} but lora_B {b.shape[1]}")
            if entry["kind"] == "embedding" or self.fan_in_fan_out:
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
            factors[key] = LoraFactors(module, left.contiguous(), right.contiguous(), self.scaling(module, rank))
        full: dict[str, torch.Tensor] = {}
        for name, tensor in self.full.items():
            key = _match_key(name, base)
            if key is None:
                raise ValueError(f"tensor {name!r} saved whole in adapter {self.path} (modules_to_save or a bias) matches no tensor "
                                 "of the pretrained model (adapter for another base, or a tied weight?)")
            if tuple(tensor.shape) != tuple(base[key][1]):
                raise ValueError(f"tensor {name!r} saved whole in adapter {self.path} has shape {tuple(tensor.shape)}, the "
                                 f"pretrained {key!r} {tuple(base[key][1])}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"tensor {name!r} of adapter {self.file} has NaN/inf values")
            full[key] = tensor
        for key, f in factors.items():
            for name, t in (("lora_A/B", f.left), ("lora_A/B", f.right)):
                if not torch.isfinite(t).all():
                    raise ValueError(f"LoRA factors {name} of module {f.module!r} in {self.file} have NaN/inf values")
        return factors, full

    def identity(self) -> Any:
        return ["lora", str(self.path.resolve()), self._identity.hexdigest()]

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, modules={len(self._lora)}, r={self.r}, alpha={self.alpha:g})"


def _match_key(name: str, base: Mapping[str, Any]) -> str | None:
    """The base key a PEFT module path names: exact, or with leading components dropped (an
    adapter trained on ``XForCausalLM`` over a bare ``XModel``), or as the unique suffix."""
    if name in base:
        return name
    parts = name.split(".")
    for i in range(1, len(parts) - 1):
        candidate = ".".join(parts[i:])
        if candidate in base:
            return candidate
    suffix = [k for k in base if k.endswith("." + name)]
    return suffix[0] if len(suffix) == 1 else None

