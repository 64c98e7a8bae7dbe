"""The run report as Markdown (:mod:`.report`'s data laid out like the demo's report): what was
run, the front plot, the chosen model's block, the comparison table and where the files are."""

from __future__ import annotations

from typing import Any

__all__ = ["report_markdown", "block_markdown", "number"]


def number(value: Any) -> str:
    """A metric or coefficient as the report prints it (``-`` when unknown)."""
    if value is None:
        return "-"
    value = float(value) + 0.0  # -0.0 printed as 0
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return f"{value:.3e}"


def _value(value: Any) -> str:
    """A setting or a named coefficient: numbers as :func:`number`, lists and mappings spelled out."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, float):
        return number(value)
    return str(value)


def _pm(mean: Any, std: Any) -> str:
    return number(mean) if std is None else f"{number(mean)} ± {number(std)}"


def _coeffs(values: list[Any] | None) -> str:
    return "-" if values is None else ", ".join(number(v) for v in values)


def _operator(spec: dict[str, Any]) -> str:
    settings = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "name" and v is not None)
    return spec.get("name", "task_arithmetic").replace("_", " ") + (f" ({settings})" if settings else "")


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _missed(predicted: dict[str, Any] | None, real: list[float], labels: list[dict[str, Any]], z: float = 3.0) -> str:
    """The metrics whose real value lies more than ``z`` predictive std from the prediction
    (and differs by more than 1e-6 x max(1, |value|)), as text; empty when none or no std."""
    if not predicted or not predicted.get("std"):
        return ""
    out = []
    for label, mean, std, value in zip(labels, predicted["mean"], predicted["std"], real):
        gap = abs(float(value) - float(mean))
        if std is not None and gap > 1e-6 * max(1.0, abs(float(value))) and gap > z * float(std):
            out.append(f"{label['task']}: real {number(value)}, predicted {number(mean)} ± "
                       f"{number(std)}, {gap / max(float(std), 1e-300):.0f} std apart")
    return "; ".join(out)


def block_markdown(report: dict[str, Any]) -> str:
    """The chosen model's block and the comparison table."""
    block, labels = report["pick"], report["metrics"]
    lines = ["## Your model", ""]
    preference = ", ".join(f"{t} {number(w)}" for t, w in block["preference"].items())
    coefficients = block["coefficients"]
    named = "; ".join(f"{k}: {_value(v)}" for k, v in coefficients.items())
    lines += [f"Preference (normalised to sum 1): {preference}.", "",
              f"Coefficients: {named}.", "", f"Saved at `{block['saved']['path']}`.", "",
              "| metric | predicted (± std) | merged in memory (real) | saved weights (real) |", "|---|---|---|---|"]
    predicted, memory, saved = block["predicted"], block["merged_in_memory"], block["saved"]
    for j, label in enumerate(labels):
        lines.append(f"| {label['axis']} | {_pm(predicted['mean'][j], (predicted['std'] or [None] * len(labels))[j]) if predicted else '-'} | "
                     f"{number(memory['metrics'][j]) if memory else '-'} | {number(saved['metrics'][j])} |")
    lines.append(f"| preference-weighted score | {number(predicted['score']) if predicted else '-'} | "
                 f"{number(memory['score']) if memory else '-'} | {number(saved['score'])} |")
    lines += ["", f"Predicted: {block['prediction']}", ""]
    missed = _missed(predicted, saved["metrics"], labels)
    if missed:
        lines += [f"**The prediction missed** ({missed}): the run's model is unreliable near this point (few evaluations near "
                  "it, or a metric with plateaus); trust the real values, and a larger budget or a point near the evaluated "
                  "ones may serve better.", ""]
    save = bool(report.get("save"))
    if memory:
        lines.append("Merged in memory: the run's live model merged for these coefficients and scored by every task, through the "
                     "evaluation store.")
    else:
        lines.append(f"Merged in memory: not shown ({block['memory_note']}" + ("; save evaluates the saved weights only)." if save else ")."))
    kept = ("save keeps the result nowhere (the run's store is only read)" if save else
            "the result is kept in the evaluation store under a digest of the weights' bytes, so a rerun that saves the same bytes "
            "evaluates nothing" + (" (this one came from the store)" if saved["from_store"] else ""))
    lines += ["", "Saved weights: the weights of the saved model read back from disk into the run's live model (built as the run "
              f"builds it) and scored once by every task; {kept}."]
    agreement = block["agreement"]
    if agreement is not None:
        verdict = "agree" if agreement["agrees"] else "DIFFER"
        lines += ["", f"The saved weights and the merge in memory {verdict}: largest difference {number(agreement['max_abs_diff'])} "
                  f"(tolerance {agreement['tolerance']:g} x max(1, |value|)"
                  + ("; the saved file keeps the pretrained dtypes, the live model may compute in another)." if not agreement["agrees"] else ").")]
    lines += ["", _table(report)]
    return "\n".join(lines)


