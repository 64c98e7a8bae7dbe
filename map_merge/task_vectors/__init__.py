"""Task vectors behind one :class:`TaskVectors`: dense in memory, streamed from safetensors,
or LoRA adapters kept as factors (see :mod:`map_merge.task_vectors.base`)."""

from .base import TaskVectors
from .dense import DenseTaskVectors
from .sources import LoraAdapter, ModelSource, load_state_dict
from .streamed import StreamedTaskVectors

__all__ = ["TaskVectors", "DenseTaskVectors", "StreamedTaskVectors", "LoraAdapter", "ModelSource", "load_state_dict"]
