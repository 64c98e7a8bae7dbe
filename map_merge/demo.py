"""The demo: the whole story on a bundled offline zoo, written as a report and plots.

``map-merge demo --out outputs/demo`` (the README's main command) builds or loads the language-
model zoo (a Llama pretrained here and its code / medical / legal / arithmetic experts, full
fine-tunes and LoRA adapters; :mod:`map_merge.zoo.lm`), and for a 2-task and a 3-task problem
runs MAP, Bayesian MAP, nested merging (3 tasks), PWE-MoE and the baselines a user would
otherwise run (task arithmetic, TIES and DARE sweeps, qNEHVI, CMA-ES; random search and NSGA-II
with ``all_baselines``), each budgeted method at the same number of real evaluations. On the LM
zoo the objectives are held-out losses (lower is better), the report opens with the zoo table
(losses and lm-eval accuracies of the base and each expert), and MAP's pick for the equal
preference is saved as a Hugging Face folder which lm-eval then scores through its own loader,
beside the same numbers computed in memory. ``zoo="text"`` runs the story on the text
classification zoo, ``zoo="vision"`` on the vision zoo in about a minute (what the tests run).
The reference front is the non-dominated set of every real evaluation made. Every real evaluation
goes through one evaluation store in the output folder and trained routers are saved there, so
a second run recomputes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import plots
from .baselines import lambda_sweep
from .compare import BUDGETED, MethodRun, run_method, score_runs
from .designs import default_num_samples, grid_design
from .front_metrics import preference_grid
from .merge_methods import Dare, Ties
from .nested import nested_merge
from .pareto import pareto_mask
from .store import EvaluationStore

__all__ = ["run_demo", "zoo_table"]

log = logging.getLogger(__name__)


def zoo_table(zoo, store: EvaluationStore, out: Path, uniform: Sequence[float] = (0.3, 0.5, 1.0), progress: bool = True) -> list[dict[str, Any]]:
    """Per task test accuracy: majority class, linear probe on frozen pretrained features,
    pretrained encoder with the task's head, fine-tuned model, task arithmetic at uniform c."""
    from sklearn.linear_model import LogisticRegression

    names = list(zoo.task_names)
    cache = out / "zoo_table_cache.json"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    objective = zoo.objective(names, split="test", store=store, progress=progress)
    single = objective(np.eye(len(names)))  # fine-tuned model i on every task (test)
    base = objective(np.zeros((1, len(names))))[0]
    uniform_acc = objective(np.array([[u] * len(names) for u in uniform]))
    rows = []
    for j, name in enumerate(names):
        task = zoo.tasks[name]
        train, test = task.splits["train"], task.splits["test"]
        majority = float((test.labels == torch.bincount(train.labels).argmax()).float().mean())
        key = f"{zoo.info.get('data_hash')}:{name}"
        if key not in cached:
            def feats(split):
                chunks = []
                with torch.inference_mode():
                    for inputs, labels in split.batches(zoo.eval_batch_size):
                        chunks.append((zoo.features(zoo.pretrained, inputs).numpy(), labels.numpy()))
                return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])

            x_train, y_train = feats(train)
            x_test, y_test = feats(test)
            probe = LogisticRegression(max_iter=3000, C=1.0).fit(x_train, y_train)
            cached[key] = float(probe.score(x_test, y_test))
            cache.write_text(json.dumps(cached))
        rows.append({
            "task": name,
            "classes": len(task.classes),
            "majority": majority,
            "linear_probe": cached[key],
            "pretrained_with_head": float(base[j]),
            "finetuned": float(single[j, j]),
            **{f"TA all tasks c={u:g}": float(uniform_acc[k, j]) for k, u in enumerate(uniform)},
        })
    return rows


