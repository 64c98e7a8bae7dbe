"""Front quality per real evaluation: MAP against the peers a user would pick, at equal budgets.

Methods (``--methods``): ``MAP`` (the default: adaptive sampling under Gaussian-process models),
``MAP (design)`` (the authors' one-shot design + quadratic surrogates, 10 re-evaluations of front
points included), ``Bayesian MAP`` (quadratic-mean adaptive sampling + the same re-evaluations),
``qNEHVI`` (botorch, constant-mean GPs, a Sobol start of 2(T+1)), the peers ``Optuna GP``
(``GPSampler``, multi-objective, defaults), ``Optuna TPE`` and ``Ax`` (``Client``, default generation
strategy) through their public APIs (``benchmarks/_peers.py``; ``pip install 'map_merge[peers]'``),
``CMA-ES`` (on the equal-preference scalarisation, as mergekit-evolve), ``random search`` and
``NSGA-II``; plus the deterministic lambda sweeps (task arithmetic, TIES, DARE) on zoos.

Every budgeted method spends exactly ``--budget`` real evaluations (default 22 at T = 2, 40 at
T = 3, 60 at T = 4). Scores per run, against a dense grid of real evaluations:

- ``hv_ratio``: hypervolume of the method's *own* evaluations over the grid front's, the reference
  point just beyond the grid front's nadir (1% of its range per task; ``hv_ratio_10``: 10%).
- ``pick_regret``: for 5-8 preferences w over the simplex, the model the method picks, scored on
  the test split (the same function for ``analytic``): best weighted test score over the grid
  minus the pick's, in metric units oriented higher-is-better (0 is perfect). MAP variants pick
  with their model (``result.select(w)``), every other method picks its best evaluated model by
  validation score (``eval_pick_regret``, reported for MAP variants too). ``grid_pick_regret``: the
  same for the whole grid picked on validation, the pick unlimited evaluations would make (on the
  zoos not 0: validation and test disagree; a pick below it generalises better than the grid's).
- ``propose_s`` (wall time minus time inside the objective), ``evaluate_s`` and
  ``propose_median_s`` (median seconds per proposed point, where the method reports them).

``--summarize`` collects every ``fronts_<label>_T<T>.json`` in ``--out`` into ``fronts_table.md`` (the
README's peer table, mean +- std over seeds, and MAP's pick regret under each pick rule).

    python benchmarks/bench_fronts.py --problem lm --tasks 2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem lm --tasks 3 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem lm --metric lm_eval --tasks 2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem analytic --tasks 4 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem vision --tasks 3 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem text --tasks 2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem lm --tasks 2 --task-names medical,legal --sweeps "" --out benchmarks/results
    python benchmarks/bench_fronts.py --summarize --out benchmarks/results

``--task-names`` runs the comparison on other tasks of a zoo (pairs the table never saw), written as
``fronts_<label>_T<T>_<names>.json`` beside the table and never summarised into it.

Each run is journaled as it finishes (``_common.RunJournal``): the same command started again after a
stop (same settings, same clean commit) runs only the rest.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _common import RunJournal, parser, source_commit, table, write  # noqa: E402
from _fronts_tables import summarize  # noqa: E402
from _peers import PEERS, run_peer  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402
from map_merge.adaptive import proposal_model_for  # noqa: E402
from map_merge.baselines import lambda_sweep  # noqa: E402
from map_merge.compare import BUDGETED, run_method  # noqa: E402
from map_merge.noisy_trend import NOISY_TREND  # noqa: E402
from map_merge.objective import check_senses  # noqa: E402
from map_merge.pareto import cautious_pick, check_noisy, orient, pareto_mask  # noqa: E402

GRID = {"analytic": {2: 21, 3: 9, 4: 6}, "vision": {2: 21, 3: 9, 4: 6}, "text": {2: 9, 3: 5}, "lm": {2: 21, 3: 9},
        "lm_acc": {2: 11, 3: 6}}
BUDGET = {2: 22, 3: 40, 4: 60}
TASKS = {"vision": ["rotated", "inverted", "mirrored_parity", "shifted_mod3"], "text": ["sentiment", "med_subject", "bias_type"],
         "lm": ["code", "medical", "legal"]}
METHODS = ("MAP", "MAP (design)", "Bayesian MAP", "qNEHVI", *PEERS, "CMA-ES", "random search")
MODEL_PICKS = ("MAP", "MAP (design)", "Bayesian MAP")


def analytic(num_tasks: int):
    """A smooth black box in [0, 1]^T (not a merge): per task a bump at its own optimum."""
    optima = 0.15 + 0.7 * np.random.default_rng(7).uniform(size=(num_tasks, num_tasks))

    def fn(c):
        c = np.atleast_2d(c)
        d = ((c[:, None, :] - optima[None]) ** 2).sum(-1)
        z = 2.5 - 8 * d**1.5 + 0.4 * np.sin(5 * c[:, :1] + 3 * c[:, -1:])
        return 1 / (1 + np.exp(-z))

    return mm.FunctionObjective(fn, num_tasks, [f"f{i}" for i in range(num_tasks)], key=f"analytic{num_tasks}", progress=False)


class Timed:
    """Forwards an objective and adds up the seconds spent inside it."""

    def __init__(self, objective):
        self.objective, self.seconds = objective, 0.0

    def __call__(self, coeffs):
        start = time.perf_counter()
        try:
            return self.objective(coeffs)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.objective, name)


def test_preferences(num: int) -> np.ndarray:
    """5-8 preferences: a coarse simplex lattice (corners included) and the equal preference."""
    lattice = mm.preference_grid(num, about=6 if num <= 3 else 4)
    rows = np.concatenate([lattice, np.full((1, num), 1.0 / num)])
    return np.unique(np.round(rows, 12), axis=0)


def run_budgeted(method: str, objective, num: int, budget: int, seed: int, reevaluations: int, proposal_model: str | None = None):
    """``(inputs (N, T), metrics (N, M), result, propose_seconds list)`` of one budgeted run."""
    if method in PEERS:
        result = run_peer(method, objective, num, budget, seed)
        return result.coeffs, result.metrics, result, result.settings["propose_seconds"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_method(method, objective, num, budget, seed=seed, reevaluations=reevaluations, proposal_model=proposal_model)
    seconds = run.result.settings.get("proposal_seconds", []) if method in MODEL_PICKS else []
    return run.inputs, run.metrics, run.result, seconds


def zoo_tasks(problem: str, num: int, task_names: str | None) -> list[str]:
    """The ``num`` tasks of a zoo to merge: its first ``num``, or ``task_names`` (comma-separated),
    put in the zoo's own order (any order of the same tasks is the same run). ``ValueError`` names
    the problem."""
    tasks = TASKS[problem]
    if num > len(tasks):
        raise ValueError(f"the {problem} zoo has {len(tasks)} tasks, so at most T = {len(tasks)}; got --tasks {num}")
    if task_names is None:
        return tasks[:num]
    names = [n.strip() for n in task_names.split(",")]
    if len(names) != num or len(set(names)) != num or not set(names) <= set(tasks):
        raise ValueError(f"--task-names must name {num} different tasks of {tasks}, got {names}")
    return [t for t in tasks if t in names]


def zoo_objectives(problem: str, names: list[str], metric: str, size: str | None, store: str | Path, val_examples: int | None = None):
    """``(zoo, val split, store, options, objective, test objective)`` of a zoo problem: the
    ``names`` tasks' validation and test objectives sharing one evaluation store. Every task of the
    zoo is loaded, so that the data fingerprint in each stored key is the same for every T."""
    from map_merge.zoo import load_zoo

    lm = problem == "lm"
    zoo = load_zoo(problem, TASKS[problem], progress=False, **({"size": size} if lm else {}))
    split = zoo.limit_split("val", val_examples)
    store = mm.EvaluationStore(store)
    options = {"metric": metric} if lm else {}
    objective = zoo.objective(names, split=split, store=store, progress=False, **options)
    test_objective = zoo.objective(names, split="test", store=store, progress=False, **options)
    return zoo, split, store, options, objective, test_objective


def table_path(out: Path, label: str, num: int, problem: str, names: list[str] | None) -> Path:
    """Where a run's JSON goes: ``fronts_<label>_T<T>.json`` (the peer table's) for the problem's own
    tasks, ``fronts_<label>_T<T>_<names>.json`` for another subset of a zoo's tasks."""
    other = names is not None and problem in TASKS and names != TASKS[problem][:num]
    return out / f"fronts_{label}_T{num}{'_' + '+'.join(names) if other else ''}.json"


