"""What a streamed storage writes out (:class:`StreamedOutput`, a part of
:class:`~map_merge.task_vectors.streamed.StreamedTaskVectors`): the merged model's tensors for
:meth:`~map_merge.TaskVectors.save_merged`, the merged LoRA adapter, and the dense copy."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..groups import Groups
from ..merge_methods import MergeMethod
from .dense import DenseTaskVectors
from .dense_load import Slot
from .lora import MatchedLora, merged_adapter_tensors
from .safetensors_io import write_safetensors
from .saving import atomic_path, check_destination
from .sources import Weights

__all__ = ["StreamedOutput"]


class StreamedOutput:
    """Saving and conversion for :class:`~map_merge.task_vectors.streamed.StreamedTaskVectors`
    (which sets the attributes below and gives the merged pieces, ``_pieces``)."""

    names: tuple[str, ...]
    num_tasks: int
    storage: str
    _base: Weights
    _tasks: list[Weights | MatchedLora]
    _lora: list[tuple[int, MatchedLora]]
    _order: tuple[str, ...]
    _keys: tuple[str, ...]
    _frozen: tuple[str, ...]
    _shapes: dict[str, tuple[int, ...]]
    _numel: dict[str, int]
    _device: torch.device
    _dtype: torch.dtype

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
        with atomic_path(target, folder=True, overwrite=overwrite) as temp:
            write_safetensors(temp / "adapter_model.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()],
                              tensors.items(), {"format": "pt"}, atomic=False)
            (temp / "adapter_config.json").write_text(json.dumps(config, indent=2))
            (temp / "map_merge.json").write_text(json.dumps(meta, indent=2, default=str))
        return Path(path)

    # ------------------------------------------------------------------ conversion
    def to_dense(self) -> DenseTaskVectors:
        """The same task vectors held densely in memory (:class:`DenseTaskVectors`)."""
        slots, offset = [], 0
        for key in self._keys:
            slots.append(Slot(key, self._shapes[key], offset, self._numel[key], self._base.tensors[key][0]))
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
