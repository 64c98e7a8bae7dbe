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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .. import merge_methods
from ..errors import RecipeError
from ..groups import Groups, as_matrix
from ..merge_methods import MergeMethod, resolve_method
from ..mergekit_emit import emit_recipe
from .safetensors_io import plan_shards, write_safetensors
from .saving import atomic_path, check_destination, write_side_files
from .sources import ModelSource, Weights, is_lora_adapter, is_on_disk

__all__ = ["TaskVectors", "STORAGES"]

log = logging.getLogger(__name__)

STORAGES = ("auto", "dense", "streamed")


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
    _kinds: ClassVar[dict[str, type["TaskVectors"]]] = {}  # "dense" / "streamed" -> the class building it

    def __init_subclass__(cls, kind: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if kind is not None:
            TaskVectors._kinds[kind] = cls

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
            return cls._kinds["dense"].build(pretrained, models, names, device=device, dtype=dtype)
        streamed = cls._kinds["streamed"].build(pretrained, models, names, device=device, dtype=dtype)
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

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None, dtype: torch.dtype | None = None,
              groups: Groups | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict for ``coeffs: (T,)`` in the checkpoint layout (all of it in memory,
        on :attr:`device`), in ``dtype`` (default: dense storage's :attr:`dtype`; streamed storage's
        pretrained dtypes, so a bf16 checkpoint stays bf16)."""
        raise NotImplementedError

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None, groups: Groups | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` (or ``T x G`` with ``groups``) into ``model``
        in place and return it. The model keeps its device and dtype (a bf16 model stays bf16);
        arithmetic is fp32."""
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

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod, groups: Groups | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, piece)`` of the merged model for ``coeffs: (T, G)`` in :meth:`_output_entries` order and dtypes."""
        raise NotImplementedError

    def _base_weights(self) -> Weights:
        """The pretrained model's weights (folder, configs, live keys)."""
        raise NotImplementedError

    def source_paths(self) -> list[Path]:
        """Every file and folder the task vectors are read from (saves never write there)."""
        raise NotImplementedError

    def _source_identities(self) -> list[Any]:
        """JSON-able identities of the pretrained model and each task's source, for ``map_merge.json``."""
        raise NotImplementedError

    def _task_references(self) -> dict[str, str]:
        """``task -> path`` of each task's source as mergekit names models (an adapter: ``base+adapter``)."""
        raise NotImplementedError

    def mergekit_config(self, coeffs: Any, method: str | MergeMethod | None = None, groups: Groups | None = None,
                        dtype: str = "float32") -> dict[str, Any]:
        """A mergekit config (``mergekit-yaml``) that reproduces the merge for ``coeffs`` (``T`` or
        ``T x G`` entries with ``groups``): ``task_arithmetic``, ``breadcrumbs`` and ``della_linear``
        with any coefficients, per-layer (depth knots) or filtered (substring groups) weights;
        ``ties`` / ``breadcrumbs_ties`` / ``della`` with equal coefficients. Models must be on disk.
        Raises :class:`~map_merge.errors.RecipeError` where mergekit has no counterpart."""
        matrix, _ = self.coefficients_by_key(coeffs, groups)
        base = self._base_weights().paths()
        if not base:
            raise RecipeError("the pretrained model is in memory; mergekit reads models from disk (build the task vectors from folders)")
        references = self._task_references()
        return emit_recipe(str(Path(base[0]).resolve()), references, matrix, resolve_method(method), groups, dtype)

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

    def coefficients_by_key(self, coeffs: Any, groups: Groups | None = None, keys: Sequence[str] | None = None
                            ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """``(C (T, G), key -> c_k (T,))`` for a coefficient vector of ``T x G`` entries (task-major,
        or shape ``(T, G)``); the mapping is ``None`` without groups (every key merges with ``C[:, 0]``)."""
        matrix = as_matrix(coeffs, self.num_tasks, groups)
        if groups is None:
            return matrix, None
        keys = list(self.keys if keys is None else keys)
        weights = groups.weights(keys)
        if groups.patterns:  # a pattern owning nothing is a silent no-op: name it (e.g. a live name of a renamed tensor)
            owned = weights.reshape(len(keys), len(groups.patterns), -1).any(axis=(0, 2))
            empty = [name for name, owns in zip(groups.patterns, owned) if not owns]
            if empty:
                raise ValueError(f"group(s) {empty} own no merged tensor (their patterns match none, or an earlier group takes "
                                 f"all they match): patterns match the checkpoint's tensor names (as save_pretrained writes them, e.g. {keys[len(keys) // 2]!r}; "
                                 "tied weights under the name kept), not a live model's renamed or fused ones")
        per_key = matrix @ weights.T  # (T, K)
        return matrix, {key: per_key[:, j] for j, key in enumerate(keys)}

    def deltas(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base (*shape), deltas (T, *shape))`` of one tensor, in :attr:`dtype` on :attr:`device`."""
        if key not in set(self.keys):
            raise KeyError(f"{key!r} is not a merged tensor of these task vectors")
        base = self.base_tensor(key)
        pieces = [d for _, _, d in self.delta_chunks([key], self.device)]
        return base, torch.cat(pieces, dim=1).reshape((self.num_tasks,) + tuple(base.shape))

    def live_deltas(self, model: nn.Module, live_keys: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``live key -> (base (*shape), deltas (T, *shape))`` for tensors of a live ``model`` named as
        the model names them: renamed and tied keys map to their checkpoint tensor, fused ones (stacked
        experts) are converted from their sources by transformers' operations (linear, so converting
        each task's delta is exact). Keys nothing maps to are left out. In :attr:`dtype` on :attr:`device`."""
        from .keymap import LivePlan

        plan = LivePlan(model, self.tensor_shapes, self.keys)
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for live in live_keys:
            key = plan.checkpoint_of(live)
            if key is not None and key in set(self.keys):
                out[live] = self.deltas(key)
                continue
            group = next((g for g in plan.groups if plan.aliases.get(live, live) in g.targets), None)
            if group is None:
                continue
            parts = {k: self.deltas(k) for k in group.sources}
            base = group.convert({k: b for k, (b, _) in parts.items()}, model)
            per_task = [group.convert({k: d[t] for k, (_, d) in parts.items()}, model) for t in range(self.num_tasks)]
            target = plan.aliases.get(live, live)
            out[live] = (base[target], torch.stack([p[target] for p in per_task]))
        return out

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``checkpoint key -> shape`` of every tensor of the pretrained model (merged or copied)."""
        raise NotImplementedError

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
        overwrite: bool = False,
        groups: Groups | None = None,
        progress: bool = True,
    ) -> Path:
        """Save the merged model for ``coeffs: (T,)``, streamed tensor by tensor.

        ``path`` ending in ``.safetensors``: one file, coefficients and method in its metadata.
        Otherwise a Hugging Face folder that ``AutoModel*.from_pretrained`` loads: safetensors
        shards of at most ``max_shard_size`` (with ``model.safetensors.index.json`` when there are
        several) in the checkpoint layout (tied weights once, as ``save_pretrained`` writes them),
        the pretrained model's ``config.json``, ``generation_config.json`` and tokenizer files
        (from its folder, or its module's configs, or ``model``'s), and ``map_merge.json``
        (coefficients, method, the sources' identities). Tensors keep the pretrained dtypes.

        ``groups``: coefficient groups (:class:`~map_merge.Groups`); ``coeffs`` then has ``T x G``
        entries (task-major) or shape ``(T, G)``.

        Never loses data: a destination that is, holds or lies inside a source of these task
        vectors is refused; an existing non-empty one unless ``overwrite=True``; everything is
        written beside it and renamed into place at the end (a crash leaves the old one or nothing).
        ``progress``: a progress bar over the bytes written (per tensor, the shard as postfix) on a
        terminal, once the save has taken :data:`SAVE_PROGRESS_DELAY` seconds; never when not a TTY.
        Raises ValueError / FileExistsError naming the destination."""
        method = resolve_method(method)
        matrix, _ = self.coefficients_by_key(coeffs, groups)
        target = check_destination(path, self.source_paths(), overwrite)
        from ..groups import coefficient_names

        meta = {"coefficients": dict(zip(coefficient_names(self.names, groups), matrix.reshape(-1).tolist())), "method": method.spec,
                "task_vectors": self.fingerprint(), "storage": self.storage, "sources": self._source_identities()}
        if groups is not None:
            meta["groups"] = groups.spec
        meta.update(extra_metadata or {})
        entries = self._output_entries()
        header_meta = {"format": "pt", "map_merge": json.dumps(meta, default=str)}
        sizes = [(key, _nbytes(dtype, shape)) for key, dtype, shape in entries]
        with _save_bar(sum(size for _, size in sizes), Path(path).name, progress) as bar:
            pieces = _counted(self._output_pieces(matrix, method, groups), bar)
            if target.suffix == ".safetensors":
                with atomic_path(target, folder=False, overwrite=overwrite) as temp:
                    write_safetensors(temp, entries, pieces, header_meta, atomic=False)
                return Path(path)
            with atomic_path(target, folder=True, overwrite=overwrite) as temp:
                self._write_shards(temp, entries, sizes, _Peekable(pieces), header_meta, max_shard_size, bar)
                base = self._base_weights()
                config = base.config if base.config is not None else getattr(model, "config", None)
                generation = base.generation_config if base.config is not None else getattr(model, "generation_config", None)
                write_side_files(temp, base.folder, config, generation, destination=Path(path))
                (temp / "map_merge.json").write_text(json.dumps(meta, indent=2, default=str))
        return Path(path)

    @staticmethod
    def _write_shards(temp: Path, entries, sizes: list[tuple[str, int]], pieces: "_Peekable", header_meta: Mapping[str, str],
                      max_shard_size: int | str, bar) -> None:
        """The weights as safetensors shards in folder ``temp`` (and their index when there are several)."""
        shards = plan_shards(sizes, parse_size(max_shard_size))
        by_key = {key: (dtype, shape) for key, dtype, shape in entries}
        weight_map: dict[str, str] = {}
        for number, shard in enumerate(shards, 1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            if len(shards) > 1:
                bar.set_postfix_str(f"shard {number}/{len(shards)}", refresh=False)
            write_safetensors(temp / name, [(k, *by_key[k]) for k in shard], pieces.while_in(set(shard)), header_meta, atomic=False)
            weight_map.update(dict.fromkeys(shard, name))
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(size for _, size in sizes)}, "weight_map": weight_map}
            (temp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def __repr__(self) -> str:
        return (f"TaskVectors(storage={self.storage!r}, tasks={list(self.names)}, params={self.num_params:,}, "
                f"device={self.device}, dtype={self.dtype})")


SAVE_PROGRESS_DELAY = 1.0
"""Seconds a save runs before its progress bar appears (a quick save shows none)."""


def _save_bar(total: int, name: str, progress: bool):
    """A tqdm bar over ``total`` bytes: on a terminal only (tqdm's ``disable=None``), after
    :data:`SAVE_PROGRESS_DELAY` seconds; ``progress=False``: none."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"saving {name}", unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                delay=SAVE_PROGRESS_DELAY, disable=None if progress else True)


def _counted(pieces: Iterator[tuple[str, torch.Tensor]], bar) -> Iterator[tuple[str, torch.Tensor]]:
    """``pieces`` as they are, the bar advanced by each one's bytes once it is consumed (written)."""
    for key, piece in pieces:
        yield key, piece
        bar.update(piece.numel() * piece.element_size())


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