class PickRegret:
    """Pick regret: how much worse, in the preferences' mean weighted score, the models picked for
    ``prefs: (P, M)`` are than the best grid point for each preference.

    ``val`` scores on ``objective`` (validation: the score the methods were given; search quality),
    ``test`` on ``test_objective``; both against the grid's best on the same objective
    (``grid_val / grid_test: (G, M)``, the metrics of ``grid: (G, T)``). ``grid_pick``: the test
    regret of the grid's own validation picks (what unlimited evaluations would hand a user; how far
    validation misleads). Metrics oriented higher-is-better by ``senses`` before weighting."""

    def __init__(self, objective, test_objective, senses, prefs: np.ndarray, grid: np.ndarray, grid_val: np.ndarray, grid_test: np.ndarray):
        self.objective, self.test_objective, self.senses, self.prefs = objective, test_objective, senses, prefs
        self.best_val = (orient(grid_val, senses) @ prefs.T).max(axis=0)  # (P,)
        self.best_test = (orient(grid_test, senses) @ prefs.T).max(axis=0)  # (P,)
        self.grid_pick = self.test(grid[np.argmax(orient(grid_val, senses) @ prefs.T, axis=0)])

    def _regret(self, objective, best: np.ndarray, picks: np.ndarray) -> float:
        scores = np.einsum("pm,pm->p", orient(np.asarray(objective(picks)), self.senses), self.prefs)
        return float(np.mean(best - scores))

    def test(self, picks: np.ndarray, test_objective=None) -> float:
        """Test regret of ``picks: (P, T)``, one per preference, evaluated on the test objective (or on
        ``test_objective``: the same test data merged another way, e.g. a sweep's own merge method)."""
        return self._regret(self.test_objective if test_objective is None else test_objective, self.best_test, picks)

    def val(self, picks: np.ndarray) -> float:
        """Validation regret of ``picks: (P, T)`` (off-evaluation picks are evaluated for scoring, outside any budget)."""
        return self._regret(self.objective, self.best_val, picks)

    def evaluated(self, inputs: np.ndarray, metrics: np.ndarray) -> tuple[float, float]:
        """``(test, validation)`` regret of the best evaluation per preference among ``inputs: (N, T)``
        with their validation ``metrics: (N, M)`` (the validation regret from the measurements themselves)."""
        weighted = orient(metrics, self.senses) @ self.prefs.T  # (N, P)
        return self.test(inputs[np.argmax(weighted, axis=0)]), float(np.mean(self.best_val - weighted.max(axis=0)))


