"""Offline model zoos built reproducibly from what registry packages ship (see README)."""
from .base import Split, Zoo, ZooTask, cache_root
from .vision import VISION_TASKS, SmallCNN, load_vision_zoo

__all__ = ["Split", "Zoo", "ZooTask", "cache_root", "load_zoo", "default_tasks", "load_vision_zoo", "SmallCNN", "VISION_TASKS",
           "load_text_zoo", "TEXT_TASKS", "load_lm_zoo", "LMZoo", "LM_DOMAINS", "LM_SIZES"]


def load_zoo(name: str, tasks=None, progress: bool = True, **kwargs):
    """The bundled zoo called ``name`` with ``tasks`` (default: all): ``"text"`` or ``"vision"``
    (a :class:`Zoo`), or ``"lm"`` (an :class:`~map_merge.zoo.lm.LMZoo`; ``kwargs`` go to
    :func:`~map_merge.zoo.lm.load_lm_zoo`, e.g. ``size="tiny"``)."""
    if name == "lm":
        from .lm import load_lm_zoo

        return load_lm_zoo(tasks, progress=progress, **kwargs)
    if kwargs:
        raise TypeError(f"the {name!r} zoo takes no options {sorted(kwargs)}")
    if name == "vision":
        return load_vision_zoo(tasks, progress=progress)
    if name == "text":
        from .text import load_text_zoo

        return load_text_zoo(tasks, progress=progress)
    raise ValueError(f"unknown zoo {name!r}; choose 'text', 'vision' or 'lm'")


def default_tasks(name: str) -> tuple[str, ...]:
    """The tasks ``load_zoo(name)`` loads when none are named."""
    if name == "vision":
        from .vision import DEFAULT_VISION_TASKS

        return DEFAULT_VISION_TASKS
    if name == "text":
        from .text import TEXT_TASKS

        return TEXT_TASKS
    if name == "lm":
        from .lm_data import LM_DOMAINS

        return tuple(LM_DOMAINS)
    raise ValueError(f"unknown zoo {name!r}; choose 'text', 'vision' or 'lm'")


def __getattr__(name: str):
    if name in ("load_text_zoo", "TEXT_TASKS"):
        from . import text

        return getattr(text, name)
    if name in ("load_lm_zoo", "LMZoo", "LM_SIZES"):
        from . import lm

        return getattr(lm, name)
    if name == "LM_DOMAINS":
        from .lm_data import LM_DOMAINS

        return LM_DOMAINS
    raise AttributeError(name)
