"""Task vectors streamed from safetensors checkpoints and PEFT LoRA adapters.

Nothing but headers (and LoRA factors, which are small) is held: each merge walks the
tensors in file order, reads one chunk (at most :data:`~map_merge.merge_methods.CHUNK`
elements) of the pretrained tensor and of every fine-tuned one, computes the merged chunk in
fp32 on the target's device and writes it into the target in its own dtype. Extra memory is a
few chunks, whatever the model's size and the number of tasks.

Task arithmetic takes a fused path: ``(1 - sum_i c_i) theta_0 + sum_i c_i theta_i`` over full
fine-tunes (one multiply-add per task, reading each checkpoint once, skipping ``c_i = 0``) plus
one matrix product ``[c_i s_i B_i]_i @ [A_i]_i`` over all LoRA adapters. TIES and DARE form the
``(T, n)`` deltas of each chunk and map them with the operator (see :mod:`map_merge.merge_methods`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import merge_methods
from ..merge_methods import MergeMethod, resolve_method
from .base import TaskVectors, chunk_ranges
from .sources import (CheckpointWeights, LoraAdapter, LoraFactors, MemoryWeights, Weights, check_finite, is_lora_adapter,
                      open_weights, preview, warn_zero_tasks)

__all__ = ["StreamedTaskVectors"]

log = logging.getLogger(__name__)

_PROGRESS_BYTES = 1 << 30  # show a progress bar over tensors for models at least this large


class _Lora:
    """One adapter matched to the pretrained tensors."""

    def __init__(self, adapter: LoraAdapter, factors: dict[str, LoraFactors], full: dict[str, torch.Tensor]) -> None:
        self.adapter = adapter
        self.factors = factors
        self.full = full
        self._on: dict[torch.device, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def factors_on(self, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` of ``key`` on ``device`` in their stored dtype (copied once per device;
        no copy on the CPU). Callers cast the rows they use to fp32 and apply the scale."""
        f = self.factors[key]
        if f.left.device == device:
            return f.left, f.right
        cache = self._on.setdefault(device, {})
        if key not in cache:
            cache[key] = (f.left.to(device), f.right.to(device))
        return cache[key]


