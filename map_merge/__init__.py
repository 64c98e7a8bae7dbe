"""map_merge: amortized Pareto fronts for model merging.

Core (plain arrays and callables): :class:`MAP`, :class:`BayesianMAP`, :func:`nested_merge`,
surrogates, front search and front metrics; :mod:`map_merge.baselines` and
:mod:`map_merge.compare` for the methods a user would otherwise run and side-by-side scoring. Adapters: :class:`TaskVectors` and
:class:`ModelObjective` for real models, :mod:`map_merge.zoo` for the bundled offline zoos,
:mod:`map_merge.plots` for figures.
"""

from . import plots
from .asynchronous import AsyncTrace, evaluate_async
from .bayes import BayesianMAP
from .executors import EvaluationError, RayExecutor, Recipe, WorkerError
from .designs import default_num_samples, grid_design, lhs_design, make_design, map_design, num_quadratic_params, sobol_design
from .groups import Groups
from .mergekit_config import MergekitRecipe, from_mergekit
from .front_metrics import front_report, gd, hypervolume, igd, igd_plus, preference_grid, preference_regret, win_rate
from .map import MAP, MAPResult, Samples
from .merge_methods import Breadcrumbs, Dare, Della, MergeMethod, TaskArithmetic, Ties
from .nested import NestedResult, nested_merge
from .objective import Executor, FunctionObjective, LocalExecutor, ModelObjective, Objective, Task
from .pareto import ParetoFront, pareto_mask
from .search import nsga3_search, scalarization_search
from .store import EvaluationStore
from .surrogate import QuadraticSurrogate, SurrogateFitWarning
from .task_vectors import LoraAdapter, TaskVectors, load_state_dict
from .tasks import Classification, HeldOutLoss, LMEvalTask

__version__ = "0.1.0"

__all__ = [
    "AsyncTrace", "BayesianMAP", "Breadcrumbs", "Classification", "Dare", "Della", "EvaluationError", "EvaluationStore", "Executor", "RayExecutor", "Recipe", "WorkerError", "evaluate_async", "FunctionObjective", "Groups", "HeldOutLoss", "from_mergekit", "LMEvalTask", "LocalExecutor", "LoraAdapter", "MAP", "MAPResult",
    "MergekitRecipe", "MergeMethod", "ModelObjective", "NestedResult", "Objective", "ParetoFront", "QuadraticSurrogate", "Samples",
    "SurrogateFitWarning", "Task", "TaskArithmetic", "TaskVectors", "Ties", "default_num_samples", "front_report", "gd",
    "grid_design", "hypervolume", "igd", "igd_plus", "lhs_design", "load_state_dict", "make_design", "map_design",
    "nested_merge", "nsga3_search", "num_quadratic_params", "pareto_mask", "plots", "preference_grid", "preference_regret",
    "scalarization_search",
    "sobol_design", "win_rate",
]
