"""The MAP variants' picks over more seeds: a table and a plot from bench_fronts.py tables that were
extended with ``--update --first-seed 5`` (docs/fronts.md, "Ten seeds for the MAP variants").

Reads every ``fronts_<label>_T<T>.json`` in ``--out`` and, for each setting where every MAP variant
has at least ``--min-seeds`` rows, writes one row: each variant's mean +- std test pick regret
(the lowest in bold), their mean validation pick regret and HV ratio, and MAP's rank among the
variants on the first five seeds and on all. Writes ``variants_table.md`` and
``variants_pick_regret.png`` there.

    python benchmarks/variants_table.py --out benchmarks/results/variants_ten_seeds
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser  # noqa: E402
from _fronts_tables import column_name, table_files  # noqa: E402

VARIANTS = ("MAP", "MAP (design)", "Bayesian MAP")


def variant_rows(folder: Path, min_seeds: int = 10) -> list[dict]:
    """One dict per setting (``setting``, ``seeds``: the seeds every variant ran, sorted, and per
    variant ``test``: test pick regrets on those seeds, ``val``, ``hv``); a setting where the
    variants share fewer than ``min_seeds`` seeds is left out (rows of other seeds are ignored, so
    every mean is over the same seeds)."""
    out = []
    for path in table_files(folder):
        payload = json.loads(path.read_text())
        by_seed = {m: {r["seed"]: r for r in payload["rows"] if r["method"] == m} for m in VARIANTS}  # a repeated seed counts once
        seeds = sorted(set.intersection(*(set(rows) for rows in by_seed.values())))
        if len(seeds) < min_seeds:
            continue
        entry = {"setting": column_name(payload), "seeds": seeds}
        for m in VARIANTS:
            rows = [by_seed[m][s] for s in seeds]
            entry[m] = {"test": np.array([r["pick_regret"] for r in rows]),
                        "val": np.array([r.get("val_pick_regret", np.nan) for r in rows]),
                        "hv": np.array([r["hv_ratio"] for r in rows])}
        out.append(entry)
    return out


def rank(entry: dict, seeds: int | None = None) -> int:
    """MAP's rank among the variants by mean test pick regret (1 = lowest; a tie ranks MAP first)
    over the first ``seeds`` common seeds (all: None)."""
    mean = {m: entry[m]["test"][:seeds].mean() for m in VARIANTS}
    return 1 + sum(mean[m] < mean["MAP"] and not np.isclose(mean[m], mean["MAP"], rtol=1e-9, atol=1e-15) for m in VARIANTS[1:])


def _mean_std(values: np.ndarray) -> str:
    std = values.std()
    return f"{values.mean():.3g} ± {0 if std < 1e-12 * max(1.0, abs(values.mean())) else std:.2g}"


def markdown(entries: list[dict]) -> str:
    """The table: each variant's mean ± std (over seeds) test pick regret (the lowest in bold, ties too), the mean validation
    regret ("-" unless every seed has it), HV ratio, MAP's rank on the first five seeds and on all."""
    lines = ["| setting | " + " | ".join(f"{m}: test pick regret (mean ± std)" for m in VARIANTS)
             + " | validation pick regret (" + " / ".join(VARIANTS) + ") | HV ratio (same order) | MAP's rank, 5 seeds → all | seeds |",
             "|---|" + "---|" * (len(VARIANTS) + 4)]
    for e in entries:
        best = min(e[m]["test"].mean() for m in VARIANTS)
        cells = [f"**{_mean_std(e[m]['test'])}**" if np.isclose(e[m]["test"].mean(), best, rtol=1e-9, atol=1e-15)  # ties: rounding only
                 else _mean_std(e[m]["test"]) for m in VARIANTS]
        val = " / ".join("-" if np.isnan(e[m]["val"]).any() else f"{e[m]['val'].mean():.3g}" for m in VARIANTS)
        hv = " / ".join(f"{e[m]['hv'].mean():.3f}" for m in VARIANTS)
        lines.append(f"| {e['setting']} | " + " | ".join(cells) + f" | {val} | {hv} | {rank(e, 5)} → {rank(e)} | {len(e['seeds'])} |")
    return "\n".join(lines)


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(entries) + 3, 3.6))
    x = np.arange(len(entries))
    for k, m in enumerate(VARIANTS):
        means = [e[m]["test"].mean() for e in entries]
        errors = [e[m]["test"].std(ddof=1) / np.sqrt(len(e[m]["test"])) for e in entries]
        ax.errorbar(x + (k - 1) * 0.2, means, yerr=errors, fmt="o", capsize=3, label=m)
    ax.set_xticks(x, [e["setting"] for e in entries], rotation=20)
    ax.set_ylabel("test pick regret (mean ± s.e.)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("MAP variants' picks over more seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__, "benchmarks/results/variants_ten_seeds")
    p.add_argument("--min-seeds", type=int, default=10, help="settings where every variant has at least this many seeds")
    args = p.parse_args()
    out = Path(args.out)
    entries = variant_rows(out, args.min_seeds)
    if not entries:
        raise SystemExit(f"variants_table.py: no table in {out} has {args.min_seeds} seeds of every MAP variant")
    text = markdown(entries)
    (out / "variants_table.md").write_text(text + "\n")
    plot(entries, out / "variants_pick_regret.png")
    print(text)


if __name__ == "__main__":
    main()
