"""The Ray pool: the workers of a started :class:`~map_merge.RayExecutor` (their slots and the
dispatcher thread live in :mod:`.dispatcher`), with what the driver calls: ship a recipe, queue an
item, set a recipe up on every worker, measure, close."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import time
from typing import Any

import numpy as np

from ..errors import WorkerError
from .dispatcher import _Dispatcher
from .jobs import _first_line, _Job, _settle, _Shipment, _shown, _Slot
from .recipe import Recipe

__all__: list[str] = []


class _Pool(_Dispatcher):
    """The workers of a started :class:`~map_merge.RayExecutor` and the dispatcher thread that
    feeds them (:class:`~map_merge.executors.dispatcher._Dispatcher`)."""

    def __init__(self, settings: Any, ray: Any, count: int) -> None:
        self.shipped: collections.OrderedDict[str, Any] = collections.OrderedDict()  # content key -> object ref
        super().__init__(settings, ray, count)

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
