"""MAP at T = 3 and 4 against a dense grid of real evaluations: which levers lift the front.

Budget: (T+1)(T+2) samples plus at most R = 30 re-evaluations. A variant's front is the
non-dominated set of all its real evaluations. Reference: the non-dominated set of the grid and of
every evaluation of every variant; hypervolume ratio at two reference points, "tight" (the
reference front's nadir minus 0.1) and "worst" (the grid's worst value per task). Also the mean and
worst preference regret of the model each variant picks for 21 preferences (``MAPResult.preference_regret``,
picks evaluated for real, not charged to the budget).

Variants:
- ``default``: MAP as shipped, then R re-evaluations spread evenly over the predicted front.
- ``gp-final``: the front searched on the quadratic plus residual-GP model (``final_model="gp"``).
- ``two-rounds``: R/2 re-evaluations, refit on samples + re-evaluations, search again, R/2 more
  re-evaluations of new front points (``MAP.refine``).
- ``gp-two-rounds``: both.
- ``loo-link``: per task the surrogate link with the lower leave-one-out error (``link="loo"``).
- ``bayes``: :class:`BayesianMAP` spending the (T+1)(T+2) samples adaptively (P + 2 initial, then
  T per round), then the same R re-evaluations in two rounds: equal total evaluations.
- ``bayes-more``: as ``bayes`` with 20 of the R re-evaluations moved to adaptive sampling
  ((T+1)(T+2) + 20 samples, R - 20 re-evaluations).

Task sets: ``tune`` (rotated, inverted, mirrored_parity; levers chosen on it) and ``held-out``
(inverted, mirrored_parity, shifted_mod3; only looked at after), T = 4 all four digits tasks.
Added after the levers were chosen, never tuned on: ``new`` (rotated, shifted_mod3 and MNIST at
8x8: a task from other data) and ``text-T4`` (the four MiniLM text fine-tunes: sentiment, tweet
source, MedMCQA subject, StereoSet bias type; first 100 validation texts per task, 4^4 grid: each
evaluation costs seconds, so run it with ``--variants gp-two-rounds,bayes --seeds 3``). Seeds 0-4.

    python benchmarks/bench_map_levers.py --out benchmarks/results
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import hv_ratios, parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402

SETS = {"tune": ["rotated", "inverted", "mirrored_parity"], "held-out": ["inverted", "mirrored_parity", "shifted_mod3"],
        "T4": ["rotated", "inverted", "mirrored_parity", "shifted_mod3"], "new": ["rotated", "shifted_mod3", "mnist"],
        "text-T4": ["sentiment", "tweet_source", "med_subject", "bias_type"]}
GRID = {3: 9, 4: 6}
TEXT = {"grid": 4, "val_examples": 100}


def set_objective(set_name: str, quick: bool, zoos: dict):
    """``(objective, grid per axis, task names)`` of a task set, the zoo loaded once."""
    names = SETS[set_name][: 2 if quick else None]
    from map_merge.zoo import load_zoo

    if set_name.startswith("text"):
        if "text" not in zoos:
            zoos["text"] = load_zoo("text", SETS["text-T4"], progress=False)
        zoo = zoos["text"]
        split = zoo.limit_split("val", 20 if quick else TEXT["val_examples"])
        return zoo.objective(names, split=split, store=mm.EvaluationStore(), progress=False), 3 if quick else TEXT["grid"], names
    kind = "vision5" if "mnist" in SETS[set_name] else "vision"
    if kind not in zoos:
        from map_merge.zoo.vision import VISION_TASKS

        zoos[kind] = load_zoo("vision", None if kind == "vision" else VISION_TASKS, progress=False)
    return zoos[kind].objective(names, store=mm.EvaluationStore(), progress=False), 5 if quick else GRID.get(len(names), 5), names


def run_variant(name: str, objective, num: int, seed: int, reevals: int):
    if name == "default":
        result = mm.MAP(seed=seed).fit(objective, num)
        result.reevaluate(objective, max_points=reevals)
    elif name == "gp-final":
        result = mm.MAP(seed=seed, final_model="gp").fit(objective, num)
        result.reevaluate(objective, max_points=reevals)
    elif name == "two-rounds":
        result = mm.MAP(seed=seed).fit(objective, num)
        result = result.refine(objective, reevaluations=reevals)
    elif name == "gp-two-rounds":
        result = mm.MAP(seed=seed, final_model="gp").fit(objective, num)
        result = result.refine(objective, reevaluations=reevals)
    elif name in ("bayes", "bayes-more"):
        extra = min(20, reevals - 2) if name == "bayes-more" else 0
        samples = (num + 1) * (num + 2) + extra
        result = mm.BayesianMAP(budget=samples, initial=mm.num_quadratic_params(num) + 2, batch=num, seed=seed).fit(objective, num)
        result = result.refine(objective, reevaluations=reevals - extra)
    elif name == "loo-link":
        result = mm.MAP(seed=seed, link="loo").fit(objective, num)
        result.reevaluate(objective, max_points=reevals)
    else:
        raise ValueError(name)
    return result


def main() -> None:
    args = parser(__doc__.splitlines()[0], "benchmarks/results")
    args.add_argument("--sets", default="tune,held-out,T4")
    args.add_argument("--variants", default="default,gp-final,two-rounds,gp-two-rounds,loo-link,bayes,bayes-more")
    args.add_argument("--seeds", type=int, default=5)
    args.add_argument("--name", default="map_levers", help="name of the JSON and PNG written")
    args = args.parse_args()
    zoos: dict = {}
    sets = args.sets.split(",")
    variants = args.variants.split(",") if not args.quick else ["gp-two-rounds", "bayes"]
    seeds = range(2 if args.quick else args.seeds)
    reevals = 6 if args.quick else 30
    rows, summary = [], []
    for set_name in sets:
        objective, per_axis, names = set_objective(set_name, args.quick, zoos)
        num = len(names)
        grid = mm.grid_design(num, per_axis)
        grid_metrics = objective(grid)
        results = {}
        for variant in variants:
            for seed in seeds:
                before = objective.num_evaluations + objective.num_cached
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run_variant(variant, objective, num, seed, reevals)
                points = result.evaluated_front().metrics
                spent = len(result.samples) + (0 if result.real_front is None else len(result.real_front))
                results[(variant, seed)] = (result, points, spent)
        everything = np.concatenate([grid_metrics] + [p for _, p, _ in results.values()])
        reference = everything[mm.pareto_mask(everything)]
        _, ratios = hv_ratios(reference, grid_metrics)
        prefs = mm.preference_grid(num)
        for (variant, seed), (result, points, spent) in results.items():
            regret = result.preference_regret(objective, reference=reference, preferences=prefs)
            rows.append({"set": set_name, "T": num, "variant": variant, "seed": seed, "evaluations": spent,
                         **ratios(points),
                         "regret_mean": regret["mean"], "regret_max": regret["max"]})
        for variant in variants:
            mine = [r for r in rows if r["set"] == set_name and r["variant"] == variant]
            summary.append({"set": set_name, "T": num, "variant": variant, "evaluations": float(np.mean([r["evaluations"] for r in mine])),
                            **{k: float(np.mean([r[k] for r in mine])) for k in ("hv_tight", "hv_worst", "regret_mean", "regret_max")},
                            "hv_tight_min": float(np.min([r["hv_tight"] for r in mine]))})
        print(table([s for s in summary if s["set"] == set_name],
                    ["set", "T", "variant", "evaluations", "hv_tight", "hv_tight_min", "hv_worst", "regret_mean", "regret_max"]), flush=True)
    out = Path(args.out)
    write(out, args.name, {"rows": rows, "summary": summary, "sets": {k: SETS[k] for k in sets}, "reevaluations": reevals})
    plot(summary, out / f"{args.name}.png", len(seeds))
    print("wrote", out / f"{args.name}.json")


def plot(summary: list[dict], path: Path, seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(s["set"] for s in summary))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        rows = [next((s for s in summary if s["set"] == name and s["variant"] == variant), None) for name in sets]
        x = np.arange(len(sets)) + k * width
        axes[0].bar(x, [np.nan if r is None else r["hv_tight"] for r in rows], width, label=variant)
        axes[1].bar(x, [np.nan if r is None else r["regret_mean"] for r in rows], width, label=variant)
    for ax, label in zip(axes, ["hypervolume ratio (tight reference)", "mean preference regret (picks, real)"]):
        ax.set_xticks(np.arange(len(sets)) + 0.4 - width / 2)
        ax.set_xticklabels(sets)
        ax.set_ylabel(label)
    axes[0].axhline(0.98, color="k", lw=0.8, ls="--")
    axes[0].set_ylim(0.5, 1.01)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MAP levers: (T+1)(T+2) samples + 30 re-evaluations, mean over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