def _lm_zoo_table(zoo, out: Path) -> list[dict[str, Any]]:
    """The LM zoo's table (:meth:`~map_merge.zoo.lm.LMZoo.table` on the test split), cached in
    ``out`` under the zoo's build key and its domains."""
    cache = out / "zoo_table_cache.json"
    key = f"lm:{zoo.info.get('key', '')}:{','.join(zoo.task_names)}"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in cached:
        cached[key] = zoo.table(split="test", lm_eval=True)
        cache.write_text(json.dumps(cached))
    return cached[key]


def _moe_run(zoo, names: list[str], store: EvaluationStore, out: Path, split: str, method: str, steps: int, seed: int, progress: bool) -> MethodRun:
    """Train PWE-MoE routers (cached in ``out``) and evaluate unloaded models on a preference lattice."""
    from .moe import simplex_lattice

    start = time.perf_counter()
    moe, info = zoo.fit_moe(names, method=method, steps=steps, batch_size=8, seed=seed, checkpoint=out, progress=progress)
    objective = zoo.moe_objective(moe, names, split=split, store=store, progress=progress)
    preferences = simplex_lattice(len(names), 0.1 if len(names) == 2 else 1 / 3)
    metrics = objective(preferences)
    coefficients = {str(list(np.round(r, 3))): {g: np.round(w, 4).tolist() for g, w in list(moe.coefficients(r).items())[:2]} for r in preferences[:3]}
    extra = {"training_steps": steps, "training_seconds": info["seconds"], "trainable_params": info["trainable_params"],
             "routers": info["routers"], "peak_rss_mb": info["peak_rss_mb"], "lp_success_rate": info["lp_success_rate"]}
    run = MethodRun(f"PWE-MoE ({method.upper()})", preferences, metrics, len(preferences), time.perf_counter() - start + (0.0 if not info["cached"] else info["seconds"]),
                    result=moe, extra=extra)
    run.extra["example_coefficients"] = coefficients
    return run


def _saved_pick(zoo, objective, names: list[str], coeffs: np.ndarray, out: Path, tag: str) -> dict[str, Any]:
    """Save MAP's equal-preference pick as a Hugging Face folder ``out/picked_<tag>`` (the demo's
    own output: replaced on a rerun) and score it on the test questions with lm-eval twice: the
    live merged model in memory (:class:`~map_merge.LMEvalTask`) and the folder loaded by
    lm-eval's own ``hf`` loader."""
    folder = out / f"picked_{tag}"
    tv = objective.task_vectors
    start = time.perf_counter()
    tv.save_merged(folder, coeffs, overwrite=True)
    save_seconds = time.perf_counter() - start
    model = zoo.new_model()
    tv.merge_into(model, coeffs)
    memory = np.array([zoo.accuracy(model, n, "test") for n in names])
    start = time.perf_counter()
    loaded = zoo.lm_eval_folder(folder, names, "test")
    return {"folder": str(folder), "coeffs": np.asarray(coeffs).tolist(), "save_seconds": save_seconds,
            "lm_eval_seconds": time.perf_counter() - start, "lm_eval_in_memory": memory.tolist(),
            "lm_eval_from_folder": loaded.tolist(), "max_abs_diff": float(np.abs(memory - loaded).max())}


