"""Executors: where evaluations run. Local (this process, one at a time) or on Ray (many workers).

An executor takes work as ``submit(fn, item) -> concurrent.futures.Future`` and offers
``map(fn, items) -> Iterator[(index, result)]`` (results in the order they finish). Objectives
(:class:`~map_merge.objective.Objective`) send their evaluator through it and write each result
to their store the moment it comes back, in the driver; workers never touch the store.

An objective's evaluator is a :class:`Recipe`: a heavy ``base`` (what builds the live model, its
task vectors and merge method) and light ``parts`` bound to it (the tasks). Locally a recipe is
just called. :class:`RayExecutor` keeps one long-lived actor per worker and ships each base and
each set of parts once, keyed by a content fingerprint; a worker holds one base (one model) per
distinct key, so objectives that differ only in their tasks (``for_tasks`` subsets) share it.
Each evaluation then sends only a coefficient vector. A dispatcher thread hands the next queued
item to whichever worker is free. A worker that dies, or whose evaluation runs past
``timeout_s``, is killed and replaced and its item re-queued (``max_retries`` times, then
:class:`WorkerError` naming the item); an exception raised by the evaluator comes back as
:class:`EvaluationError` carrying the worker's traceback.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "Recipe", "EvaluationError", "WorkerError"]

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """An evaluation raised on a worker; the message carries the item and the worker's traceback."""


class WorkerError(RuntimeError):
    """An item's worker died or timed out more often than the retries allow, or no worker could
    be placed to run it."""


class Executor(Protocol):
    """Runs ``fn(item)`` calls. ``num_workers``: how many run at once.

    ``submit`` returns a :class:`concurrent.futures.Future`; ``map`` yields ``(index, result)``
    as each finishes (any order)."""

    num_workers: int

    def submit(self, fn: Callable[[Any], Any], item: Any) -> cf.Future: ...

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]: ...


class Recipe:
    """An evaluator in two parts: ``recipe(item) == run(base, parts, item)``.

    Args:
        run: ``run(base, parts, item) -> result``; a module-level function (pickled by name).
        base: the heavy part, e.g. a live model with its task vectors and merge method.
        parts: the light part bound to it, e.g. the tasks.
        ids: ``ids() -> (base_id, parts_id)``: picklable content that identifies ``base`` and
            ``parts`` (default: the parts themselves). Recipes with equal ``base_id`` share one
            base on a worker. Called only when the recipe is shipped, once.
        setup: ``setup(base)``, run once where a base arrives, before its first evaluation
            (e.g. builds the model); ``None``: nothing.

    Executors that run in this process just call it. :class:`RayExecutor` ships ``base`` and
    ``parts`` separately, each once, keyed by a hash of the pickled ids (:meth:`keys`).
    """

    def __init__(self, run: Callable[[Any, Any, Any], Any], base: Any, parts: Any = None,
                 ids: Callable[[], tuple[Any, Any]] | None = None, setup: Callable[[Any], Any] | None = None) -> None:
        self.run, self.base, self.parts, self.ids, self.setup = run, base, parts, ids, setup
        self._keys: tuple[str, str] | None = None

    def __call__(self, item: Any) -> Any:
        return self.run(self.base, self.parts, item)

    def keys(self) -> tuple[str, str]:
        """``(base_key, key)``: content fingerprints of the base, and of the whole recipe (base,
        parts, run and setup). Computed once per recipe object."""
        if self._keys is None:
            dumps = _dumps()
            base_id, parts_id = self.ids() if self.ids is not None else (self.base, self.parts)
            base_key = hashlib.blake2b(dumps(("base", base_id)), digest_size=16).hexdigest()
            whole = hashlib.blake2b(digest_size=16)
            for part in (base_key.encode(), dumps(self.run), dumps(self.setup), dumps(parts_id)):
                whole.update(len(part).to_bytes(8, "little"))
                whole.update(part)
            self._keys = (base_key, whole.hexdigest())
        return self._keys

    def __repr__(self) -> str:
        return f"Recipe({getattr(self.run, '__qualname__', self.run)!r}, base={type(self.base).__name__})"


def _dumps() -> Callable[[Any], bytes]:
    try:
        from ray import cloudpickle
    except ImportError:
        try:
            import cloudpickle
        except ImportError:
            import pickle

            return pickle.dumps
    return cloudpickle.dumps


def _call(fn: Callable[[Any], Any], _parts: Any, item: Any) -> Any:
    return fn(item)


