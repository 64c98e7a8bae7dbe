"""map_merge: amortized Pareto fronts for model merging."""
from .merge_methods import Dare, MergeMethod, TaskArithmetic, Ties
from .objective import Executor, FunctionObjective, LocalExecutor, ModelObjective, Objective, Task
from .store import EvaluationStore
from .task_vectors import TaskVectors, load_state_dict

__version__ = "0.1.0"
from .designs import default_num_samples, lhs_design, make_design, map_design, num_quadratic_params, sobol_design
from .front_metrics import gd, hypervolume, igd, igd_plus, win_rate
from .map import MAP, MAPResult, Samples
from .pareto import ParetoFront, pareto_mask
from .search import nsga3_search, scalarization_search
from .surrogate import QuadraticSurrogate, SurrogateFitWarning
