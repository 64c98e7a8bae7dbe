"""Executors: where evaluations run. Local (this process, one at a time) or on Ray (many workers).

An executor takes work as ``submit(fn, item) -> concurrent.futures.Future`` and offers
``map(fn, items) -> Iterator[(index, result)]`` (results in the order they finish). Objectives
(:class:`~map_merge.objective.Objective`) send their ``evaluate_one`` through it and write each
result to their store the moment it comes back, in the driver; workers never touch the store.

:class:`RayExecutor` keeps one long-lived actor per worker. The function (an objective's bound
``evaluate_one``, with its model and task vectors) is put into Ray's object store once and
loaded once per actor; each evaluation then sends only a coefficient vector. A dispatcher thread
hands the next queued item to whichever worker is free. A worker that dies has its in-flight
item re-queued on a fresh worker (``max_retries`` times, then :class:`WorkerError` naming the
item); an exception raised by the evaluator comes back as :class:`EvaluationError` carrying the
worker's traceback.

:func:`evaluate_async` keeps ``W`` evaluations in flight for a sequential proposer (Bayesian
sampling): whenever one finishes, the proposer is asked for the next point given everything
finished and everything still pending.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "EvaluationError", "WorkerError", "evaluate_async", "AsyncTrace"]

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """An evaluation raised on a worker; the message carries the item and the worker's traceback."""


class WorkerError(RuntimeError):
    """A worker died (killed, out of memory) on the same item more often than the retries allow."""


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


def _shown(item: Any) -> str:
    if isinstance(item, np.ndarray):
        return str(np.round(item.astype(float), 6).tolist())
    text = repr(item)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- Ray
def _import_ray():
    try:
        import ray
    except ImportError as error:  # pragma: no cover - exercised where ray is missing
        raise ImportError("RayExecutor needs Ray: pip install 'map_merge[ray]' (or pip install 'ray>=2.9')") from error
    return ray


