"""Which model should MAP hand over? The same default runs, their picks under candidate rules.

MAP (the default, ``MAP(budget=B, seed=s)``) runs on one problem of the peer table
(``bench_fronts.py``: the analytic black box, or a zoo with ``--task-names``, e.g. an LM pair the
table never saw), and each run's picks for the 5-8 test preferences are scored on the test split
under every rule below; the runs are the same for every rule, so the rules differ only in the pick:

- ``caution 1`` (the default), ``caution 0.5``, ``caution 0.25``, ``caution 0``: the predicted
  front's best point by weighted mean less ``caution`` predictive std, unless a real evaluation
  scores more (``result.select(w, caution)``; noisy metrics scored by the model at them);
- ``over mean``: the default's model pick, replaced by a real evaluation only when the evaluation
  scores above the pick's predicted *mean* (the caution ranks predictions; a measurement competes
  with what the model expects of its pick, not with its pessimistic bound);
- ``posterior``: every real evaluation scored by the model at it, like a predicted point;
- ``best mean``: the predicted front's best mean, no real evaluation.

Regret: the dense grid's best weighted test score minus the pick's, oriented higher-is-better
(0 is perfect), mean over the preferences; ``grid_pick_regret``: the whole grid picked on
validation. Results go to ``pick_rules_<label>_T<T>[_<names>].json`` and a plot.

    python benchmarks/bench_pick_rules.py --problem lm --tasks 2 --task-names medical,legal --out benchmarks/results
    python benchmarks/bench_pick_rules.py --problem analytic --tasks 3 --out benchmarks/results
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunJournal, parser, table, write  # noqa: E402

RULES = ("caution 1", "caution 0.5", "caution 0.25", "caution 0", "over mean", "posterior", "best mean")


def over_mean(result, preference: np.ndarray) -> np.ndarray:
    """The default's model pick unless a real evaluation scores above its predicted mean (a real
    evaluation scored by its measurement; in noisy metrics by the model's mean at it). The comparison
    is :func:`~map_merge.pareto.cautious_pick` with no caution against a one-point front holding the
    pick's mean, so ties and unknown (NaN) scores are treated as the default treats them."""
    from map_merge.pareto import ParetoFront, cautious_pick

    front, index = cautious_pick(result.front, preference)
    expected = ParetoFront(front.coeffs[index:index + 1], front.metrics[index:index + 1], front.task_names, front.senses)
    real = result.real_evaluations()
    if any(result.noisy or ()):  # noisy metrics: the model's mean at each evaluation
        mean = result.predict(real.coeffs)
        handed, at = cautious_pick(expected, preference, real, caution=0.0, posterior=(mean, np.zeros_like(mean)), noisy=result.noisy)
    else:
        handed, at = cautious_pick(expected, preference, real, caution=0.0)
    return handed.coeffs[at]


