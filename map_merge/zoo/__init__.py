"""Offline model zoos built reproducibly from what registry packages ship (see README)."""
from .base import Split, Zoo, ZooTask, cache_root
from .vision import VISION_TASKS, SmallCNN, load_vision_zoo

__all__ = ["Split", "Zoo", "ZooTask", "cache_root", "load_vision_zoo", "SmallCNN", "VISION_TASKS", "load_text_zoo", "TEXT_TASKS"]


def __getattr__(name: str):
    if name in ("load_text_zoo", "TEXT_TASKS"):
        from . import text

        return getattr(text, name)
    raise AttributeError(name)
