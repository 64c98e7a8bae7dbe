"""Speed of MAP's own work (no model evaluations):

- ``proposals``: seconds to propose one point in MAP's default adaptive sampling (model fit +
  expected-hypervolume maximisation; constant-mean GPs below T = 4, from 4 on the model
  cross-validation prefers, ``proposal_model`` in each entry) over a whole run at T = 2, 3, 4 (budgets 22 / 40 / 60), on one
  torch thread; goals: median at most 2 s at T = 3 and 5 s at T = 4 (``goal_met``).
- ``rows``: the plain design's surrogate work (quadratic fit + front search) for T = 2..8, the
  default scalarization search against NSGA-III with the authors' settings (same surrogates).

    python benchmarks/bench_map_speed.py --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402


def problem(num_tasks: int, seed: int):
    optima = np.random.default_rng(seed).uniform(0, 1, (num_tasks, num_tasks))

    def fn(c):
        return 1 / (1 + np.exp(-(2 - 3 * ((np.atleast_2d(c)[:, None, :] - optima[None]) ** 2).sum(-1))))

    return mm.FunctionObjective(fn, num_tasks, [f"t{i}" for i in range(num_tasks)])


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [2, 3] if args.quick else [2, 3, 4, 6, 8]
    repeats = 1 if args.quick else 3
    rows = []
    for num_tasks in sizes:
        obj = problem(num_tasks, 0)
        samples = mm.make_design("map", num_tasks, mm.default_num_samples(num_tasks), seed=0)
        data = mm.Samples(samples, obj(samples))
        for search in ("scalarization", "nsga3"):
            estimator = mm.MAP(sampling="design", search=search)
            estimator.fit_samples(data, task_names=obj.task_names)  # warm-up (imports)
            times, result = [], None
            for _ in range(repeats):
                start = time.perf_counter()
                result = estimator.fit_samples(data, task_names=obj.task_names)
                times.append(time.perf_counter() - start)
            front = result.front.metrics
            ref = np.zeros(num_tasks)
            rows.append({"tasks": num_tasks, "search": search, "seconds": float(np.median(times)),
                         "fit_s": result.timings["fit"], "search_s": result.timings["search"],
                         "front_points": len(front), "hypervolume": mm.hypervolume(front, ref) if num_tasks <= 4 else float("nan")})
    proposals = []
    goals = {3: 2.0, 4: 5.0}
    for num_tasks in ([2, 3] if args.quick else [2, 3, 4]):
        budget = 10 if args.quick else {2: 22, 3: 40, 4: 60}[num_tasks]
        start = time.perf_counter()
        result = mm.MAP(budget=budget, seed=0).fit(problem(num_tasks, 0), num_tasks)
        seconds = np.array(result.settings["proposal_seconds"])
        entry = {"tasks": num_tasks, "budget": budget, "proposals": len(seconds), "median_s": float(np.median(seconds)),
                 "p90_s": float(np.quantile(seconds, 0.9)), "max_s": float(seconds.max()), "run_s": time.perf_counter() - start,
                 "threads": torch.get_num_threads(), "goal_median_s": goals.get(num_tasks),
                 "proposal_model": result.settings["proposal_model"]}
        entry["goal_met"] = None if entry["goal_median_s"] is None else bool(entry["median_s"] <= entry["goal_median_s"])
        proposals.append(entry)
    path = write(args.out, "map_speed", {"rows": rows, "proposals": proposals})
    curves = {}
    for search in ("scalarization", "nsga3"):
        sub = [r for r in rows if r["search"] == search]
        curves[search] = ([r["tasks"] for r in sub], [r["seconds"] for r in sub], None)
    plots.plot_curves(curves, "tasks T", "seconds (fit + search, lower is better)", title="MAP's plain design: surrogate work",
                      path=Path(args.out) / "map_speed.png")
    plots.plot_curves({"median": ([p["tasks"] for p in proposals], [p["median_s"] for p in proposals], None),
                       "90th percentile": ([p["tasks"] for p in proposals], [p["p90_s"] for p in proposals], None),
                       "goal (median)": ([p["tasks"] for p in proposals if p["goal_median_s"]], [p["goal_median_s"] for p in proposals if p["goal_median_s"]], None)},
                      "tasks T", "seconds per proposed point (lower is better)", title="MAP's adaptive sampling: time to propose a point, one thread",
                      path=Path(args.out) / "map_speed_proposals.png")
    print(table(proposals, ["tasks", "budget", "proposals", "median_s", "p90_s", "max_s", "goal_median_s", "goal_met"]))
    print(table(rows, ["tasks", "search", "seconds", "fit_s", "search_s", "front_points", "hypervolume"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