def _experiment(zoo, names: list[str], store: EvaluationStore, out: Path, split: str, seed: int, progress: bool, baselines: Sequence[str],
                moe_methods: Sequence[str], moe_steps: int, reevaluations: int, grid_per_axis: int | None,
                skip: Sequence[str] = ()) -> dict[str, Any]:
    num = len(names)
    tag = f"T{num}"
    objective = zoo.objective(names, split=split, store=store, progress=progress)
    budget = default_num_samples(num) + reevaluations
    runs: dict[str, MethodRun] = {}
    lambdas = np.round(np.linspace(0.0, 1.0, 6), 10)
    steps = ["task arithmetic", "MAP", "Bayesian MAP", *baselines]
    if num >= 3:
        steps.append("nested merging")
    steps += [f"PWE-MoE ({m.upper()})" for m in moe_methods] if moe_steps > 0 else []
    steps = [step for step in steps if step not in skip]
    for step in tqdm(steps, desc=f"{tag} methods", disable=not progress):
        log.info("%s: %s", tag, step)
        start = time.perf_counter()
        if step in ("task arithmetic", "TIES", "DARE"):
            method = {"task arithmetic": None, "TIES": Ties(0.2), "DARE": Dare(0.5, seed=seed)}[step]
            swept = objective if method is None else zoo.objective(names, split=split, method=method, store=store, progress=progress)
            found = lambda_sweep(swept, num, lambdas, name=step)
            runs[step] = MethodRun(step, found.coeffs, found.metrics, found.num_evaluations, found.seconds, found)
        elif step in BUDGETED:
            runs[step] = run_method(step, objective, num, budget, seed=seed, reevaluations=reevaluations, progress=progress)
        elif step == "nested merging":
            tv = objective.task_vectors  # shared by every stage's objective

            def objective_for(idx, names=names, tv=tv):
                return zoo.objective(names, split=split, store=store, progress=False, scored=[names[i] for i in idx], task_vectors=tv)

            nested = nested_merge(objective_for, num, np.full(num, 1.0 / num), samples_per_stage=8, seed=seed)
            runs[step] = MethodRun(step, nested.coeffs[None], nested.metrics[None], nested.num_evaluations, time.perf_counter() - start, nested,
                                   extra={"task_evaluations": nested.task_evaluations})
        else:
            method = step.split("(")[1].rstrip(")").lower()
            runs[step] = _moe_run(zoo, names, store, out, split, method, moe_steps, seed, progress)
    grid = None
    if grid_per_axis:
        grid_coeffs = grid_design(num, grid_per_axis)
        grid = objective(grid_coeffs)
    senses = tuple(objective.senses)
    sign = np.array([1.0 if s == "max" else -1.0 for s in senses])  # oriented: higher is better for every task
    pooled = np.concatenate([r.metrics for r in runs.values()] + ([grid] if grid is not None else []))
    reference = pooled[pareto_mask(pooled * sign)]
    ref_point = (pooled * sign).min(axis=0) * sign  # the worst value per task, in its own units
    preferences = preference_grid(num)
    scores = score_runs(runs, reference, ref_point, preferences=preferences, baseline="task arithmetic", senses=senses)
    for name, run in runs.items():
        scores[name].pop("example_coefficients", None)
    if "nested merging" in scores:
        # nested merging returns one model for one preference: only its regret there is meaningful
        for key in ("hv_ratio", "hypervolume", "igd", "igd_plus", "gd", "regret_mean", "regret_max", "win_rate_vs_baseline"):
            scores["nested merging"].pop(key, None)
    equal = np.full(num, 1.0 / num)
    best_equal = float(((reference * sign) @ equal).max())
    for name, run in runs.items():
        scores[name]["regret_equal_preference"] = best_equal - float(((run.metrics * sign) @ equal).max())

    map_result = runs["MAP"].result
    chosen = {"MAP (surrogate pick)": map_result.select(equal)}
    ta = runs["task arithmetic"]
    chosen["best uniform task arithmetic"] = ta.inputs[int(np.argmax((ta.metrics * sign).mean(axis=1)))]
    if "nested merging" in runs:
        chosen["nested merging"] = runs["nested merging"].inputs[0]
    test = {name: zoo.evaluate_coeffs(c[None], names, split="test")[0] for name, c in chosen.items()}
    for m in moe_methods if moe_steps > 0 else ():
        moe = runs[f"PWE-MoE ({m.upper()})"].result
        dense = moe.unload(equal)
        test[f"PWE-MoE ({m.upper()}) unloaded"] = zoo.evaluate_model(dense, names, "test")
    saved = _saved_pick(zoo, objective, names, chosen["MAP (surrogate pick)"], out, tag) if hasattr(zoo, "lm_eval_folder") else None

    fronts = {name: run.metrics for name, run in runs.items()}
    fronts = {"MAP predicted": map_result.front, **fronts}
    labels = objective.metric_labels  # axes: task, metric, unit, which way is better
    pick = plots.pick_mark(map_result.front, equal, "MAP pick (predicted)", choice=map_result.choice(equal))
    if num == 2:
        plots.plot_front_2d(fronts, names, samples=None, reference=reference[np.argsort(reference[:, 0])], senses=senses,
                            lines={name: True for name in fronts}, reference_label="reference front (all real evaluations)",
                            title=f"{_ZOO_TITLES.get(zoo.name, zoo.name)} zoo, {names[0]} vs {names[1]}: each method's front and evaluations ({split})",
                            zoom=True, labels=labels, pick=pick, path=out / f"front_{tag}.png")
    else:
        plots.plot_pairwise(fronts, names, reference=reference, title=f"{_ZOO_TITLES.get(zoo.name, zoo.name)} zoo, {num} tasks: every method's real evaluations ({split})",
                            labels=labels, pick=pick, path=out / f"front_{tag}.png")
        plots.plot_parallel(map_result.front, labels=labels, pick=pick, title=f"MAP's predicted front, {num} tasks ({split})",
                            path=out / f"parallel_{tag}.png")
    plots.plot_cost_quality({k: v for k, v in scores.items() if "hv_ratio" in v}, title=f"{_ZOO_TITLES.get(zoo.name, zoo.name)} zoo, {tag}: quality against real evaluations",
                            path=out / f"cost_{tag}.png")
    plots.plot_parity(map_result, labels=labels, path=out / f"parity_{tag}.png")
    return {
        "tasks": names,
        "split": split,
        "budget_per_method": budget,
        "reference": {"points": len(reference), "pooled_evaluations": len(pooled), "grid_points": 0 if grid is None else len(grid),
                      "ref_point": ref_point.tolist(), "front": reference.tolist()},
        "preferences": len(preferences),
        "scores": scores,
        "senses": list(senses),
        "equal_preference_test": {name: acc.tolist() for name, acc in test.items()},
        "map": {"diagnostics": map_result.diagnostics(), "timings": map_result.timings, "result": map_result.to_dict()},
        "nested": runs["nested merging"].result.to_dict() if "nested merging" in runs else None,
        "saved_pick": saved,
        "runs": {name: {"inputs": run.inputs.tolist(), "metrics": run.metrics.tolist(), "extra": run.extra} for name, run in runs.items()},
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


_ZOO_TITLES = {"lm": "Language-model", "text": "Text", "vision": "Vision"}


def _markdown(report: dict[str, Any]) -> str:
    zoo = report["zoo"]
    model = f" ({zoo['model']})" if zoo.get("model") else ""
    lines = ["# map_merge demo report", "", f"{_ZOO_TITLES.get(zoo.get('name', 'text'), zoo.get('name', 'text'))} zoo{model}, total wall time {report['seconds']:.0f} s "
             f"(this run; cached evaluations and router checkpoints are re-used).", ""]
    table = report["zoo_table"]
    if table:
        first = next(iter(table[0]))
        cols = [c for c in table[0] if c != first]
        if first == "domain":  # the language-model zoo
            lines += ["## Zoo (test split)", "", "Held-out loss in nats per token (lower is better) and lm-eval multiple-choice accuracy "
                      "(with its standard error) of the pretrained base and of each domain's expert.", ""]
        else:
            lines += ["## Zoo (test accuracy)", "", "TA all tasks c=u: task arithmetic of all the zoo's tasks with every coefficient u, "
                      "each task scored with its own head.", ""]
        lines += [f"| {first} | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row in table:
            lines.append(f"| {row[first]} | " + " | ".join(_fmt(row[c]) for c in cols) + " |")
        lines.append("")
    for tag, exp in report["experiments"].items():
        ref = exp["reference"]
        lines += [f"## {tag}: {', '.join(exp['tasks'])}", "",
                  f"Scored on `{exp['split']}`. Reference front: the non-dominated set of all {ref['pooled_evaluations']} real evaluations of every method"
                  + (f" and a {ref['grid_points']}-point grid" if ref["grid_points"] else "")
                  + f" ({ref['points']} points); hypervolume reference point: their worst value per task. Budgeted methods get {exp['budget_per_method']} "
                  f"real evaluations each. Regret: best weighted score on the reference minus the method's best among its own evaluations "
                  f"(senses: {', '.join(exp.get('senses', ['max'] * len(exp['tasks'])))}), "
                  f"mean over {exp['preferences']} preferences; win rate: share of the task-arithmetic sweep's front dominated.", "",
                  "| method | real evaluations | HV ratio | IGD+ | mean regret | regret, equal preference | win rate vs TA | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in exp["scores"].items():
            extra = f" (+{m['training_steps']} training steps)" if "training_steps" in m else ""
            lines.append(f"| {name} | {m['evaluations']}{extra} | {_fmt(m.get('hv_ratio'))} | {_fmt(m.get('igd_plus'), 4)} | {_fmt(m.get('regret_mean'), 4)} | "
                         f"{_fmt(m.get('regret_equal_preference'), 4)} | {_fmt(m.get('win_rate_vs_baseline'), 2)} | {m['seconds']:.0f} |")
        lines += ["", "Equal preference, test metrics of the chosen model:", ""]
        for name, acc in exp["equal_preference_test"].items():
            lines.append(f"- {name}: {np.round(acc, 3).tolist()} (mean {np.mean(acc):.3f})")
        saved = exp.get("saved_pick")
        if saved:
            lines += ["", f"MAP's pick for the equal preference, saved as a Hugging Face folder `{saved['folder']}` in {saved['save_seconds']:.1f} s; "
                      f"lm-eval test accuracy per task, in memory {np.round(saved['lm_eval_in_memory'], 4).tolist()}, "
                      f"from the folder through lm-eval's own `hf` loader {np.round(saved['lm_eval_from_folder'], 4).tolist()} "
                      f"(largest difference {saved['max_abs_diff']:.2g})."]
        r2 = ", ".join(f"{k}: R²={v['r2']:.3f}, LOO RMSE={v['loo_rmse']:.3f}" for k, v in exp["map"]["diagnostics"].items())
        lines += ["", f"MAP surrogate fit: {r2}.", ""]
        for name, m in exp["scores"].items():
            if "training_steps" in m:
                lp = f" (EPO LP solved in {100 * m['lp_success_rate']:.0f}% of steps)" if "EPO" in name else ""
                lines += [f"{name}: {m['routers']} routers, {m['trainable_params']} trainable parameters, {m['training_steps']} steps x 8 examples per task "
                          f"in {m['training_seconds']:.0f} s{lp}, process peak RSS {m['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)


DEMO_TASKS = {
    "lm": (("code", "medical"), ("code", "medical", "legal")),
    "text": (("sentiment", "med_subject"), ("sentiment", "med_subject", "bias_type")),
    "vision": (("rotated", "inverted"), ("rotated", "inverted", "mirrored_parity")),
}


def run_demo(
    out: str | Path = "outputs/demo",
    zoo: str = "lm",
    tasks2: Sequence[str] | None = None,
    tasks3: Sequence[str] | None = None,
    val_examples: int | None = 100,
    seed: int = 0,
    moe_steps: int | None = None,
    moe_methods: Sequence[str] = ("ls",),
    reevaluations: int = 4,
    all_baselines: bool = False,
    zoo_table_too: bool | None = None,
    grid_per_axis: int | None = None,
    progress: bool = True,
    zoo_options: dict[str, Any] | None = None,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the demo and write ``report.json``, ``report.md`` and PNG plots into ``out``.

    Args:
        zoo: the bundled zoo: ``"lm"`` (the demo: the language-model zoo; its first build takes
            minutes), ``"text"`` or ``"vision"`` (seconds; what the tests run).
        tasks2, tasks3: the 2-task and 3-task problems (the zoo's task names; default
            ``DEMO_TASKS[zoo]``).
        val_examples: validation examples per task the methods are scored on (``None``: all 200;
            the LM zoo's held-out sets are small already and used whole).
        moe_steps: PWE-MoE router training steps (0 skips PWE-MoE; default 500 on the LM zoo,
            about 20 s per task pair on one thread, 100 on the others); moe_methods: ``"ls"``, ``"epo"``.
        reevaluations: front points each MAP variant re-evaluates (part of its budget).
        all_baselines: besides the TIES and DARE sweeps, qNEHVI and CMA-ES on the 2-task problem
            (the default), run random search and NSGA-II, and every baseline on the 3-task problem
            too (``benchmarks/bench_fronts.py`` runs them all over seeds).
        zoo_table_too: add the zoo table (default: on the LM zoo only). LM zoo: held-out loss and
            lm-eval accuracy of base and experts; text zoo: test accuracy of majority class, linear
            probe, pretrained, fine-tuned and task arithmetic (about 2 minutes more).
        grid_per_axis: add a grid of real evaluations to the reference front (``per_axis ** T``).
        zoo_options: options of the LM zoo's :func:`~map_merge.zoo.lm.load_lm_zoo` (e.g.
            ``{"size": "tiny"}``: seconds; what the tests run).
        skip: methods to leave out, by their report names (e.g. ``("qNEHVI",)``); task
            arithmetic and MAP always run.
    """
    from .zoo import load_zoo

    if zoo not in DEMO_TASKS:
        raise ValueError(f"zoo must be one of {sorted(DEMO_TASKS)}, got {zoo!r}")
    zoo_table_too = (zoo == "lm") if zoo_table_too is None else zoo_table_too
    moe_steps = (500 if zoo == "lm" else 100) if moe_steps is None else int(moe_steps)
    if zoo_table_too and zoo == "vision":
        raise ValueError("the zoo table is built for the text and lm zoos only")
    kept = {"task arithmetic", "MAP"} & set(skip)
    if kept:
        raise ValueError(f"the demo cannot skip {sorted(kept)}: the report is built around them")
    tasks2 = DEMO_TASKS[zoo][0] if tasks2 is None else tasks2
    tasks3 = DEMO_TASKS[zoo][1] if tasks3 is None else tasks3
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    names = list(dict.fromkeys(list(tasks2) + list(tasks3)))
    zoo = load_zoo(zoo, names, progress=progress, **(zoo_options or {}))
    split = zoo.limit_split("val", val_examples)
    store = EvaluationStore(out / "evaluations.sqlite")
    report: dict[str, Any] = {"zoo": {"name": zoo.name, "model": zoo.info.get("model", "") or getattr(zoo, "description", ""), "tasks": list(zoo.task_names), "recipe": zoo.info.get("recipe", "")},
                              "settings": {"val_examples": val_examples, "seed": seed, "moe_steps": moe_steps, "moe_methods": list(moe_methods),
                                           "reevaluations": reevaluations, "grid_per_axis": grid_per_axis}}
    if not zoo_table_too:
        report["zoo_table"] = []
    elif zoo.name == "lm":
        report["zoo_table"] = _lm_zoo_table(zoo, out)
    else:
        report["zoo_table"] = zoo_table(zoo, store, out, progress=progress)
    report["experiments"] = {}
    for tasks in (list(tasks2), list(tasks3)):
        if not tasks:
            continue
        baselines = ["TIES", "DARE", "qNEHVI", "CMA-ES"] + (["random search", "NSGA-II"] if all_baselines else [])
        if len(tasks) > 2 and not all_baselines:
            baselines = []
        report["experiments"][f"T{len(tasks)}"] = _experiment(zoo, tasks, store, out, split, seed, progress, baselines=baselines,
                                                            moe_methods=moe_methods, moe_steps=moe_steps, reevaluations=reevaluations,
                                                            grid_per_axis=grid_per_axis, skip=skip)
        _write(out, report, start)
    _write(out, report, start)
    return report


def _write(out: Path, report: dict[str, Any], start: float) -> None:
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
