"""Task vectors behind one :class:`TaskVectors`: dense in memory, streamed from safetensors,
or LoRA adapters kept as factors (see :mod:`map_merge.task_vectors.base`). Keys are mapped
between checkpoint files, live modules and adapters in :mod:`map_merge.task_vectors.keymap`."""

from .base import TaskVectors
from .dense import DenseTaskVectors
from .lora import LoraAdapter
from .sources import ModelSource, load_state_dict
from .streamed import StreamedTaskVectors

__all__ = ["TaskVectors", "DenseTaskVectors", "StreamedTaskVectors", "LoraAdapter", "ModelSource", "load_state_dict"]
