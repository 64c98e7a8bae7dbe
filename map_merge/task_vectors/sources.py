"""Where weights come from: modules and state dicts in memory, safetensors checkpoints on disk
(read lazily, one range at a time). PEFT LoRA adapters are in :mod:`.lora`.

Each source answers the same questions, in the checkpoint layout of :mod:`.keymap` (tied weights
once, fused tensors split as ``save_pretrained`` writes them): which tensors it has (``dtype``,
``shape``), and the elements ``[start, stop)`` of one flattened tensor. Messages name the file a
tensor lives in.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .keymap import aliases_by_storage, check_materialized, checkpoint_state, preview, skeleton
from .safetensors_io import SafetensorsCheckpoint, load_checkpoint

__all__ = ["ModelSource", "load_state_dict", "Weights", "MemoryWeights", "CheckpointWeights", "open_weights",
           "is_lora_adapter", "is_on_disk", "check_finite", "preview", "warn_zero_tasks", "tensor_bytes", "SourceInfo"]

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
                return load_checkpoint(path)
            for name in ("pytorch_model.bin", "model.pt", "model.bin"):
                if (path / name).exists():
                    return _torch_state_dict(path / name)
            raise FileNotFoundError(f"no *.safetensors or pytorch_model.bin weights in model folder {path}")
        if path.suffix == ".safetensors":
            return load_checkpoint(path)
        if path.suffix in (".bin", ".pt", ".pth"):
            return _torch_state_dict(path)
        raise ValueError(f"cannot load weights from {path}: expected a folder, .safetensors, .bin, .pt or .pth")
    raise TypeError(
        "a model must be an nn.Module, a state dict, a .safetensors file or a Hugging Face model folder; "
        f"got {type(source).__name__}"
    )


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict a ``.bin`` / ``.pt`` file holds (``torch.load``, weights only); an empty,
    corrupt or unsafe file, or one holding anything but a ``str -> Tensor`` mapping (a training
    checkpoint), is refused with a :class:`CheckpointFileError` naming it."""
    import pickle

    from ..errors import CheckpointFileError

    what = f"{path} is not a PyTorch state dict"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError, AttributeError, ImportError) as error:
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else "the file ends early (empty or truncated?)"
        raise CheckpointFileError(f"{what}: torch.load failed ({type(error).__name__}: {first})") from None
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        shown = sorted(map(str, state))[:5] if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointFileError(f"{what} (a mapping of tensor names to tensors): it holds {shown}; save model.state_dict() "
                                  "(a training checkpoint's 'state_dict' entry) instead")
    return dict(state)