def grid_drift(stored, now: np.ndarray) -> float:
    """The largest difference between a table's stored best weighted test scores and this run's:
    ``inf`` when they cannot be compared (missing, another length, NaN where the other is not); a
    NaN on both sides at a preference matches (a NaN would otherwise hide every other difference)."""
    stored = np.asarray(stored if stored is not None else [], dtype=np.float64)
    now = np.asarray(now, dtype=np.float64)
    if stored.shape != now.shape or (np.isnan(stored) != np.isnan(now)).any():
        return float("inf")
    both = ~np.isnan(now)
    return float(np.max(np.abs(stored[both] - now[both]), initial=0.0))


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--problem", choices=["analytic", "vision", "text", "lm"], default="analytic")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--metric", choices=["loss", "lm_eval"], default="loss", help="lm: held-out loss (min) or lm-eval accuracy (max)")
    p.add_argument("--size", default=None, help="lm zoo size (default small; tiny with --quick)")
    p.add_argument("--per-axis", type=int, default=None, help="reference grid points per axis (default: GRID of the problem)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (with --update: add seeds to a table)")
    p.add_argument("--budget", type=int, default=None, help="real evaluations per budgeted method (default 22 / 40 / 60 at T = 2 / 3 / 4)")
    p.add_argument("--reevaluations", type=int, default=10, help="front re-evaluations inside the budget of MAP (design) / Bayesian MAP")
    p.add_argument("--methods", default=",".join(METHODS), help=f"budgeted methods, from {BUDGETED + PEERS}")
    p.add_argument("--sweeps", default=None, help="lambda sweeps, from 'task arithmetic,TIES,DARE' (default: all on zoos)")
    p.add_argument("--val-examples", type=int, default=None, help="zoos: score on the first N validation examples per task")
    p.add_argument("--store", default=None, help="evaluation store (default: <out>/<problem>_evals.sqlite)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--task-names", default=None, help="zoos: the T tasks to merge, comma-separated (default: the zoo's first T); "
                                                       "written as fronts_<label>_T<T>_<names>.json, outside the peer table")
    p.add_argument("--test-preferences", type=int, default=None, help="use the first N test preferences (default: all 5-8)")
    p.add_argument("--proposal-model", choices=["gp", "auto"], default=None,
                   help="MAP's proposal_model (default: MAP's, gp below T = 4 and auto from 4 on)")
    p.add_argument("--summarize", action="store_true", help="only write fronts_table.md from the JSON files in --out")
    p.add_argument("--update", action="store_true", help="rerun only --methods at the seeds given (and --sweeps): every other "
                                                         "(method, seed) row comes from the existing JSON of the same settings")
    args = p.parse_args()
    out = Path(args.out)
    if args.summarize:
        print(f"wrote {summarize(out)}")
        return
    import torch

    torch.set_num_threads(args.threads)
    num, problem = args.tasks, args.problem
    lm = problem == "lm"
    label = problem if not lm else ("lm" if args.metric == "loss" else "lm_acc")
    zoo = None
    if problem == "analytic":
        if args.task_names is not None:
            raise SystemExit("--task-names chooses a zoo's tasks; the analytic problem has none")
        objective = test_objective = analytic(num)
        names = list(objective.task_names)
    else:
        try:
            names = zoo_tasks(problem, num, args.task_names)
        except ValueError as error:
            raise SystemExit(f"bench_fronts.py: {error}") from None
        zoo, split, store, options, objective, test_objective = zoo_objectives(
            problem, names, args.metric, args.size or ("tiny" if args.quick else "small"),
            args.store or out / f"{problem}{'_' + args.metric if lm else ''}_evals.sqlite", args.val_examples)
    senses = check_senses(getattr(objective, "senses", None), num)
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    per_axis = args.per_axis or (GRID[label][num] if not args.quick else 5)
    budget = args.budget or (BUDGET[num] if not args.quick else 10)
    seeds = list(range(args.first_seed, args.first_seed + (1 if args.quick else args.seeds)))
    reevaluations = max(0, min(args.reevaluations, budget - mm.num_quadratic_params(num)))  # inside the budget of the design variants
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        if method not in BUDGETED + PEERS:
            raise SystemExit(f"unknown method {method!r}; choose from {BUDGETED + PEERS}")

    grid = mm.grid_design(num, per_axis)
    prefs = test_preferences(num)[: args.test_preferences]
    stored = table_path(out, label, num, problem, None if zoo is None else names)  # another subset of a zoo's tasks: kept out of the table
    size = (args.size or ("tiny" if args.quick else "small")) if lm else None
    proposal_model = proposal_model_for(args.proposal_model, num)  # what MAP's rows run: recorded, and kept alike by --update
    noisy = check_noisy(getattr(objective, "noisy", None), num)  # which metrics the MAP family's picks score by the model
    commit = source_commit()
    earlier = None
    if args.update and stored.exists():  # checked before any run: the table's rows must be scored alike
        earlier = json.loads(stored.read_text())
        # the same runs (budget, re-evaluations, data) against the same grid and test preferences (test_preferences and
        # grid_best_weighted_test are written once, from this run)
        settings = {"version": 3, "budget": budget, "grid_points": len(grid), "reevaluations": reevaluations, "val_examples": args.val_examples,
                    "size": size, "test_preferences": prefs.tolist(), "proposal_model": proposal_model}
        if "MAP" in methods and set(seeds) >= {r["seed"] for r in earlier["rows"] if r["method"] == "MAP"}:
            del settings["proposal_model"]  # every MAP row is rerun: none of the earlier proposal model is kept
        stored_model = earlier.get("proposal_model", "gp")  # tables written before the flag ran the GPs
        other = [key for key, value in settings.items() if (stored_model if key == "proposal_model" else earlier.get(key)) != value]
        if other:
            hint = (f" (its MAP rows ran proposal_model={stored_model}: pass --proposal-model {stored_model}, or rerun every MAP row)"
                    if "proposal_model" in other else "")
            raise SystemExit(f"--update: {stored} was made with other settings ({', '.join(other)}){hint}; rerun everything")
        # a kept MAP-family row's default pick scored real evaluations by the flags it recorded: other flags, another rule
        # (and, in noisy metrics, predicted them with another weight of the quadratic trend: a row without one predates it)
        kept = sorted((r["method"], r["seed"]) for r in earlier["rows"] if r["method"] in MODEL_PICKS
                      and (r["method"] not in methods or r["seed"] not in seeds)
                      and (r.get("noisy") != list(noisy) or (any(noisy) and r.get("noisy_trend", 0.0) != NOISY_TREND)))
        if kept:
            raise SystemExit(f"--update: {stored} holds picks of {kept} made with other noisy flags than the objective's now "
                             f"({list(noisy)}; a row without flags predates them) or another noisy_trend than {NOISY_TREND}; "
                             "rerun those methods and seeds too")
    start = time.perf_counter()
    grid_val = objective(grid)
    grid_test = test_objective(grid)
    grid_seconds = time.perf_counter() - start
    front = orient(grid_val, senses)[pareto_mask(orient(grid_val, senses))]
    span = np.maximum(np.ptp(front, axis=0), 1e-12)
    nadir = {"hv_ratio": front.min(axis=0) - 0.01 * span, "hv_ratio_10": front.min(axis=0) - 0.1 * span}
    full = {k: mm.hypervolume(front, ref) for k, ref in nadir.items()}
    regret = PickRegret(objective, test_objective, senses, prefs, grid, grid_val, grid_test)
    best_test = regret.best_test
    if earlier is not None:  # the kept rows were scored on the earlier objective: a rebuilt zoo (other weights) would mix two problems
        drift = grid_drift(earlier.get("grid_best_weighted_test"), best_test)
        if not drift <= 1e-9:
            raise SystemExit(f"--update: the grid's best weighted test scores differ from {stored}'s by up to {drift:.3g}: the objective is "
                             "not the one its rows were scored on (a zoo rebuilt on another machine, another evaluation store?); "
                             "rerun every method, or use the store the table was made with")
    test_regret, val_regret, grid_pick_regret = regret.test, regret.val, regret.grid_pick

    def scores(inputs: np.ndarray, metrics: np.ndarray) -> dict[str, float]:
        oriented = orient(metrics, senses)
        row = {k: float(mm.hypervolume(oriented, nadir[k]) / full[k]) for k in nadir}
        row["eval_pick_regret"], row["val_pick_regret"] = regret.evaluated(inputs, metrics)
        return row

    rows, examples = [], {}
    sweep_methods = {} if zoo is None else {"task arithmetic": None, "TIES": mm.Ties(0.2), "DARE": mm.Dare(0.5, seed=0)}
    chosen_sweeps = [s for s in (args.sweeps.split(",") if args.sweeps is not None else sweep_methods) if s]
    for name in chosen_sweeps:
        method = sweep_methods.get(name)
        swept = objective if method is None else zoo.objective(names, split=split, method=method, store=store, progress=False, **options)
        found = lambda_sweep(swept, num, np.linspace(0, 1, 11), name=name)
        row = scores(found.coeffs, found.metrics)
        if method is not None:  # the sweep's picks are merged by its own method: score them on its own test objective
            tested = zoo.objective(names, split="test", method=method, store=store, progress=False, **options)
            picks = found.coeffs[np.argmax(orient(found.metrics, senses) @ prefs.T, axis=0)]
            row["eval_pick_regret"] = regret.test(picks, tested)
        row["pick_regret"] = row["eval_pick_regret"]
        rows.append({"method": name, "seed": 0, "evaluations": found.num_evaluations, "budgeted": False, **row})
        examples[name] = found.metrics
    # every finished run kept as it finishes: a stopped benchmark started again with the same settings skips them
    journal = RunJournal(out, stored.stem, {"runs": [label, names, budget, reevaluations, len(grid), args.val_examples, size, proposal_model],
                                            "scored": [prefs.tolist(), best_test.tolist(), list(noisy), NOISY_TREND]})
    if journal.note:
        print(journal.note, flush=True)
    for method, seed in tqdm([(m, s) for m in methods for s in seeds], desc=f"{label} T={num}"):
        done = journal.get(f"{method}|{seed}")
        if done is not None:
            rows.append(done["row"])
            if seed == 0:
                examples[method] = np.asarray(done["metrics"])
            continue
        timed = Timed(objective)
        start = time.perf_counter()
        inputs, metrics, result, proposals = run_budgeted(method, timed, num, budget, seed, reevaluations, proposal_model)
        wall = time.perf_counter() - start
        row = {"method": method, "seed": seed, "evaluations": len(inputs), "budgeted": True, **scores(inputs, metrics),
               "evaluate_s": timed.seconds, "propose_s": wall - timed.seconds, "commit": commit}
        if method == "MAP":
            row["proposal_model"] = proposal_model
        if proposals:
            row["propose_median_s"] = float(np.median(proposals))
        if method in MODEL_PICKS:
            picks = np.stack([result.select(w) for w in prefs])
            row["pick_regret"], row["val_pick_regret"] = test_regret(picks), val_regret(picks)
            row["noisy"] = list(check_noisy(result.noisy, num))  # the flags this pick used (as bench_pick_rules records them)
            row["noisy_trend"] = float(result.fitter.noisy_trend)  # the weight configured (settings: the weight applied)
        else:
            row["pick_regret"] = row["eval_pick_regret"]
        if method in MODEL_PICKS:  # the same run under the other pick rules (docs/fronts.md, "Which model is handed over")
            row["pick_regret_best_mean"] = test_regret(np.stack([result.front.select(w) for w in prefs]))
            row["pick_regret_half_std"] = test_regret(np.stack([result.select(w, caution=0.5) for w in prefs]))
            real = result.real_evaluations()
            if any(result.noisy or ()):  # else the default rule is this one: the same picks
                measured = [cautious_pick(result.front, w, real) for w in prefs]
                row["pick_regret_measured"] = test_regret(np.stack([front.coeffs[index] for front, index in measured]))
            else:
                row["pick_regret_measured"] = row["pick_regret"]
            posterior = result.predict(real.coeffs, return_std=True)
            handed = [cautious_pick(result.front, w, real, posterior=posterior) for w in prefs]
            row["pick_regret_posterior"] = test_regret(np.stack([front.coeffs[index] for front, index in handed]))
        rows.append(row)
        journal.add(f"{method}|{seed}", {"row": row, "metrics": np.asarray(metrics).tolist() if seed == 0 else None})
        if seed == 0:
            examples[method] = metrics
    name = stored.stem
    if earlier is not None:  # keep the earlier run's rows of every (method, seed) not rerun now
        rerun = {(m, s) for m in methods for s in seeds} | {(m, 0) for m in chosen_sweeps}
        rows = [r for r in earlier["rows"] if (r["method"], r["seed"]) not in rerun] + rows
        fresh = set(examples)  # seed 0's evaluations when seed 0 was rerun
        examples = {**{k: np.array(v) for k, v in earlier.get("examples", {}).items() if k not in fresh}, **examples}
        order = list(dict.fromkeys([*earlier.get("methods", []), *methods]))
        rows.sort(key=lambda r: (r["budgeted"], order.index(r["method"]) if r["method"] in order else -1, r["seed"]))
        methods = order
    summary = []
    keys = ("hv_ratio", "hv_ratio_10", "pick_regret", "val_pick_regret", "eval_pick_regret", "pick_regret_best_mean", "pick_regret_half_std",
            "pick_regret_measured", "pick_regret_posterior", "propose_s", "evaluate_s", "propose_median_s")
    for method in dict.fromkeys(r["method"] for r in rows):
        sub = [r for r in rows if r["method"] == method]
        entry = {"method": method, "evaluations": sub[0]["evaluations"], "seeds": len(sub), "budgeted": sub[0]["budgeted"]}
        for key in keys:
            values = [r[key] for r in sub if key in r]
            if values and len(values) == len(sub):  # a rule measured on only some seeds is not summarised
                entry[f"{key}_mean"], entry[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        summary.append(entry)
    meaning = {"analytic": "a smooth black box (higher is better)", "vision": "accuracy (higher is better)", "text": "accuracy (higher is better)",
               "lm": "held-out loss (nats/token, lower is better)", "lm_acc": "lm-eval multiple-choice accuracy (higher is better)"}
    budgeted_methods = dict.fromkeys(r["method"] for r in rows if r["budgeted"])
    num_seeds = min((len({r["seed"] for r in rows if r["method"] == m}) for m in budgeted_methods), default=0)
    path = write(out, name, {
        "version": 3, "problem": problem, "label": label, "metric_meaning": meaning[label], "tasks": num, "task_names": names,
        "senses": list(senses), "budget": budget, "reevaluations": reevaluations, "methods": methods, "threads": args.threads,
        "proposal_model": proposal_model,
        "seeds": num_seeds,
        "size": size, "val_examples": args.val_examples,
        "grid_points": len(grid), "grid_per_axis": per_axis, "grid_seconds": grid_seconds, "grid_front_points": len(front),
        "hv_reference": {k: (sign * v).tolist() for k, v in nadir.items()},
        "hv_reference_meaning": "the grid front's nadir moved out by 1% (hv_ratio) or 10% (hv_ratio_10) of its range per task",
        "test_preferences": prefs.tolist(), "grid_best_weighted_test": best_test.tolist(), "grid_pick_regret": grid_pick_regret,
        "grid_pick_regret_meaning": "test regret of the grid's best model by weighted validation score, per preference, mean",
        "pick_regret_meaning": "grid's best weighted test score minus the pick's, oriented higher-is-better, mean over the preferences",
        "rows": rows, "summary": summary, "examples": {k: np.asarray(v).tolist() for k, v in examples.items()}})
    journal.close()  # its rows are in the table's JSON now
    budgeted = [s for s in summary if s["budgeted"]]
    colors = ["C0" if s["method"] in MODEL_PICKS else "C7" for s in budgeted]
    title = f"{label}, T={num}, {budget} real evaluations, {num_seeds} seeds ({meaning[label]})"
    plots.plot_bars({s["method"]: (s["hv_ratio_mean"], s["hv_ratio_std"]) for s in budgeted}, "hypervolume ratio to the dense grid's front",
                    title=title, colors=colors, path=out / f"{name}.png")
    plots.plot_bars({s["method"]: (s["pick_regret_mean"], s["pick_regret_std"]) for s in summary}, "test regret of the picks (lower is better)",
                    title=title, path=out / f"{name}_regret.png")
    ref_points = sign * front
    example_title = f"{label}, T={num}, seed 0: each method's {budget} real evaluations"
    if num == 2:
        plots.plot_front_2d(examples, names, reference=ref_points[np.argsort(ref_points[:, 0])], senses=senses,
                            lines={k: k in chosen_sweeps for k in examples}, title=example_title, labels=objective.metric_labels,
                            reference_label=f"dense grid's front ({len(grid)} models)", path=out / f"{name}_example.png")
    else:
        plots.plot_pairwise(examples, names, reference=ref_points, title=example_title, labels=objective.metric_labels,
                            path=out / f"{name}_example.png")
    print(table(summary, ["method", "evaluations", "seeds", "hv_ratio_mean", "hv_ratio_std", "pick_regret_mean", "pick_regret_std",
                          "eval_pick_regret_mean", "propose_s_mean", "propose_median_s_mean"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
