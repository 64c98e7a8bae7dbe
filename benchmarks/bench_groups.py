"""Coefficient groups: when do per-part coefficients pay for their extra dimensions?

T = 2 tasks of a zoo (default the language-model zoo, held-out loss per domain; ``--zoo text`` /
``vision``), merged by task arithmetic with:

- ``G=1``: one coefficient per task (2 coefficients; quadratic: 6 parameters);
- ``G=2 attn/mlp``: one for the attention tensors, one for everything else (MLP, embeddings,
  norms) per task (4 coefficients; 15 parameters);
- ``G=3 depth``: three depth knots per task interpolated over the layers, like a mergekit
  gradient (6 coefficients; 28 parameters).

Each variant runs MAP at equal real evaluations E (samples plus re-evaluations in two refit
rounds), several seeds. A variant's front is the non-dominated set of all its real evaluations.
Reference: the non-dominated set of every evaluation of every variant plus a dense ungrouped grid
(grouped merges reach points the ungrouped family cannot); per variant, pooled over seeds and
budgets, its front's hypervolume ratio and how many distinct reference points it supplies. Scores: hypervolume ratio (reference
point: the grid's worst value per task) and the regret of the pick for equal preference on the
test split (the pick evaluated for real on test; regret against the best test score among every
variant's picks and the grid's equal-preference best).

    python benchmarks/bench_groups.py --out benchmarks/results
    # as run for the README (lm zoo, code + medical, 1 thread, 12 minutes with a cold store):
    python benchmarks/bench_groups.py --budgets 24,40,80 --seeds 3 --grid 11 --tasks code medical --out benchmarks/results

Evaluations are kept in ``<out>/groups_<zoo>_evals.sqlite``: a rerun reads them back (its
``seconds`` are then MAP's own work, not the evaluations').
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

ATTENTION = r"self_attn|attention|\.attn\."


def variants() -> dict[str, mm.Groups | None]:
    return {"G=1": None, "G=2 attn/mlp": mm.Groups({"attn": ATTENTION, "mlp+rest": ".*"}), "G=3 depth": mm.Groups.by_depth(3)}


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--zoo", default="lm", choices=["lm", "text", "vision"])
    p.add_argument("--tasks", nargs=2, default=None)
    p.add_argument("--budgets", default="16,32,64", help="real evaluations per run, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--grid", type=int, default=21, help="points per axis of the ungrouped reference grid")
    p.add_argument("--size", default=None, help="lm zoo size (default: the zoo's default, small; --quick: tiny)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from map_merge.zoo import load_zoo

    budgets = [int(b) for b in args.budgets.split(",")]
    seeds, grid_axis = args.seeds, args.grid
    if args.quick:
        budgets, seeds, grid_axis = [40], 1, 3  # 40: every variant has more samples than quadratic parameters
    size = "tiny" if args.quick else args.size
    zoo = load_zoo(args.zoo, None, progress=False) if args.zoo != "lm" else load_zoo("lm", None, progress=False, **({"size": size} if size else {}))
    names = list(args.tasks or zoo.task_names[:2])
    store = mm.EvaluationStore(Path(args.out) / f"groups_{args.zoo}_evals.sqlite") if not args.quick else None
    base = zoo.objective(names, split="val", store=store, progress=False)
    senses = base.senses
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])
    start = time.perf_counter()
    grid_coeffs = mm.grid_design(2, grid_axis)
    grid = base(grid_coeffs)
    grid_seconds = time.perf_counter() - start
    runs = []
    for label, groups in variants().items():
        objective = zoo.objective(names, split="val", store=store, progress=False, groups=groups, task_vectors=base.task_vectors)
        dims = objective.num_coeffs
        for budget in budgets:
            samples = budget - max(2, min(10, budget // 4))
            if samples < mm.num_quadratic_params(dims):
                runs.append({"variant": label, "coefficients": dims, "budget": budget, "skipped":
                             f"{samples} samples < {mm.num_quadratic_params(dims)} quadratic parameters"})
                continue
            for seed in range(seeds):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = mm.MAP(num_samples=samples, seed=seed).fit(objective, dims)
                    result = result.refine(objective, reevaluations=budget - samples, rounds=2)
                coeffs = np.concatenate([result.samples.coeffs, result.real_front.coeffs])
                metrics = np.concatenate([result.samples.metrics, result.real_front.metrics])
                pick = result.select(np.ones(len(names)))
                runs.append({"variant": label, "coefficients": dims, "budget": budget, "seed": seed, "coeffs": coeffs.tolist(),
                             "metrics": metrics.tolist(), "pick": pick.tolist(), "seconds": time.perf_counter() - t0,
                             "groups": None if groups is None else groups.spec})
    done = [r for r in runs if "metrics" in r]
    pooled = np.concatenate([grid] + [np.asarray(r["metrics"]) for r in done])
    reference = pooled[mm.pareto_mask(pooled * sign)]
    ref_point = (grid * sign).min(axis=0)
    full = mm.hypervolume(reference * sign, ref_point)
    # each variant pooled over its seeds and budgets: its front's share of the reference
    on_reference = {tuple(row) for row in reference.tolist()}
    pooled_rows = {"ungrouped grid": grid}
    for label in variants():
        mine = [np.asarray(r["metrics"]) for r in done if r["variant"] == label]
        if mine:
            pooled_rows[label] = np.concatenate(mine)
    pooled_summary = []
    for label, points in pooled_rows.items():
        front = points[mm.pareto_mask(points * sign)]
        pooled_summary.append({"variant": label, "evaluations": len(points), "hv_ratio": mm.hypervolume(front * sign, ref_point) / full,
                               "reference_points": len({tuple(row) for row in front.tolist()} & on_reference)})
    # equal-preference picks scored on test (each variant's own grouping)
    test_objectives = {label: zoo.objective(names, split="test", store=store, progress=False, groups=g, task_vectors=base.task_vectors)
                       for label, g in variants().items()}
    grid_test_pick = grid_coeffs[int(np.argmax((grid * sign) @ np.ones(len(names))))]
    grid_test = test_objectives["G=1"](grid_test_pick[None])[0]
    for run in done:
        front = np.asarray(run["metrics"])
        run["hv_ratio"] = mm.hypervolume(front[mm.pareto_mask(front * sign)] * sign, ref_point) / full
        run["pick_test"] = test_objectives[run["variant"]](np.asarray(run["pick"])[None])[0].tolist()
    best = max([float((np.asarray(r["pick_test"]) * sign).mean()) for r in done] + [float((grid_test * sign).mean())])
    for run in done:
        run["regret_test"] = best - float((np.asarray(run["pick_test"]) * sign).mean())
    summary = []
    for label in variants():
        for budget in budgets:
            rows = [r for r in done if r["variant"] == label and r["budget"] == budget]
            if not rows:
                continue
            hv = np.array([r["hv_ratio"] for r in rows])
            regret = np.array([r["regret_test"] for r in rows])
            summary.append({"variant": label, "coefficients": rows[0]["coefficients"], "budget": budget, "hv_ratio": float(hv.mean()),
                            "hv_std": float(hv.std()), "regret_test": float(regret.mean()), "regret_std": float(regret.std()),
                            "seconds": float(np.mean([r["seconds"] for r in rows]))})
    path = write(args.out, f"groups_{args.zoo}", {"rows": summary, "runs": runs, "tasks": names, "senses": list(senses),
                                                  "grid": {"per_axis": grid_axis, "metrics": grid.tolist(), "seconds": grid_seconds},
                                                  "reference_points": len(reference), "reference_points_distinct": len(on_reference), "grid_equal_preference_test": grid_test.tolist(),
                                                  "pooled": pooled_summary, "threads": args.threads})
    _plot(summary, grid, reference, done, names, sign, Path(args.out) / f"groups_{args.zoo}.png")
    print(table(summary, ["variant", "coefficients", "budget", "hv_ratio", "hv_std", "regret_test", "regret_std", "seconds"]))
    print(table(pooled_summary, ["variant", "evaluations", "hv_ratio", "reference_points"]))
    print(f"wrote {path}")


def _plot(summary, grid, reference, runs, names, sign, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label in variants():
        rows = [r for r in summary if r["variant"] == label]
        if rows:
            axes[0].errorbar([r["budget"] for r in rows], [r["hv_ratio"] for r in rows], yerr=[r["hv_std"] for r in rows], marker="o",
                             capsize=3, label=label)
            axes[1].errorbar([r["budget"] for r in rows], [r["regret_test"] for r in rows], yerr=[r["regret_std"] for r in rows],
                             marker="o", capsize=3, label=label)
    axes[0].set(xlabel="real evaluations", ylabel="hypervolume ratio", title="front quality")
    axes[1].set(xlabel="real evaluations", ylabel="regret of the pick (test)", title="equal-preference pick")
    axes[2].scatter(grid[:, 0], grid[:, 1], s=6, c="0.75", label="ungrouped grid")
    largest = max(r["budget"] for r in runs)
    for label in variants():
        mine = [np.asarray(r["metrics"]) for r in runs if r["variant"] == label and r["budget"] == largest]
        if mine:
            points = np.concatenate(mine)
            front = points[mm.pareto_mask(points * sign)]
            front = front[np.argsort(front[:, 0])]
            axes[2].plot(front[:, 0], front[:, 1], marker=".", label=f"{label} (E={largest})")
    axes[2].set(xlabel=names[0], ylabel=names[1], title="real fronts")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
