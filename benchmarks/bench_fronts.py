"""Front quality against real evaluations spent, over seeds: MAP, Bayesian MAP, and what a user
would otherwise run (random search, NSGA-II and qNEHVI on real evaluations, task arithmetic,
TIES and DARE lambda sweeps), plus nested merging (T >= 3, equal preference) and PWE-MoE.

Budgeted methods get E = b * P + R real evaluations for b in --budgets (P: the quadratic's
parameters, R: --reevaluations, the front points MAP variants re-evaluate). A method's front is the
non-dominated set of every real model it evaluated. Reference front: a dense grid of real
evaluations joined with every evaluation any method made (the best known front); the hypervolume
reference point is the grid's worst value per task. Per row: hypervolume ratio, IGD+, mean
preference regret over ~20 preferences (best weighted score on the reference minus the best among
the method's evaluations), win rate over the task-arithmetic sweep, regret at equal preference,
and the method's own overhead in seconds (wall time minus time inside the objective). For MAP
variants, "pick regret" scores the model the surrogate picks for each preference, evaluated for
real (not charged to the budget).

Metrics may be maximised (accuracy) or minimised (held-out loss): every score is taken with the
objective's senses (the hypervolume reference point is the grid's worst value per task).

The language-model zoo (``--problem lm``, domains code / medical / legal) is scored by held-out
loss (``--metric loss``, min) or lm-eval multiple-choice accuracy (``--metric lm_eval``, max); its
runs also report "test regret": for each preference, the model a user picks from a method's real
evaluations (best weighted validation score) is scored on the test split, against the best
weighted test score of every model picked that way (the dense grid's picks included; a
"dense grid" row is the grid's own pick). MAP variants add the test regret of the surrogate's
own picks. Outputs: ``fronts_lm_T{T}`` (loss) and ``fronts_lm_acc_T{T}`` (lm-eval).

    python benchmarks/bench_fronts.py --problem lm --tasks 2 --metric loss --out benchmarks/results
    python benchmarks/bench_fronts.py --problem lm --tasks 2 --metric lm_eval --out benchmarks/results
    python benchmarks/bench_fronts.py --problem vision --tasks 2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem vision --tasks 3 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem text --tasks 2 --budgets 1,2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem analytic --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402
from map_merge.baselines import lambda_sweep  # noqa: E402
from map_merge.compare import BUDGETED, MethodRun, run_method, score_runs  # noqa: E402
from map_merge.front_metrics import preference_grid  # noqa: E402
from map_merge.objective import check_senses  # noqa: E402

GRID = {"analytic": {2: 21, 3: 9, 4: 6}, "vision": {2: 21, 3: 9, 4: 6}, "text": {2: 9, 3: 4}, "lm": {2: 21, 3: 9}}
TASKS = {"vision": ["rotated", "inverted", "mirrored_parity", "shifted_mod3"], "text": ["sentiment", "med_subject", "bias_type"],
         "lm": ["code", "medical", "legal"]}


def analytic(num_tasks: int):
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


class Columns:
    """Some of an objective's metric columns, with their senses (the stages of nested merging)."""

    def __init__(self, objective, index):
        self.objective, self.index = objective, list(index)
        self.senses = tuple(objective.senses[i] for i in self.index)

    def __call__(self, coeffs):
        return self.objective(coeffs)[:, self.index]


def picks_of(inputs: np.ndarray, oriented: np.ndarray, preferences: np.ndarray) -> np.ndarray:
    """``(P, T)``: per preference, the evaluated input with the best weighted (oriented) score."""
    return inputs[np.argmax(oriented @ preferences.T, axis=0)]


