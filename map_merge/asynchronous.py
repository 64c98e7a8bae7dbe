"""Asynchronous evaluation for a sequential proposer: keep ``W`` evaluations in flight.

:func:`evaluate_async` is what Bayesian sampling (and the MOBO baseline) run on an executor with
several workers: whenever one evaluation finishes, the proposer is asked for the next point
given everything finished and everything still pending.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .objective_base import submit_one

__all__ = ["AsyncTrace", "evaluate_async"]


@dataclass
class AsyncTrace:
    """What :func:`evaluate_async` did: the finished evaluations in completion order and, for
    each, how many were in flight when it was proposed."""

    coeffs: np.ndarray  # (N, T)
    metrics: np.ndarray  # (N, M)
    order: np.ndarray  # (N,) submission index of each finished evaluation (0..K0-1: the initial design)
    in_flight: list[int]  # per submission: evaluations pending right after it (itself included)
    max_in_flight: int = 0


def _check_finite(objective: Any, x: np.ndarray, metrics: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(metrics))
    if len(bad):
        names = list(getattr(objective, "task_names", None) or [f"task{j}" for j in range(len(metrics))])
        shown = {str(names[j]) if j < len(names) else f"task{j}": float(metrics[j]) for j in bad}
        raise ValueError(f"the objective returned a non-finite metric for task(s) {shown} at coefficient vector "
                         f"{np.round(x, 6).tolist()}")


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
    rest is drained. The design needs a point (``ValueError`` otherwise: the proposer needs a
    finished evaluation). ``W`` defaults to the objective's ``executor.num_workers``. The trace
    holds exactly ``budget`` rows, whatever the proposer returns.

    A proposal equal to a point already pending or finished is **submitted again and counted**
    as one of the budget's evaluations (the trace holds that point twice, each row with its own
    submission index); an :class:`~map_merge.Objective` answers it from the evaluation already in
    flight or from its store when it has one. A non-finite metric raises ``ValueError`` at once,
    naming the task and the coefficient vector; evaluations still pending are cancelled.

    With ``lookahead`` (default) the next point is proposed while all ``W`` workers are busy
    (conditioned on all ``W`` as pending) and handed to the first worker that frees up, so a
    proposal's own time is hidden behind the evaluations instead of idling a worker.
    """
    width = num_workers if num_workers is not None else int(getattr(getattr(objective, "executor", None), "num_workers", 1))
    width = max(1, int(width))
    budget = int(budget)
    initial = np.atleast_2d(np.asarray(initial, dtype=np.float64))
    if budget < len(initial):
        raise ValueError(f"budget={budget} is below the {len(initial)} points of the initial design")
    if budget > 0 and len(initial) == 0:
        raise ValueError(f"the initial design is empty (shape {initial.shape}): the proposer conditions on finished "
                         "evaluations, so evaluate_async needs at least one initial point (K0 >= 1) to spend a budget of "
                         f"{budget}")
    queue = list(initial)
    pending: list[tuple[cf.Future, int, np.ndarray]] = []  # one entry per submission (futures may repeat)
    done_order: list[int] = []
    done_x: list[np.ndarray] = []
    done_y: list[np.ndarray] = []
    trace_in_flight: list[int] = []
    submitted = 0
    ready: np.ndarray | None = None

    def next_point() -> np.ndarray:
        pend = np.array([x for _, _, x in pending]) if pending else np.zeros((0, initial.shape[1]))
        point = np.asarray(propose(np.array(done_x), np.array(done_y), pend), dtype=np.float64).reshape(-1)
        if point.shape != (initial.shape[1],):
            raise ValueError(f"the proposer returned shape {point.shape}; expected ({initial.shape[1]},)")
        return point

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
                pending.append((submit_one(objective, x), submitted, x))
                submitted += 1
                trace_in_flight.append(len(pending))
            if not pending:  # nothing to wait for and nothing to propose from: never spin
                raise RuntimeError(f"evaluate_async has nothing in flight and nothing finished after {submitted} of {budget} "
                                   "submissions")
            if (lookahead and width > 1 and ready is None and not queue and done_x and submitted < budget
                    and not any(f.done() for f, _, _ in pending)):
                ready = next_point()  # computed while every worker is busy
            cf.wait({f for f, _, _ in pending}, return_when=cf.FIRST_COMPLETED)
            still = []
            for future, index, x in pending:
                if not future.done():
                    still.append((future, index, x))
                    continue
                metrics = np.asarray(future.result(), dtype=np.float64).reshape(-1)
                _check_finite(objective, x, metrics)
                done_order.append(index)
                done_x.append(x)
                done_y.append(metrics)
                if on_result is not None:
                    on_result(len(done_x))
            pending = still
    finally:
        for future, _, _ in pending:
            future.cancel()
    return AsyncTrace(np.array(done_x), np.array(done_y), np.array(done_order, dtype=int), trace_in_flight,
                      max(trace_in_flight, default=0))
