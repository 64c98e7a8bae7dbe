"""The adaptive sampling loop: spend a budget of real evaluations, each new point proposed from
every evaluation so far.

:func:`sample_adaptively` evaluates an initial design, then asks ``propose`` for the next points
until the budget is spent, either in synchronous rounds of ``batch`` points or, on an executor with
``W > 1`` workers, asynchronously with ``W`` evaluations in flight (each finished evaluation
triggers one proposal conditioned on the pending ones; :func:`~map_merge.evaluate_async`). MAP's
default sampling and :class:`~map_merge.BayesianMAP` both run it; they differ in ``propose``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .designs import default_num_samples, make_design, num_quadratic_params, one_hots, with_points
from .pareto import check_senses
from .result import MAPResult, Samples, call_objective

__all__ = ["sample_adaptively", "Proposer", "fit_adaptive", "default_initial"]

Proposer = Callable[[np.ndarray, np.ndarray, "np.ndarray | None", int], np.ndarray]
"""``propose(coeffs_done (N, T), metrics_done (N, M), pending (P, T) or None, size) -> (size, T)``."""


def sample_adaptively(
    objective: Callable[[np.ndarray], np.ndarray],
    initial: np.ndarray,
    budget: int,
    propose: Proposer,
    *,
    batch: int = 1,
    asynchronous: bool = False,
    lookahead: bool = True,
    min_done: int = 0,
    filler: Iterator[np.ndarray] | None = None,
    progress: bool = False,
    desc: str = "adaptive sampling",
    timings: dict[str, float] | None = None,
    proposal_seconds: list[float] | None = None,
) -> tuple[Samples, int | None]:
    """Spend exactly ``budget`` real evaluations: ``initial (K0, T)`` first, then proposals.

    Args:
        objective: ``coeffs (K, T) -> metrics (K, M)``.
        initial: the starting design (``round`` 0 in the returned samples).
        budget: total real evaluations, ``>= len(initial)``.
        propose: the proposer (see :data:`Proposer`).
        batch: points per synchronous round (round ``r`` = the r-th batch).
        asynchronous: keep the executor's ``W`` workers busy, one proposal per finished
            evaluation (round = submission order beyond the initial design).
        lookahead: asynchronous only: propose while every worker is busy.
        min_done: asynchronous only: while at most this many evaluations have finished, free
            workers get the next point of ``filler`` instead of a proposal.
        progress: show a tqdm bar.  timings: adds ``"evaluate"`` and ``"acquire"`` seconds.
        proposal_seconds: appended with the seconds each proposed point took (a batch's time is
            shared by its points).

    Returns ``(samples, max_in_flight)`` (``None`` when synchronous).
    """
    from tqdm.auto import tqdm

    budget = int(budget)
    initial = np.atleast_2d(np.asarray(initial, dtype=np.float64))
    if budget < len(initial):
        raise ValueError(f"budget={budget} is below the initial design of {len(initial)} evaluations")
    if int(batch) < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    timings = timings if timings is not None else {}
    timings.setdefault("evaluate", 0.0)
    timings.setdefault("acquire", 0.0)
    record = proposal_seconds if proposal_seconds is not None else []
    if asynchronous:
        return _asynchronous(objective, initial, budget, propose, lookahead, min_done, filler, progress, desc, timings, record)
    start = time.perf_counter()
    samples = Samples(initial, call_objective(objective, initial))
    timings["evaluate"] += time.perf_counter() - start
    round_index = 0
    with tqdm(total=budget, initial=len(initial), desc=desc, disable=not progress, leave=False) as bar:
        while len(samples) < budget:
            round_index += 1
            size = min(int(batch), budget - len(samples))
            start = time.perf_counter()
            new = np.atleast_2d(np.asarray(propose(samples.coeffs, samples.metrics, None, size), dtype=np.float64))
            timings["acquire"] += time.perf_counter() - start
            record += [(time.perf_counter() - start) / size] * size
            if new.shape != (size, initial.shape[1]):
                raise ValueError(f"the proposer returned shape {new.shape}; expected ({size}, {initial.shape[1]})")
            start = time.perf_counter()
            samples = samples.append(new, call_objective(objective, new, samples.metrics.shape[1]), round_index)
            timings["evaluate"] += time.perf_counter() - start
            bar.update(size)
    return samples, None


def _asynchronous(objective, initial, budget, propose, lookahead, min_done, filler, progress, desc, timings, record):
    from tqdm.auto import tqdm

    from .asynchronous import evaluate_async

    acquire_before = timings["acquire"]

    def one(done_x: np.ndarray, done_y: np.ndarray, pending: np.ndarray) -> np.ndarray:
        if len(done_x) <= min_done and filler is not None:
            return next(filler)
        start = time.perf_counter()
        point = np.asarray(propose(done_x, done_y, pending, 1), dtype=np.float64).reshape(-1)
        timings["acquire"] += time.perf_counter() - start
        record.append(time.perf_counter() - start)
        return point

    start = time.perf_counter()
    with tqdm(total=budget, desc=f"{desc} (async)", disable=not progress, leave=False) as bar:
        trace = evaluate_async(objective, initial, one, budget, on_result=lambda n: bar.update(1), lookahead=lookahead)
    timings["evaluate"] += time.perf_counter() - start - (timings["acquire"] - acquire_before)
    rounds = np.where(trace.order < len(initial), 0, trace.order - len(initial) + 1)
    return Samples(trace.coeffs, trace.metrics, rounds.astype(int)), trace.max_in_flight


AVERAGE_MERGE_TASKS = frozenset({2})  # numbers of coefficients T whose starting design has the average merge (with_average)
PROPOSAL_RECHOOSE = 4  # MAP(proposal_model="auto"): evaluations between two cross-validated choices
AUTO_PROPOSALS_FROM = 4  # MAP's default proposal model: "auto" from this many coefficients T on, "gp" below


def proposal_model_for(proposal_model: str | None, num_coeffs: int) -> str:
    """The proposal model MAP runs: ``proposal_model`` when given, else (the default) ``"auto"``
    from ``AUTO_PROPOSALS_FROM`` (4) coefficients on (T tasks, or T x G with coefficient groups)
    and ``"gp"`` below. Measured in
    ``benchmarks/bench_adaptive_levers.py`` ("auto proposals", docs/fronts.md): at T = 4 the
    cross-validated choice took the analytic problem's HV ratio from 1.033 to 1.074 (pick regret
    0.00024 to -0.00097); at T = 3 it won on the analytic problem and lost front on the vision zoo
    (0.625 to 0.560), at T = 2 it picked worse: below T = 4 the GPs stay."""
    if proposal_model is not None:
        return proposal_model
    return "auto" if int(num_coeffs) >= AUTO_PROPOSALS_FROM else "gp"


def default_initial(num_coeffs: int) -> int:
    """MAP's adaptive starting design: ``max(6, 2T)`` points (at T = 2 the average merge; for a
    merge the T experts; Sobol points)."""
    return max(6, 2 * int(num_coeffs))


def with_average(coeffs: np.ndarray, after: int, bounds: tuple[float, float]) -> np.ndarray:
    """The starting design ``coeffs (K, T)`` with the average merge (every coefficient ``1 / T``,
    clipped to the box: weight averaging, the merge users try first) as row ``after`` (after a
    user's own points). The last row that is neither a user's point nor an expert (a one-hot
    vector of the box, :func:`~map_merge.designs.one_hots`) gives way: the experts anchor the
    front's ends and stay. Unchanged when the average is in the design already, or the user's
    points and the experts fill it (a small ``initial`` or ``budget``).

    MAP adds it at T = 2, where it is the centre of the box [0, 1]^2 (Ax's first trial) and lies between the
    two experts, where the zoos' fronts bend: HV ratio 0.765 -> 0.807 on the vision zoo (10 seeds),
    level on the LM loss and the analytic problem. At T = 3 it was mixed (analytic 0.977 -> 0.969,
    vision 0.625 -> 0.635), so the design there is unchanged (``benchmarks/bench_adaptive_levers.py``,
    "no average" at T = 2, "average at every T" at T = 3; docs/fronts.md)."""
    low, high = float(bounds[0]), float(bounds[1])
    average = np.clip(np.full((1, coeffs.shape[1]), 1.0 / coeffs.shape[1]), low, high)
    if after >= len(coeffs) or not len(_new_rows(average, coeffs)):
        return coeffs
    experts = one_hots(coeffs.shape[1], low, high)
    spare = [i for i in range(after, len(coeffs)) if len(_new_rows(coeffs[i : i + 1], experts))]
    if not spare:
        return coeffs
    rest = np.delete(coeffs, spare[-1], axis=0)
    return np.concatenate([rest[:after], average, rest[after:]])


def fit_adaptive(estimator: Any, objective: Callable[[np.ndarray], np.ndarray], num_coeffs: int, names: Sequence[str] | None,
                 include: np.ndarray | None, progress: bool) -> MAPResult:
    """MAP's adaptive sampling (``MAP(sampling="adaptive")``, see :class:`~map_merge.MAP`): the
    starting design, expected-hypervolume proposals under :class:`~map_merge.gp_model.GPModel`
    (or, under ``proposal_model="auto"``, the model cross-validation prefers: :func:`proposal_model_for`),
    the last ``final`` evaluations on the model's picks for the preferences; then the front of
    the final model. ``estimator`` is the :class:`~map_merge.MAP` holding the settings."""
    from .acquisition import propose_ehvi
    from .gp_model import GPModel

    budget = default_num_samples(num_coeffs) if estimator.budget is None else int(estimator.budget)
    if estimator.model in ("quadratic", "quadratic+gp") and budget < num_quadratic_params(num_coeffs):  # before any evaluation
        raise ValueError(f"model={estimator.model!r} fits a quadratic in {num_coeffs} coefficients, which has "
                         f"{num_quadratic_params(num_coeffs)} parameters: budget={budget} is too few (or use model='auto' or 'gp')")
    initial = default_initial(num_coeffs) if estimator.initial is None else int(estimator.initial)
    initial = min(initial, budget)
    if include is not None:
        initial = max(initial, min(budget, len(np.atleast_2d(include)) + 2))
    preferences = estimator.preferences
    declared = len(names) if names is not None else None
    if preferences is not None and declared is not None and preferences.shape[1] != declared:  # before any evaluation
        raise ValueError(f"preferences have {preferences.shape[1]} entries but the objective returns {declared} metrics")
    proposal_model = proposal_model_for(estimator.proposal_model, num_coeffs)
    if estimator.final is None:
        final = _default_final(preferences, declared, num_coeffs, proposal_model)
        if preferences is None and budget - initial < 2 * final:  # the ends only where as many proposals come first
            final = 0
    else:
        final = int(estimator.final)
    final = min(final, budget - initial)
    ends_only = estimator.final is None and preferences is None  # the default's picks: the ends alone, one per metric
    if initial < 2:
        raise ValueError(f"adaptive sampling needs a budget of at least 2 real evaluations, got {budget}")
    batch = 1 if estimator.batch is None else int(estimator.batch)
    bounds, seed, noise = estimator.bounds, int(estimator.seed), estimator.noise
    design = estimator.design or ("sobol" if getattr(objective, "task_vectors", None) is not None else "qmc")
    coeffs = with_points(make_design(design, num_coeffs, initial, bounds, seed), include, initial)
    if num_coeffs in AVERAGE_MERGE_TASKS:
        coeffs = with_average(coeffs, 0 if include is None else len(np.atleast_2d(include)), bounds)
    width = int(getattr(getattr(objective, "executor", None), "num_workers", 1))
    asynchronous = width > 1 if estimator.asynchronous == "auto" else bool(estimator.asynchronous)
    timings = {"evaluate": 0.0, "acquire": 0.0}
    proposal_seconds: list[float] = []
    state: dict[str, Any] = {}

    def fit_model(done_x: np.ndarray, done_y: np.ndarray) -> GPModel:
        if "senses" not in state:
            if done_y.shape[1] < 2:
                raise ValueError("adaptive sampling trades off at least 2 metrics; with one, use MAP(sampling='design')")
            state["senses"] = check_senses(getattr(objective, "senses", None), done_y.shape[1])
            if names is not None and len(names) != done_y.shape[1]:  # now, not once the whole budget is spent
                raise ValueError(f"got {len(names)} task names for {done_y.shape[1]} metrics")
        state["model"] = GPModel(done_x, done_y, bounds, noise=noise, warm_start=state.get("model"))
        if proposal_model == "auto" and len(done_x) >= num_quadratic_params(num_coeffs) + 2:
            return _chosen_proposal_model(estimator, objective, done_x, done_y, state) or state["model"]
        return state["model"]

    filler = iter(make_design("sobol", num_coeffs, 4 * budget + num_coeffs, bounds, seed + 1)[num_coeffs + len(coeffs):])

    def propose(done_x: np.ndarray, done_y: np.ndarray, pending: np.ndarray | None, size: int) -> np.ndarray:
        model = fit_model(done_x, done_y)
        new = propose_ehvi(model, done_y, state["senses"], bounds, q=size, pending=pending, seed=seed + len(done_x), baseline=done_x)
        known = done_x if pending is None or not len(pending) else np.concatenate([done_x, pending])
        fresh = _new_rows(new, known)
        while len(fresh) < size:  # a repeat of an evaluated (or pending) point would teach nothing: a space-filling point instead
            fresh = np.concatenate([fresh, _new_rows(next(filler)[None], np.concatenate([known, fresh]))])
        return fresh
    samples, in_flight = sample_adaptively(objective, coeffs, budget - final, propose, batch=batch, asynchronous=asynchronous,
                                           lookahead=estimator.lookahead, min_done=2, filler=filler, progress=progress, timings=timings,
                                           proposal_seconds=proposal_seconds)
    senses = check_senses(getattr(objective, "senses", None), samples.metrics.shape[1])
    state.setdefault("senses", senses)
    names = tuple(names) if names is not None else tuple(f"task{j}" for j in range(samples.metrics.shape[1]))
    picks_spent, picks_evaluated = 0, 0
    if ends_only:  # the metrics are known now (an objective that names none counted one per coefficient)
        final = min(final, samples.metrics.shape[1])
    step = max(1, width if asynchronous else batch)  # points one round may evaluate at once
    while len(samples) < budget:  # the picks for the preferences; repeats of evaluated points give way to proposals
        start = time.perf_counter()
        new = np.zeros((0, num_coeffs))
        if picks_spent < final:  # exactly the models the user would be handed: the picks from the front of the final model
            wanted = _final_preferences(preferences, samples.metrics.shape[1], final)[picks_spent : picks_spent + budget - len(samples)]
            if not len(wanted):  # nothing left to pick for: proposals for the rest
                picks_spent = final
                continue
            interim = estimator.fit_samples(samples, objective=objective, task_names=names, senses=senses, warm_start=state.get("model"))
            picks_spent += len(wanted)
            new = _new_rows(np.stack([interim.select(w) for w in wanted]), samples.coeffs)
            picks_evaluated += len(new)
            gave_way = min(len(wanted) - len(new), step - len(new))  # with idle workers: their proposals join this round
            if gave_way > 0 and step > 1:
                new = np.concatenate([new, propose(samples.coeffs, samples.metrics, new if len(new) else None, gave_way)])
        if len(new) == 0:
            if picks_spent < final:
                continue
            new = propose(samples.coeffs, samples.metrics, None, min(step, budget - len(samples)))
        timings["acquire"] += time.perf_counter() - start
        proposal_seconds += [(time.perf_counter() - start) / len(new)] * len(new)
        start = time.perf_counter()
        samples = samples.append(new, call_objective(objective, new, samples.metrics.shape[1]), int(samples.round.max()) + 1)
        timings["evaluate"] += time.perf_counter() - start
    result = estimator.fit_samples(samples, objective=objective, task_names=names, senses=senses, timings=timings,
                                   warm_start=state.get("model"))
    result.settings.update({"strategy": "adaptive", "design": design, "budget": budget, "initial": initial, "final": final,
                            "final_evaluated": picks_evaluated, "noise": noise,
                            "batch": None if asynchronous else batch, "asynchronous": asynchronous, "max_in_flight": in_flight,
                            "preferences": None if preferences is None else preferences.tolist(),
                            "proposal_seconds": proposal_seconds, "proposal_model": proposal_model,
                            "proposal_kinds": state.get("proposal_kinds", [])})
    return result


def _chosen_proposal_model(estimator: Any, objective: Any, done_x: np.ndarray, done_y: np.ndarray, state: dict[str, Any]) -> Any:
    """``proposal_model="auto"``: the quadratic + GP model of the evaluations so far when
    cross-validation prefers it to constant-mean GPs (chosen again every ``PROPOSAL_RECHOOSE``
    evaluations), else ``None`` (the GPs)."""
    names = tuple(f"metric{j}" for j in range(done_y.shape[1]))
    if len(done_x) - state.get("chosen_at", -PROPOSAL_RECHOOSE) >= PROPOSAL_RECHOOSE:
        kind, _ = estimator.cross_validated_kind(Samples(done_x, done_y, np.zeros(len(done_x), dtype=int)), objective, names)
        state["chosen_at"], state["chosen_kind"] = len(done_x), kind
        state.setdefault("proposal_kinds", []).append((len(done_x), kind))
    if state["chosen_kind"] != "quadratic+gp":
        return None
    return estimator.residual_model(done_x, done_y, objective, names)


def _default_final(preferences: np.ndarray | None, num_metrics: int | None, num_coeffs: int, proposal_model: str) -> int:
    """MAP's default ``final``: one evaluation per preference given; else, under constant-mean GP
    proposals (``proposal_model="gp"``), one per metric: each metric's own pick, the front's ends,
    where hypervolume proposals under a constant mean spend least (an objective that names no
    metrics counts one per coefficient); under cross-validated proposals, whose quadratic mean
    reaches the ends itself, none (docs/fronts.md, "The front's ends")."""
    if preferences is not None:
        return len(preferences)
    if proposal_model != "gp":
        return 0
    return num_metrics if num_metrics is not None else num_coeffs


def _final_preferences(preferences: np.ndarray | None, num_metrics: int, final: int) -> np.ndarray:
    """``(final, M)`` normalised preferences for the last evaluations: the user's (cycled), else the
    front's ends first (each metric alone: the one-hot preferences), then the equal preference, then
    well-spread points of the simplex."""
    if preferences is not None:
        if preferences.shape[1] != num_metrics:
            raise ValueError(f"preferences have {preferences.shape[1]} entries but the objective returns {num_metrics} metrics")
        rows = preferences / preferences.sum(axis=1, keepdims=True)
        return rows[np.arange(final) % len(rows)]
    ends = np.eye(num_metrics)
    if final <= num_metrics:
        return ends[:final]
    from .front_metrics import preference_grid
    from .search import thin_front

    equal = np.full((1, num_metrics), 1.0 / num_metrics)
    rest = final - num_metrics - 1
    about = max(rest, 2) * 4
    while True:  # a grid with enough points besides the ends and the equal preference
        grid = preference_grid(num_metrics, about=about)
        grid = grid[(grid < 1.0 - 1e-9).all(axis=1) & (np.abs(grid - equal).max(axis=1) > 1e-9)]
        if len(grid) >= rest:
            break
        about *= 2
    spread = grid[thin_front(grid, rest)] if rest > 0 else grid[:0]
    return np.concatenate([ends, equal, spread])[:final]


def _new_rows(points: np.ndarray, existing: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """The rows of ``points`` farther than ``tol`` (max norm) from every row of ``existing`` and
    from each other."""
    kept: list[np.ndarray] = []
    for point in points:
        others = np.concatenate([existing, np.array(kept).reshape(-1, existing.shape[1])])
        if not (np.abs(others - point).max(axis=1) <= tol).any():
            kept.append(point)
    return np.array(kept).reshape(-1, existing.shape[1])
