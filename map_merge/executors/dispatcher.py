"""The Ray pool's dispatcher: one thread hands each queued job to whichever worker is free, collects
the results, and replaces a worker that died or ran past its deadline (re-queueing its item)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from ..errors import EvaluationError, WorkerError
from .jobs import _first_line, _Job, _settle, _shown, _Slot
from .worker import _Worker

__all__: list[str] = []

log = logging.getLogger(__name__)


class _Dispatcher:
    """The workers' slots and the dispatcher thread that feeds them (the base of
    :class:`~map_merge.executors.pool._Pool`, which adds what the driver calls).

    Each slot's one call in flight moves it through phases: ``start`` (being placed, bounded by
    ``placement_timeout_s``), ``load`` (first use of a recipe, ``load_timeout_s``) and ``run``
    (one evaluation, ``timeout_s``). A slot past its deadline, or whose actor died, is handled
    here: its worker replaced and its item re-queued, or the slot dropped.

    Args:
        settings: the :class:`~map_merge.RayExecutor` whose settings are read at each dispatch.
        ray: the ``ray`` module.  count: workers to start.
    """

    def __init__(self, settings: Any, ray: Any, count: int) -> None:
        self.settings, self.ray = settings, ray
        self.remote = ray.remote(_Worker)
        self.slots: list[_Slot] = []
        self.queue: collections.deque[_Job] = collections.deque()
        self.in_flight: dict[Any, _Slot] = {}
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

    def _replace_idle(self, slot: _Slot, actor: Any, reason: str, timed_out: bool) -> bool:
        """Replace ``slot``'s worker if it is still ``actor``; whether it was (a job the dispatcher
        gave it meanwhile is re-queued, within its retries)."""
        with self.lock:  # held throughout (re-entrant): the dispatcher cannot replace it in between
            if slot.actor is not actor or slot.state == "gone":
                return False
            log.warning("%s %s; killed and replaced", self._worker_name(slot), reason)
            self._replace(slot, slot.job, reason, timed_out=timed_out)
            return True

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
