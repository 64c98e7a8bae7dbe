"""The demo: the whole story on the offline text zoo, written as a report and plots.

``map-merge demo --out outputs/demo`` (the README's main command) builds or loads the text zoo,
tabulates it, and for a 2-task and a 3-task problem compares against a dense grid of real
evaluations (the reference front): MAP (predicted and re-evaluated), and uniform task arithmetic
over a lambda sweep, Bayesian MAP (adaptive sampling at the same budget) and PWE-MoE (LS and EPO).
Every real evaluation goes through one evaluation store in the output
folder, so a second run recomputes nothing.
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

from . import plots
from .designs import grid_design
from .front_metrics import front_report
from .bayes import BayesianMAP
from .map import MAP
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


def _moe_front(zoo, names: list[str], store: EvaluationStore, out: Path, method: str, steps: int, batch: int, seed: int, progress: bool) -> dict[str, Any]:
    """Train PWE-MoE routers (cached in ``out``) and evaluate unloaded models on the simplex lattice."""
    import hashlib
    import resource

    from .moe import ParetoMoE, simplex_lattice
    from .objective import FunctionObjective

    tv = zoo.task_vectors(names)
    moe = ParetoMoE(zoo.pretrained, tv, upcycle="mlp", init_lambda=0.3, seed=seed)
    key = hashlib.blake2b(json.dumps([tv.fingerprint(), method, steps, batch, seed]).encode(), digest_size=8).hexdigest()
    ckpt = out / f"moe_routers_{'-'.join(names)}_{method}_{key}.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        moe.routers.load_state_dict(saved["routers"])
        fit_info = saved["fit"]
    else:
        generator = torch.Generator().manual_seed(seed)

        def loss_for(name):
            task = zoo.tasks[name]
            data = task.splits["train"]

            def loss(model):
                index = torch.randint(0, len(data), (batch,), generator=generator)
                mask = data.inputs["attention_mask"][index]
                width = int(mask.sum(1).max())
                inputs = {k: v[index, :width] for k, v in data.inputs.items()}
                return torch.nn.functional.cross_entropy(task.head(zoo.features(model, inputs)), data.labels[index])

            return loss

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        history = moe.fit({n: loss_for(n) for n in names}, steps=steps, method=method, seed=seed, progress=progress)
        fit_info = {"steps": steps, "batch_per_task": batch, "seconds": history.seconds, "trainable_params": moe.num_trainable,
                    "routers": len(moe.routers), "lp_success_rate": float(np.mean(history.lp_ok)),
                    "final_loss": float(np.mean(history.total[-10:])),
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_mb_before": rss_before / 1024}
        torch.save({"routers": moe.routers.state_dict(), "fit": fit_info}, ckpt)

    def evaluate(preference: np.ndarray) -> np.ndarray:
        dense = moe.unload(preference)
        return np.array([zoo.accuracy(dense, n, "val") for n in names])

    objective = FunctionObjective(evaluate, len(names), names, batched=False, key=f"pwe-moe:{key}:val", store=store, progress=progress)
    preferences = simplex_lattice(len(names), 0.1 if len(names) == 2 else 0.25)
    metrics = objective(preferences)
    return {"preferences": preferences, "metrics": metrics, "fit": fit_info, "coefficients": {str(list(r)): {g: w.tolist() for g, w in moe.coefficients(r).items()} for r in preferences[:3]}}


def _experiment(zoo, names: list[str], store: EvaluationStore, out: Path, per_axis: int, seed: int, progress: bool,
                moe_steps: int = 100, moe_batch: int = 8) -> dict[str, Any]:
    num = len(names)
    tag = f"T{num}"
    objective = zoo.objective(names, split="val", store=store, progress=progress)
    start = time.perf_counter()
    grid = grid_design(num, per_axis)
    grid_metrics = objective(grid)
    reference = grid_metrics[pareto_mask(grid_metrics)]
    ref_point = grid_metrics.min(axis=0)
    grid_seconds = time.perf_counter() - start

    before = objective.num_evaluations
    start = time.perf_counter()
    result = MAP(seed=seed).fit(objective, num)
    real = result.reevaluate(objective, max_points=15 if num == 2 else 20)
    map_seconds = time.perf_counter() - start

    start = time.perf_counter()
    bayes = BayesianMAP(budget=result.num_evaluations, batch=num, seed=seed).fit(objective, num, progress=progress)
    bayes_real = bayes.reevaluate(objective, max_points=15 if num == 2 else 20)
    bayes_seconds = time.perf_counter() - start

    lambdas = np.round(np.linspace(0.0, 1.0, 11), 10)
    sweep_coeffs = np.repeat(lambdas[:, None], num, axis=1)
    sweep = objective(sweep_coeffs)

    moe = {}
    if moe_steps > 0:
        for method in ("ls", "epo"):
            moe[method] = _moe_front(zoo, names, store, out, method, moe_steps, moe_batch, seed, progress)

    methods = {
        "MAP predicted": front_report(result.front.metrics, reference, ref_point),
        "MAP real": front_report(real.metrics[pareto_mask(real.metrics)], reference, ref_point),
        "task arithmetic sweep": front_report(sweep[pareto_mask(sweep)], reference, ref_point),
    }
    methods["MAP predicted"]["evaluations"] = result.num_evaluations
    methods["MAP real"]["evaluations"] = result.num_evaluations + len(real)
    methods["MAP, all real evaluations"] = front_report(result.evaluated_front().metrics, reference, ref_point)
    methods["MAP, all real evaluations"]["evaluations"] = result.num_evaluations + len(real)
    methods["Bayesian MAP, all real evaluations"] = front_report(bayes.evaluated_front().metrics, reference, ref_point)
    methods["Bayesian MAP, all real evaluations"]["evaluations"] = bayes.num_evaluations + len(bayes_real)
    methods["task arithmetic sweep"]["evaluations"] = len(lambdas)
    for method, found in moe.items():
        label = f"PWE-MoE ({method.upper()})"
        methods[label] = front_report(found["metrics"][pareto_mask(found["metrics"])], reference, ref_point)
        methods[label]["evaluations"] = len(found["metrics"])
        methods[label]["training_steps"] = found["fit"]["steps"]
        methods[label]["training_seconds"] = found["fit"]["seconds"]
    equal = np.full(num, 1.0 / num)
    chosen = result.select(equal)
    chosen_test = zoo.evaluate_coeffs(chosen[None], names, split="test")[0]
    best_ta = lambdas[int(np.argmax(sweep.mean(axis=1)))]
    ta_test = zoo.evaluate_coeffs(np.full((1, num), best_ta), names, split="test")[0]

    fronts = {"MAP predicted": result.front, "MAP real (re-evaluated)": real, "task arithmetic (lambda sweep)": sweep,
              "Bayesian MAP real (all evaluations)": bayes.evaluated_front()}
    for method, found in moe.items():
        fronts[f"PWE-MoE {method.upper()} (unloaded, real)"] = found["metrics"]
    if num == 2:
        plots.plot_front_2d(fronts, names, samples=result.samples.metrics, reference=reference[np.argsort(reference[:, 0])],
                            lines={"MAP real (re-evaluated)": False, "task arithmetic (lambda sweep)": True, "Bayesian MAP real (all evaluations)": False,
                                   "PWE-MoE LS (unloaded, real)": True, "PWE-MoE EPO (unloaded, real)": True},
                            title=f"text zoo, {names[0]} vs {names[1]}: MAP at {result.num_evaluations} evaluations vs a {len(grid)}-point grid",
                            zoom=True,
                            path=out / f"front_{tag}.png")
    else:
        plots.plot_pairwise({"MAP predicted": result.front, "MAP real": real, "TA sweep": sweep, "Bayesian MAP real": bayes.evaluated_front(),
                             **{f"PWE-MoE {m.upper()}": f["metrics"] for m, f in moe.items()}}, names, reference=grid_metrics,
                            title=f"text zoo, 3 tasks: MAP at {result.num_evaluations} evaluations vs a {len(grid)}-point grid",
                            path=out / f"front_{tag}.png")
        plots.plot_parallel(result.front, highlight=[result.front.select_index(equal)], path=out / f"parallel_{tag}.png")
    plots.plot_parity(result, path=out / f"parity_{tag}.png")
    plots.plot_landscape(result, task=0, path=out / f"landscape_{tag}.png")
    return {
        "tasks": names,
        "grid": {"points": len(grid), "per_axis": per_axis, "reference_front_points": len(reference), "ref_point": ref_point.tolist(), "seconds": grid_seconds},
        "methods": methods,
        "bayesian_map": {"seconds": bayes_seconds, "evaluations": bayes.num_evaluations + len(bayes_real), "rounds": bayes.samples.round.tolist(),
                         "front": bayes.evaluated_front().to_dict()},
        "map": {"seconds": map_seconds, "diagnostics": result.diagnostics(), "timings": result.timings,
                "evaluations_charged": objective.num_evaluations - before},
        "equal_preference": {
            "map_coeffs": chosen.tolist(), "map_test_accuracy": chosen_test.tolist(), "map_test_mean": float(chosen_test.mean()),
            "best_uniform_lambda": float(best_ta), "ta_test_accuracy": ta_test.tolist(), "ta_test_mean": float(ta_test.mean()),
        },
        "result": result.to_dict(),
        "task_arithmetic_sweep": {"lambdas": lambdas.tolist(), "metrics": sweep.tolist()},
        "pwe_moe": {m: {"preferences": f["preferences"].tolist(), "metrics": f["metrics"].tolist(), "fit": f["fit"],
                        "example_coefficients": f["coefficients"]} for m, f in moe.items()},
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# map_merge demo report", "", f"Text zoo ({report['zoo']['model']}), total wall time {report['seconds']:.0f} s.", ""]
    table = report["zoo_table"]
    if table:
        cols = [c for c in table[0] if c != "task"]
        lines += ["## Zoo (test accuracy)", "", "TA all tasks c=u: task arithmetic of all zoo tasks with every coefficient u, each task scored with its own head.", "", "| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for row in table:
            lines.append(f"| {row['task']} | " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
        lines.append("")
    for tag, exp in report["experiments"].items():
        lines += [f"## {tag}: {', '.join(exp['tasks'])}", "",
                  f"Reference front: {exp['grid']['points']}-point grid of real evaluations ({exp['grid']['reference_front_points']} non-dominated). "
                  f"Hypervolume reference point: the grid's worst value per task.", "",
                  "| method | real evaluations | HV ratio | IGD | IGD+ | points |", "|---|---|---|---|---|---|"]
        for name, m in exp["methods"].items():
            lines.append(f"| {name} | {m['evaluations']} | {m['hv_ratio']:.3f} | {m['igd']:.4f} | {m['igd_plus']:.4f} | {m['num_points']} |")
        eq = exp["equal_preference"]
        lines += ["", f"Equal preference, test accuracy: MAP {np.round(eq['map_test_accuracy'], 3).tolist()} (mean {eq['map_test_mean']:.3f}) "
                      f"vs best uniform task arithmetic (lambda={eq['best_uniform_lambda']:.1f}) {np.round(eq['ta_test_accuracy'], 3).tolist()} (mean {eq['ta_test_mean']:.3f}).", ""]
        r2 = ", ".join(f"{k}: R²={v['r2']:.3f}, LOO RMSE={v['loo_rmse']:.3f}" for k, v in exp["map"]["diagnostics"].items())
        lines += [f"Surrogate fit: {r2}.", ""]
        for method, found in exp.get("pwe_moe", {}).items():
            fit = found["fit"]
            lp = f" (EPO LP solved in {100 * fit['lp_success_rate']:.0f}% of steps)" if method == "epo" else ""
            lines += [f"PWE-MoE ({method.upper()}): {fit['routers']} routers, {fit['trainable_params']} trainable parameters, "
                      f"{fit['steps']} steps x {fit['batch_per_task']} examples per task in {fit['seconds']:.0f} s{lp}, "
                      f"process peak RSS {fit['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)


def run_demo(
    out: str | Path = "outputs/demo",
    tasks2: Sequence[str] = ("sentiment", "med_subject"),
    tasks3: Sequence[str] = ("sentiment", "med_subject", "bias_type"),
    per_axis2: int = 9,
    per_axis3: int = 4,
    seed: int = 0,
    moe_steps: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and write ``report.json``, ``report.md`` and PNG plots into ``out``."""
    from .zoo.text import TEXT_TASKS, load_text_zoo

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    zoo = load_text_zoo(TEXT_TASKS, progress=progress)
    store = EvaluationStore(out / "evaluations.sqlite")
    report: dict[str, Any] = {"zoo": {"model": zoo.info["model"], "tasks": list(zoo.task_names), "recipe": zoo.info["recipe"]}}
    report["zoo_table"] = zoo_table(zoo, store, out, progress=progress)
    report["experiments"] = {}
    for names, per_axis in ((list(tasks2), per_axis2), (list(tasks3), per_axis3)):
        report["experiments"][f"T{len(names)}"] = _experiment(zoo, names, store, out, per_axis, seed, progress, moe_steps=moe_steps)
        _write(out, report, start)
    _write(out, report, start)
    return report


def _write(out: Path, report: dict[str, Any], start: float) -> None:
    report["seconds"] = time.perf_counter() - start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(_markdown(report))
