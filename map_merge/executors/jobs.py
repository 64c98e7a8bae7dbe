"""The Ray pool's bookkeeping: a recipe shipped to Ray's object store, a queued job, a worker's
slot, and how their futures are settled and their items named in messages."""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__: list[str] = []


def _shown(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return str(np.round(item.astype(float), 6).tolist())
    text = repr(item)
    return text if len(text) <= 200 else text[:197] + "..."


def _settle(future: cf.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve ``future`` unless something else already did (the dispatcher and ``shutdown`` race)."""
    try:
        if not future.running() and not future.done():
            if not future.set_running_or_notify_cancel():
                return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except (cf.InvalidStateError, RuntimeError):
        pass


@dataclass
class _Shipment:
    """A recipe in Ray's object store: its keys and boxed references (a list stops Ray from
    resolving the reference before the worker asks for it)."""

    base_key: str
    base_box: list
    key: str
    parts_box: list


@dataclass
class _Job:
    ship: _Shipment
    item: Any
    future: cf.Future
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    timeouts: int = 0
    dispatched: float = 0.0


@dataclass
class _Slot:
    index: int
    actor: Any
    state: str = "starting"  # "starting" (being placed), "ready", "gone" (could not be placed)
    job: _Job | None = None
    phase: str | None = None  # what its in-flight call does: "start", "load" or "run"
    ref: Any = None
    deadline: float | None = None
    loaded: frozenset = frozenset()  # recipe keys the worker holds (its answer to the last load)
    evaluations: int = 0
    busy: float = 0.0
    started: float = field(default_factory=time.time)
    info: dict = field(default_factory=dict)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
