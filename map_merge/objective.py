"""Black-box objectives: ``objective(coeffs: (K, T)) -> metrics: (K, M)``.

The algorithm core (MAP, Bayesian sampling, nested merging, fronts) only ever calls an
objective. :class:`ModelObjective` is the adapter for real models: it merges into one live
model per coefficient vector and runs every task's metric. :class:`FunctionObjective` wraps a
plain function (analytic test problems). Both consult an :class:`~map_merge.store.EvaluationStore`
first and persist each new result the moment it exists, so a killed run loses nothing.

Metrics are returned in their own units and sense (an accuracy, or a loss); ``senses`` says
per task whether higher (``"max"``) or lower (``"min"``) is better.

The base class is in :mod:`.objective_base`, the objectives in :mod:`.model_objective` and
:mod:`.function_objective`; this module gathers them.
"""

from __future__ import annotations

from .executors import Executor, LocalExecutor, Recipe
from .function_objective import FunctionObjective
from .model_objective import LiveModel, ModelObjective, Task, as_task, metric_value
from .objective_base import Objective, check_senses, submit_one

__all__ = ["Task", "Objective", "FunctionObjective", "ModelObjective", "LiveModel", "Executor", "LocalExecutor", "Recipe", "check_senses",
           "submit_one", "as_task", "metric_value"]
