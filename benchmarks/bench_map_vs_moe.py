"""MAP against PWE-MoE on the same three tasks: fronts side by side (one panel per task pair and a
3-task view) and each method's total cost: real evaluations, training steps, wall time and peak
memory. Each method runs in its own fresh process, so its peak resident memory is its own
(the JSON also gives the peak after loading the zoo, the floor every method shares).

MAP and Bayesian MAP spend (T+1)(T+2) samples plus 10 re-evaluations; PWE-MoE trains routers for
--moe-steps steps and is evaluated (unloaded) on a lattice of 15 preferences. Reference front:
a grid of real evaluations joined with every method's evaluations.

    python benchmarks/bench_map_vs_moe.py --zoo vision --out benchmarks/results
    python benchmarks/bench_map_vs_moe.py --zoo text --moe-steps 100 --out benchmarks/results
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

TASKS = {"vision": ["rotated", "inverted", "mirrored_parity"], "text": ["sentiment", "med_subject", "bias_type"]}
# the zoo is loaded with these tasks (as bench_fronts.py does), so stored evaluations are shared
LOADED = {"vision": ["rotated", "inverted", "mirrored_parity", "shifted_mod3"], "text": TASKS["text"]}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(zoo_name: str, out: str, val_examples: int | None):
    import map_merge as mm
    from map_merge.zoo import load_zoo

    zoo = load_zoo(zoo_name, LOADED[zoo_name], progress=False)
    split = zoo.limit_split("val", val_examples)
    store = mm.EvaluationStore(Path(out) / f"{zoo_name}_evals.sqlite")
    return zoo, split, store


def run_one(method: str, zoo_name: str, out: str, moe_steps: int, val_examples: int | None, quick: bool) -> dict:
    """One method in this (fresh) process; returns its real evaluations and costs."""
    import torch

    import map_merge as mm
    from map_merge.moe import simplex_lattice

    torch.set_num_threads(max(1, torch.get_num_threads()))
    zoo, split, store = _load(zoo_name, out, val_examples)
    floor = _peak_mb()
    names = TASKS[zoo_name]
    num = len(names)
    start = time.perf_counter()
    extra = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method in ("MAP", "Bayesian MAP"):
            # no store: a cached evaluation would hide the method's real cost (the grid uses it)
            objective = zoo.objective(names, split=split, store=None, progress=False)
            samples = mm.default_num_samples(num) if not quick else mm.num_quadratic_params(num)
            estimator = mm.MAP(num_samples=samples, seed=0) if method == "MAP" else mm.BayesianMAP(budget=samples, seed=0)
            result = estimator.fit(objective, num)
            real = result.reevaluate(objective, max_points=10 if not quick else 3)
            points = np.concatenate([result.samples.metrics, real.metrics])
            evaluations, steps = len(points), 0
        else:
            kind = method.split("(")[1].rstrip(")").lower()
            moe, info = zoo.fit_moe(names, method=kind, steps=moe_steps, batch_size=32 if zoo_name == "vision" else 8,
                                    lr=3e-2 if zoo_name == "vision" else 1e-2, seed=0, progress=False)
            preferences = simplex_lattice(num, 0.25)
            points = zoo.moe_objective(moe, names, split=split, store=None, progress=False)(preferences)
            evaluations, steps = len(points), moe_steps
            extra = {"training_seconds": info["seconds"], "trainable_params": info["trainable_params"], "routers": info["routers"]}
    return {"method": method, "points": points.tolist(), "evaluations": evaluations, "training_steps": steps,
            "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_mb(), "peak_rss_after_zoo_mb": floor, **extra}


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--zoo", choices=["vision", "text"], default="vision")
    p.add_argument("--moe-steps", type=int, default=200)
    p.add_argument("--val-examples", type=int, default=None, help="validation examples per task (default: all)")
    p.add_argument("--grid-per-axis", type=int, default=None, help="reference grid (default 9 on vision, 4 on text)")
    args = p.parse_args()
    import map_merge as mm
    from map_merge import plots
    from map_merge.compare import MethodRun, score_runs
    from map_merge.front_metrics import preference_grid

    moe_steps = 5 if args.quick else args.moe_steps
    methods = ["MAP", "Bayesian MAP", "PWE-MoE (LS)", "PWE-MoE (EPO)"]
    context = multiprocessing.get_context("spawn")
    results = {}
    for method in methods:
        with context.Pool(1) as pool:
            results[method] = pool.apply(run_one, (method, args.zoo, args.out, moe_steps, args.val_examples, args.quick))
        print(f"{method}: {results[method]['evaluations']} evaluations, {results[method]['seconds']:.1f} s, peak {results[method]['peak_rss_mb']:.0f} MB",
              flush=True)
    zoo, split, store = _load(args.zoo, args.out, args.val_examples)
    names = TASKS[args.zoo]
    per_axis = 3 if args.quick else (args.grid_per_axis or (9 if args.zoo == "vision" else 4))
    objective = zoo.objective(names, split=split, store=store, progress=False)
    grid = objective(mm.grid_design(len(names), per_axis))
    runs = {m: MethodRun(m, np.zeros((0, len(names))), np.array(r["points"]), r["evaluations"], r["seconds"]) for m, r in results.items()}
    pooled = np.concatenate([grid] + [r.metrics for r in runs.values()])
    reference = pooled[mm.pareto_mask(pooled)]
    scores = score_runs(runs, reference, grid.min(axis=0), preferences=preference_grid(len(names)))
    rows = [{**{k: v for k, v in results[m].items() if k != "points"}, **{k: scores[m][k] for k in ("hv_ratio", "igd_plus", "regret_mean")}}
            for m in methods]
    name = f"map_vs_moe_{args.zoo}"
    path = write(args.out, name, {"zoo": args.zoo, "tasks": names, "split": split, "grid_points": len(grid), "reference_points": len(reference),
                                  "rows": rows, "points": {m: r["points"] for m, r in results.items()}})
    labels = {m: f"{m}: {r['evaluations']} evals" + (f" + {r['training_steps']} steps" if r["training_steps"] else "")
              + f", {r['seconds']:.0f} s, {r['peak_rss_mb'] / 1024:.1f} GB" for m, r in results.items()}
    fronts = {labels[m]: np.array(r["points"]) for m, r in results.items()}
    title = f"{args.zoo} zoo: MAP vs PWE-MoE (cost in the legend: evaluations, training, wall time, peak RSS)"
    labels = objective.metric_labels  # axes: task, metric, which way is better
    plots.plot_pairwise(fronts, names, reference=reference, title=title, labels=labels, path=Path(args.out) / f"{name}_pairs.png")
    plots.plot_front_3d(fronts, names, reference=reference, title=f"{args.zoo} zoo, 3-task view", labels=labels, path=Path(args.out) / f"{name}_3d.png")
    print(table(rows, ["method", "evaluations", "training_steps", "seconds", "peak_rss_mb", "peak_rss_after_zoo_mb", "hv_ratio", "igd_plus", "regret_mean"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
