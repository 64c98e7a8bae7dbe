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

The class is built of parts, one module each: opening and checking the sources
(:mod:`.streamed_open`), reading chunks (:mod:`.streamed_chunks`), writing out
(:mod:`.streamed_output`); here are its state and the merges.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from .keymap import LivePlan
from .lora import MatchedLora
from .reader import ChunkReader
from .sources import CheckpointWeights, Weights, is_lora_adapter, warn_zero_tasks
from .streamed_chunks import StreamedChunks
from .streamed_open import adapter_plan, is_zero_task, match_adapter, open_base, open_finetune
from .streamed_output import StreamedOutput

__all__ = ["StreamedTaskVectors"]

log = logging.getLogger(__name__)

_PROGRESS_BYTES = 1 << 30  # show a progress bar over tensors for models at least this large


class StreamedTaskVectors(StreamedChunks, StreamedOutput, TaskVectors, kind="streamed"):
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
        base = open_base(pretrained)
        plan = adapter_plan(base) if any(is_lora_adapter(m) for m in models) else None
        tasks: list[Weights | MatchedLora] = []
        for name, model in zip(names, models):
            if is_lora_adapter(model):
                tasks.append(match_adapter(model, name, base, plan))
                warn_if_other_base(tasks[-1].adapter.path, tasks[-1].adapter.base_model, pretrained)
            else:
                tasks.append(open_finetune(model, name, base))
        warn_zero_tasks(names, [is_zero_task(base, task) for task in tasks])
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
