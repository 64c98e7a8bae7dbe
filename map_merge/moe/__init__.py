"""PWE-MoE: preference-routed mixtures of task-vector experts, trained once, unloaded per preference."""
from .epo import epo_weights
from .pareto_moe import FitHistory, ParetoMoE, Router, find_mlp_groups, simplex_lattice

__all__ = ["ParetoMoE", "Router", "FitHistory", "find_mlp_groups", "epo_weights", "simplex_lattice"]
