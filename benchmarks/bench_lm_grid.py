"""Is there a real trade-off between the language-model zoo's experts? Dense grids of held-out loss.

For every pair of domains, a 21 x 21 grid of task-arithmetic coefficients in [0, 1]^2 (and a
9^3 grid for domain triples) is merged and scored on the validation texts (held-out loss, nats
per token). Reported against the issue's goals:

- at least 10 non-dominated grid points at T = 2 for every pair;
- along the front, each domain's loss moves over at least half of the gap between the base's
  and its expert's loss (range of the loss over the front points / (base - expert));
- lm-eval: each expert beats the base on its own multiple-choice task (test split) by more than
  the task's standard error (lm-eval's ``mean_stderr`` of the per-question 0/1 scores).

Also: the zoo table (base and experts, test held-out loss and lm-eval accuracy), every model's
loss on every domain (how much each expert forgets), the zoo's build time, the time of one
evaluation. Evaluations are kept in an evaluation store under the zoo cache, so a rerun resumes.

    python benchmarks/bench_lm_grid.py --out benchmarks/results          # small zoo (about 45 min)
    python benchmarks/bench_lm_grid.py --quick --out /tmp/lm_grid        # tiny zoo, 5 x 5 grids
"""

from __future__ import annotations

import os

# two OpenMP threads that spin-wait crawl on a shared 2-core machine (5-40x slower than one);
# passive waiting must be chosen before torch is imported
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import itertools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402


def front_stats(metrics: np.ndarray, coeffs: np.ndarray, names: list[str]) -> dict:
    """Non-dominated grid points (losses: lower is better) and how far each loss moves along them."""
    import map_merge as mm

    mask = mm.pareto_mask(-metrics)
    front = metrics[mask]
    num = len(names)
    base_row = int(np.flatnonzero(np.all(coeffs == 0.0, axis=1))[0])
    out = {"names": names, "num_points": int(len(metrics)), "num_nondominated": int(mask.sum()), "domains": {}}
    for i, name in enumerate(names):
        one_hot = np.zeros(num)
        one_hot[i] = 1.0
        expert_row = int(np.flatnonzero(np.all(np.isclose(coeffs, one_hot), axis=1))[0])
        base, expert = float(metrics[base_row, i]), float(metrics[expert_row, i])
        gap = base - expert
        moved = float(front[:, i].max() - front[:, i].min())
        out["domains"][name] = {"base_loss": base, "expert_loss": expert, "gap": gap, "front_min": float(front[:, i].min()),
                                "front_max": float(front[:, i].max()), "front_range": moved,
                                "range_over_gap": moved / gap if gap > 0 else float("nan")}
    out["goal_10_points"] = bool(out["num_nondominated"] >= 10)
    out["goal_half_gap"] = bool(all(d["range_over_gap"] >= 0.5 for d in out["domains"].values()))
    return out


