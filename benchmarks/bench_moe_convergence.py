"""PWE-MoE trained to its plateau, and MAP against it at equal evaluations and equal wall time.

Vision zoo, T = 3 (rotated, inverted, mirrored parity). Routers are trained for up to --steps
(the paper's 4000) with the library's defaults otherwise (Adam, lr 1e-2, cosine to lr / 10, 32
training examples per task and step); along the way the unloaded dense models for the simplex
lattice of step 0.1 (66 preferences) are scored for real at --checkpoints. Variants: linear
scalarisation (LS) and EPO, each with preferences drawn from Dirichlet(1) only (``corners 0``,
the paper's sampling) or with a share of one-task preferences (``corners 0.25``). The curve is one
run of --steps with its cosine schedule; --short runs train for fewer steps with their own
schedule (final point only).

Scores: hypervolume ratio of the 66 unloaded models' non-dominated set to the reference front
(a 9^3 grid of real task-arithmetic evaluations joined with every model any run evaluated), at
the tight reference point (the reference front's nadir minus 0.1) and at the grid's worst value;
and the corner gap: for each task, the fine-tuned model's accuracy minus the accuracy of the model
unloaded at that task's corner preference (max over tasks), i.e. whether the routers reach the
simplex's corners.

MAP rows: (T+1)(T+2) = 20 samples and more (--map-samples), then 30 re-evaluations in two refit
rounds (the default); wall time counts every evaluation (no store), as PWE-MoE's counts its
training and its 66 evaluations.

    python benchmarks/bench_moe_convergence.py --out benchmarks/results
    python benchmarks/bench_moe_convergence.py --methods ls --corners 0,0.25,0.5 --steps 2000 \
        --checkpoints 500,1000,2000 --short "" --map-samples 20 --name moe_corners --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from _common import hv_ratios, parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge.moe import ParetoMoE, simplex_lattice  # noqa: E402

NAMES = ["rotated", "inverted", "mirrored_parity"]


def train_and_track(zoo, method: str, corners: float, steps: int, checkpoints: list[int], seed: int, lattice: np.ndarray,
                    batch_size: int, lr: float) -> list[dict]:
    """Train one PWE-MoE; return one record per checkpoint (0 in ``checkpoints``: before training;
    the last step always): step, training seconds so far, the lattice's real metrics (L, T), and
    the seconds one scoring of the lattice took."""
    moe = ParetoMoE(zoo.pretrained, zoo.task_vectors(NAMES), upcycle=zoo.upcycle, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    losses = {n: zoo.train_loss(n, batch_size, generator) for n in NAMES}
    records: list[dict] = []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def score(step: int) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        start = time.perf_counter()
        metrics = zoo.moe_objective(moe, NAMES, progress=False)(lattice)
        records.append({"step": step, "train_seconds": clock["train"], "eval_seconds": time.perf_counter() - start, "metrics": metrics})
        clock["since"] = time.perf_counter()

    wanted = set(checkpoints)
    if 0 in wanted:
        score(0)
    moe.fit(losses, steps=steps, method=method, lr=lr, corners=corners, seed=seed, progress=False,
            callback=lambda step: score(step) if step in wanted or step == steps else None)
    return records


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--checkpoints", default="25,50,100,200,500,1000,2000,4000")
    p.add_argument("--short", default="250,1000", help="separate shorter runs (own cosine schedule)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--corners", default="0,0.25")
    p.add_argument("--methods", default="ls,epo")
    p.add_argument("--map-samples", default="20,36,100,300")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--name", default="moe_convergence", help="name of the JSON and PNG written")
    p.add_argument("--lattice-step", type=float, default=0.1, help="preference lattice the unloaded models are scored on")
    args = p.parse_args()
    if args.quick:
        args.steps, args.checkpoints, args.short, args.seeds, args.map_samples = 6, "3", "4", 1, "20"
        args.corners, args.lattice_step = "0.25", 0.5
    from map_merge.zoo import load_vision_zoo

    zoo = load_vision_zoo(progress=False)
    num = len(NAMES)
    objective = zoo.objective(NAMES, progress=False)  # no store: MAP's wall time is its real cost
    grid_metrics = objective(mm.grid_design(num, 5 if args.quick else 9))
    finetuned = np.array([objective(np.eye(num)[[i]])[0, i] for i in range(num)])
    lattice = simplex_lattice(num, args.lattice_step)
    corner_rows = [int(np.flatnonzero((lattice == np.eye(num)[i]).all(axis=1))[0]) for i in range(num)]
    checkpoints = [0] + [int(c) for c in args.checkpoints.split(",") if int(c) <= args.steps]
    seeds = range(args.seeds)

    moe_runs = []  # (method, corners, steps of the run, seed, records)
    jobs = [(m, float(c), s) for m in args.methods.split(",") for c in args.corners.split(",") for s in seeds]
    for method, corners, seed in tqdm(jobs, desc="PWE-MoE runs"):
        moe_runs.append((method, corners, args.steps, seed,
                         train_and_track(zoo, method, corners, args.steps, checkpoints, seed, lattice, args.batch, args.lr)))
        for short in [int(s) for s in args.short.split(",") if s]:
            records = train_and_track(zoo, method, corners, short, [], seed, lattice, args.batch, args.lr)
            moe_runs.append((method, corners, short, seed, records))

    map_runs = []  # (samples, seed, wall seconds, metrics of every evaluation)
    for samples in tqdm([int(s) for s in args.map_samples.split(",")], desc="MAP runs"):
        for seed in seeds:
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = mm.MAP(num_samples=samples, seed=seed).fit(objective, num)
                result = result.refine(objective, reevaluations=6 if args.quick else 30)
            seconds = time.perf_counter() - start
            points = np.concatenate([result.samples.metrics, result.real_front.metrics])
            map_runs.append((samples, seed, seconds, points))

    everything = np.concatenate([grid_metrics] + [r["metrics"] for *_, records in moe_runs for r in records] + [m for *_, m in map_runs])
    reference = everything[mm.pareto_mask(everything)]
    refs, ratios = hv_ratios(reference, grid_metrics)

    rows = []
    for method, corners, run_steps, seed, records in moe_runs:
        for r in records:
            corner_acc = np.array([r["metrics"][corner_rows[i], i] for i in range(num)])
            rows.append({"method": f"PWE-MoE ({method.upper()})", "corners": corners, "run_steps": run_steps, "seed": seed, "step": r["step"],
                         "evaluations": len(lattice), "seconds": r["train_seconds"] + r["eval_seconds"], "train_seconds": r["train_seconds"],
                         **ratios(r["metrics"]), "corner_gap": float((finetuned - corner_acc).max()), "corner_accuracy": corner_acc.tolist()})
    for samples, seed, seconds, points in map_runs:
        rows.append({"method": "MAP", "samples": samples, "seed": seed, "evaluations": len(points), "seconds": seconds, **ratios(points)})

    summary = []
    keys = dict.fromkeys((r["method"], r.get("corners"), r.get("run_steps"), r.get("step"), r.get("samples")) for r in rows)
    for method, corners, run_steps, step, samples in keys:
        sub = [r for r in rows if (r["method"], r.get("corners"), r.get("run_steps"), r.get("step"), r.get("samples")) == (method, corners, run_steps, step, samples)]
        entry = {"method": method, "corners": corners, "run_steps": run_steps, "step": step, "samples": samples, "seeds": len(sub),
                 "evaluations": float(np.mean([r["evaluations"] for r in sub]))}
        for k in ("hv_tight", "hv_worst", "corner_gap", "seconds"):
            if k in sub[0]:
                entry[k] = float(np.mean([r[k] for r in sub]))
        summary.append(entry)
    out = Path(args.out)
    path = write(out, args.name, {
        "tasks": NAMES, "steps": args.steps, "checkpoints": checkpoints, "lr": args.lr, "batch_per_task": args.batch,
        "lattice": len(lattice), "grid_points": len(grid_metrics), "reference_points": len(reference), "finetuned_accuracy": finetuned.tolist(),
        "ref_points": {k: v.tolist() for k, v in refs.items()}, "rows": rows, "summary": summary})
    print(table(summary, ["method", "corners", "run_steps", "step", "samples", "evaluations", "hv_tight", "hv_worst", "corner_gap", "seconds"]))
    plot(summary, out / f"{args.name}.png")
    print("wrote", path)


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    curves = dict.fromkeys((s["method"], s["corners"]) for s in summary if s["method"] != "MAP")
    longest = max((s["run_steps"] for s in summary if s["method"] != "MAP"), default=0)
    for (method, corners), color in zip(curves, plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        label = f"{method}, corners {corners:g}"
        curve = sorted((s for s in summary if (s["method"], s["corners"]) == (method, corners) and s["run_steps"] == longest), key=lambda s: s["step"])
        short = [s for s in summary if (s["method"], s["corners"]) == (method, corners) and s["run_steps"] != longest]
        x = [max(s["step"], 1) for s in curve]
        axes[0].plot(x, [s["hv_tight"] for s in curve], "o-", color=color, label=label)
        axes[0].plot([s["step"] for s in short], [s["hv_tight"] for s in short], "s", color=color, mfc="none", ms=9)
        axes[1].plot(x, [s["corner_gap"] for s in curve], "o-", color=color, label=label)
        axes[2].plot([s["seconds"] for s in curve], [s["hv_tight"] for s in curve], "o-", color=color, label=label)
    maps = sorted((s for s in summary if s["method"] == "MAP"), key=lambda s: s["seconds"])
    axes[2].plot([s["seconds"] for s in maps], [s["hv_tight"] for s in maps], "k*-", ms=10, label="MAP (+30 re-evaluations)")
    for s in maps:
        axes[2].annotate(f"{s['evaluations']:.0f} evals", (s["seconds"], s["hv_tight"]), fontsize=7, xytext=(3, -10), textcoords="offset points")
    axes[0].set(xscale="log", xlabel="router steps (circles: one run's curve; squares: shorter runs)", ylabel="HV ratio of the unloaded lattice models (tight ref)")
    axes[1].set(xscale="log", xlabel="router steps", ylabel="corner gap (fine-tuned - corner model acc.)")
    axes[2].set(xscale="log", xlabel="wall seconds (training + scoring)", ylabel="HV ratio (tight ref)", title="equal wall time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("PWE-MoE on the vision zoo (T = 3): convergence, corners, and MAP at equal wall time (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
