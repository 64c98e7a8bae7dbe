"""The Ray actor's body: a worker holds recipe bases (one live model each) and parts by content
key, sets each up once and runs evaluations, sending any exception back with its traceback."""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import EvaluationError

__all__: list[str] = []


def _import_ray():
    try:
        import ray
    except ImportError as error:  # pragma: no cover - exercised where ray is missing
        raise ImportError("RayExecutor needs Ray: pip install 'map_merge[ray]' (or pip install 'ray>=2.9')") from error
    return ray


class _Worker:
    """The actor body (wrapped by ``ray.remote`` at start-up): holds recipe bases and parts by key."""

    def __init__(self, index: int, bases_kept: int = 2, parts_kept: int = 64) -> None:
        self.index = index
        self.bases_kept, self.parts_kept = bases_kept, parts_kept
        self.bases: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self.parts: collections.OrderedDict[str, tuple[str, Callable, Any]] = collections.OrderedDict()
        self.created = time.time()

    def describe(self) -> dict:
        import socket

        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(), "created": self.created,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _evaluator(self, base_key: str, base_box: list, key: str, parts_box: list) -> tuple[Any, Callable, Any]:
        import ray

        base = self.bases.get(base_key)
        if base is None:
            base, setup = ray.get(base_box[0])  # fetched once per worker, never once per evaluation
            if setup is not None:
                setup(base)
            self.bases[base_key] = base
            while len(self.bases) > self.bases_kept:
                self.bases.popitem(last=False)
                _free_accelerator_memory()
        self.bases.move_to_end(base_key)
        entry = self.parts.get(key)
        if entry is None:
            run, parts = ray.get(parts_box[0])
            entry = self.parts[key] = (base_key, run, parts)
            while len(self.parts) > self.parts_kept:
                self.parts.popitem(last=False)
        self.parts.move_to_end(key)
        return base, entry[1], entry[2]

    def _held(self) -> list[str]:
        return [key for key, (base_key, _, _) in self.parts.items() if base_key in self.bases]

    def load(self, base_key: str, base_box: list, key: str, parts_box: list) -> list[str]:
        """Fetch and set up a recipe now; returns the recipe keys this worker holds."""
        try:
            self._evaluator(base_key, base_box, key, parts_box)
        except BaseException as error:  # noqa: BLE001 - sent back with the traceback
            raise _worker_error(self.index, "setting up the objective", error) from None
        return self._held()

    def run(self, base_key: str, base_box: list, key: str, parts_box: list, item: Any) -> tuple[Any, float, float, list[str]]:
        """``(result, start, end, recipe keys held)``: the keys tell the driver what this worker
        still holds (a recipe set up here may have evicted another one)."""
        try:
            base, run, parts = self._evaluator(base_key, base_box, key, parts_box)
        except BaseException as error:  # noqa: BLE001 - sent back with the traceback
            raise _worker_error(self.index, "setting up the objective", error) from None
        if isinstance(item, np.ndarray):
            item = item.copy()  # Ray hands arrays over read-only
        start = time.time()
        try:
            value = run(base, parts, item)
        except BaseException as error:  # noqa: BLE001 - sent back with the traceback, never swallowed
            raise _worker_error(self.index, "evaluating", error) from None
        return value, start, time.time(), self._held()


def _worker_error(index: int, what: str, error: BaseException) -> EvaluationError:
    import traceback

    return EvaluationError(f"{type(error).__name__}: {error}\n--- worker {index} (pid {os.getpid()}) traceback, {what} ---\n"
                           + "".join(traceback.format_exception(error)))


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass
