"""Offline model zoos built reproducibly from what registry packages ship (see README)."""
from .base import Split, Zoo, ZooTask, cache_root
from .vision import VISION_TASKS, SmallCNN, load_vision_zoo

__all__ = ["Split", "Zoo", "ZooTask", "cache_root", "load_zoo", "default_tasks", "load_vision_zoo", "SmallCNN", "VISION_TASKS", "load_text_zoo", "TEXT_TASKS"]


def load_zoo(name: str, tasks=None, progress: bool = True) -> Zoo:
    """The bundled zoo called ``name`` (``"text"`` or ``"vision"``) with ``tasks`` (default: all)."""
    if name == "vision":
        return load_vision_zoo(tasks, progress=progress)
    if name == "text":
        from .text import load_text_zoo

        return load_text_zoo(tasks, progress=progress)
    raise ValueError(f"unknown zoo {name!r}; choose 'text' or 'vision'")


def default_tasks(name: str) -> tuple[str, ...]:
    """The tasks ``load_zoo(name)`` loads when none are named."""
    if name == "vision":
        from .vision import DEFAULT_VISION_TASKS

        return DEFAULT_VISION_TASKS
    if name == "text":
        from .text import TEXT_TASKS

        return TEXT_TASKS
    raise ValueError(f"unknown zoo {name!r}; choose 'text' or 'vision'")


def __getattr__(name: str):
    if name in ("load_text_zoo", "TEXT_TASKS"):
        from . import text

        return getattr(text, name)
    raise AttributeError(name)
