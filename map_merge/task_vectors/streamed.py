"""Task vectors streamed from safetensors checkpoints and PEFT LoRA adapters.

Nothing but headers (and LoRA factors, which are small) is held: each merge walks the
tensors in file order, reads one chunk (at most :data:`~map_merge.merge_methods.CHUNK`
elements) of the pretrained tensor and of every fine-tuned one, computes the merged chunk in
fp32 on the target's device and writes it into the target in its own dtype. Extra memory is a
few chunks, whatever the model's size and the number of tasks.

Task arithmetic takes a fused path: ``(1 - sum_i c_i) theta_0 + sum_i c_i theta_i`` over full
fine-tunes (one multiply-add per task, reading each checkpoint once, skipping ``c_i = 0``; the
reads run ahead in a thread, :mod:`.reader`) plus one matrix product ``[c_i s_i B_i]_i @ [A_i]_i``
over all LoRA adapters (:mod:`.lora`). TIES and DARE form the ``(T, n)`` deltas of each chunk and
map them with the operator (see :mod:`map_merge.merge_methods`). Live models are written through
:mod:`.binding` (renamed, fused and tied tensors, see :mod:`.keymap`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import merge_methods
from ..errors import RecipeError
from ..groups import Groups
from ..merge_methods import MergeMethod, resolve_method
from .adapter_base import warn_if_other_base
from .base import TaskVectors, chunk_ranges
from .binding import LiveWriter
from .dense import DenseTaskVectors, _Slot
from .keymap import LivePlan
from .lora import LoraAdapter, MatchedLora, merged_adapter_tensors
from .reader import ChunkReader, RawChunks
from .safetensors_io import write_safetensors
from .saving import atomic_path, check_destination
from .sources import (CheckpointWeights, MemoryWeights, Weights, check_finite, is_lora_adapter, open_weights, preview,
                      warn_zero_tasks)

__all__ = ["StreamedTaskVectors"]

log = logging.getLogger(__name__)

_PROGRESS_BYTES = 1 << 30  # show a progress bar over tensors for models at least this large


class StreamedTaskVectors(TaskVectors, kind="streamed"):
    """Task vectors read from disk (or adapters) chunk by chunk at every merge.

    Build with :meth:`TaskVectors.from_models`. ``storage`` is ``"streamed"`` (full fine-tunes),
    ``"lora"`` (adapters only) or ``"mixed"``. :meth:`merge_into` writes into the model's own
    tensors on their own device and in their own dtype. :meth:`validate` reads everything once
    to check for NaN/inf; merges check each merged chunk and name the file and key at fault.
    """

    def __init__(self, base: Weights, tasks: Sequence[Weights | MatchedLora], names: Sequence[str], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.names = tuple(names)
        self._base = base
        self._tasks = list(tasks)
        self._device = device
        self._dtype = dtype
        floating = {k: v for k, v in base.tensors.items() if v[0].is_floating_point}
        if isinstance(base, CheckpointWeights):  # file order: sequential reads
            infos = base.checkpoint.tensors
            order = sorted(base.tensors, key=lambda k: (str(infos[k].file), infos[k].offset))
        else:
            order = list(base.tensors)
        self._order = tuple(order)
        self._keys = tuple(k for k in order if k in floating)
        self._frozen = tuple(k for k in order if k not in floating)
        self._shapes = {k: tuple(base.tensors[k][1]) for k in order}
        self._numel = {k: int(np.prod(self._shapes[k], dtype=np.int64)) for k in order}
        self._full = [(i, t) for i, t in enumerate(self._tasks) if isinstance(t, Weights)]
        self._lora = [(i, t) for i, t in enumerate(self._tasks) if isinstance(t, MatchedLora)]
        kinds = {"full" if isinstance(t, Weights) else "lora" for t in self._tasks}
        self.storage = "mixed" if len(kinds) > 1 else ("lora" if kinds == {"lora"} else "streamed")
        self._state: tuple[str, Any] | None = None  # one-entry cache: (method key, fitted statistics)
        self._fingerprint: str | None = None
        self.progress: bool | None = None  # None: a bar for models of 1 GB or more
        self._work: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reader = ChunkReader(base, self._full, self._lora, self._keys)
        self._plans: dict[tuple, LivePlan] = {}
        self._blocks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, pretrained: Any, models: Sequence[Any], names: Sequence[str], device: torch.device,
              dtype: torch.dtype) -> "StreamedTaskVectors":
        base = open_weights(pretrained, "the pretrained model", stream=True)
        if not base.tensors:
            raise ValueError("the pretrained model has no tensors")
        for key, (tdtype, _) in base.tensors.items():
            if tdtype.is_complex:
                raise ValueError(f"tensor {key!r} of the pretrained model is complex ({tdtype}); not supported")
        if not any(d.is_floating_point for d, _ in base.tensors.values()):
            raise ValueError("the pretrained model has no floating-point tensors to merge")
        if isinstance(base, MemoryWeights):
            for key, (tdtype, _) in base.tensors.items():
                if tdtype.is_floating_point:
                    check_finite(base.tensor(key), key, base.owner.removeprefix('the '))
        plan = _adapter_plan(base) if any(is_lora_adapter(m) for m in models) else None
        tasks: list[Weights | MatchedLora] = []
        for name, model in zip(names, models):
            if is_lora_adapter(model):
                adapter = model if isinstance(model, LoraAdapter) else LoraAdapter(model)
                factors, full, saved_as = adapter.match(base.tensors, plan)
                warn_if_other_base(adapter.path, adapter.base_model, pretrained)
                for key, tensor in full.items():
                    if not tensor.dtype.is_floating_point or not base.tensors[key][0].is_floating_point:
                        raise ValueError(f"tensor {key!r} saved in adapter {adapter.path} for task {name!r} is not floating point")
                tasks.append(MatchedLora(adapter, factors, full, saved_as))
                continue
            weights = open_weights(model, f"fine-tuned model {name!r}", stream=True)
            _check_matches(base, weights)
            if isinstance(weights, MemoryWeights):
                for key, (tdtype, _) in weights.tensors.items():
                    if tdtype.is_floating_point and key in base.tensors:
                        check_finite(weights.tensor(key), key, weights.owner.removeprefix('the '))
            tasks.append(weights)
        warn_zero_tasks(names, [_is_zero(base, task) for task in tasks])
        tv = cls(base, tasks, names, device, dtype)
        log.info("task vectors (%s): %d tasks x %d entries, merged on %s", tv.storage, tv.num_tasks, tv.num_params, device)
        return tv

    # ------------------------------------------------------------------ properties
    @property
    def num_params(self) -> int:
        return sum(self._numel[k] for k in self._keys)

    @property
    def keys(self) -> tuple[str, ...]:
        return self._keys

    @property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the pretrained model's floating tensors as stored."""
        return sum(self._numel[k] * torch.empty((), dtype=self._base.tensors[k][0]).element_size() for k in self._keys)

    def fingerprint(self) -> str:
        """Hash of the names, the headers and file identities (path, size, mtime) of every
        checkpoint and the adapters' contents; no pass over the weights."""
        if self._fingerprint is None:
            parts = [self.storage, list(self.names), self._base.identity()]
            parts += [t.identity() if isinstance(t, Weights) else t.adapter.identity() for t in self._tasks]
            self._fingerprint = hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=16).hexdigest()
        return self._fingerprint

    def _base_weights(self) -> Weights:
        return self._base

    def source_paths(self) -> list[Path]:
        paths = list(self._base.paths())
        for task in self._tasks:
            paths += task.paths() if isinstance(task, Weights) else [task.adapter.path]
        return paths

    def _task_references(self) -> dict[str, str]:
        base = self._base.paths()
        out = {}
        for name, task in zip(self.names, self._tasks):
            if isinstance(task, Weights):
                paths = task.paths()
                if not paths:
                    raise RecipeError(f"task {name!r} is in memory; mergekit reads models from disk")
                out[name] = str(Path(paths[0]).resolve())
            else:
                if not base:
                    raise RecipeError("the pretrained model is in memory; mergekit reads models from disk")
                out[name] = f"{Path(base[0]).resolve()}+{task.adapter.path.resolve()}"
        return out

    def _source_identities(self) -> list[Any]:
        out: list[Any] = [{"pretrained": self._base.describe()}]
        for name, task in zip(self.names, self._tasks):
            out.append({name: task.describe() if isinstance(task, Weights) else str(task.adapter.path.resolve())})
        return out

    # ------------------------------------------------------------------ reading chunks
    def _work_buffers(self, device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two fp32 work vectors of ``numel`` on ``device``, allocated once per device and reused
        (a merged chunk handed out is consumed before the next one is computed)."""
        size = merge_methods.CHUNK
        buffers = self._work.get(device)
        if buffers is None or buffers[0].numel() < size:
            buffers = (torch.empty(size, dtype=torch.float32, device=device), torch.empty(size, dtype=torch.float32, device=device))
            self._work[device] = buffers
        return buffers[0][:numel], buffers[1][:numel]

    def _block_buffers(self, device: torch.device, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(base (numel,), deltas (T, numel))`` on ``device``, allocated once per device and
        reused by merges with an operator (a chunk's deltas are consumed before the next is read)."""
        size = merge_methods.CHUNK
        buffers = self._blocks.get(device)
        if buffers is None or buffers[0].numel() < size:
            buffers = (torch.empty(size, dtype=torch.float32, device=device),
                       torch.empty(self.num_tasks * size, dtype=torch.float32, device=device))
            self._blocks[device] = buffers
        return buffers[0][:numel], buffers[1][: self.num_tasks * numel].view(self.num_tasks, numel)

    def _read_base(self, key: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The pretrained chunk as a new fp32 tensor on ``device`` (safe to modify)."""
        raw = self._base.read(key, start, stop)
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
        out.copy_(raw)
        return out

    def _delta(self, index: int, key: str, start: int, stop: int, base: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Task ``index``'s delta chunk in fp32 on ``device`` (``None``: zero)."""
        task = self._tasks[index]
        if isinstance(task, Weights):
            out = task.read(key, start, stop).to(device=device, dtype=torch.float32, copy=True)
            return out.sub_(base)
        return task.delta(key, start, stop, base, device)

    def _delta_block(self, key: str, start: int, stop: int, device: torch.device, raw: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, deltas (T, n))`` in fp32 on ``device``: new tensors, or (``raw``: the chunks
        the reader read ahead for every task) the reused :meth:`_block_buffers`."""
        if raw is None:
            base = self._read_base(key, start, stop, device)
            deltas = torch.zeros(self.num_tasks, stop - start, dtype=torch.float32, device=device)
        else:
            base, deltas = self._block_buffers(device, stop - start)
            base.copy_(raw[0])
            for (index, _), (_, chunk) in zip(self._full, raw[1]):  # full fine-tunes come first, in order
                deltas[index].copy_(chunk).sub_(base)
        for index, task in enumerate(self._tasks):
            if raw is not None and isinstance(task, Weights):
                continue
            delta = self._delta(index, key, start, stop, base, device)
            if delta is not None:
                deltas[index] = delta
            elif raw is not None:
                deltas[index].zero_()
        return base, deltas

    def delta_chunks(self, keys: Sequence[str] | None = None, device: torch.device | None = None) -> Iterator[tuple[str, int, torch.Tensor]]:
        device = torch.device(device) if device is not None else self._device
        for key in self._keys if keys is None else keys:
            for start, stop in chunk_ranges(self._shapes[key]):
                _, deltas = self._delta_block(key, start, stop, device)
                yield key, start, deltas.to(self._dtype)

    def base_tensor(self, key: str) -> torch.Tensor:
        return self._base.read(key).to(device=self._device, dtype=self._dtype).reshape(self._shapes[key])

    # ------------------------------------------------------------------ merging
    def prepare(self, method: str | MergeMethod | None = None) -> None:
        self._fitted(resolve_method(method))

    def _fitted(self, method: MergeMethod) -> Any:
        key = json.dumps(method.spec, sort_keys=True)
        if self._state is None or self._state[0] != key:
            self._state = None
            sizes = {k: self._numel[k] for k in self._keys}
            chunks = lambda keys=None: ((k, s, d.float()) for k, s, d in self.delta_chunks(keys, self._device))  # noqa: E731
            self._state = (key, method.fit(chunks, sizes, {k: self._shapes[k] for k in self._keys}))
        return self._state[1]

    def _merged_chunk(self, key: str, start: int, stop: int, c: np.ndarray, method: MergeMethod, state: Any,
                      device: torch.device, raw: Any = None) -> torch.Tensor:
        """The merged chunk ``[start, stop)`` of ``key`` in fp32 on ``device`` (``raw``: the chunks
        task arithmetic reads, when already read ahead)."""
        if method.is_identity:
            out = self._task_arithmetic_chunk(key, start, stop, c, device, raw)
        else:  # raw: every task's chunk, read ahead; deltas are then scratch the operator may overwrite
            out = self._work_buffers(device, stop - start)[0]
            # an elementwise operator on the CPU goes tile by tile: deltas, operator and sum stay in cache
            step = merge_methods.tile_columns(self.num_tasks) if raw is not None and method.elementwise and device.type == "cpu" else stop - start
            for begin in range(0, stop - start, step):
                end = min(begin + step, stop - start)
                part = None if raw is None else (raw[0][begin:end], [(w, t[begin:end]) for w, t in raw[1]])
                base, deltas = self._delta_block(key, start + begin, start + end, device, part)
                prepared = method.transform(key, start + begin, deltas, state) if raw is None else method.transform_(key, start + begin, deltas, state)
                piece = out[begin:end].copy_(base)
                for weight, row in zip(c.tolist(), prepared):  # row by row: addmv with a (n, T) matrix is several times slower
                    if weight != 0:
                        piece.add_(row, alpha=weight)
        # NaN/inf anywhere makes the sum non-finite (a sum is ~50x cheaper than isfinite().all())
        if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
            self._raise_nonfinite(key, start, stop, c)
        return out

    def _task_arithmetic_chunk(self, key: str, start: int, stop: int, c: np.ndarray, device: torch.device,
                               raw: RawChunks | None = None) -> torch.Tensor:
        """``(1 - sum_i c_i) theta_0 + sum_i c_i theta_i`` over whole tensors (full fine-tunes and
        tensors an adapter saves whole) plus one product over every adapter's factors."""
        base_raw, whole = raw if raw is not None else self._reader.read(key, start, stop, c)
        out, scratch = self._work_buffers(device, stop - start)
        out.copy_(base_raw)
        base_weight = 1.0 - sum(weight for weight, _ in whole)
        if base_weight != 1.0:
            out.mul_(base_weight)
        for weight, tensor in whole:
            tensor = tensor.to(device)
            if tensor.dtype != torch.float32:  # cast first: a mixed-dtype add_ is several times slower
                tensor = scratch.copy_(tensor)
            out.add_(tensor, alpha=weight)
        rows = [lora.rows(key, start, stop, device, float(c[i]))
                for i, lora in self._lora if key in lora.factors and c[i] != 0]
        if rows:
            offset, cols = rows[0][2], rows[0][3]
            left = torch.cat([r[0] for r in rows], dim=1)
            right = torch.cat([r[1] for r in rows], dim=0)
            if offset == 0 and (stop - start) % cols == 0:  # whole rows: accumulate in place, no temporary
                out.view(-1, cols).addmm_(left, right)
            else:
                out.add_((left @ right).reshape(-1)[offset : offset + stop - start])
        return out

    def _raise_nonfinite(self, key: str, start: int, stop: int, c: np.ndarray) -> None:
        for weights in [self._base] + [w for _, w in self._full]:
            if not bool(torch.isfinite(weights.read(key, start, stop)).all()):
                raise ValueError(f"tensor {key!r} of {weights.where(key)} has NaN/inf value(s)")
        raise ValueError(f"merging tensor {key!r} with coefficients {c.tolist()} overflowed to NaN/inf")

    def _pieces(self, coeffs: np.ndarray, method: MergeMethod, desc: str | None, device_of: Mapping[str, torch.device] | None = None,
                keys: Sequence[str] | None = None, groups: Groups | None = None) -> Iterator[tuple[str, int, int, torch.Tensor | None]]:
        """``(key, start, stop, merged fp32 chunk)`` for ``coeffs: (T,)`` or ``(T, G)`` over ``keys``
        (default: all, file order); frozen (integer) tensors come as ``(key, 0, numel, None)``; ``desc``: the
        progress bar's label (``None``: no bar, the caller shows one). Chunks
        are computed on ``device_of[key]`` (default: :attr:`device`); task arithmetic reads the next
        chunk while this one is computed."""
        matrix, per_key = self.coefficients_by_key(coeffs, groups)
        shared = matrix[:, 0]

        def c_of(key: str) -> np.ndarray:
            return shared if per_key is None else per_key[key]

        state = self._fitted(method)
        show = desc is not None and (self.progress if self.progress is not None else self.nbytes >= _PROGRESS_BYTES)
        frozen = set(self._frozen)
        keys = list(self._keys if keys is None else keys)
        work = [(key, start, stop) for key in keys if key not in frozen for start, stop in chunk_ranges(self._shapes[key])]
        # the next chunk is read in a thread while this one is computed (pread releases the GIL):
        # reading and arithmetic overlap. Task arithmetic reads the tasks with c_i != 0, operators all
        every = np.ones(self.num_tasks)
        raws = self._reader.ahead(work, c_of if method.is_identity else (lambda key: every))
        bar = tqdm(total=len(keys), desc=desc, disable=not show, leave=False, unit="tensor")
        try:
            for key in keys:
                bar.update(1)
                if key in frozen:
                    yield key, 0, self._numel[key], None
                    continue
                device = device_of.get(key, self._device) if device_of is not None else self._device
                for start, stop in chunk_ranges(self._shapes[key]):
                    raw = next(raws) if raws is not None else None
                    yield key, start, stop, self._merged_chunk(key, start, stop, c_of(key), method, state, device, raw)
        finally:
            bar.close()
            if raws is not None:
                raws.close()

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None, dtype: torch.dtype | None = None,
              groups: Groups | None = None) -> dict[str, torch.Tensor]:
        """The merged state dict for ``coeffs: (T,)`` in the checkpoint layout on :attr:`device`, each
        tensor in ``dtype`` (default: its pretrained dtype, so a bf16 checkpoint gives bf16 tensors;
        arithmetic is fp32 per chunk). The whole model is built in memory: at scale use
        :meth:`merge_into` or :meth:`save_merged`."""
        method = resolve_method(method)
        state: dict[str, torch.Tensor] = {}
        for key, start, stop, piece in self._pieces(coeffs, method, "merging", groups=groups):
            if piece is None:
                state[key] = self._base.read(key).to(self._device, copy=True)
                continue
            if key not in state:
                state[key] = torch.empty(self._numel[key], dtype=dtype or self._base.tensors[key][0], device=self._device)
            state[key][start:stop] = piece
        state = {k: v.view(self._shapes[k]) for k, v in state.items()}
        for alias, holder in self._base.aliases.items():
            if holder in state:
                state[alias] = state[holder]
        return state

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None, groups: Groups | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` into ``model``'s own tensors, chunk by chunk,
        computed on their device and written in their dtype (fp32 arithmetic). Keys are matched through
        :class:`~map_merge.task_vectors.keymap.LivePlan`: renamed tensors are written in place, fused ones
        (stacked MoE experts) converted by transformers' operations once their sources are merged,
        tied ones written once. Statistics of TIES are computed once per method on :attr:`device`."""
        method = resolve_method(method)
        self.coefficients_by_key(coeffs, groups)  # validated before the model is touched
        writer = LiveWriter(model, self._plan(model), self._numel)
        keys = [key for key in self._keys if writer.plan.writes(key)]  # all but a head a bare base model lacks
        devices = {key: writer.device_of(key) for key in keys}
        with torch.no_grad():
            for key in self._frozen:
                if key in writer.plan.frozen:
                    writer.write_whole(key, self._base.read(key))
            for key, start, stop, piece in self._pieces(coeffs, method, "merging", devices, keys=keys, groups=groups):
                if piece is not None:
                    writer.write(key, start, piece)
            writer.finish()
        return model

    def _plan(self, model: nn.Module) -> LivePlan:
        """The model's :class:`LivePlan`, cached per architecture and key layout."""
        signature = (type(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()))
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plans[signature] = LivePlan(model, self._shapes, self._keys)
        return plan

    def validate(self) -> "StreamedTaskVectors":
        """Read every tensor of every checkpoint once and raise on NaN/inf, naming file and key."""
        for key in tqdm(self._keys, desc="validating", leave=False, unit="tensor"):
            for start, stop in chunk_ranges(self._shapes[key]):
                if not bool(torch.isfinite(self._base.read(key, start, stop)).all()):
                    raise ValueError(f"tensor {key!r} of {self._base.where(key)} has NaN/inf value(s)")
                for _, task in self._full:
                    if not bool(torch.isfinite(task.read(key, start, stop)).all()):
                        raise ValueError(f"tensor {key!r} of {task.where(key)} has NaN/inf value(s)")
        return self

    # ------------------------------------------------------------------ saving
    def _output_entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        return [(k, self._base.tensors[k][0], self._shapes[k]) for k in self._order]

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod, groups: Groups | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for key, _, _, piece in self._pieces(coeffs, method, None, keys=self._order, groups=groups):  # save_merged shows the bar
            yield key, (self._base.read(key) if piece is None else piece.to(self._base.tensors[key][0]))

    def save_merged_adapter(self, path: str | os.PathLike, coeffs: Any, overwrite: bool = False, groups: Groups | None = None) -> Path:
        """Save the task-arithmetic merge of LoRA adapters as one PEFT LoRA adapter (exact).

        ``sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_T s_T B_T] @ [A_1; ...; A_T]``: the factors
        are concatenated (rank = the sum of the ranks, zero-padded to one rank for all modules,
        ``lora_alpha = r`` so the scaling is 1); tensors saved whole (``modules_to_save``) are
        merged and saved whole. Only for storage ``"lora"`` and task arithmetic: a sum of TIES or
        DARE deltas is not low-rank (use :meth:`save_merged` for the full model). The same save
        rules as :meth:`save_merged` (sources protected, ``overwrite``, written then renamed).
        Returns the folder, which ``peft.PeftModel.from_pretrained(base, folder)`` loads."""
        if self.storage != "lora":
            raise ValueError(f"a merged adapter needs every task to be a LoRA adapter (storage 'lora', not {self.storage!r}); "
                             "use save_merged for the full merged model")
        matrix, per_key = self.coefficients_by_key(coeffs, groups)
        target = check_destination(path, self.source_paths(), overwrite)
        adapters = [lora for _, lora in self._lora]
        c_of = {k: (matrix[:, 0] if per_key is None else per_key[k]) for k in self._keys}
        tensors, config = merged_adapter_tensors(adapters, c_of, self._keys, self._shapes, self._base.read)
        from ..groups import coefficient_names

        meta = {"coefficients": dict(zip(coefficient_names(self.names, groups), matrix.reshape(-1).tolist())),
                "method": {"name": "task_arithmetic"}, **({"groups": groups.spec} if groups is not None else {}),
                "task_vectors": self.fingerprint(), "storage": self.storage, "sources": self._source_identities()}
        with atomic_path(target, folder=True) as temp:
            write_safetensors(temp / "adapter_model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                              tensors.items(), {"format": "pt"}, atomic=False)
            (temp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (temp / "map_merge.json").write_text(json.dumps(meta, indent=2, default=str))
        return Path(path)

    # ------------------------------------------------------------------ conversion
    def to_dense(self) -> TaskVectors:
        """The same task vectors held densely in memory (:class:`DenseTaskVectors`)."""
        slots, offset = [], 0
        for key in self._keys:
            slots.append(_Slot(key, self._shapes[key], offset, self._numel[key], self._base.tensors[key][0]))
            offset += self._numel[key]
        base = torch.empty(offset, dtype=self._dtype, device=self._device)
        vectors = torch.empty(self.num_tasks, offset, dtype=self._dtype, device=self._device)
        starts = {s.key: s.offset for s in slots}
        for key in self._keys:
            base[starts[key] : starts[key] + self._numel[key]] = self.base_tensor(key).reshape(-1)
        for key, start, deltas in self.delta_chunks(None, self._device):
            vectors[:, starts[key] + start : starts[key] + start + deltas.shape[1]] = deltas
        frozen = {k: self._base.read(k).view(self._shapes[k]).to(self._device, copy=True) for k in self._frozen}
        from .sources import SourceInfo

        sources = [SourceInfo.of(t) if isinstance(t, Weights) else
                   SourceInfo(f"adapter of {n!r}", [t.adapter.path], None, str(t.adapter.path.resolve()))
                   for n, t in zip(self.names, self._tasks)]
        return DenseTaskVectors(base, vectors, slots, self.names, aliases=self._base.aliases, frozen=frozen,
                                base_weights=SourceInfo.of(self._base), sources=sources)


def _adapter_plan(base: Weights) -> LivePlan | None:
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


def _is_zero(base: Weights, task: Weights | MatchedLora) -> bool:
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
