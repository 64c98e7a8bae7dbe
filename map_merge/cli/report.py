"""The run report: what a run or a save gave the user, how sure it is, and how it compares.

For the chosen model (the config's preference, or the one ``save`` was given) the report holds
its coefficients, its predicted metrics with their uncertainty (map / bayes: the run's model;
nested merging and PWE-MoE have none), its real metrics merged in memory (through the run's
evaluation store) and one real evaluation of the *saved* weights (:func:`~map_merge.saved_eval.evaluate_saved`),
and a table against the base (c = 0), each expert (c = e_i), the best uniform merge (c = lambda 1,
lambda in :data:`UNIFORM`, best by the preference-weighted score) and, for a run started from a
mergekit recipe, the recipe's merge. The comparison's evaluations go through the objective and
its store (a rerun repeats none) and are counted apart from the budget.

``map-merge {map, bayes, nested, moe}`` write it as ``report.md`` and ``report.json`` into
``out`` (:func:`run_report`, :func:`write_report`); ``map-merge save`` prints the block for the
model it saved (:func:`save_report`), reading the run's store without writing to it. The text is
laid out by :mod:`.report_text`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..pareto import check_preference, orient
from .outputs import atomic_write
from .report_text import block_markdown, report_markdown

__all__ = ["Chosen", "UNIFORM", "AGREEMENT", "pick_block", "comparison", "run_report", "write_report", "write_failed", "save_report"]

UNIFORM = (0.2, 0.4, 0.6, 0.8, 1.0)
"""The uniform merges compared: every coefficient lambda."""

AGREEMENT = 1e-3
"""The saved weights' metrics agree with the merge in memory when each differs by at most this
times ``max(1, |value|)`` (the saved file keeps the pretrained dtypes; the live model may use another)."""

METHODS = {"map": "MAP", "bayes": "Bayesian MAP", "nested": "nested merging", "moe": "PWE-MoE"}


@dataclass
class Chosen:
    """The model a command chose, as the report shows it.

    Attributes:
        coeffs: ``(C,)`` its merging coefficients (``T x G`` task-major with groups); ``None``
            where it is no coefficient vector (PWE-MoE's routed model, unloaded).
        predicted, std: ``(M,)`` the run's prediction of its metrics and the predictive std.
        prediction: where the prediction comes from, or why there is none.
        coefficients: the coefficients as named for the reader (default: ``objective.coeff_names``).
        measured: one of the run's real evaluations handed over (it beat every prediction), not a
            point of the predicted front.
    """

    coeffs: np.ndarray | None
    predicted: np.ndarray | None = None
    std: np.ndarray | None = None
    prediction: str = ""
    coefficients: dict[str, Any] | None = None
    measured: bool = False


def real_pick_reason(noisy: Any, whose: str = "this") -> str:
    """Why a run's real evaluation was handed over for ``whose`` preference, by the rule of
    :meth:`~map_merge.MAPResult.select`: ``noisy``, the run's per-metric noise flags (or ``None``)."""
    if noisy is not None and any(noisy):
        return (f"scored by the model at it in its noisy metrics and by its measurements in the others (less one predictive "
                f"standard deviation of the noisy ones), it scores better for {whose} preference than any predicted model less one "
                "predictive standard deviation")
    return f"measured, it scores better for {whose} preference than any predicted model less one predictive standard deviation"


def _listed(values: Any) -> list[float | None] | None:
    """An array as a JSON list, NaN as ``None``."""
    if values is None:
        return None
    return [None if not np.isfinite(v) else float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def _score(metrics: np.ndarray | None, senses, weights: np.ndarray) -> float | None:
    """``sum_j w_j m_j`` with lower-is-better metrics negated (higher is better); ``None`` if unknown."""
    if metrics is None or not np.isfinite(metrics).all():
        return None
    return float(orient(np.asarray(metrics, dtype=np.float64)[None], senses)[0] @ weights)


def _dominates(better: np.ndarray | None, other: np.ndarray | None, senses) -> bool | None:
    """Whether ``better`` Pareto-dominates ``other`` (``None`` when either is unknown)."""
    if better is None or other is None or not (np.isfinite(better).all() and np.isfinite(other).all()):
        return None
    a, b = orient(np.asarray(better)[None], senses)[0], orient(np.asarray(other)[None], senses)[0]
    return bool((a >= b).all() and (a > b).any())


def _metrics(objective: Any, coeffs: np.ndarray, evaluate: bool) -> tuple[np.ndarray, list[str | None]]:
    """Metrics ``(K, M)`` of ``coeffs (K, C)`` through the objective and its store (NaN where a
    model failed, with its error; ``evaluate=False``: the store's results only)."""
    coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
    names = tuple(objective.task_names)
    if not evaluate:
        if objective.store is None:
            return np.full((len(coeffs), len(names)), np.nan), ["not evaluated"] * len(coeffs)
        known = objective.store.get(objective.fingerprint(), coeffs, names)
        return known, [None if np.isfinite(row).all() else "not in the run's store" for row in known]
    try:
        return np.asarray(objective(coeffs), dtype=np.float64), [None] * len(coeffs)
    except ValueError:  # a non-finite metric somewhere (the finite results are stored): row by row
        out, errors = np.full((len(coeffs), len(names)), np.nan), []
        for k, row in enumerate(coeffs):
            try:
                out[k] = objective(row[None])[0]
                errors.append(None)
            except ValueError as error:
                errors.append(str(error))
        return out, errors


def pick_block(objective: Any, chosen: Chosen, preference, saved: str | Path, evaluate: bool = True) -> dict[str, Any]:
    """The chosen model's block: coefficients, prediction, the merge in memory (``evaluate=False``:
    only if the store has it) and one real evaluation of the weights saved at ``saved``."""
    from ..saved_eval import evaluate_saved

    names, senses = list(objective.task_names), tuple(objective.senses)
    weights = check_preference(preference, len(names))
    coefficients = chosen.coefficients
    if coefficients is None:
        coefficients = dict(zip(objective.coeff_names, np.asarray(chosen.coeffs, dtype=float).tolist()))
    memory, memory_note = None, "PWE-MoE's model is the routed model unloaded for the preference: no coefficient vector to merge"
    if chosen.coeffs is not None:
        found, errors = _metrics(objective, np.asarray(chosen.coeffs, dtype=np.float64)[None], evaluate)
        memory, memory_note = (found[0], "") if errors[0] is None else (None, errors[0])
    score = evaluate_saved(objective, saved)
    agreement = None
    if memory is not None and np.isfinite(score.metrics).all():
        diff = np.abs(score.metrics - memory)
        agreement = {"max_abs_diff": float(diff.max()), "tolerance": AGREEMENT,
                     "agrees": bool((diff <= AGREEMENT * np.maximum(1.0, np.abs(memory))).all())}
    predicted = None
    if chosen.predicted is not None:
        predicted = {"mean": _listed(chosen.predicted), "std": _listed(chosen.std), "score": _score(chosen.predicted, senses, weights)}
    return {
        "preference": dict(zip(names, weights.tolist())),
        "coefficients": coefficients,
        "coeffs": _listed(chosen.coeffs),
        "predicted": predicted,
        "prediction": chosen.prediction,
        "measured": bool(chosen.measured),
        "merged_in_memory": None if memory is None else {"metrics": _listed(memory), "score": _score(memory, senses, weights)},
        "memory_note": memory_note,
        "saved": {"path": str(saved), "metrics": _listed(score.metrics), "score": _score(score.metrics, senses, weights),
                  "from_store": score.from_store, "digest": score.digest},
        "agreement": agreement,
    }


def comparison(objective: Any, preference, pick: np.ndarray | None, recipe: np.ndarray | None = None,
               evaluate: bool = True) -> dict[str, Any]:
    """Rows for the base (c = 0), each expert (c = e_i; with groups every group of task i at 1),
    the best uniform merge over :data:`UNIFORM` and ``recipe`` (``(C,)`` coefficients, optional):
    their real metrics through the objective (``evaluate=False``: the store's only), the
    preference-weighted score and whether ``pick`` (``(M,)`` real metrics) dominates them."""
    senses = tuple(objective.senses)
    weights = check_preference(preference, len(objective.task_names))
    tasks = list(objective.task_vectors.names)
    size = objective.num_coeffs
    groups = size // len(tasks)
    rows: list[dict[str, Any]] = [{"model": "base (c = 0)", "kind": "base", "coeffs": np.zeros(size)}]
    for i, task in enumerate(tasks):
        one = np.zeros((len(tasks), groups))
        one[i] = 1.0
        rows.append({"model": f"expert {task} (c = e_{task})", "kind": "expert", "coeffs": one.reshape(-1)})
    rows += [{"model": f"uniform (c = {lam:g} for every coefficient)", "kind": "uniform", "lambda": lam, "coeffs": np.full(size, lam)}
             for lam in UNIFORM]
    if recipe is not None:
        rows.append({"model": "your mergekit recipe", "kind": "recipe", "coeffs": np.asarray(recipe, dtype=np.float64).reshape(-1)})
    metrics, errors = _metrics(objective, np.stack([row["coeffs"] for row in rows]), evaluate)
    for row, values, error in zip(rows, metrics, errors):
        known = values if np.isfinite(values).all() else None
        row.update(coeffs=_listed(row["coeffs"]), metrics=_listed(values), score=_score(known, senses, weights),
                   dominated_by_pick=_dominates(pick, known, senses), note=error)
    uniform = [row for row in rows if row["kind"] == "uniform" and row["score"] is not None]
    if uniform:
        max(uniform, key=lambda row: row["score"])["best"] = True  # the first of equal scores
    return {"rows": rows, "operator": objective.method.spec}


def _labels(objective: Any) -> list[dict[str, Any]]:
    return [{"task": lab.task, "metric": lab.metric, "unit": lab.unit, "sense": lab.sense, "axis": lab.axis} for lab in objective.metric_labels]


def _models(config: dict[str, Any], zoo: Any, tasks: list[str]) -> dict[str, Any]:
    if zoo is not None:
        return {"zoo": config.get("zoo", getattr(zoo, "name", "")), "description": zoo.info.get("model", "") or getattr(zoo, "description", "")}
    return {"pretrained": config["pretrained"], "finetuned": {t: config["finetuned"][t] for t in tasks if t in config["finetuned"]}}


def _recipe_coeffs(config: dict[str, Any], objective: Any) -> np.ndarray | None:
    if "_recipe" not in config:
        return None
    coeffs = np.asarray(config["_recipe"].coeffs_for(list(objective.task_vectors.names)), dtype=np.float64).reshape(-1)
    return coeffs if coeffs.shape[0] == objective.num_coeffs else None


def _evaluate(objective: Any, chosen: Chosen, preference, saved: Path, recipe, evaluate: bool) -> tuple[dict, dict, dict]:
    """The block, the comparison and the count of the models they evaluated (and found in the store)."""
    before = (objective.num_evaluations, objective.num_cached)
    block = pick_block(objective, chosen, preference, saved, evaluate=evaluate)
    real = block["saved"]["metrics"] if None not in block["saved"]["metrics"] else (block["merged_in_memory"] or {}).get("metrics")
    table = comparison(objective, preference, None if real is None or None in real else np.asarray(real), recipe, evaluate=evaluate)
    folder = 0 if block["saved"]["from_store"] else 1
    read = 0  # evaluate=False reads the store directly (the objective's counters never see it): count what it answered
    if not evaluate:
        read = (block["merged_in_memory"] is not None) + sum(row["note"] is None for row in table["rows"])
    count = {"models_evaluated": objective.num_evaluations - before[0] + folder,
             "from_store": objective.num_cached - before[1] + (1 - folder) + read}
    return block, table, count


def run_report(command: str, config: dict[str, Any], out: Path, objective: Any, zoo: Any, preference, summary: dict[str, Any],
               chosen: Chosen, settings: dict[str, Any]) -> dict[str, Any]:
    """The report of a finished run (its evaluations made now, counted in ``extra_evaluations``)."""
    names = list(objective.task_names)
    block, table, count = _evaluate(objective, chosen, preference, Path(summary["saved"]), _recipe_coeffs(config, objective), True)
    files = {"result.json": "every evaluation, the front and the run's summary", "merged": "your model (the pick), a Hugging Face folder"}
    if command != "nested":
        files["front.png"] = "the front plot"
    if str(summary.get("mergekit", "")).endswith("mergekit.yaml"):
        files["mergekit.yaml"] = "the pick as a mergekit recipe"
    files["report.json"] = "this report's data"
    return {
        "command": command, "method": METHODS[command], "config": config.get("_path"), "mergekit": config.get("_mergekit"),
        "models": _models(config, zoo, names), "tasks": names, "metrics": _labels(objective), "operator": objective.method.spec,
        "coefficient_names": list(objective.coeff_names), "settings": settings,
        "run": {key: summary.get(key) for key in ("budget", "evaluations", "models_evaluated", "from_store")},
        "pick": block, "comparison": table, "extra_evaluations": count, "out": str(out), "files": files,
        "store": str(objective.store.path) if getattr(objective.store, "path", None) else None,
    }


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` into ``out`` (written, then renamed into place)."""
    atomic_write(out / "report.json", lambda temp: temp.write_text(json.dumps(report, indent=1)))
    atomic_write(out / "report.md", lambda temp: temp.write_text(report_markdown(report)))


def write_failed(out: Path, message: str) -> None:
    """A report saying why there is none (so no earlier run's report stays beside these results)."""
    atomic_write(out / "report.json", lambda temp: temp.write_text(json.dumps({"error": message}, indent=1)))
    atomic_write(out / "report.md", lambda temp: temp.write_text(f"# map_merge run report\n\nThe report of this run failed: {message}\n"
                                                                     "(result.json holds the run's results.)\n"))


def save_report(config: dict[str, Any], method: Any, chosen: Chosen, preference, saved: Path, store_path: Path) -> str:
    """``preference``: ``None`` for the equal one. The block and table ``map-merge save`` prints for the model it saved at ``saved``: the
    saved weights evaluated once; the merge in memory and the comparison as the run's store has
    them (read, never written: nothing is evaluated for them)."""
    from ..config import build_objective
    from ..store import EvaluationStore

    built = dict(config)
    if method is not None:  # --method: the objective of the operator the model was saved with
        built.pop("_recipe", None)
        built["_method"] = method
    objective, names, _ = build_objective(built, store=EvaluationStore.snapshot(store_path), progress=False)
    preference = [1.0] * len(names) if preference is None else preference
    block, table, count = _evaluate(objective, chosen, preference, saved, _recipe_coeffs(built, objective), False)
    report = {"tasks": names, "metrics": _labels(objective), "pick": block, "comparison": table, "extra_evaluations": count,
              "store": str(store_path), "save": True}
    return block_markdown(report)
