"""The peer table's markdown, from bench_fronts.py's ``fronts_<label>_T<T>.json`` files:
``summarize`` writes ``fronts_table.md`` (mean +- std per method and problem, the wide HV / pick
table of the README, the validation pick regrets, MAP's pick rules)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from map_merge.adaptive import proposal_model_for

LABELS = {"lm": "LM loss", "lm_acc": "LM lm-eval"}  # a table's label as its column names it (the others as they are)


def column_name(payload: dict) -> str:
    """``"<problem> T=<T>"`` of a table (``"LM loss T=2"``, ``"vision T=3"``)."""
    return f"{LABELS.get(payload['label'], payload['label'])} T={payload['tasks']}"

def table_files(out: Path) -> list[Path]:
    """The peer table's ``fronts_<label>_T<T>.json`` in ``out``, by label then T (runs on another
    subset of a zoo's tasks, ``fronts_<label>_T<T>_<names>.json``, are not the table's)."""
    found = [p for p in out.glob("fronts_*_T*.json") if p.stem.rsplit("_T", 1)[1].isdigit()]
    return sorted(found, key=lambda p: (p.stem.rsplit("_T", 1)[0], int(p.stem.rsplit("_T", 1)[1])))


def summarize(out: Path) -> Path:
    """``fronts_table.md``: one table over the table's ``fronts_<label>_T<T>.json`` in ``out`` (mean +- std)."""
    lines = ["| problem | T | B | method | HV ratio | pick regret | propose s/run | median s/point |", "|---|---|---|---|---|---|---|---|"]
    for path in table_files(out):
        payload = json.loads(path.read_text())
        if "summary" not in payload or payload.get("version") != 3:
            continue
        for s in payload["summary"]:
            if s.get("budgeted") is False:
                continue
            hv = f"{s['hv_ratio_mean']:.3f} ± {s['hv_ratio_std']:.3f}"
            regret = f"{s['pick_regret_mean']:.4f} ± {s['pick_regret_std']:.4f}" if "pick_regret_mean" in s else ""
            median = f"{s['propose_median_s_mean']:.2f}" if "propose_median_s_mean" in s else ""
            method = s["method"] + (f" ({_proposal_note(payload)[2:]})" if s["method"] == "MAP" and _proposal_note(payload) else "")
            lines.append(f"| {payload['label']} | {payload['tasks']} | {payload['budget']} | {method} | {hv} | {regret} | "
                         f"{s['propose_s_mean']:.0f} | {median} |")
    target = out / "fronts_table.md"
    target.write_text("\n".join(lines) + "\n\n" + wide_table(out) + "\n\n" + val_table(out) + "\n\n" + rules_table(out) + "\n")
    return target


RULES = {"pick_regret_best_mean": "best predicted mean",
         "pick_regret": "default: mean - 1 std, unless a real evaluation scores more (in noisy metrics, accuracies and lm-eval's, by the model at it)",
         "pick_regret_measured": "mean - 1 std, unless a real evaluation's measurement scores more (every metric exact)",
         "pick_regret_half_std": "the default with 0.5 std",
         "pick_regret_posterior": "mean - 1 std, real evaluations scored by the model at them (every metric noisy)",
         "eval_pick_regret": "best evaluated model by validation score"}


def _proposal_note(payload: dict) -> str:
    """``", proposal_model=gp"`` for a table whose MAP rows did not run the default proposals of
    its number of tasks (``proposal_model_for``; today's default below T = 4, "auto" from 4 on)."""
    chosen = payload.get("proposal_model", "gp")  # tables written before the flag ran the GPs
    return "" if chosen == proposal_model_for(None, payload["tasks"]) else f", proposal_model={chosen}"


def _regret_text(value: float, digits: int = 2) -> str:
    """A regret to ``digits`` significant digits; rounding noise around 0 (the grid's own pick on a
    noise-free problem) shown as 0."""
    return "0" if abs(value) < 1e-12 else f"{value:.{digits}g}"