class StreamedTaskVectors(TaskVectors):
    """Task vectors read from disk (or adapters) chunk by chunk at every merge.

    Build with :meth:`TaskVectors.from_models`. ``storage`` is ``"streamed"`` (full fine-tunes),
    ``"lora"`` (adapters only) or ``"mixed"``. :meth:`merge_into` writes into the model's own
    tensors on their own device and in their own dtype. :meth:`validate` reads everything once
    to check for NaN/inf; merges check each merged chunk and name the file and key at fault.
    """

    def __init__(self, base: Weights, tasks: Sequence[Weights | _Lora], names: Sequence[str], device: torch.device,
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
        self._lora = [(i, t) for i, t in enumerate(self._tasks) if isinstance(t, _Lora)]
        kinds = {"full" if isinstance(t, Weights) else "lora" for t in self._tasks}
        self.storage = "mixed" if len(kinds) > 1 else ("lora" if kinds == {"lora"} else "streamed")
        self._state: tuple[str, Any] | None = None  # one-entry cache: (method key, fitted statistics)
        self._fingerprint: str | None = None
        self.progress: bool | None = None  # None: a bar for models of 1 GB or more
        self._work: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._blocks: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._slots: list[list[torch.Tensor]] = []

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
        tasks: list[Weights | _Lora] = []
        for name, model in zip(names, models):
            if is_lora_adapter(model):
                adapter = model if isinstance(model, LoraAdapter) else LoraAdapter(model)
                factors, full = adapter.resolve(base.tensors)
                for key, tensor in full.items():
                    if not tensor.dtype.is_floating_point or not base.tensors[key][0].is_floating_point:
                        raise ValueError(f"tensor {key!r} saved in adapter {adapter.path} for task {name!r} is not floating point")
                tasks.append(_Lora(adapter, factors, full))
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

    def _source_folder(self) -> Path | None:
        return self._base.folder

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

    def _read_slots(self) -> list[list[torch.Tensor]]:
        """Two sets (double buffering) of one byte buffer per checkpoint, for chunk reads."""
        itemsize = max(torch.empty((), dtype=w.tensors[k][0]).element_size() for w in [self._base] + [w for _, w in self._full]
                       for k in self._keys)
        size = merge_methods.CHUNK * itemsize
        if not self._slots or self._slots[0][0].numel() < size:
            self._slots = [[torch.empty(size, dtype=torch.uint8) for _ in range(1 + len(self._full))] for _ in range(2)]
        return self._slots

    def _read_base(self, key: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """The pretrained chunk as a new fp32 tensor on ``device`` (safe to modify)."""
        raw = self._base.read(key, start, stop)
        out = torch.empty(stop - start, dtype=torch.float32, device=device)
        out.copy_(raw)
        return out

    def _lora_rows(self, lora: _Lora, key: str, start: int, stop: int, device: torch.device, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(scale * s * left rows, right, offset, cols)`` covering elements ``[start, stop)``."""
        left, right = lora.factors_on(key, device)
        cols = right.shape[1]
        row0, row1 = start // cols, -(-stop // cols)
        scale = scale * lora.factors[key].scale
        return left[row0:row1].to(torch.float32) * scale, right.to(torch.float32), start - row0 * cols, cols

    def _delta(self, index: int, key: str, start: int, stop: int, base: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """Task ``index``'s delta chunk in fp32 on ``device`` (``None``: zero)."""
        task = self._tasks[index]
        if isinstance(task, Weights):
            out = task.read(key, start, stop).to(device=device, dtype=torch.float32, copy=True)
            return out.sub_(base)
        out = None
        if key in task.full:
            out = task.full[key].reshape(-1)[start:stop].to(device=device, dtype=torch.float32, copy=True).sub_(base)
        if key in task.factors:
            left, right, offset, _ = self._lora_rows(task, key, start, stop, device)
            product = (left @ right).reshape(-1)[offset : offset + stop - start]
            out = product if out is None else out.add_(product)
        return out

    def _delta_block(self, key: str, start: int, stop: int, device: torch.device, raw: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, deltas (T, n))`` in fp32 on ``device``: new tensors, or (``raw``: the chunks
        :meth:`_read_whole` read ahead for every task) the reused :meth:`_block_buffers`."""
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

    def _read_whole(self, key: str, start: int, stop: int, c: np.ndarray, slot: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor]]]:
        """The raw chunks task arithmetic needs: the pretrained one and ``(c_i, chunk)`` of every
        whole tensor with ``c_i != 0`` (full fine-tunes, tensors an adapter saves whole), read
        into the byte buffers of ``slot`` (one per source) when given."""
        buffers = iter(slot) if slot is not None else None
        take = (lambda: next(buffers)) if buffers is not None else (lambda: None)  # noqa: E731
        base = self._base.read(key, start, stop, take())
        whole = [(float(c[i]), w.read(key, start, stop, take())) for i, w in self._full if c[i] != 0]
        whole += [(float(c[i]), lora.full[key].reshape(-1)[start:stop]) for i, lora in self._lora if key in lora.full and c[i] != 0]
        return base, whole

    def _task_arithmetic_chunk(self, key: str, start: int, stop: int, c: np.ndarray, device: torch.device,
                               raw: tuple[torch.Tensor, list[tuple[float, torch.Tensor]]] | None = None) -> torch.Tensor:
        """``(1 - sum_i c_i) theta_0 + sum_i c_i theta_i`` over whole tensors (full fine-tunes and
        tensors an adapter saves whole) plus one product over every adapter's factors."""
        base_raw, whole = raw if raw is not None else self._read_whole(key, start, stop, c)
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
        rows = [self._lora_rows(lora, key, start, stop, device, float(c[i]))
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

    def _pieces(self, c: np.ndarray, method: MergeMethod, desc: str, device_of: Mapping[str, torch.device] | None = None,
                keys: Sequence[str] | None = None) -> Iterator[tuple[str, int, int, torch.Tensor | None]]:
        """``(key, start, stop, merged fp32 chunk)`` over ``keys`` (default: all, file order);
        frozen (integer) tensors come as ``(key, 0, numel, None)``. Chunks are computed on
        ``device_of[key]`` (default: :attr:`device`)."""
        state = self._fitted(method)
        show = self.progress if self.progress is not None else self.nbytes >= _PROGRESS_BYTES
        frozen = set(self._frozen)
        keys = list(self._keys if keys is None else keys)
        work = [(key, start, stop) for key in keys if key not in frozen for start, stop in chunk_ranges(self._shapes[key])]
        ahead = iter(work)
        # the next chunk is read in a thread while this one is computed (pread releases the GIL):
        # reading and arithmetic overlap. Task arithmetic reads the tasks with c_i != 0, operators all
        reads = c if method.is_identity else np.ones_like(c)
        pool = ThreadPoolExecutor(1) if len(work) > 1 else None
        slots = self._read_slots() if pool is not None else None
        turn = 0
        pending = pool.submit(self._read_whole, *next(ahead), reads, slots[0]) if pool is not None else None
        bar = tqdm(total=len(keys), desc=desc, disable=not show, leave=False, unit="tensor")
        try:
            for key in keys:
                bar.update(1)
                if key in frozen:
                    yield key, 0, self._numel[key], None
                    continue
                device = device_of.get(key, self._device) if device_of is not None else self._device
                for start, stop in chunk_ranges(self._shapes[key]):
                    raw = None
                    if pending is not None:
                        raw = pending.result()
                        following = next(ahead, None)
                        turn = 1 - turn  # the other slot: the chunk in hand is still being computed from this one
                        pending = pool.submit(self._read_whole, *following, reads, slots[turn]) if following is not None else None
                    yield key, start, stop, self._merged_chunk(key, start, stop, c, method, state, device, raw)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def merge(self, coeffs: Any, method: str | MergeMethod | None = None) -> dict[str, torch.Tensor]:
        c, method = self.check_coeffs(coeffs), resolve_method(method)
        state: dict[str, torch.Tensor] = {}
        for key, start, stop, piece in self._pieces(c, method, "merging"):
            if key not in state:
                state[key] = torch.empty(self._numel[key], dtype=self._dtype, device=self._device)
            state[key][start:stop] = piece
        state = {k: v.view(self._shapes[k]) for k, v in state.items()}
        for key in self._frozen:
            state[key] = self._base.read(key).to(self._device, copy=True).view(self._shapes[key])
        return state

    def merge_into(self, model: nn.Module, coeffs: Any, method: str | MergeMethod | None = None) -> nn.Module:
        """Write the merged weights for ``coeffs: (T,)`` into ``model``'s own tensors, chunk by chunk,
        computed on their device and written in their dtype (fp32 arithmetic). Tied tensors are
        written once. Statistics of TIES are computed once per method on :attr:`device`."""
        c, method = self.check_coeffs(coeffs), resolve_method(method)
        targets = self._targets(model)
        flats = {key: tensor.view(-1) for key, tensor in targets.items()}
        with torch.no_grad():
            for key in self._frozen:
                if key in targets:
                    targets[key].copy_(self._base.read(key).view(self._shapes[key]))
            devices = {key: tensor.device for key, tensor in targets.items()}
            for key, start, stop, piece in self._pieces(c, method, "merging", devices):
                flats[key][start:stop].copy_(piece)
        return model

    def _targets(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = model.state_dict(keep_vars=True)
        # a tensor that code under torch.inference_mode() put into the model (e.g. transformers'
        # tie_weights padding a bias, called by an evaluator) cannot be written in place: give the
        # model a normal copy, shared by every key that shared it
        stale = {v.data_ptr(): v for v in state.values() if isinstance(v, torch.Tensor) and v.is_inference()}
        if stale:
            from .dense import _set_tensor

            with torch.inference_mode(False):
                fresh = {ptr: tensor.detach().clone() for ptr, tensor in stale.items()}
            for key, value in state.items():
                if value.data_ptr() in fresh and value.is_inference():
                    _set_tensor(model, key, fresh[value.data_ptr()])
            state = model.state_dict(keep_vars=True)
        missing = [k for k in self._keys if k not in state]
        if missing:
            raise ValueError(f"model {type(model).__name__} does not match the task vectors: missing keys {preview(missing)}")
        owned = {state[k].data_ptr() for k in self._keys}
        extra = [k for k, v in state.items() if k not in self._shapes and v.dtype.is_floating_point and v.data_ptr() not in owned]
        if extra:
            raise ValueError(f"model {type(model).__name__} does not match the task vectors: unexpected keys {preview(extra)}")
        out = {}
        for key in self._keys + self._frozen:
            if key not in state:
                continue
            tensor = state[key].data if isinstance(state[key], nn.Parameter) else state[key]
            if tuple(tensor.shape) != self._shapes[key]:
                raise ValueError(f"shape mismatch for {key!r}: model {tuple(tensor.shape)}, task vectors {self._shapes[key]}")
            if key in self._keys and not tensor.dtype.is_floating_point:
                raise ValueError(f"tensor {key!r} of the model is {tensor.dtype}, not floating point")
            if not tensor.is_contiguous():
                raise ValueError(f"tensor {key!r} of the model is not contiguous; call model.contiguous() parameters first")
            out[key] = tensor
        return out

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

    def _output_pieces(self, coeffs: np.ndarray, method: MergeMethod) -> Iterator[tuple[str, torch.Tensor]]:
        for key, _, _, piece in self._pieces(coeffs, method, "saving", keys=self._order):
            yield key, (self._base.read(key) if piece is None else piece.to(self._base.tensors[key][0]))

    def save_merged_adapter(self, path: str | os.PathLike, coeffs: Any) -> Path:
        """Save the task-arithmetic merge of LoRA adapters as one PEFT LoRA adapter (exact).

        ``sum_i c_i s_i B_i A_i = [c_1 s_1 B_1 | ... | c_T s_T B_T] @ [A_1; ...; A_T]``: the factors
        are concatenated (rank = the sum of the ranks, zero-padded to one rank for all modules,
        ``lora_alpha = r`` so the scaling is 1); tensors saved whole (``modules_to_save``) are
        merged and saved whole. Only for storage ``"lora"`` and task arithmetic: a sum of TIES or
        DARE deltas is not low-rank (use :meth:`save_merged` for the full model).
        Returns the folder, which ``peft.PeftModel.from_pretrained(base, folder)`` loads."""
        if self.storage != "lora":
            raise ValueError(f"a merged adapter needs every task to be a LoRA adapter (storage 'lora', not {self.storage!r}); "
                             "use save_merged for the full merged model")
        c = self.check_coeffs(coeffs)
        adapters = [lora for _, lora in self._lora]
        fan = {bool(lora.adapter.fan_in_fan_out) for lora in adapters}
        if len(fan) > 1:
            raise ValueError("the adapters disagree on fan_in_fan_out; they cannot be saved as one adapter")
        keys = [k for k in self._keys if any(k in lora.factors for lora in adapters)]
        rank = max(sum(lora.factors[k].rank for lora in adapters if k in lora.factors) for k in keys) if keys else 1
        tensors: dict[str, torch.Tensor] = {}
        targets, to_save = [], []
        cpu = torch.device("cpu")
        for key in keys:
            lefts, rights, module, embedding = [], [], None, False
            for (index, lora), weight in zip(self._lora, c):
                if key not in lora.factors:
                    continue
                left, right = lora.factors_on(key, cpu)
                lefts.append(left.to(torch.float32) * (lora.factors[key].scale * float(weight)))
                rights.append(right.to(torch.float32))
                module = lora.factors[key].module
                embedding = embedding or lora.adapter.is_embedding(module)
            left, right = torch.cat(lefts, dim=1), torch.cat(rights, dim=0)
            pad = rank - left.shape[1]
            left = torch.nn.functional.pad(left, (0, pad))
            right = torch.nn.functional.pad(right, (0, 0, 0, pad))
            dtype = next(lora.factors[key].left.dtype for lora in adapters if key in lora.factors)  # the adapters' own
            if embedding:
                tensors[f"base_model.model.{module}.lora_embedding_A"] = left.T.contiguous().to(dtype)
                tensors[f"base_model.model.{module}.lora_embedding_B"] = right.T.contiguous().to(dtype)
            elif fan == {True}:
                tensors[f"base_model.model.{module}.lora_A.weight"] = left.T.contiguous().to(dtype)
                tensors[f"base_model.model.{module}.lora_B.weight"] = right.T.contiguous().to(dtype)
            else:
                tensors[f"base_model.model.{module}.lora_A.weight"] = right.contiguous().to(dtype)
                tensors[f"base_model.model.{module}.lora_B.weight"] = left.contiguous().to(dtype)
            targets.append(module)
        whole = [k for k in self._keys if any(k in lora.full for lora in adapters)]
        for key in whole:
            base = self._base.read(key).to(torch.float32)
            merged = base.clone()
            for (index, lora), weight in zip(self._lora, c):
                if key in lora.full:
                    merged.add_(lora.full[key].reshape(-1).to(torch.float32) - base, alpha=float(weight))
            if key in keys:  # an adapted module's base_layer: the adapter's own base must be the pretrained one
                if not torch.equal(merged, base):
                    raise ValueError(f"adapters replace the base layer of LoRA module {key!r}; no single adapter holds that merge")
                continue
            dtype = next(lora.full[key].dtype for lora in adapters if key in lora.full)
            tensors[f"base_model.model.{key}"] = merged.view(self._shapes[key]).to(dtype)
            to_save.append(key.rsplit(".", 1)[0])
        from .safetensors_io import write_safetensors

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "adapter_model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                          tensors.items(), {"format": "pt"})
        config = dict(adapters[0].adapter.config)
        config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                       "target_modules": sorted(set(targets)), "modules_to_save": sorted(set(to_save)) or None,
                       "init_lora_weights": True})
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        meta = {"coefficients": dict(zip(self.names, c.tolist())), "method": {"name": "task_arithmetic"}, "task_vectors": self.fingerprint(),
                "storage": self.storage}
        (folder / "map_merge.json").write_text(json.dumps(meta, indent=2))
        return folder

    # ------------------------------------------------------------------ conversion
    def to_dense(self) -> TaskVectors:
        """The same task vectors held densely in memory (:class:`DenseTaskVectors`)."""
        from .dense import DenseTaskVectors, _Slot

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
        return DenseTaskVectors(base, vectors, slots, self.names, frozen=frozen, folder=self._base.folder)


def _is_zero(base: Weights, task: Weights | _Lora) -> bool:
    """A cheap test for a zero task vector: the same files as the pretrained model, the same
    tensors in memory, or an adapter whose factors are all zero (PEFT's initialisation)."""
    if isinstance(task, _Lora):
        factors_zero = all(not bool(f.left.any()) or not bool(f.right.any()) for f in task.factors.values())
        return factors_zero and all(torch.equal(t.reshape(-1).to(torch.float32), base.read(k).to(torch.float32))
                                    for k, t in task.full.items())
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