def plot_pairs(results: list[dict], coeffs: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = (len(results) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.2 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results):
        m, c = np.asarray(res["metrics"]), coeffs
        a, b = res["names"]
        mask = np.zeros(len(m), dtype=bool)
        mask[res["front"]] = True
        ax.scatter(m[:, 0], m[:, 1], s=8, c="0.75", label=f"grid ({len(m)} merges)")
        order = np.argsort(m[mask, 0])
        ax.plot(m[mask][order, 0], m[mask][order, 1], "o-", ms=4, color="C3", label=f"non-dominated ({int(mask.sum())})")
        for point, marker, label in (((0, 0), "*", "base"), ((1, 0), "s", f"{a} expert"), ((0, 1), "^", f"{b} expert"), ((1, 1), "D", "c = (1, 1)")):
            row = int(np.flatnonzero(np.all(np.isclose(c, point), axis=1))[0])
            ax.scatter(*m[row], marker=marker, s=70, edgecolor="k", zorder=5, label=label)
        ax.set_xlabel(f"{a} held-out loss (nats/token)")
        ax.set_ylabel(f"{b} held-out loss")
        ax.set_title(f"{a} vs {b}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_triples(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 3, figsize=(13.5, 4.0 * len(results)), squeeze=False)
    for row, res in enumerate(results):
        m = np.asarray(res["metrics"])
        mask = np.zeros(len(m), dtype=bool)
        mask[res["front"]] = True
        for col, (i, j) in enumerate(itertools.combinations(range(3), 2)):
            ax = axes[row, col]
            ax.scatter(m[:, i], m[:, j], s=5, c="0.8", label=f"grid ({len(m)})")
            ax.scatter(m[mask, i], m[mask, j], s=12, c="C3", label=f"non-dominated in 3-D ({int(mask.sum())})")
            ax.set_xlabel(f"{res['names'][i]} loss")
            ax.set_ylabel(f"{res['names'][j]} loss")
            ax.legend(fontsize=7)
        axes[row, 0].set_title(" / ".join(res["names"]), fontsize=10, loc="left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_table(rows: list[dict], cross: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["domain"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    models = list(cross)
    matrix = np.array([[cross[m][d] for d in names] for m in models])
    im = ax1.imshow(matrix, cmap="viridis_r")
    ax1.set_xticks(range(len(names)), names)
    ax1.set_yticks(range(len(models)), models)
    for (i, j), v in np.ndenumerate(matrix):
        ax1.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v > matrix.mean() else "k", fontsize=8)
    ax1.set_title("test held-out loss: model (row) on domain (column)", fontsize=9)
    fig.colorbar(im, ax=ax1, fraction=0.046)
    if "base_acc" in rows[0]:
        x = np.arange(len(names))
        for k, who in enumerate(("base", "expert")):
            ax2.bar(x + (k - 0.5) * 0.38, [r[f"{who}_acc"] for r in rows], 0.38, yerr=[r[f"{who}_acc_stderr"] for r in rows],
                    capsize=3, label=who)
        ax2.axhline(0.25, color="k", lw=0.8, ls=":", label="chance (4 choices)")
        ax2.set_xticks(x, names)
        ax2.set_ylabel("lm-eval accuracy (test), +- stderr")
        ax2.legend(fontsize=8)
        ax2.set_title("lm-eval multiple choice: base against each domain's expert", fontsize=9)
    else:
        ax2.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results")
    p.add_argument("--size", default=None, help="zoo size (default: small; tiny with --quick)")
    p.add_argument("--per-axis", type=int, default=None, help="grid points per axis at T = 2 (default 21; 5 with --quick)")
    p.add_argument("--per-axis-3", type=int, default=None, help="grid points per axis at T = 3 (default 9; 3 with --quick)")
    p.add_argument("--triples", type=int, default=None, help="how many domain triples to grid (default: all 4; 1 with --quick)")
    p.add_argument("--no-lm-eval", action="store_true", help="skip the lm-eval scores")
    args = p.parse_args()

    import torch

    import map_merge as mm
    from map_merge.zoo import cache_root, load_zoo

    size = args.size or ("tiny" if args.quick else "small")
    per_axis = args.per_axis or (5 if args.quick else 21)
    per_axis_3 = args.per_axis_3 or (3 if args.quick else 9)
    start = time.perf_counter()
    zoo = load_zoo("lm", size=size)
    load_seconds = time.perf_counter() - start
    names = list(zoo.task_names)
    print(f"lm zoo ({size}) at {zoo.folder}: built in {zoo.info['seconds']:.0f} s (this load {load_seconds:.0f} s)", flush=True)

    # the zoo table and every model on every domain (test split)
    rows = zoo.table("test", lm_eval=not args.no_lm_eval)
    models = {"base": zoo.new_model(), **{f"{n} expert": zoo.expert_model(n) for n in names}}
    cross = {label: {n: zoo.loss(model, n, "test") for n in names} for label, model in models.items()}
    if not args.no_lm_eval:
        from lm_eval.api.metrics import mean_stderr

        for row in rows:  # lm-eval's own standard error of a mean of 0/1 scores
            for who in ("base", "expert"):
                hits = round(row[f"{who}_acc"] * row["questions"])
                row[f"{who}_acc_stderr"] = float(mean_stderr([1.0] * hits + [0.0] * (row["questions"] - hits)))
            row["margin"] = row["expert_acc"] - row["base_acc"]
            row["goal_beats_stderr"] = bool(row["margin"] > max(row["base_acc_stderr"], row["expert_acc_stderr"]))
    print(table(rows, list(rows[0])), flush=True)

    # the time of one evaluation (no store), at T = 2 and T = 4
    timing = {}
    for group in (names[:2], names):
        objective = zoo.objective(group, progress=False)
        coeffs = np.random.default_rng(0).uniform(size=(4, len(group)))
        objective(coeffs[:1])  # warm-up
        merge0, eval0 = objective.merge_seconds, objective.eval_seconds
        t0 = time.perf_counter()
        objective(coeffs[1:])
        timing[f"T{len(group)}"] = {"seconds_per_evaluation": (time.perf_counter() - t0) / 3, "merge": (objective.merge_seconds - merge0) / 3,
                                    "eval": (objective.eval_seconds - eval0) / 3, "threads": torch.get_num_threads()}
    print("per evaluation:", timing, flush=True)

    store = mm.EvaluationStore(cache_root() / "lm_grid_store.sqlite")
    pairs, triples = [], []
    grid2 = mm.grid_design(2, per_axis)
    for pair in itertools.combinations(names, 2):
        t0 = time.perf_counter()
        objective = zoo.objective(list(pair), store=store, progress=True)
        metrics = objective(grid2)
        stats = front_stats(metrics, grid2, list(pair))
        stats.update(metrics=np.round(metrics, 5).tolist(), front=np.flatnonzero(mm.pareto_mask(-metrics)).tolist(),
                     seconds=time.perf_counter() - t0, evaluated=objective.num_evaluations, from_store=objective.num_cached)
        pairs.append(stats)
        print(f"T=2 {pair}: {stats['num_nondominated']} non-dominated; range/gap "
              f"{[round(d['range_over_gap'], 2) for d in stats['domains'].values()]} ({stats['seconds']:.0f} s)", flush=True)
    grid3 = mm.grid_design(3, per_axis_3)
    chosen = list(itertools.combinations(names, 3))[: (args.triples or (1 if args.quick else None))]
    for triple in chosen:
        t0 = time.perf_counter()
        objective = zoo.objective(list(triple), store=store, progress=True)
        metrics = objective(grid3)
        stats = front_stats(metrics, grid3, list(triple))
        stats.update(metrics=np.round(metrics, 5).tolist(), front=np.flatnonzero(mm.pareto_mask(-metrics)).tolist(),
                     seconds=time.perf_counter() - t0, evaluated=objective.num_evaluations, from_store=objective.num_cached)
        triples.append(stats)
        print(f"T=3 {triple}: {stats['num_nondominated']} non-dominated; range/gap "
              f"{[round(d['range_over_gap'], 2) for d in stats['domains'].values()]} ({stats['seconds']:.0f} s)", flush=True)

    summary = {
        "goal_10_points_every_pair": all(s["goal_10_points"] for s in pairs),
        "goal_half_gap_every_pair": all(s["goal_half_gap"] for s in pairs),
        "goal_lm_eval_beats_stderr": None if args.no_lm_eval else all(r["goal_beats_stderr"] for r in rows),
        "min_nondominated_T2": min(s["num_nondominated"] for s in pairs),
        "min_range_over_gap_T2": min(d["range_over_gap"] for s in pairs for d in s["domains"].values()),
    }
    print("goals:", summary, flush=True)
    out = Path(args.out)
    name = "lm_grid"
    write(out, name, {"size": size, "zoo": {k: zoo.info.get(k) for k in ("key", "seconds", "seconds_data", "seconds_pretrain", "seconds_experts",
                                                                      "recipe", "sources", "train_tokens", "mix", "base_dtype", "expert_dtype",
                                                                      "threads")},
                      "kinds": zoo.kinds, "rows": rows, "cross_loss": cross, "timing": timing, "per_axis": per_axis, "per_axis_3": per_axis_3,
                      "grid_T2": "map_merge.grid_design(2, per_axis) (metrics rows in its order)",
                      "grid_T3": "map_merge.grid_design(3, per_axis_3)", "summary": summary, "pairs": pairs, "triples": triples})
    plot_pairs(pairs, grid2, out / f"{name}_T2.png", f"LM zoo ({size}): held-out loss of {per_axis}x{per_axis} task-arithmetic merges per pair (validation)")
    if triples:
        plot_triples(triples, out / f"{name}_T3.png", f"LM zoo ({size}): {per_axis_3}^3 merges per triple, pairwise views (validation)")
    plot_table(rows, cross, out / f"{name}_zoo.png", f"LM zoo ({size}): base and experts (test split)")
    print(f"wrote {out / name}.json and plots", flush=True)


if __name__ == "__main__":
    main()
