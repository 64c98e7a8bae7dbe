"""Nested merging against plain MAP: evaluations spent and the real quality of the model chosen
for one preference (equal weights), on the vision zoo (T = 4) and an analytic problem (T = 8).

Plain MAP spends (T+1)(T+2) evaluations of all T tasks and picks its predicted-front point for the
preference; nested merging spends T-1 pairwise stages. Both chosen models are scored for real.

    python benchmarks/bench_nested.py --out benchmarks/results
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


class Counting:
    """Counts (model, task) evaluations of an objective over a task subset of a full objective."""

    def __init__(self, full, indices):
        self.full, self.indices = full, list(indices)
        self.task_evaluations = 0

    def __call__(self, coeffs):
        self.task_evaluations += len(coeffs) * len(self.indices)
        return self.full(coeffs)[:, self.indices]


def analytic(num_tasks: int):
    rng = np.random.default_rng(num_tasks)
    best = rng.uniform(0.5, 0.9, size=num_tasks)
    interference = rng.uniform(0.05, 0.3, size=(num_tasks, num_tasks))
    np.fill_diagonal(interference, 0.0)

    def fn(c):
        c = np.atleast_2d(c)
        z = 2.0 - 6 * (c - best) ** 2 - (c**2) @ interference.T
        return 1 / (1 + np.exp(-z))

    return fn


def main() -> None:
    args = parser(__doc__, "benchmarks/results").parse_args()
    problems = []
    if args.quick:  # the shape of the run on a small problem (the test suite runs it)
        problems.append(("analytic", 3, analytic(3)))
    else:
        from map_merge.zoo import load_vision_zoo

        names = ["rotated", "inverted", "mirrored_parity", "shifted_mod3"]
        zoo = load_vision_zoo(names, progress=False)
        objective = zoo.objective(names, store=Path(args.out) / "vision_evals.sqlite", progress=False)
        problems += [("vision", 4, objective), ("analytic", 8, analytic(8))]
    rows = []
    for name, num, full in problems:
        preference = np.ones(num) / num
        start = time.perf_counter()
        counters = []

        def objective_for(idx, full=full, counters=counters):
            counter = Counting(full, idx)
            counters.append(counter)
            return counter

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nested = mm.nested_merge(objective_for, num, preference, samples_per_stage=8 if args.quick else 20, seed=0)
        nested_seconds = time.perf_counter() - start
        start = time.perf_counter()
        plain_obj = Counting(full, range(num))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = mm.MAP(seed=0).fit(plain_obj, num)
        chosen = plain.select(preference)
        plain_real = full(chosen[None])[0]
        plain_seconds = time.perf_counter() - start
        lambdas = np.linspace(0, 1, 21)[:, None] * np.ones(num)
        uniform = full(lambdas).mean(axis=1)
        rows += [
            {"problem": name, "tasks": num, "method": "nested merging", "models_evaluated": nested.num_evaluations,
             "task_evaluations": sum(c.task_evaluations for c in counters), "mean_metric": float(nested.metrics.mean()), "seconds": nested_seconds,
             "coeffs": np.round(nested.coeffs, 3).tolist()},
            {"problem": name, "tasks": num, "method": "plain MAP", "models_evaluated": plain.num_evaluations + 1,
             "task_evaluations": plain_obj.task_evaluations + num, "mean_metric": float(plain_real.mean()), "seconds": plain_seconds,
             "coeffs": np.round(chosen, 3).tolist()},
            {"problem": name, "tasks": num, "method": "best uniform TA (21-point sweep)", "models_evaluated": 21,
             "task_evaluations": 21 * num, "mean_metric": float(uniform.max()), "seconds": 0.0,
             "coeffs": np.round(lambdas[int(np.argmax(uniform))], 3).tolist()},
        ]
    path = write(args.out, "nested", {"rows": rows, "preference": "equal weights"})
    print(table(rows, ["problem", "tasks", "method", "models_evaluated", "task_evaluations", "mean_metric", "seconds"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
