"""Evaluations on Ray: throughput, worker idle share and driver overhead; synchronous rounds
against the asynchronous queue for Bayesian MAP, measured and at simulated scale.

1. ``throughput``: the same coefficient vectors on the vision zoo (and the text zoo) through
   ``LocalExecutor`` and ``RayExecutor`` with 1 and 2 CPU workers (local runtime): evaluations per
   second, idle share of the workers, driver overhead per evaluation (round trip minus the
   worker's own time), also as a share of one evaluation's cost.
2. ``bayes``: ``BayesianMAP`` on the vision zoo with 2 Ray workers, synchronous rounds of 2
   (``asynchronous=False, batch=2``) against the asynchronous queue, in the same run: wall time,
   idle share, hypervolume of the evaluated points.
3. ``simulated``: the asynchronous queue against synchronous rounds on 4-32 simulated workers
   whose evaluations take 30-120 s (drawn uniformly; a virtual clock, nothing sleeps) while the
   proposals are real ``BayesianMAP`` proposals timed on this machine: total time and idle share
   as workers grow.

    python benchmarks/bench_distributed.py --out benchmarks/results
"""

from __future__ import annotations

import heapq
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge.designs import make_design, num_quadratic_params  # noqa: E402
from map_merge.map import resolve_links  # noqa: E402
from map_merge.objective import check_senses  # noqa: E402


def front_hv(metrics: np.ndarray, ref: np.ndarray) -> float:
    return mm.hypervolume(metrics[mm.pareto_mask(metrics)], ref)


def throughput(zoo, label: str, num_coeffs: int, num_evals: int, workers: list[int], seed: int = 0, split: str = "val") -> list[dict]:
    names = list(zoo.task_names)[:num_coeffs]
    coeffs = np.random.default_rng(seed).uniform(0.0, 1.0, (num_evals, num_coeffs))
    objective = zoo.objective(names, split=split, progress=False)
    objective(coeffs[:1] + 1e-3)  # warm caches
    start = time.perf_counter()
    reference = objective(coeffs)
    local = time.perf_counter() - start
    per_eval = local / num_evals
    rows = [{"zoo": label, "executor": "local", "workers": 1, "wall_s": local, "evals_per_s": num_evals / local, "idle_share": 0.0,
             "overhead_ms": 0.0, "overhead_share": 0.0, "eval_s": per_eval, "equal": True}]
    for count in workers:
        with mm.RayExecutor(num_workers=count) as executor:
            remote = zoo.objective(names, split=split, progress=False)
            remote.executor = executor
            load = executor.prepare(remote.recipe())
            remote(coeffs[:count] + 1e-3)  # warm each worker
            executor.reset_stats()
            start = time.perf_counter()
            values = remote(coeffs)
            wall = time.perf_counter() - start
            stats = executor.stats()
        rows.append({"zoo": label, "executor": "ray", "workers": count, "wall_s": wall, "evals_per_s": num_evals / wall,
                     "idle_share": stats["idle_share"], "overhead_ms": 1e3 * stats["overhead_per_eval_s"],
                     "overhead_share": stats["overhead_per_eval_s"] / per_eval, "eval_s": per_eval, "load_s": max(load),
                     "equal": bool(np.array_equal(values, reference))})
        print(table(rows[-1:], ["zoo", "workers", "wall_s", "evals_per_s", "idle_share", "overhead_ms", "overhead_share", "equal"]), flush=True)
    return rows


def bayes(zoo, label: str, num_coeffs: int, budget: int, seed: int = 0, split: str = "val") -> list[dict]:
    names = list(zoo.task_names)[:num_coeffs]
    rows = []
    with mm.RayExecutor(num_workers=2) as executor:
        for mode in ("synchronous", "asynchronous", "async+lookahead"):
            objective = zoo.objective(names, split=split, progress=False)
            objective.executor = executor
            executor.prepare(objective.recipe())
            executor.reset_stats()
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = mm.BayesianMAP(budget=budget, seed=seed, batch=2, asynchronous=mode != "synchronous",
                                        lookahead=mode == "async+lookahead").fit(objective, num_coeffs)
            wall = time.perf_counter() - start
            stats = executor.stats()
            rows.append({"zoo": label, "mode": mode, "budget": budget, "evaluations": objective.num_evaluations, "wall_s": wall,
                         "idle_share": stats["idle_share"], "acquire_s": result.timings["acquire"],
                         "max_in_flight": result.settings.get("max_in_flight") or 2, "metrics": result.samples.metrics.tolist()})
    ref = np.min([np.min(r["metrics"], axis=0) for r in rows], axis=0) - 0.1
    for row in rows:
        row["hv"] = front_hv(np.array(row.pop("metrics")), ref)
    print(table(rows, ["zoo", "mode", "evaluations", "wall_s", "idle_share", "acquire_s", "hv"]), flush=True)
    return rows


