"""The executor protocol and the executor that runs in this process, one item after another."""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

__all__ = ["Executor", "LocalExecutor"]


class Executor(Protocol):
    """Runs ``fn(item)`` calls. ``num_workers``: how many run at once.

    ``submit`` returns a :class:`concurrent.futures.Future`; ``map`` yields ``(index, result)``
    as each finishes (any order)."""

    num_workers: int

    def submit(self, fn: Callable[[Any], Any], item: Any) -> cf.Future: ...

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class LocalExecutor:
    """Evaluates one item after another in this process (``submit`` runs the call at once)."""

    num_workers = 1

    def submit(self, fn: Callable[[Any], Any], item: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(item))
        except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(error)
        return future

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        for index, item in enumerate(items):
            yield index, fn(item)
