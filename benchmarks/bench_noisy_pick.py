"""Does flagging lm-eval scores as noisy pick better models on domain pairs the peer table never saw?

The peer table (``bench_fronts.py --problem lm --metric lm_eval``) merges the LM zoo's first two
domains (code, medical). This script runs MAP and the one-shot design (10 re-evaluations inside the
budget, as in the peer table) on other pairs of the zoo's domains, scored by lm-eval multiple-choice
accuracy on the validation questions, and scores each run's pick for the 5 test preferences on the
test questions under two rules (same runs):

- ``noisy_rule``: the default, ``result.select(w)``: lm-eval scores are flagged noisy, so a real
  evaluation competes by the model's prediction at it less one posterior std;
- ``measured_rule``: the same, a real evaluation competing by its measurement
  (``cautious_pick(result.front, w, result.real_evaluations())``);
- ``best_eval_by_val``: the run's best real evaluation by weighted validation score.

Regret: the 11 x 11 grid's best weighted test score minus the pick's (accuracy, 0 is perfect);
``grid_pick_regret``: the whole grid picked on validation.

    python benchmarks/bench_noisy_pick.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, write  # noqa: E402

RULES = {"noisy_rule": "default (lm-eval flagged noisy)", "measured_rule": "real evaluations by their measurement",
         "best_eval_by_val": "best real evaluation by validation"}
METHODS = ("MAP", "MAP (design)")


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--pairs", default="code,legal;medical,legal", help="domain pairs of the LM zoo, ';'-separated")
    p.add_argument("--seeds", type=int, default=None, help="default 5 (1 with --quick)")
    p.add_argument("--budget", type=int, default=None, help="real evaluations per run (default 22; 12 with --quick)")
    p.add_argument("--per-axis", type=int, default=None, help="reference grid points per axis (default 11; 4 with --quick)")
    p.add_argument("--store", default=None, help="evaluation store (default: <out>/lm_lm_eval_evals.sqlite)")
    args = p.parse_args()
    try:
        settings = resolve(args)
    except ValueError as error:
        raise SystemExit(f"bench_noisy_pick.py: {error}") from None
    import torch
    from tqdm.auto import tqdm

    import map_merge as mm
    from map_merge.compare import run_method
    from map_merge.pareto import cautious_pick
    from map_merge.zoo import load_zoo

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, seeds, per_axis, budget, reevaluations, size = (settings[k] for k in ("pairs", "seeds", "per_axis", "budget", "reevaluations", "size"))
    zoo = load_zoo("lm", sorted({n for pair in pairs for n in pair}), progress=False, size=size)
    store = mm.EvaluationStore(args.store or out / "lm_lm_eval_evals.sqlite")
    prefs = mm.preference_grid(2, about=6)
    prefs = np.unique(np.round(np.concatenate([prefs, [[0.5, 0.5]]]), 12), axis=0)  # bench_fronts.test_preferences(2)
    rows, grids = [], {}
    for names in pairs:
        names = list(names)
        val = zoo.objective(names, split=zoo.limit_split("val", None), store=store, progress=False, metric="lm_eval")
        test = zoo.objective(names, split="test", store=store, progress=False, metric="lm_eval")
        grid = mm.grid_design(2, per_axis)
        grid_val, grid_test = val(grid), test(grid)
        best = (grid_test @ prefs.T).max(axis=0)

        def regret(coeffs: np.ndarray) -> float:
            return float(np.mean(best - np.einsum("pm,pm->p", test(np.asarray(coeffs)), prefs)))

        label = "+".join(names)
        grids[label] = regret(grid[np.argmax(grid_val @ prefs.T, axis=0)])
        for method in METHODS:
            for seed in tqdm(range(seeds), desc=f"{label} {method}", leave=False):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = run_method(method, val, 2, budget, seed=seed, reevaluations=reevaluations).result
                real = result.real_evaluations()
                measured = [cautious_pick(result.front, w, real) for w in prefs]
                rows.append({"pair": label, "method": method, "seed": seed, "noisy": list(result.noisy),
                             "noisy_rule": regret(np.stack([result.select(w) for w in prefs])),
                             "measured_rule": regret(np.stack([front.coeffs[i] for front, i in measured])),
                             "best_eval_by_val": regret(real.coeffs[np.argmax(real.metrics @ prefs.T, axis=0)])})
    summary = [{"pair": label, "method": method, "seeds": seeds, "grid_pick_regret": grids[label],
                **{f"{k}_mean": float(np.mean([r[k] for r in rows if (r["pair"], r["method"]) == (label, method)])) for k in RULES}}
               for label in grids for method in METHODS]
    write(out, "noisy_pick", {"pairs": [list(p) for p in pairs], "budget": budget, "reevaluations": reevaluations, "seeds": seeds,
                              "size": size, "grid_per_axis": per_axis,
                              "test_preferences": prefs.tolist(), "rules": RULES, "rows": rows, "summary": summary})
    plot(summary, out / "noisy_pick.png")
    for s in summary:
        print(s["pair"], s["method"], {k: round(s[f"{k}_mean"], 5) for k in RULES}, "grid", round(s["grid_pick_regret"], 5))


def resolve(args: argparse.Namespace) -> dict:
    """The run's settings from the command line: ``pairs`` (each two different domains of the LM
    zoo), ``seeds``, ``per_axis``, ``budget`` (explicit values win over ``--quick``'s) and the
    front re-evaluations inside the budget (10, 2 with ``--quick``, fewer when the budget leaves
    fewer beyond the one-shot design's 6 points, as in ``bench_fronts.py``); ``ValueError`` naming
    a bad option."""
    from map_merge.designs import num_quadratic_params
    from map_merge.zoo.lm_data import LM_DOMAINS

    pairs = [tuple(name.strip() for name in pair.split(",")) for pair in args.pairs.split(";") if pair.strip()]
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(LM_DOMAINS):
            raise ValueError(f"--pairs: each pair is two different domains of the LM zoo {LM_DOMAINS}, "
                             f"'a,b;c,d'; got {','.join(pair)!r}")
    if not pairs:
        raise ValueError(f"--pairs names no pair: {args.pairs!r}")
    if len(set(pairs)) < len(pairs):
        raise ValueError(f"--pairs names a pair twice: {args.pairs!r}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    per_axis = args.per_axis if args.per_axis is not None else (4 if args.quick else 11)
    budget = args.budget if args.budget is not None else (12 if args.quick else 22)
    if seeds < 1 or per_axis < 2:
        raise ValueError(f"--seeds must be at least 1 and --per-axis at least 2, got {seeds} and {per_axis}")
    design = num_quadratic_params(2)
    if budget < design:
        raise ValueError(f"--budget {budget} is below the one-shot design's {design} points")
    reevaluations = max(0, min(2 if args.quick else 10, budget - design))
    return {"pairs": pairs, "seeds": seeds, "per_axis": per_axis, "budget": budget, "reevaluations": reevaluations,
            "size": "tiny" if args.quick else "small"}


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{s['pair']}\n{s['method']}" for s in summary]
    x = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(1.9 * len(summary) + 4.5, 4))
    for k, (key, name) in enumerate(RULES.items()):
        ax.bar(x + (k - 1) * 0.27, [s[f"{key}_mean"] for s in summary], 0.27, label=name)
    ax.scatter(x, [s["grid_pick_regret"] for s in summary], color="k", marker="_", s=600, zorder=3, label="whole grid, picked on validation")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("test pick regret (accuracy)")
    ax.set_title(f"lm-eval accuracy, pairs the peer table did not see ({summary[0]['seeds']} seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