class _Worker:
    """The actor body (wrapped by ``ray.remote`` at start-up): caches loaded functions by token."""

    def __init__(self, index: int, cache_size: int = 4) -> None:
        self.index = index
        self.cache_size = cache_size
        self.functions: collections.OrderedDict[Any, Callable] = collections.OrderedDict()
        self.created = time.time()

    def describe(self) -> dict:
        import socket

        return {"index": self.index, "pid": os.getpid(), "host": socket.gethostname(), "created": self.created,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _function(self, token: Any, boxed: list) -> Callable:
        fn = self.functions.get(token)
        if fn is None:
            import ray

            fn = ray.get(boxed[0])  # loaded once per worker, never once per evaluation
            self.functions[token] = fn
            while len(self.functions) > self.cache_size:
                self.functions.popitem(last=False)
                _free_accelerator_memory()
        self.functions.move_to_end(token)
        return fn

    def load(self, token: Any, boxed: list) -> float:
        start = time.time()
        self._function(token, boxed)
        return time.time() - start

    def run(self, token: Any, boxed: list, item: Any) -> tuple[Any, float, float]:
        fn = self._function(token, boxed)
        if isinstance(item, np.ndarray):
            item = item.copy()  # Ray hands arrays over read-only
        start = time.time()
        try:
            value = fn(item)
        except BaseException as error:  # noqa: BLE001 - sent back with the traceback, never swallowed
            import traceback

            raise EvaluationError(f"{type(error).__name__}: {error}\n--- worker {self.index} (pid {os.getpid()}) traceback ---\n"
                                  + "".join(traceback.format_exception(error))) from None
        return value, start, time.time()


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
class _Job:
    fn_token: Any
    boxed: list
    item: Any
    future: cf.Future
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    dispatched: float = 0.0


@dataclass
class _Slot:
    index: int
    actor: Any
    job: _Job | None = None
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
        max_retries: re-queues of an item whose worker died before the run fails.
        init_kwargs: extra arguments for ``ray.init`` (e.g. ``runtime_env``, ``num_cpus``).

    Use as a context manager (or call :meth:`shutdown`) to stop the actors. Results do not
    depend on the executor: the same objective gives the same metrics as with
    :class:`LocalExecutor`.
    """

    def __init__(self, num_workers: int | None = None, resources_per_worker: dict[str, float] | None = None,
                 address: str | None = None, max_retries: int = 2, init_kwargs: dict[str, Any] | None = None) -> None:
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
        self.resources = resources
        self.address = address
        self.max_retries = int(max_retries)
        self.init_kwargs = dict(init_kwargs or {})
        self._requested = None if num_workers is None else int(num_workers)
        self._ray = None
        self._owns_runtime = False
        self._slots: list[_Slot] = []
        self._queue: collections.deque[_Job] = collections.deque()
        self._in_flight: dict[Any, _Slot] = {}
        self._functions: collections.OrderedDict[Any, tuple[Any, Any]] = collections.OrderedDict()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker_count = 0
        self._window_start = time.time()
        self._latency: list[float] = []  # per evaluation: round trip seen by the driver minus the worker's time
        self.deaths = 0
        self._broken: BaseException | None = None

    # ------------------------------------------------------------------ life cycle
    @property
    def num_workers(self) -> int:
        self._start()
        return len(self._slots)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is not None:
                return
            ray = _import_ray()
            if not ray.is_initialized():
                kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, **self.init_kwargs}
                ray.init(address=self.address, **kwargs)
                self._owns_runtime = True
            self._ray = ray
            self._remote = ray.remote(_Worker)
            count = self._requested if self._requested is not None else self._fit_workers()
            if count < 1:
                raise RuntimeError(f"the Ray cluster has room for no worker with resources {self.resources} "
                                   f"(cluster: {ray.cluster_resources()})")
            self._slots = [self._new_slot(i) for i in range(count)]
            infos = ray.get([slot.actor.describe.remote() for slot in self._slots])
            for slot, info in zip(self._slots, infos):
                slot.info = info
                slot.started = time.time()
            self._window_start = time.time()
            self._thread = threading.Thread(target=self._dispatch_loop, name="map_merge-ray-dispatcher", daemon=True)
            self._thread.start()
            log.info("RayExecutor: %d workers with %s each", count, self.resources)

    def _fit_workers(self) -> int:
        total = self._ray.cluster_resources()
        counts = []
        for key, amount in self.resources.items():
            if amount > 0:
                counts.append(int(total.get(key, 0.0) / amount + 1e-9))
        return min(counts) if counts else 1

    def _new_slot(self, index: int) -> _Slot:
        options: dict[str, Any] = {"max_restarts": 0, "max_concurrency": 1}
        resources = dict(self.resources)
        options["num_cpus"] = resources.pop("CPU", 0.0 if "GPU" in resources else 1.0)
        if "GPU" in resources:
            options["num_gpus"] = resources.pop("GPU")
        if "memory" in resources:
            options["memory"] = resources.pop("memory")
        if resources:
            options["resources"] = resources
        self._worker_count += 1
        return _Slot(index, self._remote.options(**options).remote(self._worker_count - 1))

    def shutdown(self) -> None:
        """Stop the dispatcher and the actors (and the local Ray runtime this executor started).
        Queued items fail with a ``CancelledError``."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            for job in self._queue:
                job.future.cancel()
            self._queue.clear()
            for slot in self._slots:
                if slot.job is not None and not slot.job.future.done():
                    slot.job.future.set_exception(cf.CancelledError("the executor was shut down"))
                try:
                    self._ray.kill(slot.actor)
                except Exception:  # noqa: BLE001 - already gone
                    pass
            self._slots = []
            self._in_flight.clear()
            self._functions.clear()
            if self._owns_runtime and self._ray is not None:
                self._ray.shutdown()
                self._owns_runtime = False
            self._thread = None
            self._stop.clear()

    def __enter__(self) -> "RayExecutor":
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ work
    def _function_ref(self, fn: Callable) -> tuple[Any, list]:
        owner = getattr(fn, "__self__", None)
        func = getattr(fn, "__func__", fn)
        version = None
        if owner is not None and callable(getattr(owner, "fingerprint", None)):
            try:
                version = owner.fingerprint()  # an objective that changed is shipped again
            except Exception:  # noqa: BLE001 - no fingerprint: identity alone
                version = None
        key = (id(owner) if owner is not None else id(fn), getattr(func, "__qualname__", repr(func)), version)
        with self._lock:
            entry = self._functions.get(key)
            if entry is None:
                entry = (fn, self._ray.put(fn))  # keeps fn alive, so its id stays unique
                self._functions[key] = entry
                while len(self._functions) > 8:
                    self._functions.popitem(last=False)
            self._functions.move_to_end(key)
        token = (key[0], key[1], key[2], entry[1].hex())
        return token, [entry[1]]

    def prepare(self, fn: Callable) -> list[float]:
        """Ship ``fn`` to every worker and load it there now; returns each worker's load seconds."""
        self._start()
        token, boxed = self._function_ref(fn)
        return self._ray.get([slot.actor.load.remote(token, boxed) for slot in self._slots])

    def submit(self, fn: Callable[[Any], Any], item: Any) -> cf.Future:
        self._start()
        if self._broken is not None:
            raise RuntimeError(f"this RayExecutor's dispatcher failed ({type(self._broken).__name__}: {self._broken}); create a new one")
        token, boxed = self._function_ref(fn)
        future: cf.Future = cf.Future()
        with self._lock:
            self._queue.append(_Job(token, boxed, item, future))
        self._wake.set()
        return future

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` as results arrive. If one item fails, items not yet started
        are cancelled, those in flight are still yielded, then the error is raised."""
        futures = {self.submit(fn, item): index for index, item in enumerate(items)}
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

    # ------------------------------------------------------------------ dispatcher
    def _dispatch_loop(self) -> None:
        ray = self._ray
        while not self._stop.is_set():
            try:
                with self._lock:
                    self._assign()
                    refs = list(self._in_flight)
                if not refs:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.02)
                for ref in ready:
                    self._finish(ref)
            except BaseException as error:  # noqa: BLE001 - never leave futures hanging on a dead dispatcher
                log.exception("RayExecutor dispatcher failed")
                self._fail_all(error)
                return

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            jobs = list(self._queue) + [slot.job for slot in self._in_flight.values() if slot.job is not None]
            self._queue.clear()
            self._in_flight.clear()
            for slot in self._slots:
                slot.job = None
            self._broken = error
        for job in jobs:
            if not job.future.done():
                if not job.future.running():
                    job.future.set_running_or_notify_cancel()
                job.future.set_exception(RuntimeError(f"the Ray dispatcher failed while {_shown(job.item)} was queued: "
                                                      f"{type(error).__name__}: {error}"))

    def _assign(self) -> None:
        for slot in self._slots:
            if slot.job is not None:
                continue
            job = None
            while self._queue:
                candidate = self._queue.popleft()
                # a re-queued job is already running; a fresh one may have been cancelled meanwhile
                if candidate.attempts > 0 or candidate.future.set_running_or_notify_cancel():
                    job = candidate
                    break
            if job is None:
                return
            job.dispatched = time.time()
            slot.job = job
            self._in_flight[slot.actor.run.remote(job.fn_token, job.boxed, job.item)] = slot

    def _finish(self, ref: Any) -> None:
        ray = self._ray
        with self._lock:
            slot = self._in_flight.pop(ref)
            job, slot.job = slot.job, None
        try:
            value, started, finished = ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            cause = getattr(error, "cause", None)
            message = str(cause) if isinstance(cause, EvaluationError) else str(error)
            job.future.set_exception(EvaluationError(f"evaluating {_shown(job.item)} failed on worker {slot.info.get('index')} "
                                                     f"(pid {slot.info.get('pid')}, {slot.info.get('host')}): {message}"))
            return
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                ray.exceptions.OutOfMemoryError) as error:
            self._replace(slot, job, error)
            return
        except Exception as error:  # noqa: BLE001 - any other Ray failure is this item's, reported with it
            job.future.set_exception(EvaluationError(f"evaluating {_shown(job.item)} on worker {slot.info.get('index')} failed in Ray: "
                                                     f"{type(error).__name__}: {error}"))
            return
        now = time.time()
        slot.evaluations += 1
        slot.busy += finished - max(started, self._window_start)
        self._latency.append(max(0.0, (now - job.dispatched) - (finished - started)))
        job.future.set_result(value)

    def _replace(self, slot: _Slot, job: _Job, error: BaseException) -> None:
        self.deaths += 1
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        job.attempts += 1
        job.failures.append(f"worker {slot.info.get('index')} (pid {slot.info.get('pid')}): {type(error).__name__}: {reason}")
        log.warning("worker %s died while evaluating %s (%s); re-queued (attempt %d of %d)", slot.info.get("index"),
                    _shown(job.item), reason, job.attempts, self.max_retries + 1)
        try:
            self._ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass
        fresh = self._new_slot(slot.index)
        with self._lock:
            slot.actor, slot.info, slot.started = fresh.actor, {"index": slot.index, "pid": "?", "host": "?"}, time.time()
            if job.attempts > self.max_retries:
                job.future.set_exception(WorkerError(
                    f"evaluating {_shown(job.item)} failed: its worker died {job.attempts} times "
                    f"(max_retries={self.max_retries}): " + "; ".join(job.failures)))
            else:
                self._queue.appendleft(job)
        threading.Thread(target=self._describe, args=(slot, fresh.actor), daemon=True).start()

    def _describe(self, slot: _Slot, actor: Any) -> None:
        try:
            info = self._ray.get(actor.describe.remote(), timeout=120)
        except Exception:  # noqa: BLE001 - the replacement died too; its failure is reported with its item
            return
        with self._lock:
            if slot.actor is actor:
                slot.info = info

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        """Start a new measurement window for :meth:`stats`."""
        self._start()
        with self._lock:
            self._window_start = time.time()
            self._latency = []
            for slot in self._slots:
                slot.evaluations, slot.busy = 0, 0.0

    def stats(self) -> dict[str, Any]:
        """Since :meth:`reset_stats` (or start): evaluations, busy seconds and idle share per
        worker and overall, and the driver's overhead per evaluation (round trip minus the
        worker's own time), in seconds."""
        with self._lock:
            window = max(time.time() - self._window_start, 1e-9)
            workers = [{"index": s.index, "pid": s.info.get("pid"), "host": s.info.get("host"), "evaluations": s.evaluations,
                        "busy_s": s.busy, "idle_share": 1.0 - min(s.busy / window, 1.0)} for s in self._slots]
            busy = sum(s.busy for s in self._slots)
            latency = list(self._latency)
        return {
            "num_workers": len(workers), "window_s": window, "evaluations": sum(w["evaluations"] for w in workers),
            "idle_share": 1.0 - min(busy / (window * max(len(workers), 1)), 1.0),
            "overhead_per_eval_s": float(np.mean(latency)) if latency else 0.0, "deaths": self.deaths, "workers": workers,
        }

    def __repr__(self) -> str:
        state = f"{len(self._slots)} workers" if self._slots else "not started"
        return f"RayExecutor({state}, resources_per_worker={self.resources}, address={self.address!r})"


# --------------------------------------------------------------------------- asynchronous proposals
@dataclass
class AsyncTrace:
    """What :func:`evaluate_async` did: the finished evaluations in completion order and, for
    each, how many were in flight when it was proposed."""

    coeffs: np.ndarray  # (N, T)
    metrics: np.ndarray  # (N, M)
    order: np.ndarray  # (N,) submission index of each finished evaluation (0..K0-1: the initial design)
    in_flight: list[int]  # per submission: evaluations pending right after it (itself included)
    max_in_flight: int = 0


def evaluate_async(
    objective: Any,
    initial: np.ndarray,
    propose: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    budget: int,
    num_workers: int | None = None,
    on_result: Callable[[int], None] | None = None,
    lookahead: bool = True,
) -> AsyncTrace:
    """Spend exactly ``budget`` evaluations with at most ``W`` in flight.

    The ``initial (K0, T)`` design is queued first; whenever an evaluation finishes,
    ``propose(coeffs_done (N, T), metrics_done (N, M), pending (P, T)) -> (T,)`` gives the next
    point (conditioned on the pending ones), until ``budget`` points were submitted; then the
    rest is drained. ``W`` defaults to the objective's ``executor.num_workers``.

    With ``lookahead`` (default) the next point is proposed while all ``W`` workers are busy
    (conditioned on all ``W`` as pending) and handed to the first worker that frees up, so a
    proposal's own time is hidden behind the evaluations instead of idling a worker.
    """
    from .objective import submit_one

    width = num_workers if num_workers is not None else int(getattr(getattr(objective, "executor", None), "num_workers", 1))
    width = max(1, int(width))
    initial = np.atleast_2d(np.asarray(initial, dtype=np.float64))
    if budget < len(initial):
        raise ValueError(f"budget={budget} is below the {len(initial)} points of the initial design")
    queue = list(initial)
    pending: dict[cf.Future, tuple[int, np.ndarray]] = {}
    done_order: list[int] = []
    done_x: list[np.ndarray] = []
    done_y: list[np.ndarray] = []
    trace_in_flight: list[int] = []
    submitted = 0
    ready: np.ndarray | None = None

    def next_point() -> np.ndarray:
        pend = np.array([p for _, p in pending.values()]) if pending else np.zeros((0, initial.shape[1]))
        return np.asarray(propose(np.array(done_x), np.array(done_y), pend), dtype=np.float64).reshape(-1)

    try:
        while submitted < budget or pending:
            while submitted < budget and len(pending) < width:
                if queue:
                    x = queue.pop(0)
                elif ready is not None:
                    x, ready = ready, None
                elif done_x:
                    x = next_point()
                else:
                    break  # nothing finished yet to condition on: wait for the design
                pending[submit_one(objective, x)] = (submitted, x)
                submitted += 1
                trace_in_flight.append(len(pending))
            if lookahead and width > 1 and ready is None and not queue and done_x and submitted < budget and not any(f.done() for f in pending):
                ready = next_point()  # computed while every worker is busy
            finished, _ = cf.wait(list(pending), return_when=cf.FIRST_COMPLETED)
            for future in finished:
                index, x = pending.pop(future)
                done_order.append(index)
                done_x.append(x)
                done_y.append(np.asarray(future.result(), dtype=np.float64).reshape(-1))
                if on_result is not None:
                    on_result(len(done_x))
    finally:
        for future in pending:
            future.cancel()
    metrics = np.array(done_y)
    bad = ~np.isfinite(metrics).all(axis=1)
    if bad.any():
        raise ValueError(f"the objective returned NaN/inf metrics for coefficient vectors {np.array(done_x)[bad][:5].tolist()}")
    return AsyncTrace(np.array(done_x), metrics, np.array(done_order, dtype=int), trace_in_flight, max(trace_in_flight, default=0))