def simulated(workers: list[int], seed: int = 0, low: float = 30.0, high: float = 120.0, extra_rounds: int = 4) -> list[dict]:
    """Virtual-clock model of the two loops, with real proposals on an analytic T = 3 problem."""
    num_coeffs = 3
    targets = np.array([[1.0, 0.0, 0.2], [0.0, 1.0, 0.5], [0.3, 0.2, 1.0]])

    def f(c: np.ndarray) -> np.ndarray:
        return 1.0 - ((np.atleast_2d(c)[:, None, :] - targets[None]) ** 2).sum(-1) / 3.0

    rows = []
    for width in workers:
        initial = num_quadratic_params(num_coeffs) + 2
        budget = initial + extra_rounds * width
        design = make_design("map", num_coeffs, initial, (0.0, 1.0), seed)
        bmap = mm.BayesianMAP(budget=budget, seed=seed, link="identity")
        senses, links, names = check_senses(None, 3), resolve_links("identity", None, 3), ("a", "b", "c")
        rng = np.random.default_rng(seed)
        draw = np.random.default_rng(seed + width)
        durations = draw.uniform(low, high, size=budget)

        def propose(x, y, size, pending):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = bmap._propose(x, y, senses, links, names, size, rng, pending)
            return new, time.perf_counter() - start

        # synchronous rounds of W: the round ends with its slowest evaluation, then the next batch is proposed
        clock, busy, used, proposal_s = 0.0, 0.0, 0, 0.0
        x, y = design, f(design)
        for start in range(0, initial, width):
            chunk = durations[start : start + width]
            clock += chunk.max()
            busy += chunk.sum()
            used += len(chunk)
        while used < budget:
            size = min(width, budget - used)
            new, spent = propose(x, y, size, None)
            clock += spent
            proposal_s += spent
            chunk = durations[used : used + size]
            clock += chunk.max()
            busy += chunk.sum()
            used += size
            x, y = np.concatenate([x, new]), np.concatenate([y, f(new)])
        rows.append({"workers": width, "mode": "synchronous", "budget": budget, "total_s": clock, "proposal_s": proposal_s,
                     "idle_share": 1.0 - busy / (width * clock)})
        for lookahead in (False, True):
            rows.append(simulate_async(width, budget, design, durations, f, propose, lookahead))
        print(table(rows[-3:], ["workers", "mode", "budget", "total_s", "proposal_s", "idle_share"]), flush=True)
    return rows