def picks(result, preferences: np.ndarray) -> dict[str, np.ndarray]:
    """``rule -> (P, T)`` picks of one MAP run for ``preferences (P, M)``."""
    from map_merge.pareto import cautious_pick

    real = result.real_evaluations()
    posterior = result.predict(real.coeffs, return_std=True)
    chosen = {f"caution {c:g}": np.stack([result.select(w, caution=c) for w in preferences]) for c in (1.0, 0.5, 0.25, 0.0)}
    chosen["over mean"] = np.stack([over_mean(result, w) for w in preferences])
    chosen["posterior"] = np.stack([front.coeffs[i] for front, i in (cautious_pick(result.front, w, real, posterior=posterior)
                                                                     for w in preferences)])
    chosen["best mean"] = np.stack([result.front.select(w) for w in preferences])
    return chosen


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    p.add_argument("--problem", choices=["analytic", "vision", "text", "lm"], default="analytic")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--metric", choices=["loss", "lm_eval"], default="loss", help="lm: held-out loss or lm-eval accuracy")
    p.add_argument("--task-names", default=None, help="zoos: the T tasks to merge, comma-separated (default: the zoo's first T)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--store", default=None, help="evaluation store (default: <out>/<problem>_evals.sqlite)")
    args = p.parse_args()
    import torch
    from tqdm.auto import tqdm

    import map_merge as mm
    from bench_fronts import BUDGET, GRID, TASKS, analytic, test_preferences, zoo_objectives, zoo_tasks
    from map_merge.objective import check_senses
    from map_merge.pareto import check_noisy, orient

    torch.set_num_threads(1)
    out, num = Path(args.out), args.tasks
    label = args.problem if args.problem != "lm" else ("lm" if args.metric == "loss" else "lm_acc")
    suffix, names, size = "", None, None
    if args.problem == "analytic":
        if args.task_names is not None:
            raise SystemExit("--task-names chooses a zoo's tasks; the analytic problem has none")
        objective = test_objective = analytic(num)
    else:
        try:
            names = zoo_tasks(args.problem, num, args.task_names)
        except ValueError as error:
            raise SystemExit(f"bench_pick_rules.py: {error}") from None
        suffix = "" if names == TASKS[args.problem][:num] else "_" + "+".join(names)
        size = ("tiny" if args.quick else "small") if args.problem == "lm" else None
        store = args.store or out / f"{args.problem}{'_' + args.metric if args.problem == 'lm' else ''}_evals.sqlite"
        *_, objective, test_objective = zoo_objectives(args.problem, names, args.metric, size, store)
    senses = check_senses(getattr(objective, "senses", None), num)
    grid = mm.grid_design(num, 4 if args.quick else GRID[label][num])
    prefs = test_preferences(num)
    budget = 10 if args.quick else BUDGET[num]
    seeds = range(1 if args.quick else args.seeds)
    best_test = (orient(test_objective(grid), senses) @ prefs.T).max(axis=0)

    def regret(coeffs: np.ndarray) -> float:
        return float(np.mean(best_test - np.einsum("pm,pm->p", orient(test_objective(coeffs), senses), prefs)))

    grid_pick = regret(grid[np.argmax(orient(objective(grid), senses) @ prefs.T, axis=0)])
    rows = []
    name = f"pick_rules_{label}_T{num}{suffix}"
    journal = RunJournal(out, name, {"runs": [label, names, size, budget, len(grid), prefs.tolist(), best_test.tolist()]})
    if journal.note:
        print(journal.note, flush=True)
    for seed in tqdm(seeds, desc=f"pick rules {label} T={num}{suffix}"):
        if journal.get(str(seed)) is not None:  # finished before a stop: read back, not run again
            rows.append(journal.get(str(seed)))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = mm.MAP(budget=budget, seed=seed).fit(objective, num)
        rows.append({"seed": seed, "model": result.settings.get("model"), "noisy_trend": result.fitter.noisy_trend,
                     "noisy": list(check_noisy(result.noisy, num)),  # which metrics "default" scores by the model
                     **{rule: regret(chosen) for rule, chosen in picks(result, prefs).items()}})
        journal.add(str(seed), rows[-1])
    summary = [{"rule": rule, "pick_regret_mean": float(np.mean([r[rule] for r in rows])),
                "pick_regret_std": float(np.std([r[rule] for r in rows]))} for rule in RULES]
    path = write(out, name, {"problem": args.problem, "label": label, "tasks": num, "task_names": names, "senses": list(senses),
                             "size": size, "budget": budget, "seeds": len(rows), "test_preferences": prefs.tolist(),
                             "grid_points": len(grid), "grid_best_weighted_test": best_test.tolist(), "grid_pick_regret": grid_pick,
                             "meaning": "test regret of MAP's picks under each rule (the same runs), oriented higher-is-better",
                             "rows": rows, "summary": summary})
    journal.close()
    from map_merge import plots

    plots.plot_bars({s["rule"]: (s["pick_regret_mean"], s["pick_regret_std"]) for s in summary}, "test regret of the picks (lower is better)",
                    title=f"MAP's pick rules: {label} T={num}{suffix}, {budget} evaluations, {len(rows)} seeds", path=out / f"{name}.png")
    print(table(summary, ["rule", "pick_regret_mean", "pick_regret_std"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