def _table(report: dict[str, Any]) -> str:
    table, labels, block = report["comparison"], report["metrics"], report["pick"]
    extra = report["extra_evaluations"]
    header = "| model | coefficients | " + " | ".join(label["axis"] for label in labels) + " | score | dominated by your model |"
    lines = ["## Compared", "",
             "Real evaluations of the same merge (operator: " + _operator(table["operator"]) + ") at other coefficients, through the run's "
             "evaluation store. Score: the preference-weighted sum of the metrics, lower-is-better ones negated (higher is better). "
             "Dominated: your model (its saved weights) is at least as good on every task and better on one.", "",
             header, "|---" * (len(labels) + 4) + "|"]
    saved, predicted = block["saved"], block["predicted"]
    lines.append(f"| **your model** (saved weights, real) | {_coeffs(block['coeffs'])} | "
                 + " | ".join(number(v) for v in saved["metrics"]) + f" | {number(saved['score'])} | - |")
    if predicted:
        std = predicted["std"] or [None] * len(labels)
        lines.append(f"| your model (predicted ± std) | {_coeffs(block['coeffs'])} | "
                     + " | ".join(_pm(m, s) for m, s in zip(predicted["mean"], std)) + f" | {number(predicted['score'])} | - |")
    for row in table["rows"]:
        if row["kind"] == "uniform" and not row.get("best"):
            continue
        name = f"best uniform (c = {row['lambda']:g} for every coefficient)" if row["kind"] == "uniform" else row["model"]
        lines.append(f"| {name} | {_coeffs(row['coeffs'])} | " + " | ".join(number(v) for v in row["metrics"])
                     + f" | {number(row['score'])} | {_yes(row['dominated_by_pick'])} |")
    uniform = [row for row in table["rows"] if row["kind"] == "uniform"]
    lines += ["", "Uniform merges tried (score): " + ", ".join(f"c = {row['lambda']:g}: {number(row['score'])}" for row in uniform) + "."]
    if table["operator"].get("name", "task_arithmetic") != "task_arithmetic":
        lines += ["", "The experts' rows are merges at one-hot coefficients under this operator, not necessarily the fine-tuned models themselves."]
    notes = sorted({row["note"] for row in table["rows"] if row.get("note")})
    if notes:
        lines += ["", "Not known: " + "; ".join(notes) + ("." if report.get("save") is None else
                                                           " (save reads the run's store and evaluates no comparison: run the command "
                                                           "that writes the report first)."), ]
    counted = f"{extra['models_evaluated']} model(s) evaluated, {extra['from_store']} answered by the store"
    lines += ["", f"Evaluations for this block and table: {counted}" + (" (outside the run's budget)." if not report.get("save") else
                                                                      " (the run's store is read, never written).")]
    return "\n".join(lines)


def _what(report: dict[str, Any]) -> list[str]:
    models = report["models"]
    command = f"map-merge {report['command']} --config {report['config']}" + (f" --mergekit {report['mergekit']}" if report["mergekit"] else "")
    if "zoo" in models:
        what = f"the bundled `{models['zoo']}` zoo" + (f" ({models['description']})" if models.get("description") else "")
    else:
        experts = ", ".join(f"{t}: `{p}`" for t, p in models["finetuned"].items())
        what = f"your models: pretrained `{models['pretrained']}`; experts {experts}"
    metrics = "; ".join(label["axis"] for label in report["metrics"])
    settings = ", ".join(f"{k} {_value(v)}" for k, v in report["settings"].items())
    run, extra = report["run"], report["extra_evaluations"]
    budget = f"budget {run['budget']} real evaluations; " if run.get("budget") is not None else ""
    return [f"- Command: `{command}`", f"- Models: {what}", f"- Tasks and metrics: {metrics}",
            f"- Method: {report['method']} ({settings}); merge operator: {_operator(report['operator'])}",
            f"- Evaluations: {budget}{run['evaluations']} distinct models used, {run['models_evaluated']} evaluated by this run "
            f"and {run['from_store']} answered by the evaluation store; this report: {extra['models_evaluated']} more evaluated "
            f"and {extra['from_store']} from the store (outside the budget)."]


def report_markdown(report: dict[str, Any]) -> str:
    """``report.md``: what was run, the front, the chosen model's block and table, the files."""
    lines = ["# map_merge run report", "", *_what(report), ""]
    if "front.png" in report["files"]:
        pick = "the unloaded models"
        if report["command"] in ("map", "bayes"):  # as the plot labels it: a predicted point, or a real evaluation that beat them
            pick = "the pick for your preference (a gold star, " + ("one of the run's real evaluations)" if report["pick"].get("measured")
                                                                     else "predicted)")
        lines += ["## Front", "", "![front](front.png)", "",
                  f"Every real evaluation, the {report['method']} front and {pick}"
                  + (", and your recipe's merge as evaluated" if report["mergekit"] else "") + ".", ""]
    else:
        lines += ["## Front", "", "Nested merging returns one model for one preference: no front to plot.", ""]
    lines += [block_markdown(report), "", "## Files", "", f"In `{report['out']}`:", ""]
    lines += [f"- `{name}`: {what}" for name, what in report["files"].items()]
    if report.get("store"):
        lines.append(f"- evaluation store `{report['store']}`: every result, reused by reruns")
    return "\n".join(lines) + "\n"
