"""``map-merge {map, bayes, nested, moe} --config run.yaml``: the run commands on a config. Each
checks the whole config before any model loads, evaluates through the run's store (a rerun
re-evaluates nothing and loads no model it does not need), and writes result.json, front.png,
the pick as merged/ and the run report (report.md, report.json: :mod:`.report`) to the config's 'out'."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, build_executor, build_objective, check_run, default_out, fit_moe, load_config
from .outputs import atomic_write, check_out, write_recipe
from .report import Chosen, real_pick_reason, run_report, write_failed, write_report
from .report_text import block_markdown

__all__ = ["cmd_run"]

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    """map / bayes / nested / moe on a config."""
    from ..store import EvaluationStore
    from ..task_vectors.manifest import mark_run

    config = load_config(args.config, mergekit=args.mergekit)
    if args.command == "moe" and "groups" in config:
        raise ConfigError(f"{args.config}: field 'groups' does not apply to 'moe' (PWE-MoE routes whole task vectors per module)")
    out = default_out(config, args.command)
    args.store_path = Path(config.get("store", out / "evaluations.sqlite"))  # what a Ctrl-C reports
    check_run(config, args.command)  # what the command needs, before any model loads
    check_out(config, out, args.overwrite, args.emit_mergekit)
    objective, names, zoo = build_objective(config, store=None)  # task vectors and tasks; the live model when first used
    if args.emit_mergekit:  # what no pick can make a recipe of (operator, groups, models in memory): say so before evaluating
        objective.task_vectors.mergekit_config(np.ones(objective.num_coeffs), objective.method, objective.groups)
    preference = config.get("preference", [1.0] * len(names))
    if len(preference) != len(names):
        raise ConfigError(f"{args.config}: field 'preference' has {len(preference)} weights for {len(names)} tasks {names}")
    executor = build_executor(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        mark_run(out)  # a run's folder: never a save destination
        objective.store = EvaluationStore(args.store_path)
    except BaseException:
        if executor is not None:
            executor.shutdown()
        raise
    if executor is not None:
        objective.executor = executor  # evaluations on Ray workers; this process proposes and stores
    try:
        return _run_command(args, config, out, objective, names, zoo, preference)
    finally:
        if executor is not None:
            executor.shutdown()
        objective.store.close()  # its write-ahead log folded into the file now, not whenever the object is collected


def _run_command(args, config, out: Path, objective, names: list[str], zoo, preference) -> int:
    summary: dict[str, Any] = {"command": args.command, "tasks": names}
    counted = [objective]  # the objectives whose counters are the run's models evaluated
    if args.command in ("map", "bayes"):
        payload, chosen, settings = _map_or_bayes(args.command, config, out, objective, names, preference, summary)
    elif args.command == "nested":
        payload, chosen, settings = _nested(config, objective, names, preference, summary, counted)
    else:
        payload, chosen, settings = _moe(config, out, objective, names, zoo, preference, summary)
    summary.update(models_evaluated=sum(o.num_evaluations for o in counted), from_store=sum(o.num_cached for o in counted))
    if args.command != "moe":
        source = config.get("_recipe")
        if source is not None:  # a run from a mergekit recipe: where the saved folder's dtypes differ from mergekit's output
            from ..mergekit_settings import warn_dtype

            warn_dtype(source.settings, objective.task_vectors)
        summary["saved"] = str(_save_pick(objective, zoo, summary["coeffs"], out / "merged"))
        if args.emit_mergekit:
            from ..mergekit_config import RecipeError
            from ..mergekit_settings import carry_settings

            try:
                recipe = objective.task_vectors.mergekit_config(summary["coeffs"], objective.method, objective.groups)
                recipe = carry_settings(recipe, source.settings) if source is not None else recipe  # dtype, tokenizer... kept
                summary["mergekit"] = str(write_recipe(recipe, out / "mergekit.yaml"))  # mergekit-yaml reproduces merged/
            except RecipeError as error:  # the pick (unequal coefficients under a sign consensus): the results stay
                summary["mergekit"] = f"not written: {error}"
                log.warning("no mergekit recipe for the pick: %s", error)
    def write_result() -> None:
        result = {**payload, "summary": summary}
        atomic_write(out / "result.json", lambda temp: temp.write_text(json.dumps(result, indent=1, default=float)))

    write_result()  # the run's results are kept whatever happens to the report
    try:
        report = run_report(args.command, config, out, objective, zoo, preference, summary, chosen, settings)
    except Exception as error:  # noqa: BLE001 - the results are written; the report's own evaluations failed: say so
        report = None
        summary["report"] = {"error": f"{type(error).__name__}: {error}"}
        write_failed(out, summary["report"]["error"])
        log.error("the run's results are written, but its report failed: %s: %s", type(error).__name__, error)
    else:
        write_report(out, report)
        summary["report"] = {"path": str(out / "report.md"), **report["extra_evaluations"]}
    write_result()
    written = f"{out}/result.json" + (f", {out}/front.png" if args.command != "nested" else "") + (f", {out}/report.md" if report else "")
    print(json.dumps(summary, indent=1, default=float))
    print(f"preference {preference}; wrote {written} and {summary['saved']}" if args.command != "nested" else f"wrote {written} and {summary['saved']}")
    if report is not None:
        print()
        print(block_markdown(report))
    return 0


def _map_or_bayes(command: str, config, out: Path, objective, names, preference, summary: dict[str, Any]):
    """``map``: MAP with ``budget`` real evaluations in all (adaptive sampling by default, its last
    evaluation on the model's pick for the config's preference; ``sampling: design``: the authors'
    design, up to 10 of the budget re-evaluating front points); ``bayes``: Bayesian MAP, ``budget``
    in all."""
    from ..bayes import BayesianMAP
    from ..designs import default_num_samples, num_quadratic_params
    from ..map import MAP

    dims = objective.num_coeffs  # T, or T x G with coefficient groups
    options = dict(bounds=tuple(config.get("bounds", (0.0, 1.0))), link=config.get("link", "auto"), seed=config.get("seed", 0))
    if "design" in config:
        options["design"] = config["design"]
    budget = int(config.get("budget", config.get("num_samples", default_num_samples(dims))))
    # a recipe's weights, evaluated first, in the task vectors' order (a config's 'tasks' may reorder or subset the recipe's)
    start = config["_recipe"].coeffs_for(objective.task_vectors.names)[None] if "_recipe" in config else None
    sampling = config.get("sampling", "design" if "num_samples" in config else "adaptive")
    if command == "map" and sampling == "adaptive":
        result = MAP(budget=budget, preferences=[preference], **options).fit(objective, dims, include=start, progress=True)
    elif command == "map":
        reevaluations = min(10, budget - num_quadratic_params(dims))
        reevaluations = reevaluations if reevaluations >= 2 else 0
        result = MAP(budget=budget - reevaluations, sampling="design", **options).fit(objective, dims, include=start)
        if reevaluations:
            result = result.refine(objective, reevaluations=reevaluations, rounds=2)  # half the front points, refit, the rest
    else:
        result = BayesianMAP(budget=budget, acquisition=config.get("acquisition", "ehvi"), **options).fit(
            objective, dims, progress=True, include=start)
    fronts = {"predicted": result.front, "all real evaluations": result.evaluated_front()}
    if result.real_front is not None:
        fronts["real (re-evaluated)"] = result.real_front
    recipe = [i for i, c in enumerate(result.samples.coeffs) if start is not None and np.allclose(c, start[0])][:1]  # the recipe's evaluation
    chosen = result.select(preference)  # a predicted front point, or a real evaluation that beats the predictions (the one hook)
    shown, handed, index, measured_pick = _where_picked(result, chosen, preference)
    _plot_fronts(fronts, names, out / "front.png", senses=objective.senses, labels=objective.metric_labels,
                 pick=(shown, preference, (handed, index)), recipe=(start[0], result.samples.metrics[recipe[0]]) if recipe else None)
    used = result.samples.coeffs if result.real_front is None else np.concatenate([result.samples.coeffs, result.real_front.coeffs])
    summary.update(budget=budget, sampling=sampling if command == "map" else "bayesian", samples=len(result.samples),
                   reevaluated=0 if result.real_front is None else len(result.real_front), diagnostics=result.diagnostics(),
                   coeffs=chosen.tolist(), evaluations=len(np.unique(used, axis=0)))
    if objective.coeff_names is not None and len(objective.coeff_names) != len(names):
        summary["coefficients"] = dict(zip(objective.coeff_names, chosen.tolist()))
    mean, std = result.predict(chosen[None], return_std=True)
    model = result.settings.get("model", "gp")
    what = {"gp": "Gaussian processes", "quadratic+gp": "quadratic surrogates plus a Gaussian process on their residuals",
            "quadratic": "quadratic surrogates"}.get(model, model)
    measured = "" if not measured_pick else f" The pick is one of the run's real evaluations: {real_pick_reason(result.noisy, 'your')}."
    pick = Chosen(chosen, mean[0], std[0], f"the run's model of every metric ({what}, fitted on its {len(result.samples)} real "
                  f"evaluations) at these coefficients, with its predictive standard deviation.{measured}", measured=bool(measured))
    shown = ("sampling", "model", "design", "seed", "bounds", "links") if command == "map" else ("model", "seed", "bounds", "links")
    settings = {key: result.settings[key] for key in shown if key in result.settings}
    if command == "bayes":
        settings["acquisition"] = config.get("acquisition", "ehvi")
    return result.to_dict(), pick, {"budget": budget, **settings}


def _nested(config, objective, names, preference, summary: dict[str, Any], counted: list):
    from ..nested import nested_merge

    def objective_for(idx):
        stage = objective.for_tasks([names[i] for i in idx])
        counted.append(stage)
        return stage

    result = nested_merge(objective_for, len(names), preference, samples_per_stage=config.get("samples_per_stage", 10),
                          bounds=tuple(config.get("bounds", (0.0, 1.0))), seed=config.get("seed", 0),
                          schedule=config.get("schedule", "sequential"))
    summary.update(evaluations=result.num_evaluations, task_evaluations=result.task_evaluations, coeffs=result.coeffs.tolist(),
                   metrics=result.metrics.tolist())
    pick = Chosen(result.coeffs, prediction="none: nested merging fits a 2-task model per stage, none of the whole merge "
                  "(its last stage evaluated the model for real: see the real columns).")
    settings = {"samples_per_stage": config.get("samples_per_stage", 10), "schedule": config.get("schedule", "sequential"),
                "seed": config.get("seed", 0), "bounds": list(config.get("bounds", (0.0, 1.0)))}
    return result.to_dict(), pick, settings


def _moe(config, out: Path, objective, names, zoo, preference, summary: dict[str, Any]):
    from ..moe import simplex_lattice
    from ..task_vectors.saving import save_module

    moe, info, moe_objective = fit_moe(config, objective, zoo, checkpoint=out, store=objective.store)
    num = len(names)
    preferences = simplex_lattice(num, 0.1 if num == 2 else 0.25)
    metrics = moe_objective(preferences)
    _plot_fronts({f"PWE-MoE ({info['method'].upper()}), unloaded": metrics}, names, out / "front.png", senses=objective.senses,
                 labels=objective.metric_labels)
    weights = np.asarray(preference, dtype=float) / float(np.sum(preference))
    coefficients = {g: w.tolist() for g, w in moe.coefficients(weights).items()}
    meta = {"preference": dict(zip(names, weights.tolist())), "method": f"PWE-MoE ({info['method']})", "coefficients": coefficients}
    tv = objective.task_vectors
    saved = save_module(moe.unload(weights), out / "merged", tv.source_paths(), overwrite=True, source_folder=tv._base_weights().folder,
                        metadata=meta)
    summary.update(fit=info, evaluations=len(preferences), coefficients=coefficients, saved=str(saved))
    named = {f"routed group {g!r}" if g else "the whole model": dict(zip(names, w)) for g, w in coefficients.items()}
    pick = Chosen(None, prediction="none: PWE-MoE has no predictive model (its front is the unloaded models, evaluated for real).",
                  coefficients=named)
    settings = {"moe_method": info["method"], "router training steps": info.get("steps", config.get("moe_steps")), "seed": config.get("seed", 0)}
    return {"fit": info, "preferences": preferences.tolist(), "metrics": metrics.tolist()}, pick, settings


def _where_picked(result: Any, chosen: np.ndarray, preference=None) -> tuple[Any, Any, int, bool]:
    """``(front, handed front, index, measured)`` of the picked ``chosen (T,)``: where
    ``result.choice(preference)`` says when it hands over the same coefficients (a re-evaluated
    front point is both a front row and a real evaluation: the rule knows which it handed over);
    else a point of the predicted front, else one of the run's real evaluations (``measured``),
    else (a pick made otherwise) the model's prediction at it, as a one-point front."""
    from ..pareto import ParetoFront

    if preference is not None:
        handed, index = result.choice(preference)
        if np.array_equal(handed.coeffs[index], chosen):
            return result.front, handed, int(index), handed is not result.front

    on_front = np.flatnonzero(np.all(result.front.coeffs == chosen, axis=1))
    if len(on_front):
        return result.front, result.front, int(on_front[0]), False
    real = result.real_evaluations()
    measured = np.flatnonzero(np.all(real.coeffs == chosen, axis=1)) if real is not None else np.zeros(0, dtype=int)
    if len(measured):
        return result.front, real, int(measured[0]), True
    alone = ParetoFront(chosen[None], result.predict(chosen[None]), result.task_names, result.senses, label="predicted")
    return alone, alone, 0, False


