"""The one public face of task vectors, whatever stores them.

``TaskVectors.from_models`` picks the storage from what it is given:

- ``"dense"``: modules or state dicts in memory. The pretrained weights and all T task vectors
  live as one ``(T + 1, P)`` block; a merge is one fused ``addmv``. The fast path for small models.
- ``"streamed"``: safetensors files or sharded Hugging Face folders. Only headers are read up
  front; each merge reads one chunk of one tensor at a time from every checkpoint and computes
  ``theta_0 + sum_i c_i tau_i`` for it in fp32, writing it in the target's own dtype. Extra
  memory is a few chunks, whatever the model's size and T.
- ``"lora"``: PEFT LoRA adapters (``tau = scaling * B @ A``, kept as factors), over a pretrained
  model in memory or on disk; ``"mixed"`` when adapters and full fine-tunes are combined.

Every storage merges by the same chunked definition of the operators in
:mod:`map_merge.merge_methods`, so they give the same merged model (to fp32 rounding).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import merge_methods
from ..merge_methods import MergeMethod, resolve_method
from .safetensors_io import plan_shards, write_safetensors
from .sources import ModelSource, is_lora_adapter, is_on_disk

__all__ = ["TaskVectors", "STORAGES"]

log = logging.getLogger(__name__)

STORAGES = ("auto", "dense", "streamed")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "map_merge.json")


def chunk_ranges(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Flat element ranges ``[start, stop)`` covering a tensor of ``shape``: whole rows (the
    trailing dimensions, ``shape[1:]``) of about :data:`~map_merge.merge_methods.CHUNK` elements
    (read at call time), or CHUNK-sized pieces of a row longer than that."""
    size = merge_methods.CHUNK
    numel = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else numel
    if numel == 0:
        return [(0, 0)]
    step = max(1, size // row) * row if row <= size else size
    return [(start, min(start + step, numel)) for start in range(0, numel, step)]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like ``"5GB"``, ``"500MB"``, ``"2GiB"``."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


class TaskVectors:
    """Pretrained weights plus T task vectors, ready to merge with per-task coefficients.

    Build with :meth:`from_models`. Attributes and properties:
        names: task names, length T.  num_tasks: T.  num_params: P (floating entries merged).
        storage: ``"dense"``, ``"streamed"``, ``"lora"`` or ``"mixed"`` (read-only).
        keys: the merged floating-point tensors' keys.  device / dtype: where and in which dtype
        merges without a target model are computed (``merge``, ``save_merged``, statistics).
    """

    storage: str = "abstract"
    names: tuple[str, ...]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        pretrained: ModelSource,
        finetuned: Sequence[Any] | Mapping[str, Any],
        names: Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        storage: str = "auto",
    ) -> "TaskVectors":
        """Validate the models and build their task vectors.

        Args:
            pretrained: the pretrained model: module, state dict, ``.safetensors`` file or HF folder.
            finetuned: fine-tuned models (same kinds) or PEFT LoRA adapter folders (or
                :class:`LoraAdapter`), as a sequence or a ``name -> model`` mapping; may be mixed.
            names: task names for a sequence (default ``task0, task1, ...``).
            device: where merges without a target model run and dense vectors live (default: CPU).
            dtype: arithmetic dtype (default: float32).
            storage: ``"auto"`` (streamed when the models are safetensors on disk or any is a LoRA
                adapter, dense otherwise), ``"dense"`` (load everything into memory) or ``"streamed"``.

        Raises:
            ValueError: no fine-tuned model, duplicate names, missing/extra keys, shape or dtype
                mismatches, NaN/inf values, an adapter that does not fit the base (the message names
                the key and the model or file).
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
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        dtype = dtype or torch.float32
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        any_lora = any(is_lora_adapter(m) for m in models)
        if storage == "auto":
            on_disk = is_on_disk(pretrained) and all(is_on_disk(m) or is_lora_adapter(m) for m in models)
            storage = "streamed" if any_lora or on_disk else "dense"
        if storage == "dense" and not any_lora:
            from .dense import DenseTaskVectors

            return DenseTaskVectors.build(pretrained, models, names, device=device, dtype=dtype)
        from .streamed import StreamedTaskVectors

        streamed = StreamedTaskVectors.build(pretrained, models, names, device=device, dtype=dtype)
        return streamed.to_dense() if storage == "dense" else streamed

    # ------------------------------------------------------------------ to implement
    @property
    def num_params(self) -> int:
        raise NotImplementedError

    @property
    def keys(self) -> tuple[str, ...]:
        """Floating-point keys that are merged, in storage order (tied aliases excluded)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash identifying the pretrained weights, the task vectors and the names."""
        raise NotImplementedError

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict for ``coeffs: (T,)`` (all of it in memory, on :attr:`device`)."""
        raise NotImplementedError

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` into ``model`` in place and return it.
        The model keeps its device and dtype (a bf16 model stays bf16); arithmetic is fp32."""
        raise NotImplementedError

    def prepare(self, method: str | MergeMethod | None = None) -> None:
        """Compute a merge method's statistics now (TIES thresholds; the dense prepared vectors)
        so that the first merge does not pay for them. Cached for the last method."""
        raise NotImplementedError

    def delta_chunks(self, keys: Sequence[str] | None = None, device: torch.device | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(key, start, deltas (T, n))`` over flat ranges of the given tensors (see
        :data:`~map_merge.merge_methods.ChunkSource`), in :attr:`dtype` on ``device``."""
        raise NotImplementedError

    def base_tensor(self, key: str) -> torch.Tensor:
        """The pretrained tensor ``key`` in :attr:`dtype` on :attr:`device`."""
        raise NotImplementedError

    def _output_entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(key, dtype, shape)`` of every tensor a saved merged model holds, in order."""
        raise NotImplementedError

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, piece)`` of the merged model in :meth:`_output_entries` order and dtypes."""
        raise NotImplementedError

    def _source_folder(self) -> Path | None:
        """The pretrained model's Hugging Face folder, if it came from one."""
        return None

    def _source_config(self) -> Any:
        """The pretrained module's Hugging Face config, if it came as such a module."""
        return None

    # ------------------------------------------------------------------ shared
    @property
    def num_tasks(self) -> int:
        return len(self.names)

    def check_coeffs(self, coeffs: Any) -> np.ndarray:
        """``coeffs`` as a finite float64 ``(T,)`` array, or a ValueError naming the problem."""
        if isinstance(coeffs, torch.Tensor):
            coeffs = coeffs.detach().to("cpu", torch.float64).numpy()
        c = np.asarray(coeffs, dtype=np.float64)
        if c.ndim != 1 or c.shape[0] != self.num_tasks:
            raise ValueError(
                f"expected {self.num_tasks} coefficients (one per task: {list(self.names)}), got shape {tuple(c.shape)}"
            )
        if not np.isfinite(c).all():
            raise ValueError(f"coefficients must be finite, got {c.tolist()}")
        return c

    def deltas(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base (*shape), deltas (T, *shape))`` of one tensor, in :attr:`dtype` on :attr:`device`."""
        if key not in set(self.keys):
            raise KeyError(f"{key!r} is not a merged tensor of these task vectors")
        base = self.base_tensor(key)
        pieces = [d for _, _, d in self.delta_chunks([key], self.device)]
        return base, torch.cat(pieces, dim=1).reshape((self.num_tasks,) + tuple(base.shape))

    def cosine_similarity(self) -> np.ndarray:
        """``(T, T)`` cosine similarities between task vectors (one pass over the weights)."""
        gram = torch.zeros(self.num_tasks, self.num_tasks, dtype=torch.float64)
        for _, _, deltas in self.delta_chunks(None, self.device):
            d = deltas.double()
            gram += (d @ d.T).cpu()
        norms = gram.diagonal().clamp_min(1e-300).sqrt()
        return (gram / norms[:, None] / norms[None, :]).numpy()

    def save_merged(
        self,
        path: str | os.PathLike,
        coeffs: Any,
        method: str | MergeMethod | None = None,
        model: nn.Module | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Save the merged model for ``coeffs: (T,)``, streamed tensor by tensor.

        ``path`` ending in ``.safetensors``: one file, coefficients and method in its metadata.
        Otherwise a Hugging Face folder that ``AutoModel*.from_pretrained`` loads: safetensors
        shards of at most ``max_shard_size`` (with ``model.safetensors.index.json`` when there are
        several), the pretrained folder's config and tokenizer files (or ``model.config`` /
        the pretrained module's config), and ``map_merge.json`` with the coefficients and method.
        Tensors keep the pretrained model's dtypes."""
        method = resolve_method(method)
        c = self.check_coeffs(coeffs)
        meta = {"coefficients": dict(zip(self.names, c.tolist())), "method": method.spec, "task_vectors": self.fingerprint(),
                "storage": self.storage}
        meta.update(extra_metadata or {})
        path = Path(path)
        entries = self._output_entries()
        pieces = self._output_pieces(c, method)
        header_meta = {"format": "pt", "map_merge": json.dumps(meta)}
        if path.suffix == ".safetensors":
            path.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(path, entries, pieces, header_meta)
            return path
        path.mkdir(parents=True, exist_ok=True)
        sizes = [(key, _nbytes(dtype, shape)) for key, dtype, shape in entries]
        shards = plan_shards(sizes, parse_size(max_shard_size))
        by_key = {key: (dtype, shape) for key, dtype, shape in entries}
        pieces = _Peekable(pieces)
        weight_map: dict[str, str] = {}
        for number, shard in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            members = set(shard)
            write_safetensors(path / name, [(k, *by_key[k]) for k in shard], pieces.while_in(members), header_meta)
            weight_map.update(dict.fromkeys(shard, name))
        stale = path / "model.safetensors.index.json"
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(size for _, size in sizes)}, "weight_map": weight_map}
            stale.write_text(json.dumps(index, indent=2))
        elif stale.exists():
            stale.unlink()
        self._write_side_files(path, model)
        (path / "map_merge.json").write_text(json.dumps(meta, indent=2))
        return path

    def _write_side_files(self, folder: Path, model: nn.Module | None) -> None:
        source = self._source_folder()
        if source is not None and source.resolve() != folder.resolve():
            for item in source.iterdir():
                if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES:
                    shutil.copy2(item, folder / item.name)
            return
        config = getattr(model, "config", None) if model is not None else self._source_config()
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(str(folder))
            generation = getattr(model, "generation_config", None) if model is not None else None
            if generation is not None and hasattr(generation, "save_pretrained"):
                try:
                    generation.save_pretrained(str(folder))
                except Exception:  # a default generation config may refuse to save; the weights do not need it
                    log.debug("generation config not saved", exc_info=True)
        else:
            log.warning("saved merged weights to %s without a config.json (pass model= a Hugging Face model, or build the "
                        "task vectors from a Hugging Face folder) - from_pretrained needs one", folder)

    def __repr__(self) -> str:
        return (f"TaskVectors(storage={self.storage!r}, tasks={list(self.names)}, params={self.num_params:,}, "
                f"device={self.device}, dtype={self.dtype})")


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


class _Peekable:
    """An iterator of ``(key, piece)`` that hands out consecutive runs by key membership."""

    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._items = iter(items)
        self._head: tuple[str, torch.Tensor] | None = None

    def while_in(self, keys: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        while True:
            if self._head is None:
                self._head = next(self._items, None)
                if self._head is None:
                    return
            if self._head[0] not in keys:
                return
            item, self._head = self._head, None
            yield item