def unique_call(objective, coeffs: np.ndarray) -> np.ndarray:
    """``objective(coeffs)`` evaluating each distinct row once."""
    rows, inverse = np.unique(np.round(coeffs, 12), axis=0, return_inverse=True)
    return objective(rows)[np.asarray(inverse).reshape(-1)]


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--problem", choices=["analytic", "vision", "text", "lm"], default="analytic")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--metric", choices=["loss", "lm_eval"], default="loss",
                   help="lm: held-out loss (min) or lm-eval multiple-choice accuracy (max)")
    p.add_argument("--size", default=None, help="lm zoo size (default small; tiny with --quick)")
    p.add_argument("--per-axis", type=int, default=None, help="grid points per axis of the reference grid (default: GRID of the problem)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--budgets", default="1,2,3,4", help="budgets as multiples of the quadratic's parameter count P")
    p.add_argument("--reevaluations", type=int, default=10)
    p.add_argument("--methods", default=",".join(BUDGETED), help=f"budgeted methods, from {BUDGETED}")
    p.add_argument("--sweeps", default=None, help="lambda sweeps to run, from 'task arithmetic,TIES,DARE' (default: all on zoos)")
    p.add_argument("--moe-steps", type=int, default=None, help="PWE-MoE training steps (default 100 on vision, 0 elsewhere)")
    p.add_argument("--val-examples", type=int, default=None, help="score zoo models on the first N validation examples per task")
    p.add_argument("--no-picks", action="store_true", help="skip evaluating the surrogate's pick per preference (always skipped on text)")
    p.add_argument("--store", default=None, help="evaluation store (default: <out>/<problem>_evals.sqlite)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--test-preferences", type=int, default=20, help="lm: about how many preferences the test regret averages over")
    p.add_argument("--surrogate-test-picks", action="store_true", help="lm: also score the MAP surrogates' picks on test")
    p.add_argument("--no-nested", action="store_true", help="skip nested merging (T >= 3)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    num, problem = args.tasks, args.problem
    out = Path(args.out)
    zoo = None
    lm = problem == "lm"
    if problem == "analytic":
        objective = analytic(num)
    else:
        from map_merge.zoo import load_zoo

        names = TASKS[problem][:num]
        # all of the problem's tasks are loaded, so that the data fingerprint (part of every stored
        # evaluation's key) is the same for every T and for the demo
        extra = {"size": args.size or ("tiny" if args.quick else "small")} if lm else {}
        zoo = load_zoo(problem, TASKS[problem], progress=False, **extra)
        split = zoo.limit_split("val", args.val_examples)
        store = mm.EvaluationStore(args.store or out / f"{problem}{'_' + args.metric if lm else ''}_evals.sqlite")
        options = {"metric": args.metric} if lm else {}
        objective = zoo.objective(names, split=split, store=store, progress=False, **options)
    senses = check_senses(getattr(objective, "senses", None), num)
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    per_axis = args.per_axis or (GRID[problem][num] if not args.quick else 5)
    grid = mm.grid_design(num, per_axis)
    start = time.perf_counter()
    cached_before = getattr(objective, "num_cached", 0)
    grid_metrics = objective(grid)
    grid_seconds = time.perf_counter() - start
    grid_from_store = getattr(objective, "num_cached", 0) - cached_before  # grid points an earlier run had evaluated
    ref_point = sign * (sign * grid_metrics).min(axis=0)  # the grid's worst value per task
    params = mm.num_quadratic_params(num)
    multiples = [1] if args.quick else [int(b) for b in args.budgets.split(",")]
    budgets = [b * params + args.reevaluations for b in multiples]
    seeds = list(range(2 if args.quick else args.seeds))
    methods = [m for m in args.methods.split(",") if m]
    moe_steps = (5 if args.quick else 100) if args.moe_steps is None and problem == "vision" else (args.moe_steps or 0)
    preferences = preference_grid(num)
    equal = np.full(num, 1.0 / num)

    runs: list[tuple[dict, MethodRun]] = []  # (row keys, run)
    picks: dict[tuple, np.ndarray] = {}  # (method, budget, seed) -> real metrics of the surrogate's picks (P, M)
    surrogate_results: dict[tuple, object] = {}  # (method, budget, seed) -> the MAP variant's result
    sweep_methods = {} if zoo is None else {"task arithmetic": None, "TIES": mm.Ties(0.2), "DARE": mm.Dare(0.5, seed=0)}
    chosen_sweeps = ["task arithmetic"] if zoo is None else list(sweep_methods)
    if args.sweeps is not None:
        chosen_sweeps = [s for s in args.sweeps.split(",") if s]
    sweep_objectives = {}  # sweep name -> its (val objective, merge method)
    # deterministic sweeps: once
    for name in chosen_sweeps:
        method = sweep_methods.get(name)
        swept = Timed(objective if method is None else zoo.objective(names, split=split, method=method, store=store, progress=False, **options))
        sweep_objectives[name] = method
        found = lambda_sweep(swept, num, np.linspace(0, 1, 11), name=name)
        runs.append(({"method": name, "seed": 0, "budget": 11},
                     MethodRun(name, found.coeffs, found.metrics, found.num_evaluations, found.seconds - swept.seconds)))
    jobs = [(m, b, s) for b in budgets for m in methods for s in seeds]
    for method, budget, seed in tqdm(jobs, desc=f"{problem} T={num}"):
        timed = Timed(objective)
        run = run_method(method, timed, num, budget, seed=seed, reevaluations=args.reevaluations)
        run.seconds -= timed.seconds
        run.extra["objective_seconds"] = timed.seconds
        runs.append(({"method": method, "seed": seed, "budget": budget}, run))
        if method in ("MAP", "Bayesian MAP"):
            surrogate_results[(method, budget, seed)] = run.result
        if method in ("MAP", "Bayesian MAP") and not args.no_picks and problem != "text":
            chosen = np.stack([run.result.select(w) for w in preferences])
            picks[(method, budget, seed)] = objective(chosen)
    for seed in seeds if num >= 3 and not args.no_nested else []:
        timed = Timed(objective)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nested = mm.nested_merge(lambda idx: Columns(timed, idx), num, equal, samples_per_stage=2 * mm.num_quadratic_params(2), seed=seed)
        runs.append(({"method": "nested merging", "seed": seed, "budget": nested.num_evaluations},
                     MethodRun("nested merging", nested.coeffs[None], nested.metrics[None], nested.num_evaluations,
                               time.perf_counter() - start - timed.seconds, nested)))
    from map_merge.moe import simplex_lattice

    moe_jobs = [(seed, kind) for seed in seeds for kind in ("ls", "epo")] if moe_steps > 0 else []
    for seed, kind in tqdm(moe_jobs, desc=f"PWE-MoE, {moe_steps} router steps", disable=not moe_jobs):
        moe, info = zoo.fit_moe(names, method=kind, steps=moe_steps, batch_size=32 if problem == "vision" else 8, lr=3e-2 if problem == "vision" else 1e-2,
                                seed=seed, checkpoint=out / "moe_routers", progress=False)
        inputs = simplex_lattice(num, 0.1 if num == 2 else 0.25)
        metrics = zoo.moe_objective(moe, names, split=split, store=store, progress=False)(inputs)
        runs.append(({"method": f"PWE-MoE ({kind.upper()})", "seed": seed, "budget": len(inputs)},
                     MethodRun(f"PWE-MoE ({kind.upper()})", inputs, metrics, len(inputs), info["seconds"],
                               extra={"training_steps": moe_steps, "peak_rss_mb": info["peak_rss_mb"]})))

    # test regret (lm): each run's pick per preference, from its real evaluations on validation, scored on test
    test_scores: dict[int, np.ndarray] = {}  # run index -> (P,) weighted oriented test scores of its picks
    surrogate_test: dict[tuple, np.ndarray] = {}
    test_info = {}
    if lm:
        start = time.perf_counter()
        test_objectives = {}

        def test_objective(merge):
            key = "task arithmetic" if merge is None else merge
            if key not in test_objectives:
                test_objectives[key] = zoo.objective(names, split="test", store=store, progress=False, method=sweep_methods.get(merge),
                                                     **options)
            return test_objectives[key]

        def weighted_test(merge, coeffs):
            metrics = unique_call(test_objective(merge), coeffs)
            return np.einsum("pm,pm->p", sign * metrics, test_preferences)

        test_preferences = preference_grid(num, about=args.test_preferences)
        grid_pick = picks_of(grid, sign * grid_metrics, test_preferences)
        grid_test = weighted_test(None, grid_pick)
        for index, (keys, run) in enumerate(runs):
            if keys["method"].startswith("PWE-MoE") or keys["method"] == "nested merging":
                continue
            merge = keys["method"] if keys["method"] in sweep_methods else None
            test_scores[index] = weighted_test(merge, picks_of(run.inputs, sign * run.metrics, test_preferences))
        for key, result in surrogate_results.items() if args.surrogate_test_picks else ():
            surrogate_test[key] = weighted_test(None, np.stack([result.select(w) for w in test_preferences]))
        best_test = np.max(np.stack([grid_test, *test_scores.values(), *surrogate_test.values()]), axis=0)
        test_info = {"test_preferences": test_preferences.tolist(), "test_best_weighted": best_test.tolist(), "dense_grid_test_regret_mean": float((best_test - grid_test).mean()),
                     "test_seconds": time.perf_counter() - start,
                     "test_evaluations": int(sum(o.num_evaluations for o in test_objectives.values()))}

    pooled = np.concatenate([grid_metrics] + [run.metrics for _, run in runs])
    reference = pooled[mm.pareto_mask(sign * pooled)]
    best_equal = float((sign * reference @ equal).max())
    # a tighter hypervolume reference point: the reference front's nadir moved out by 10% of its range per task
    oriented_ref = sign * reference
    nadir_point = sign * (oriented_ref.min(axis=0) - 0.1 * np.maximum(np.ptp(oriented_ref, axis=0), 1e-12))
    hv_nadir_full = mm.hypervolume(oriented_ref, sign * nadir_point)
    baseline = next(run for keys, run in runs if keys["method"] == "task arithmetic") if "task arithmetic" in chosen_sweeps else None
    rows = []
    for index, (keys, run) in enumerate(runs):
        compared = {"run": run} if baseline is None else {"run": run, "task arithmetic": baseline}
        score = score_runs(compared, reference, ref_point, preferences=preferences, baseline=None if baseline is None else "task arithmetic",
                           senses=senses)["run"]
        score["regret_equal_preference"] = best_equal - float((sign * run.metrics @ equal).max())
        score["hv_ratio_nadir"] = float(mm.hypervolume(sign * run.front(senses), sign * nadir_point) / hv_nadir_full)
        if keys["method"] == "nested merging":
            score = {k: v for k, v in score.items() if k in ("evaluations", "seconds", "regret_equal_preference")}
        pick = picks.get((keys["method"], keys["budget"], keys["seed"]))
        if pick is not None:
            score["pick_regret_mean"] = float(np.mean((sign * reference @ preferences.T).max(axis=0) - np.einsum("pm,pm->p", sign * pick, preferences)))
        if index in test_scores:
            score["test_regret_mean"] = float((best_test - test_scores[index]).mean())
        if (keys["method"], keys["budget"], keys["seed"]) in surrogate_test:
            score["test_pick_regret_mean"] = float((best_test - surrogate_test[(keys["method"], keys["budget"], keys["seed"])]).mean())
        rows.append({**keys, **score})
    if lm:
        rows.append({"method": "dense grid", "seed": 0, "budget": len(grid), "evaluations": len(grid), "seconds": 0.0,
                     "test_regret_mean": test_info["dense_grid_test_regret_mean"]})
    summary = []
    keys_summarised = ("hv_ratio", "hv_ratio_nadir", "igd_plus", "regret_mean", "pick_regret_mean", "test_regret_mean", "test_pick_regret_mean",
                       "win_rate_vs_baseline", "regret_equal_preference", "seconds")
    for method in dict.fromkeys(r["method"] for r in rows):
        for evaluations in sorted({r["evaluations"] for r in rows if r["method"] == method} if method not in BUDGETED else budgets):
            sub = [r for r in rows if r["method"] == method and (r["evaluations"] == evaluations or (method in BUDGETED and r["budget"] == evaluations))]
            entry = {"method": method, "evaluations": evaluations, "seeds": len(sub)}
            for key in keys_summarised:
                values = [r[key] for r in sub if key in r]
                if values:
                    entry[f"{key}_mean"], entry[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
            summary.append(entry)
    label = problem if not lm else ("lm" if args.metric == "loss" else "lm_acc")
    name = f"fronts_{label}_T{num}"
    metric_label = {"loss": "held-out loss (nats/token, lower is better)", "lm_eval": "lm-eval multiple-choice accuracy (higher is better)"}
    path = write(out, name, {
        "problem": problem, "metric": args.metric if lm else None, "metric_meaning": metric_label[args.metric] if lm else None,
        "size": extra.get("size") if zoo is not None else None, "senses": list(senses),
        "val_examples": args.val_examples, "tasks": num, "task_names": list(getattr(objective, "task_names", [])),
        "grid_points": len(grid), "grid_per_axis": per_axis, "grid_seconds": grid_seconds, "grid_from_store": grid_from_store, "threads": args.threads,
        "reference_points": len(reference), "reference": "non-dominated set of the grid and every evaluation of every run",
        "ref_point": ref_point.tolist(), "ref_point_meaning": "the grid's worst value per task (hv_ratio)",
        "nadir_point": nadir_point.tolist(), "nadir_point_meaning": "the reference front's nadir moved out by 10% of its range per task (hv_ratio_nadir)",
        "seeds": len(seeds), "budgets": budgets, "reevaluations": args.reevaluations,
        "preferences": len(preferences), "moe_steps": moe_steps, **test_info, "rows": rows, "summary": summary})
    for key, ylabel, suffix in (("hv_ratio", "hypervolume ratio to the reference front", ""), ("regret_mean", "mean preference regret", "_regret"),
                                *((("test_regret_mean", "mean test regret of the picks", "_test_regret"),) if lm else ())):
        curves = {}
        for method in dict.fromkeys(s["method"] for s in summary):
            sub = [s for s in summary if s["method"] == method and f"{key}_mean" in s]
            if sub:
                curves[method] = ([s["evaluations"] for s in sub], [s[f"{key}_mean"] for s in sub], np.array([s[f"{key}_std"] for s in sub]))
        title = f"{label}, T={num}: mean ± std over {len(seeds)} seeds"
        plots.plot_curves(curves, "real evaluations", ylabel, title=title, path=out / f"{name}{suffix}.png")
    # one seed's fronts side by side at the largest budget (MAP vs MoE vs baselines)
    example = {keys["method"]: run.metrics for keys, run in runs
               if keys["seed"] == 0 and (keys["method"] not in BUDGETED or keys["budget"] == budgets[-1]) and keys["method"] != "nested merging"}
    title = f"{label}, T={num}, seed 0, {budgets[-1]} evaluations per budgeted method"
    labels = getattr(objective, "metric_labels", None)  # axes: task, metric, unit, which way is better
    if num == 2:
        plots.plot_front_2d(example, list(objective.task_names), reference=reference[np.argsort(reference[:, 0])],
                            lines={k: k in chosen_sweeps or k.startswith("PWE") for k in example}, title=title,
                            reference_label="reference front (grid + every run)", senses=senses, labels=labels, path=out / f"{name}_example.png")
    else:
        plots.plot_pairwise(example, list(objective.task_names), reference=reference, title=title, senses=senses, labels=labels,
                            path=out / f"{name}_example.png")
    columns = ["method", "evaluations", "seeds", "hv_ratio_mean", "hv_ratio_std", "hv_ratio_nadir_mean", "igd_plus_mean", "regret_mean_mean",
               "pick_regret_mean_mean", "win_rate_vs_baseline_mean", "regret_equal_preference_mean", "seconds_mean"]
    if lm:
        columns[8:8] = ["test_regret_mean_mean", "test_regret_mean_std", "test_pick_regret_mean_mean"]
    print(table(summary, columns))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
