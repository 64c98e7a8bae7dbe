"""Front quality against real evaluations spent: plain MAP, Bayesian MAP (qLogNEHVI and the fixed
angular bins), random search and uniform task arithmetic, over seeds, against the reference
front of a dense grid of real evaluations.

Every method gets the same total of real evaluations: MAP variants spend B on samples and 10 on
re-evaluating front points; random search spends B + 10. The front of a method is the
non-dominated set of all real models it evaluated.

    python benchmarks/bench_fronts.py --problem vision --tasks 2 --out benchmarks/results
    python benchmarks/bench_fronts.py --problem analytic --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402

REEVAL = 10


def analytic(num_tasks: int):
    optima = 0.15 + 0.7 * np.random.default_rng(7).uniform(size=(num_tasks, num_tasks))

    def fn(c):
        c = np.atleast_2d(c)
        d = ((c[:, None, :] - optima[None]) ** 2).sum(-1)
        z = 2.5 - 8 * d**1.5 + 0.4 * np.sin(5 * c[:, :1] + 3 * c[:, -1:])
        return 1 / (1 + np.exp(-z))

    return mm.FunctionObjective(fn, num_tasks, [f"f{i}" for i in range(num_tasks)], key=f"analytic{num_tasks}")


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--problem", choices=["analytic", "vision"], default="analytic")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    num = args.tasks
    if args.problem == "vision":
        from map_merge.zoo import load_vision_zoo

        names = ["rotated", "inverted", "mirrored_parity", "shifted_mod3"][:num]
        zoo = load_vision_zoo(names, progress=False)
        objective = zoo.objective(names, store=Path(args.out) / "vision_evals.sqlite", progress=False)
    else:
        objective = analytic(num)
    per_axis = {2: 21, 3: 9, 4: 6}[num] if not args.quick else 5
    grid = mm.grid_design(num, per_axis)
    grid_metrics = objective(grid)
    reference = grid_metrics[mm.pareto_mask(grid_metrics)]
    ref_point = grid_metrics.min(axis=0)
    params = mm.num_quadratic_params(num)
    budgets = [params, 2 * params] if args.quick else [params, 2 * params, 3 * params, 4 * params]
    seeds = range(2 if args.quick else args.seeds)
    methods = ["MAP", "Bayesian MAP (nehvi)", "Bayesian MAP (binned)", "random search"]
    rows = []
    for budget in budgets:
        for method in methods:
            for seed in seeds:
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if method == "random search":
                        coeffs = np.random.default_rng(seed).uniform(size=(budget + REEVAL, num))
                        points = objective(coeffs)
                        points = points[mm.pareto_mask(points)]
                    else:
                        if method == "MAP":
                            estimator = mm.MAP(num_samples=budget, seed=seed)
                        else:
                            initial = min(budget, params + 2)
                            estimator = mm.BayesianMAP(budget=budget, initial=initial, batch=num, seed=seed,
                                                       acquisition="nehvi" if "nehvi" in method else "binned")
                        result = estimator.fit(objective, num)
                        result.reevaluate(objective, max_points=REEVAL)
                        points = result.evaluated_front().metrics
                report = mm.front_report(points, reference, ref_point)
                rows.append({"budget": budget, "evaluations": budget + REEVAL, "method": method, "seed": seed,
                             "seconds": time.perf_counter() - start, **report})
    summary = []
    for budget in budgets:
        for method in methods:
            sub = [r for r in rows if r["budget"] == budget and r["method"] == method]
            hv = np.array([r["hv_ratio"] for r in sub])
            summary.append({"evaluations": budget + REEVAL, "method": method, "hv_ratio_mean": float(hv.mean()), "hv_ratio_std": float(hv.std()),
                            "igd_plus_mean": float(np.mean([r["igd_plus"] for r in sub])), "seconds_mean": float(np.mean([r["seconds"] for r in sub]))})
    wins = {}
    for method in methods[1:3]:
        wins[method] = {str(b): int(sum(
            next(r for r in rows if r["budget"] == b and r["method"] == method and r["seed"] == s)["hv_ratio"]
            > next(r for r in rows if r["budget"] == b and r["method"] == "MAP" and r["seed"] == s)["hv_ratio"] for s in seeds)) for b in budgets}
    name = f"fronts_{args.problem}_T{num}"
    path = write(args.out, name, {"problem": args.problem, "tasks": num, "grid_points": len(grid), "reference_points": len(reference),
                                  "ref_point": ref_point.tolist(), "seeds": len(list(seeds)), "rows": rows, "summary": summary,
                                  "wins_over_plain_map": wins})
    curves = {m: ([s["evaluations"] for s in summary if s["method"] == m], [s["hv_ratio_mean"] for s in summary if s["method"] == m],
                  np.array([s["hv_ratio_std"] for s in summary if s["method"] == m])) for m in methods}
    plots.plot_curves(curves, "real evaluations", "hypervolume ratio to the reference grid",
                      title=f"{args.problem}, T={num}: mean ± std over {len(list(seeds))} seeds", path=Path(args.out) / f"{name}.png")
    print(table(summary, ["evaluations", "method", "hv_ratio_mean", "hv_ratio_std", "igd_plus_mean", "seconds_mean"]))
    print("seeds where Bayesian beats plain MAP (hv ratio):", wins)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