def _plot_fronts(fronts: dict, names, path: Path, senses=None, labels=None, pick=None, recipe=None) -> None:
    """``labels``: the objective's metric labels; ``pick``: ``(front, preference, (handed front, index))``; ``recipe``: ``(coeffs, metrics)``."""
    from .. import plots

    pick = plots.pick_mark(pick[0], pick[1], label="your pick (predicted)", choice=pick[2]) if pick is not None else None
    marks = {"your recipe": plots.Mark(recipe[1], recipe[0], "your recipe (evaluated)")} if recipe is not None else None

    def write(temp: Path) -> None:
        if len(names) == 2:
            plots.plot_front_2d(fronts, names, lines={k: k.startswith("PWE") for k in fronts}, senses=senses, labels=labels, pick=pick,
                                marks=marks, path=temp)
        else:
            plots.plot_pairwise(fronts, names, senses=senses, labels=labels, pick=pick, marks=marks, path=temp)

    atomic_write(path, write)


def _save_pick(objective, zoo, coeffs, path: Path) -> Path:
    """The merged model for ``coeffs`` as a Hugging Face folder (replacing an earlier run's)."""
    tv = objective.task_vectors
    if zoo is not None and hasattr(zoo, "new_encoder"):
        model = zoo.new_encoder()
    else:  # the live model's configs only when the pretrained weights bring none (a bare weights file)
        base = tv._base_weights()
        model = objective.model if base.folder is None and base.config is None else None
    return tv.save_merged(path, coeffs, method=objective.method, model=model, overwrite=True, groups=objective.groups)
