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

Modules, one idea each:

- :mod:`.recipe`: :class:`Recipe`, the job description a worker runs.
- :mod:`.local`: the :class:`Executor` protocol and :class:`LocalExecutor`.
- :mod:`.ray_executor`: :class:`RayExecutor`, its settings and life cycle.
- :mod:`.pool`: the started pool of Ray workers (ship, queue, prepare, statistics);
  :mod:`.dispatcher`: the thread that feeds and replaces them; :mod:`.worker`: the actor's body;
  :mod:`.jobs`: the pool's bookkeeping (shipments, jobs, slots).
- :class:`EvaluationError` and :class:`WorkerError` live in :mod:`map_merge.errors`.
"""

from ..errors import EvaluationError, WorkerError
from .local import Executor, LocalExecutor
from .ray_executor import RayExecutor
from .recipe import Recipe, as_recipe

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "Recipe", "EvaluationError", "WorkerError", "as_recipe"]