def as_recipe(fn: Callable[[Any], Any]) -> Recipe:
    """``fn`` itself if it is a :class:`Recipe`, else a recipe whose base is ``fn``."""
    return fn if isinstance(fn, Recipe) else Recipe(_call, fn)


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


# --------------------------------------------------------------------------- Ray
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


class _Pool:
    """The workers of a started :class:`RayExecutor` and the dispatcher thread that feeds them.

    Each slot's one call in flight moves it through phases: ``start`` (being placed, bounded by
    ``placement_timeout_s``), ``load`` (first use of a recipe, ``load_timeout_s``) and ``run``
    (one evaluation, ``timeout_s``). A slot past its deadline, or whose actor died, is handled
    here: its worker replaced and its item re-queued, or the slot dropped."""

    def __init__(self, settings: RayExecutor, ray: Any, count: int) -> None:
        self.settings, self.ray = settings, ray
        self.remote = ray.remote(_Worker)
        self.slots: list[_Slot] = []
        self.queue: collections.deque[_Job] = collections.deque()
        self.in_flight: dict[Any, _Slot] = {}
        self.shipped: collections.OrderedDict[str, Any] = collections.OrderedDict()  # content key -> object ref
        self.lock = threading.RLock()
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.worker_count = 0
        self.window_start = time.time()
        self.latency: list[float] = []  # per evaluation: round trip seen by the driver minus the worker's time
        self.deaths = self.timeouts = 0
        self.broken: BaseException | None = None
        with self.lock:
            for index in range(count):
                slot = _Slot(index, None)
                self._launch(slot)
                self.slots.append(slot)
        self.thread = threading.Thread(target=self._dispatch_loop, name="map_merge-ray-dispatcher", daemon=True)
        self.thread.start()

    def live_workers(self) -> int:
        return sum(slot.state != "gone" for slot in self.slots)

    def _no_worker_left(self) -> bool:
        return bool(self.slots) and all(slot.state == "gone" for slot in self.slots)

    def _launch(self, slot: _Slot) -> None:
        """A new actor in ``slot``, being placed: its ``describe`` call is in flight with the
        placement deadline."""
        options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        resources = dict(self.settings.resources)
        options["num_cpus"] = resources.pop("CPU", 0.0 if "GPU" in resources else 1.0)
        if "GPU" in resources:
            options["num_gpus"] = resources.pop("GPU")
        if "memory" in resources:
            options["memory"] = resources.pop("memory")
        if resources:
            options["resources"] = resources
        self.worker_count += 1
        slot.actor = self.remote.options(**options).remote(self.worker_count - 1)
        slot.state, slot.loaded, slot.info, slot.started = "starting", frozenset(), {"index": slot.index, "pid": "?", "host": "?"}, time.time()
        self._send(slot, "start", slot.actor.describe.remote(), self.settings.placement_timeout_s)

    def _send(self, slot: _Slot, phase: str, ref: Any, timeout: float | None) -> None:
        slot.phase, slot.ref = phase, ref
        slot.deadline = None if timeout is None else time.time() + timeout
        self.in_flight[ref] = slot

    def close(self) -> None:
        """Stop the dispatcher, kill the actors and resolve every unfinished future."""
        self.stop.set()
        self.wake.set()
        self.thread.join(timeout=5)
        with self.lock:
            jobs = list(self.queue) + [slot.job for slot in self.slots if slot.job is not None]
            self.queue.clear()
            for slot in self.slots:
                slot.job = None
                try:
                    self.ray.kill(slot.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self.in_flight.clear()
            self.shipped.clear()
        for job in jobs:
            if not job.future.cancel():
                _settle(job.future, error=cf.CancelledError(f"the executor was shut down while {_shown(job.item)} was running"))

    # ------------------------------------------------------------------ work
    def _ship(self, recipe: Recipe) -> _Shipment:
        """Put a recipe's base and parts into Ray's object store, each once per content key."""
        base_key, key = recipe.keys()
        with self.lock:
            base_ref = self.shipped.get(base_key)
            if base_ref is None:
                base_ref = self.shipped[base_key] = self.ray.put((recipe.base, recipe.setup))
            parts_ref = self.shipped.get(key)
            if parts_ref is None:
                parts_ref = self.shipped[key] = self.ray.put((recipe.run, recipe.parts))
            for used in (base_key, key):
                self.shipped.move_to_end(used)
            while len(self.shipped) > 64:  # refs in queued jobs keep their objects alive
                self.shipped.popitem(last=False)
        return _Shipment(base_key, [base_ref], key, [parts_ref])

    def prepare(self, recipe: Recipe) -> list[float]:
        """Set ``recipe`` up on every live worker now; each worker's seconds, in slot order.

        A worker's own clock starts once it is placed and idle (a call queued behind its placement or
        an evaluation waits for them); past ``load_timeout_s`` the worker is killed and replaced, like
        a hung set-up under :meth:`submit`, and :class:`WorkerError` names it. A worker that dies
        meanwhile is replaced too (:class:`WorkerError`); one the dispatcher replaced or dropped
        meanwhile is left out (its replacement sets the recipe up on first use)."""
        ship = self._ship(recipe)
        load = self.settings.load_timeout_s
        calls: dict[Any, tuple[_Slot, Any]] = {}
        with self.lock:
            for slot in self.slots:
                if slot.state != "gone":
                    calls[slot.actor.load.remote(ship.base_key, ship.base_box, ship.key, ship.parts_box)] = (slot, slot.actor)
        starts = time.time()
        clock = dict.fromkeys(calls, starts)  # when each call's own wait began
        seconds: dict[int, float] = {}
        pending = list(calls)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=len(pending), timeout=0.25, fetch_local=True)
            for ref in ready:
                slot, actor = calls[ref]
                try:
                    held = self.ray.get(ref)
                except self.ray.exceptions.RayTaskError:
                    raise  # the set-up raised: an EvaluationError with the worker's traceback
                except Exception as error:  # noqa: BLE001 - the worker died (or was replaced by the dispatcher)
                    if self._replace_idle(slot, actor, f"died while setting up the objective: {type(error).__name__}: "
                                                          f"{_first_line(error)}", timed_out=False):
                        raise WorkerError(f"preparing the objective failed: {self._worker_name(slot)} died while setting it "
                                          f"up ({type(error).__name__}: {_first_line(error)}); it was replaced") from None
                    continue
                with self.lock:
                    if slot.actor is actor:
                        slot.loaded = frozenset(held)
                        seconds[slot.index] = time.time() - starts
            now = time.time()
            late = []
            with self.lock:
                for ref in list(pending):
                    slot, actor = calls[ref]
                    if slot.actor is not actor or slot.state == "gone":
                        pending.remove(ref)  # replaced or dropped meanwhile: its call never finishes
                    elif slot.state == "starting" or slot.phase is not None:
                        clock[ref] = now  # queued behind the worker's placement or the dispatcher's call
                    elif load is not None and now - clock[ref] > load:
                        late.append((slot, actor))
            if late:
                names = [self._worker_name(slot) for slot, _ in late]
                for slot, actor in late:
                    self._replace_idle(slot, actor, f"setting up the objective took over load_timeout_s={load:g} s", timed_out=True)
                raise WorkerError(f"preparing the objective failed: {', '.join(names)} did not finish setting it up within "
                                  f"load_timeout_s={load:g} s; {'it was' if len(late) == 1 else 'they were'} killed and replaced "
                                  "(a replacement sets the objective up on first use)")
        return [seconds[slot.index] for slot, _ in calls.values() if slot.index in seconds]

    def _replace_idle(self, slot: _Slot, actor: Any, reason: str, timed_out: bool) -> bool:
        """Replace ``slot``'s worker if it is still ``actor``; whether it was (a job the dispatcher
        gave it meanwhile is re-queued, within its retries)."""
        with self.lock:  # held throughout (re-entrant): the dispatcher cannot replace it in between
            if slot.actor is not actor or slot.state == "gone":
                return False
            log.warning("%s %s; killed and replaced", self._worker_name(slot), reason)
            self._replace(slot, slot.job, reason, timed_out=timed_out)
            return True

    def submit(self, recipe: Recipe, item: Any) -> cf.Future:
        if self.broken is not None:
            raise RuntimeError(f"this RayExecutor's dispatcher failed ({type(self.broken).__name__}: {self.broken}); create a new one")
        ship = self._ship(recipe)
        future: cf.Future = cf.Future()
        with self.lock:
            if self._no_worker_left():
                _settle(future, error=WorkerError(f"evaluating {_shown(item)} failed: no worker is left to run it (every worker "
                                                  f"could not be placed within placement_timeout_s={self.settings.placement_timeout_s:g} s)"))
                return future
            self.queue.append(_Job(ship, item, future))
        self.wake.set()
        return future

    # ------------------------------------------------------------------ dispatcher
    def _dispatch_loop(self) -> None:
        while not self.stop.is_set():
            try:
                self.wake.clear()
                with self.lock:
                    self._assign()
                    refs = list(self.in_flight)
                if not refs:
                    self.wake.wait(timeout=0.5)
                    continue
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=0.05, fetch_local=False)
                for ref in ready:
                    self._complete(ref)
                self._check_deadlines()
            except BaseException as error:  # noqa: BLE001 - never leave futures hanging on a dead dispatcher
                if self.stop.is_set():
                    return
                log.exception("RayExecutor dispatcher failed")
                self._fail_all(error)
                return

    def _fail_all(self, error: BaseException) -> None:
        with self.lock:
            jobs = list(self.queue) + [slot.job for slot in self.slots if slot.job is not None]
            self.queue.clear()
            self.in_flight.clear()
            for slot in self.slots:
                slot.job = None
            self.broken = error
        for job in jobs:
            _settle(job.future, error=RuntimeError(f"the Ray dispatcher failed while {_shown(job.item)} was queued: "
                                                  f"{type(error).__name__}: {error}"))

    def _assign(self) -> None:
        for slot in self.slots:
            if slot.state != "ready" or slot.job is not None:
                continue
            job = None
            while self.queue:
                candidate = self.queue.popleft()
                # a re-queued job is already running; a fresh one may have been cancelled meanwhile
                if candidate.attempts > 0 or candidate.future.set_running_or_notify_cancel():
                    job = candidate
                    break
            if job is None:
                return
            slot.job = job
            ship = job.ship
            if ship.key in slot.loaded:
                self._run(slot)
            else:  # the worker's first use of this recipe: set up (build the model), not timed as an evaluation
                self._send(slot, "load", slot.actor.load.remote(ship.base_key, ship.base_box, ship.key, ship.parts_box),
                           self.settings.load_timeout_s)

    def _run(self, slot: _Slot) -> None:
        job, ship = slot.job, slot.job.ship
        job.dispatched = time.time()
        self._send(slot, "run", slot.actor.run.remote(ship.base_key, ship.base_box, ship.key, ship.parts_box, job.item),
                   self.settings.timeout_s)

    def _worker_name(self, slot: _Slot) -> str:
        return f"worker {slot.info.get('index', slot.index)} (pid {slot.info.get('pid')}, {slot.info.get('host')})"

    def _complete(self, ref: Any) -> None:
        with self.lock:
            slot = self.in_flight.pop(ref, None)
            if slot is None or slot.ref is not ref:
                return  # a call of a worker already replaced
            phase, job = slot.phase, slot.job
            slot.phase = slot.ref = slot.deadline = None
        try:
            value = self.ray.get(ref)
        except Exception as error:  # noqa: BLE001 - sorted out below; never left unreported
            self._failed(slot, phase, job, error)
            return
        with self.lock:
            if phase == "start":
                slot.info, slot.state, slot.started = value, "ready", time.time()
                return
            if phase == "load":
                slot.loaded = frozenset(value)
                self._run(slot)
                return
            result, started, finished, held = value
            slot.loaded = frozenset(held)
            now = time.time()
            slot.evaluations += 1
            slot.busy += finished - max(started, self.window_start)
            self.latency.append(max(0.0, (now - job.dispatched) - (finished - started)))
            slot.job = None
        _settle(job.future, result=result)

    def _failed(self, slot: _Slot, phase: str | None, job: _Job | None, error: BaseException) -> None:
        ray = self.ray
        if phase == "start":  # a worker that fails to start is dropped, whatever the failure
            self._lose(slot, f"it could not be started: {type(error).__name__}: {_first_line(error)}")
            return
        if isinstance(error, ray.exceptions.RayTaskError):  # the evaluator (or the objective's set-up) raised
            cause = getattr(error, "cause", None)
            message = str(cause) if isinstance(cause, EvaluationError) else str(error)
            failure = EvaluationError(f"evaluating {_shown(job.item) if job else '?'} failed on {self._worker_name(slot)}: {message}")
        else:  # any other failure is the worker's (died, its node died, unschedulable, out of memory, unreachable):
            # replace it and re-queue the item, within max_retries; a worker left in the pool would take the next items
            self._replace(slot, job, f"{type(error).__name__}: {_first_line(error)}", timed_out=False)
            return
        with self.lock:
            slot.job = None
        if job is not None:
            _settle(job.future, error=failure)

    def _check_deadlines(self) -> None:
        now = time.time()
        with self.lock:
            late = [slot for slot in self.slots if slot.deadline is not None and now > slot.deadline]
        settings = self.settings
        for slot in late:
            if slot.phase == "start":
                self._lose(slot, f"it could not be placed within placement_timeout_s={settings.placement_timeout_s:g} s "
                                 f"(resources per worker {settings.resources}; free in the cluster: {self._free_resources()})")
            elif slot.phase == "load":
                self._replace(slot, slot.job, f"setting up the objective took over load_timeout_s={settings.load_timeout_s:g} s",
                              timed_out=True)
            elif slot.phase == "run":
                self._replace(slot, slot.job, f"timed out after timeout_s={settings.timeout_s:g} s", timed_out=True)

    def _free_resources(self) -> dict:
        try:
            return {k: round(v, 3) for k, v in self.ray.available_resources().items() if not k.startswith("node:")}
        except Exception:  # noqa: BLE001 - only for the message
            return {}

    def _replace(self, slot: _Slot, job: _Job | None, reason: str, timed_out: bool) -> None:
        """Kill the worker in ``slot``, start a fresh one there and re-queue (or fail) its job."""
        name = self._worker_name(slot)
        retries = self.settings.max_retries
        with self.lock:
            self.in_flight.pop(slot.ref, None)
            if timed_out:
                self.timeouts += 1
            else:
                self.deaths += 1
            try:
                self.ray.kill(slot.actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
            slot.job = None
            self._launch(slot)
            if job is None:
                return
            job.attempts += 1
            job.timeouts += int(timed_out)
            job.failures.append(f"{name}: {reason}")
            log.warning("%s %s while evaluating %s; re-queued (attempt %d of %d)", name, "timed out" if timed_out else "died",
                        _shown(job.item), job.attempts, retries + 1)
            if job.attempts <= retries:
                self.queue.appendleft(job)
                return
        deaths = job.attempts - job.timeouts
        what = ("its worker died" if job.timeouts == 0 else
                f"it timed out (timeout_s={self.settings.timeout_s:g})" if deaths == 0 else "its worker died or timed out")
        _settle(job.future, error=WorkerError(f"evaluating {_shown(job.item)} failed: {what} {job.attempts} time{'s' * (job.attempts != 1)} "
                                              f"(max_retries={retries}): " + "; ".join(job.failures)))

    def _lose(self, slot: _Slot, reason: str) -> None:
        """Drop a worker that could not be placed; with none left, fail every queued item."""
        with self.lock:
            self.in_flight.pop(slot.ref, None)
            try:
                self.ray.kill(slot.actor)
            except Exception:  # noqa: BLE001 - never started
                pass
            slot.state, slot.phase, slot.ref, slot.deadline = "gone", None, None, None
            log.warning("RayExecutor worker slot %d dropped: %s", slot.index, reason)
            if any(s.state != "gone" for s in self.slots):
                return
            jobs = list(self.queue)
            self.queue.clear()
        for job in jobs:
            _settle(job.future, error=WorkerError(f"evaluating {_shown(job.item)} failed: no worker is left to run it; the last "
                                                  f"one was dropped because {reason}"
                                                  + (f"; earlier: {'; '.join(job.failures)}" if job.failures else "")))

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        with self.lock:
            self.window_start = time.time()
            self.latency = []
            for slot in self.slots:
                slot.evaluations, slot.busy = 0, 0.0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            window = max(time.time() - self.window_start, 1e-9)
            live = [s for s in self.slots if s.state != "gone"]
            workers = [{"index": s.index, "pid": s.info.get("pid"), "host": s.info.get("host"), "evaluations": s.evaluations,
                        "busy_s": s.busy, "idle_share": 1.0 - min(s.busy / window, 1.0)} for s in live]
            busy = sum(s.busy for s in live)
            latency = list(self.latency)
        return {
            "num_workers": len(workers), "window_s": window, "evaluations": sum(w["evaluations"] for w in workers),
            "idle_share": 1.0 - min(busy / (window * max(len(workers), 1)), 1.0),
            "overhead_per_eval_s": float(np.mean(latency)) if latency else 0.0, "workers": workers,
        }


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