def simulate_async(width, budget, design, durations, f, propose, lookahead: bool) -> dict:
    """The asynchronous queue on a virtual clock: whenever one evaluation finishes, one new point
    conditioned on the pending ones; with ``lookahead`` the next point is proposed while every
    worker is busy (its time overlaps the evaluations) and submitted when a worker frees up."""
    num_coeffs = design.shape[1]
    minimum = num_quadratic_params(num_coeffs)
    filler = iter(make_design("sobol", num_coeffs, 2 * budget, (0.0, 1.0), 1)[len(design):])
    clock, busy, proposal_s = 0.0, 0.0, 0.0
    queue, heap, done_x, done_y, submitted = list(design), [], [], [], 0
    ready, ready_at = None, 0.0

    def next_point():
        nonlocal proposal_s
        if len(done_x) <= minimum:  # as BayesianMAP: space-filling points until a quadratic can be fitted
            return next(filler), 0.0
        pending = np.array([item[2] for item in heap]) if heap else None
        new, spent = propose(np.array(done_x), np.array(done_y), 1, pending)
        proposal_s += spent
        return new[0], spent

    while submitted < budget or heap:
        while submitted < budget and len(heap) < width:
            if queue:
                point = queue.pop(0)
            elif ready is not None:
                point, ready = ready, None
                clock = max(clock, ready_at)
            else:
                point, spent = next_point()
                clock += spent
            heapq.heappush(heap, (clock + durations[submitted], submitted, point))
            busy += durations[submitted]
            submitted += 1
        if lookahead and ready is None and not queue and submitted < budget and done_x:
            ready, spent = next_point()
            ready_at = clock + spent  # computed while the workers run
        finish, _, point = heapq.heappop(heap)
        clock = max(clock, finish)
        done_x.append(point)
        done_y.append(f(point)[0])
    return {"workers": width, "mode": "async+lookahead" if lookahead else "asynchronous", "budget": budget, "total_s": clock,
            "proposal_s": proposal_s, "idle_share": 1.0 - busy / (width * clock)}


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for zoo in sorted({r["zoo"] for r in payload["throughput"]}):
        rows = [r for r in payload["throughput"] if r["zoo"] == zoo]
        labels = [f"{r['executor']}\n{r['workers']}w" for r in rows]
        local = rows[0]["evals_per_s"]
        ax.plot(labels, [r["evals_per_s"] / local for r in rows], "o-",
                label=f"{zoo} zoo (local: {local:.3g}/s, {1e3 * rows[0]['eval_s']:.0f} ms each)")
    ax.set_ylabel("evaluations per second / local")
    ax.set_title("throughput (this machine: 2 CPU cores)")
    ax.legend()
    ax = axes[1]
    rows = payload["bayes"]
    colors = {"synchronous": "tab:gray", "asynchronous": "tab:blue", "async+lookahead": "tab:green"}
    short = {"synchronous": "sync", "asynchronous": "async", "async+lookahead": "look-\nahead"}
    ax.bar([f"{r['zoo']}\n{short[r['mode']]}" for r in rows], [r["idle_share"] for r in rows],
           color=[colors[r["mode"]] for r in rows])
    for i, r in enumerate(rows):
        ax.text(i, r["idle_share"], f"{r['wall_s']:.0f} s", ha="center", va="bottom")
    ax.set_ylabel("worker idle share")
    ax.set_title("Bayesian MAP, 2 Ray workers (wall time on bars)")
    ax = axes[2]
    sim = payload["simulated"]
    for mode, style in (("synchronous", "s--"), ("asynchronous", "o-"), ("async+lookahead", "^-")):
        rows = [r for r in sim if r["mode"] == mode]
        ax.plot([r["workers"] for r in rows], [r["idle_share"] for r in rows], style, label=f"{mode}: idle share")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("simulated workers (evaluations of 30-120 s)")
    ax.set_ylabel("worker idle share")
    ax.set_title("simulated scale, real proposals")
    twin = ax.twinx()
    for mode, style in (("synchronous", "s:"), ("asynchronous", "o:"), ("async+lookahead", "^:")):
        rows = [r for r in sim if r["mode"] == mode]
        twin.plot([r["workers"] for r in rows], [r["total_s"] / 60 for r in rows], style, color="gray", alpha=0.7)
    twin.set_ylabel("total minutes (dotted)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "benchmarks/results")
    args.add_argument("--no-text", action="store_true", help="skip the text zoo (MiniLM)")
    args = args.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    from map_merge.zoo import load_text_zoo, load_vision_zoo

    vision = load_vision_zoo(progress=False)
    payload: dict = {"throughput": [], "bayes": [], "simulated": []}
    if args.quick:
        payload["throughput"] += throughput(vision, "vision", 3, 6, [1])
        payload["bayes"] = bayes(vision, "vision", 2, 8)
        payload["simulated"] = simulated([2], extra_rounds=1)
    else:
        payload["throughput"] += throughput(vision, "vision", 3, 48, [1, 2])
        payload["bayes"] = bayes(vision, "vision", 3, 30)
        if not args.no_text:
            text = load_text_zoo(progress=False)
            split = text.limit_split("val", 200)
            payload["throughput"] += throughput(text, "text", 3, 12, [1, 2], split=split)
            payload["bayes"] += bayes(text, "text", 3, 30, split=split)
        payload["simulated"] = simulated([4, 8, 16, 32])
    payload["rows"] = payload["throughput"] + payload["bayes"] + payload["simulated"]
    out = Path(args.out)
    write(out, "distributed", payload)
    plot(payload, out / "distributed.png")
    print("wrote", out / "distributed.json", out / "distributed.png")


if __name__ == "__main__":
    main()
