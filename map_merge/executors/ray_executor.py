"""The public face of the Ray pool: :class:`RayExecutor` checks its settings, starts (or joins) a
Ray runtime and a :class:`~map_merge.executors.pool._Pool` on first use, and stops them."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .pool import _Pool
from .recipe import as_recipe
from .worker import _import_ray

__all__ = ["RayExecutor"]

log = logging.getLogger(__name__)


class RayExecutor:
    """Evaluations on long-lived Ray actors, one per worker, fed from one queue.

    Args:
        num_workers: actors to start (default: as many as the cluster's resources fit at
            ``resources_per_worker``).
        resources_per_worker: Ray resources of one actor, e.g. ``{"CPU": 1}`` (default),
            ``{"GPU": 1}`` or ``{"GPU": 0.25}`` (four workers share a GPU: for models that use a
            quarter of its memory and compute). Other keys are custom Ray resources.
        address: ``None`` starts a local Ray runtime; ``"auto"`` or ``"ray://host:10001"`` joins
            a running cluster (``ray start --head`` on one machine, ``ray start --address=...``
            on the others).
        max_retries: re-queues of an item whose worker died or timed out before the run fails.
        timeout_s: seconds one evaluation may run on a worker (``None``: no bound). Past it the
            worker is killed (``ray.kill``) and replaced, and the item re-queued; a worker's
            first use of an objective (fetching it, building its model) is not counted.
        load_timeout_s: seconds a worker may take to fetch and set up an objective (build its
            model) before it is treated like a hung evaluation: killed and replaced (default an
            hour; ``None``: no bound). It bounds :meth:`prepare` too.
        placement_timeout_s: seconds a new or replacement worker may take to be placed and
            started. One that is not is dropped from the pool; when no worker is left, every
            queued item fails with :class:`WorkerError` saying so.
        init_kwargs: extra arguments for ``ray.init`` (e.g. ``runtime_env``, ``num_cpus``).

    The settings are read at each dispatch: changing ``timeout_s`` or ``max_retries`` on a running
    executor applies to the next evaluations, changing ``resources`` to the next workers started.
    Use as a context manager (or call :meth:`shutdown`) to stop the actors. Results do not
    depend on the executor: the same objective gives the same metrics as with
    :class:`LocalExecutor`.
    """

    def __init__(self, num_workers: int | None = None, resources_per_worker: dict[str, float] | None = None,
                 address: str | None = None, max_retries: int = 2, timeout_s: float | None = None,
                 load_timeout_s: float | None = 3600.0, placement_timeout_s: float = 300.0,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        resources = dict(resources_per_worker) if resources_per_worker is not None else {"CPU": 1.0}
        for key, value in resources.items():
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"resources_per_worker[{key!r}] must be a non-negative number, got {value!r}")
        if resources.get("GPU", 0) > 1 and float(resources["GPU"]) != int(resources["GPU"]):
            raise ValueError(f"a worker takes a fraction of one GPU or a whole number of GPUs, got GPU={resources['GPU']}")
        if num_workers is not None and int(num_workers) < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if int(max_retries) < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        for name, value in (("timeout_s", timeout_s), ("load_timeout_s", load_timeout_s), ("placement_timeout_s", placement_timeout_s)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds or None, got {value!r}")
        self.resources = resources
        self.address = address
        self.max_retries = int(max_retries)
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.load_timeout_s = None if load_timeout_s is None else float(load_timeout_s)
        self.placement_timeout_s = None if placement_timeout_s is None else float(placement_timeout_s)
        self.init_kwargs = dict(init_kwargs or {})
        self._requested = None if num_workers is None else int(num_workers)
        self._ray = None
        self._owns_runtime = False
        self._pool: _Pool | None = None
        self._lock = threading.Lock()
        self._deaths = self._timeouts = 0  # of pools already shut down

    # ------------------------------------------------------------------ life cycle
    @property
    def num_workers(self) -> int:
        return self._start().live_workers()

    @property
    def deaths(self) -> int:
        """Workers that died under an evaluation (since this executor was created)."""
        return self._deaths + (self._pool.deaths if self._pool is not None else 0)

    @property
    def timeouts(self) -> int:
        """Evaluations (or set-ups) timed out (since this executor was created)."""
        return self._timeouts + (self._pool.timeouts if self._pool is not None else 0)

    def _start(self) -> "_Pool":
        with self._lock:
            if self._pool is not None:
                return self._pool
            ray = _import_ray()
            if not ray.is_initialized():
                kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, **self.init_kwargs}
                ray.init(address=self.address, **kwargs)
                self._owns_runtime = True
            self._ray = ray
            count = self._requested if self._requested is not None else self._fit_workers()
            if count < 1:
                raise RuntimeError(f"the Ray cluster has room for no worker with resources {self.resources} "
                                   f"(cluster: {ray.cluster_resources()})")
            self._pool = _Pool(self, ray, count)
            log.info("RayExecutor: %d workers with %s each", count, self.resources)
            return self._pool

    def _fit_workers(self) -> int:
        total = self._ray.cluster_resources()
        counts = []
        for key, amount in self.resources.items():
            if amount > 0:
                counts.append(int(total.get(key, 0.0) / amount + 1e-9))
        return min(counts) if counts else 1

    def shutdown(self) -> None:
        """Stop the dispatcher and the actors (and the local Ray runtime this executor started),
        within seconds whatever is running or queued. Every unfinished future is resolved: queued
        items are cancelled, running and re-queued ones fail with a ``CancelledError``."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            self._deaths += pool.deaths
            self._timeouts += pool.timeouts
        with self._lock:
            if self._owns_runtime and self._ray is not None:
                self._ray.shutdown()
                self._owns_runtime = False

    def __enter__(self) -> "RayExecutor":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ work
    def prepare(self, fn: Callable) -> list[float]:
        """Ship ``fn`` (a :class:`Recipe`, e.g. ``objective.recipe()``, or any callable) to every
        worker and set it up there now; returns each worker's seconds. A worker that takes over
        ``load_timeout_s`` (once placed and idle) or dies is killed and replaced, and
        :class:`WorkerError` names it."""
        return self._start().prepare(as_recipe(fn))

    def submit(self, fn: Callable[[Any], Any], item: Any) -> cf.Future:
        return self._start().submit(as_recipe(fn), item)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as results arrive. If one item fails, items not yet started
        are cancelled, those in flight are still yielded, then the error is raised."""
        recipe = as_recipe(fn)
        futures = {self.submit(recipe, item): index for index, item in enumerate(items)}
        error: BaseException | None = None
        try:
            for future in cf.as_completed(futures):
                if future.cancelled():
                    continue
                failure = future.exception()
                if failure is not None:
                    if error is None:
                        error = failure
                        for other in futures:
                            other.cancel()  # queued ones only; running ones finish and are yielded
                    continue
                yield futures[future], future.result()
        finally:
            for other in futures:
                other.cancel()
        if error is not None:
            raise error

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        """Start a new measurement window for :meth:`stats`."""
        self._start().reset_stats()

    def stats(self) -> dict[str, Any]:
        """Since :meth:`reset_stats` (or start): evaluations, busy seconds and idle share per
        worker and overall, and the driver's overhead per evaluation (round trip minus the
        worker's own time), in seconds; deaths and timeouts since the executor was created."""
        return {**self._start().stats(), "deaths": self.deaths, "timeouts": self.timeouts}

    def __repr__(self) -> str:
        state = f"{len(self._pool.slots)} workers" if self._pool is not None else "not started"
        return f"RayExecutor({state}, resources_per_worker={self.resources}, address={self.address!r}, timeout_s={self.timeout_s})"
