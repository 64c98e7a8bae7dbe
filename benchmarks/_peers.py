"""The peers a user would pick instead of map_merge, driven through their own public APIs.

- Optuna 5 (``pip install 'map_merge[peers]'`` or ``optuna``): ``GPSampler`` (multi-objective,
  log expected hypervolume improvement; its defaults) and ``TPESampler`` (its default sampler),
  through ``study.optimize(fn, n_trials=budget)``.
- Ax 1.3 (``ax-platform``): ``ax.api.client.Client`` with its default generation strategy (Sobol,
  then BoTorch's qLogNEHVI), through ``get_next_trials`` / ``complete_trial``.

Each returns a :class:`~map_merge.baselines.BaselineResult` with every real evaluation in order;
``settings["propose_seconds"]`` holds the seconds each point took to propose (the peer's own time,
evaluation excluded). These are yardsticks for ``bench_fronts.py``: never imported by the library.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from map_merge.baselines import BaselineResult
from map_merge.map import call_objective
from map_merge.objective import check_senses

PEERS = ("Optuna GP", "Optuna TPE", "Ax")


def _names(objective, num_metrics: int) -> tuple[str, ...]:
    return tuple(getattr(objective, "task_names", None) or [f"task{j}" for j in range(num_metrics)])


def optuna_search(objective, num_coeffs: int, budget: int, seed: int = 0, sampler: str = "gp",
                  bounds: tuple[float, float] = (0.0, 1.0)) -> BaselineResult:
    """Optuna's ``GPSampler`` (``sampler="gp"``) or ``TPESampler`` (``"tpe"``) with their defaults,
    minimising / maximising every metric by its sense, ``budget`` trials."""
    try:
        import optuna
    except ImportError:
        raise ImportError("the Optuna peers need optuna: pip install 'map_merge[peers]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    senses = getattr(objective, "senses", None)
    if not senses:
        raise ValueError("the Optuna peers need an objective with senses (one 'max'/'min' per metric)")
    senses = check_senses(senses, len(senses))
    chosen = optuna.samplers.GPSampler(seed=seed) if sampler == "gp" else optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(directions=["maximize" if s == "max" else "minimize" for s in senses], sampler=chosen)
    coeffs, metrics, propose = [], [], []
    clock = [time.perf_counter()]

    def trial_fn(trial):
        c = np.array([trial.suggest_float(f"c{i}", bounds[0], bounds[1]) for i in range(num_coeffs)])
        propose.append(time.perf_counter() - clock[0])
        row = call_objective(objective, c[None], len(senses))[0]
        coeffs.append(c)
        metrics.append(row)
        clock[0] = time.perf_counter()
        return tuple(float(v) for v in row)

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.optimize(trial_fn, n_trials=int(budget))
    name = "Optuna GP" if sampler == "gp" else "Optuna TPE"
    return BaselineResult(name, np.array(coeffs), np.array(metrics), senses, _names(objective, len(senses)), time.perf_counter() - start,
                          {"budget": budget, "seed": seed, "sampler": type(chosen).__name__, "propose_seconds": propose})


def ax_search(objective, num_coeffs: int, budget: int, seed: int = 0, bounds: tuple[float, float] = (0.0, 1.0)) -> BaselineResult:
    """Ax's ``Client`` with its default generation strategy, one trial at a time."""
    try:
        from ax.api.client import Client
        from ax.api.configs import RangeParameterConfig
    except ImportError:
        raise ImportError("the Ax peer needs ax-platform: pip install 'map_merge[peers]'") from None
    senses = getattr(objective, "senses", None)
    if not senses:
        raise ValueError("the Ax peer needs an objective with senses (one 'max'/'min' per metric)")
    senses = check_senses(senses, len(senses))
    metric = [f"m{j}" for j in range(len(senses))]  # Ax wants identifiers
    client = Client(random_seed=seed)
    client.configure_experiment(parameters=[RangeParameterConfig(name=f"c{i}", bounds=(float(bounds[0]), float(bounds[1])),
                                                                 parameter_type="float") for i in range(num_coeffs)])
    client.configure_optimization(objective=", ".join(("" if s == "max" else "-") + m for s, m in zip(senses, metric)))
    coeffs, metrics, propose = [], [], []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while len(coeffs) < budget:
            _quiet("ax")
            clock = time.perf_counter()
            trials = client.get_next_trials(max_trials=1)
            propose.append(time.perf_counter() - clock)
            for index, params in trials.items():
                c = np.array([params[f"c{i}"] for i in range(num_coeffs)], dtype=np.float64)
                row = call_objective(objective, c[None], len(senses))[0]
                coeffs.append(c)
                metrics.append(row)
                client.complete_trial(index, raw_data={m: float(v) for m, v in zip(metric, row)})
    return BaselineResult("Ax", np.array(coeffs)[:budget], np.array(metrics)[:budget], senses, _names(objective, len(senses)),
                          time.perf_counter() - start, {"budget": budget, "seed": seed, "propose_seconds": propose})


def _quiet(prefix: str) -> None:
    """Silence a library's INFO logs (Ax sets levels on its own loggers as it creates them)."""
    for name in list(logging.root.manager.loggerDict):
        if name == prefix or name.startswith(prefix + "."):
            logging.getLogger(name).setLevel(logging.ERROR)


def run_peer(name: str, objective, num_coeffs: int, budget: int, seed: int = 0) -> BaselineResult:
    """One of :data:`PEERS` by name."""
    if name == "Optuna GP":
        return optuna_search(objective, num_coeffs, budget, seed, "gp")
    if name == "Optuna TPE":
        return optuna_search(objective, num_coeffs, budget, seed, "tpe")
    if name == "Ax":
        return ax_search(objective, num_coeffs, budget, seed)
    raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