def tensor_bytes(tensor: torch.Tensor) -> memoryview | bytes:
    """The raw bytes of a tensor (any dtype, bf16 included), for hashing."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(data.view(torch.uint8).numpy()) if data.numel() else b""


def check_finite(tensor: torch.Tensor, key: str, owner: str) -> None:
    """Raise naming the key and its owner (``"fine-tuned model 'x'"``) when ``tensor`` has NaN/inf."""
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"tensor {key!r} of the {owner} has {bad} NaN/inf value(s)")


def warn_zero_tasks(names: Sequence[str], zero: Sequence[bool]) -> None:
    """Warn, naming them, about tasks whose task vector is zero (a fine-tune identical to the
    pretrained model, or an untrained adapter): merging them changes nothing."""
    empty = [n for n, z in zip(names, zero) if z]
    if empty:
        warnings.warn(f"task(s) {empty}: the fine-tuned model is identical to the pretrained one (a zero task vector); "
                      "its coefficient changes nothing", UserWarning, stacklevel=4)


def is_lora_adapter(source: Any) -> bool:
    """Whether ``source`` is a PEFT adapter folder (``adapter_config.json`` inside)."""
    from .lora import LoraAdapter

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
    """A set of named tensors in the checkpoint layout, readable one flat element range at a time.

    Attributes:
        owner: for messages (``"the pretrained model"``, ``"fine-tuned model 'x'"``).
        tensors: ``key -> (dtype, shape)``.
        aliases: live keys of tied weights left out of ``tensors`` ``-> the key holding them``.
        config / generation_config: a module's Hugging Face configs (saved beside a merged model).
    """

    owner: str
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    aliases: dict[str, str] = {}
    config: Any = None
    generation_config: Any = None

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

    def paths(self) -> list[Path]:
        """Files and folders these weights are read from (never written to)."""
        return []

    def describe(self) -> Any:
        """A short JSON-able description of where these weights come from (``map_merge.json``)."""
        paths = self.paths()
        return str(paths[0].resolve()) if paths else "in memory"

    def live_model(self) -> nn.Module | None:
        """A model whose live keys adapters name: the module itself, or a meta-device skeleton of
        the folder's architecture, made once (``None``: the tensors' own keys are the live keys)."""
        if self.__dict__.get("_skeleton", False) is False:  # not looked for yet
            self._skeleton = skeleton(self.folder) if self.folder is not None else None
        return self._skeleton

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_skeleton"] = False  # rebuilt where needed
        return state


class MemoryWeights(Weights):
    """Tensors already in memory (a module, in its checkpoint layout, or a mapping); reads are views."""

    def __init__(self, state: Mapping[str, torch.Tensor], owner: str, module: nn.Module | None = None,
                 aliases: Mapping[str, str] | None = None, path: str | os.PathLike | None = None) -> None:
        self.owner = owner
        self._path = Path(path).expanduser().resolve() if path is not None else None  # once: a later os.chdir changes nothing
        self._origin: Path | None = None  # a module's local from_pretrained folder (protected from saves)
        self._skeleton: Any = False
        check_materialized(state, owner)
        self._state = dict(state)
        self.aliases = dict(aliases or {})
        self.tensors = {k: (v.dtype, tuple(v.shape)) for k, v in self._state.items()}
        self._identity: str | None = None
        self._module = module
        self.config = getattr(module, "config", None)
        self.generation_config = getattr(module, "generation_config", None)

    @classmethod
    def of_module(cls, module: nn.Module, owner: str) -> "MemoryWeights":
        state, aliases = checkpoint_state(module)
        weights = cls(state, owner, module=module, aliases=aliases)
        weights._origin = _local_origin(module)
        return weights

    def read(self, key: str, start: int = 0, stop: int | None = None, buffer: torch.Tensor | None = None) -> torch.Tensor:
        return self._state[key].detach().reshape(-1)[start:stop]

    def tensor(self, key: str) -> torch.Tensor:
        return self._state[key]

    def identity(self) -> Any:
        if self._identity is None:
            digest = hashlib.blake2b(digest_size=16)
            for key, value in self._state.items():
                digest.update(key.encode())
                digest.update(tensor_bytes(value))
            self._identity = digest.hexdigest()
        return ["memory", self._identity]

    @property
    def folder(self) -> Path | None:
        return self._path if self._path is not None and self._path.is_dir() else None

    def paths(self) -> list[Path]:
        """The file or folder loaded; for a module, the local folder ``from_pretrained`` loaded it
        from (its ``name_or_path``), so that no save replaces that folder."""
        return ([self._path] if self._path is not None else []) + ([self._origin] if self._origin is not None else [])

    def describe(self) -> Any:
        return str(self._path.resolve()) if self._path is not None else "in memory"

    def live_model(self) -> nn.Module | None:
        return self._module if self._module is not None else super().live_model()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_module"] = None  # the tensors travel; the module they came from does not
        return state


def _local_origin(module: nn.Module) -> Path | None:
    """The local folder a Hugging Face module was loaded from (``config._name_or_path``), if any."""
    name = getattr(getattr(module, "config", None), "_name_or_path", None) or getattr(module, "name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    try:
        path = Path(name).expanduser()
        return path.resolve() if path.is_dir() else None
    except (OSError, ValueError):
        return None


class CheckpointWeights(Weights):
    """Tensors in a safetensors file or sharded folder, read lazily with ``pread``."""

    def __init__(self, path: str | os.PathLike, owner: str) -> None:
        self.owner = owner
        self.checkpoint = SafetensorsCheckpoint(path)
        self.tensors = {k: (i.dtype, i.shape) for k, i in self.checkpoint.tensors.items()}
        self._skeleton: Any = False  # not looked for yet

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

    def paths(self) -> list[Path]:
        return [self.checkpoint.path, *self.checkpoint.files]


def open_weights(source: ModelSource, owner: str, stream: bool) -> Weights:
    """:class:`CheckpointWeights` for safetensors on disk when ``stream``, else
    :class:`MemoryWeights` (modules in their checkpoint layout; files are loaded)."""
    if stream and is_on_disk(source):
        return CheckpointWeights(source, owner)
    if isinstance(source, nn.Module):
        return MemoryWeights.of_module(source, owner)
    path = source if isinstance(source, (str, os.PathLike)) else None
    state = load_state_dict(source)
    aliases = aliases_by_storage(state)  # a state dict of tied weights: each tensor once
    return MemoryWeights({k: v for k, v in state.items() if k not in aliases}, owner, path=path, aliases=aliases)


class SourceInfo(Weights):
    """What a storage keeps of a source after copying its tensors: where it came from (paths,
    folder, a short description) and its Hugging Face configs; no tensors."""

    def __init__(self, owner: str, paths: Sequence[Path], folder: Path | None, description: Any, config: Any = None,
                 generation_config: Any = None, aliases: Mapping[str, str] | None = None) -> None:
        self.owner = owner
        self.tensors = {}
        self._paths = list(paths)
        self._folder = folder
        self._description = description
        self.config = config
        self.generation_config = generation_config
        self.aliases = dict(aliases or {})
        self._skeleton: Any = False

    @classmethod
    def of(cls, weights: Weights) -> "SourceInfo":
        return cls(weights.owner, weights.paths(), weights.folder, weights.describe(), weights.config, weights.generation_config,
                   weights.aliases)

    @property
    def folder(self) -> Path | None:
        return self._folder

    def paths(self) -> list[Path]:
        return list(self._paths)

    def describe(self) -> Any:
        return self._description