def rules_table(out: Path, method: str = "MAP") -> str:
    """``method``'s test pick regret under each pick rule (the same runs), one column per problem,
    and the whole grid's validation pick; the best rule of each column in bold."""
    columns, cells = [], {}
    for path in table_files(out):
        payload = json.loads(path.read_text())
        entry = next((s for s in payload.get("summary", []) if s["method"] == method), None)
        if payload.get("version") != 3 or entry is None or "pick_regret_best_mean_mean" not in entry:
            continue
        column = f"{column_name(payload)}{_proposal_note(payload)}"
        columns.append(column)
        best = min(entry.get(f"{key}_mean", np.inf) for key in RULES)
        for key in RULES:
            value = entry.get(f"{key}_mean")
            cells[key, column] = "-" if value is None else f"**{value:.2g}**" if value == best else f"{value:.2g}"
        cells["grid", column] = f"*{_regret_text(payload['grid_pick_regret'])}*" if "grid_pick_regret" in payload else "-"
    if not columns:
        return ""
    lines = [f"| {method}'s pick rule | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells[key, c] for c in columns) + " |" for key, label in RULES.items()]
    lines.append("| *whole grid, picked on validation* | " + " | ".join(cells["grid", c] for c in columns) + " |")
    return "\n".join(lines)


def wide_table(out: Path) -> str:
    """One row per method, one column per problem: ``HV ratio / pick regret`` means, the best of
    each column in bold (the README's peer table); the last row the whole grid's validation pick."""
    settings, cells, methods, references = [], {}, [], {}
    for path in table_files(out):
        payload = json.loads(path.read_text())
        if "summary" not in payload or payload.get("version") != 3:
            continue
        budgeted = [s for s in payload["summary"] if s.get("budgeted") is not False]
        seeds = payload.get("seeds")
        seeds = len(seeds) if isinstance(seeds, list) else seeds
        seeds = max([s.get("seeds", 0) for s in budgeted] + [seeds or 0])  # the column's; a method run on fewer says so in its cell
        column = (f"{column_name(payload)} (B={payload['budget']}" + (f", {seeds} seeds" if seeds and seeds != 5 else "")
                  + _proposal_note(payload) + ")")
        settings.append(column)
        if "grid_pick_regret" in payload:
            references[column] = f"*1 / {_regret_text(payload['grid_pick_regret'])}*"
        best_hv = max(s["hv_ratio_mean"] for s in budgeted)
        best_regret = min(s.get("pick_regret_mean", np.inf) for s in budgeted)
        for s in budgeted:
            if s["method"] not in methods:
                methods.append(s["method"])
            hv, regret = s["hv_ratio_mean"], s.get("pick_regret_mean", np.nan)
            hv_text = f"**{hv:.3f}**" if np.isclose(hv, best_hv, rtol=1e-9, atol=0) else f"{hv:.3f}"  # ties: means that differ in rounding only
            regret_text = f"**{regret:.2g}**" if np.isclose(regret, best_regret, rtol=1e-9, atol=1e-15) else f"{regret:.2g}"
            fewer = f" ({s['seeds']} seeds)" if s.get("seeds") and s["seeds"] < seeds else ""
            cells[s["method"], column] = f"{hv_text} / {regret_text}{fewer}"
    lines = ["| method | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    lines += [f"| {m} | " + " | ".join(cells.get((m, c), "-") for c in settings) + " |" for m in methods]
    lines.append("| *whole grid, picked on validation* | " + " | ".join(references.get(c, "-") for c in settings) + " |")
    return "\n".join(lines)


def val_table(out: Path) -> str:
    """One row per method, one column per problem: the picks' mean *validation* regret (the score the
    methods were given; search quality without how well validation predicts test), the best of each
    column in bold; "-" where a column was measured before ``val_pick_regret`` was recorded."""
    settings, cells, methods = [], {}, []
    for path in table_files(out):
        payload = json.loads(path.read_text())
        if "summary" not in payload or payload.get("version") != 3:
            continue
        budgeted = [s for s in payload["summary"] if s.get("budgeted") is not False]
        if not any("val_pick_regret_mean" in s for s in budgeted):
            continue
        column = f"{column_name(payload)}{_proposal_note(payload)}"
        settings.append(column)
        # the best in bold only where every method was measured (rows kept by --update from before lack it)
        best = min(s.get("val_pick_regret_mean", np.inf) for s in budgeted) if all("val_pick_regret_mean" in s for s in budgeted) else None
        for s in budgeted:
            if s["method"] not in methods:
                methods.append(s["method"])
            value = s.get("val_pick_regret_mean")
            if value is not None:
                text = _regret_text(value, 3)  # 3 digits: validation regrets of several methods often share their first two
                cells[s["method"], column] = f"**{text}**" if best is not None and np.isclose(value, best, rtol=1e-9, atol=1e-15) else text
    if not settings:
        return ""
    lines = ["| validation pick regret | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    lines += [f"| {m} | " + " | ".join(cells.get((m, c), "-") for c in settings) + " |" for m in methods]
    return "\n".join(lines)
