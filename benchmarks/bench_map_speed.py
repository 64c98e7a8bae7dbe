"""Speed of MAP's surrogate work (fit + front search, no model evaluations) for T = 2..8,
default scalarization search against NSGA-III with the authors' settings (same surrogates).

    python benchmarks/bench_map_speed.py --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

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
    args = parser(__doc__, "benchmarks/results").parse_args()
    sizes = [2, 3] if args.quick else [2, 3, 4, 6, 8]
    repeats = 1 if args.quick else 3
    rows = []
    for num_tasks in sizes:
        obj = problem(num_tasks, 0)
        samples = mm.make_design("map", num_tasks, mm.default_num_samples(num_tasks), seed=0)
        data = mm.Samples(samples, obj(samples))
        for search in ("scalarization", "nsga3"):
            estimator = mm.MAP(search=search)
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
    path = write(args.out, "map_speed", {"rows": rows})
    curves = {}
    for search in ("scalarization", "nsga3"):
        sub = [r for r in rows if r["search"] == search]
        curves[search] = ([r["tasks"] for r in sub], [r["seconds"] for r in sub], None)
    plots.plot_curves(curves, "tasks T", "seconds (fit + search)", title="MAP surrogate work", path=Path(args.out) / "map_speed.png")
    print(table(rows, ["tasks", "search", "seconds", "fit_s", "search_s", "front_points", "hypervolume"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
