"""Command line: ``map-merge {demo, zoo, map, bayes, nested, moe, save}``.

``map-merge map --config merge.yaml`` runs MAP (``bayes``: Bayesian MAP, ``nested``: nested
merging for the config's preference, ``moe``: PWE-MoE) on the models a small YAML/JSON file
describes, and saves the merged model for the config's preference. Your own models::

    pretrained: base/                   # HF folder, .safetensors, .bin or .pt (paths relative to this file;
                                        # 'out' and 'store' relative to the working directory)
    finetuned:                          # task -> fine-tuned model
      task_a: a/
      task_b: b/
    evaluator: my_eval.py:evaluate      # evaluate(model, task) -> float, or "package.module:function"
    model: my_eval.py:build             # optional: build() -> nn.Module (default: AutoModel of 'pretrained')
    sense: max                          # or min (a loss)

or a bundled zoo (models, data and metrics from the zoo)::

    zoo: text                           # or vision
    tasks: [sentiment, med_subject]

and the settings (all optional)::

    method: task_arithmetic             # ties / dare
    num_samples: 12                     # map: real evaluations for the surrogates
    bounds: [0.0, 1.0]
    seed: 0
    store: outputs/evals.sqlite         # evaluation store (resumes an interrupted run)
    out: outputs/map
    link: sigmoid                       # surrogate link (zoo: sigmoid; own models: identity)
    preference: [1, 1]                  # the model to pick and save (and nested merging's target)
    budget: 16                          # bayes: total real evaluations
    acquisition: nehvi                  # bayes: nehvi / binned
    samples_per_stage: 10               # nested: real evaluations per pairwise stage
    schedule: levels                    # nested: sequential (one pair at a time) / levels (disjoint pairs at once)
    ray:                                # evaluations on Ray workers (pip install 'map_merge[ray]'); omit to run here
      address: auto                     # join a running cluster; omit for a local runtime
      num_workers: 8                    # default: as many as the resources fit
      resources_per_worker: {GPU: 1}    # or {GPU: 0.25}: four small models per GPU; {CPU: 1} by default
      max_retries: 2                    # re-queues of an evaluation whose worker died
    moe_method: ls                      # moe: ls / epo
    moe_steps: 2000                     # moe: router training steps (the default: the plateau on the vision zoo)
    train_loss: my_eval.py:loss         # moe on own models: loss(model, task) -> scalar tensor on a training batch
    upcycle: mlp                        # moe on own models: mlp / all / a regex over module names
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, build_executor, build_objective, fit_moe, load_config

__all__ = ["main", "load_config"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(out=args.out, zoo=args.zoo, seed=args.seed, moe_steps=args.moe_steps, moe_methods=args.moe_methods,
                      val_examples=None if args.val_examples == 0 else args.val_examples, all_baselines=args.all_baselines,
                      zoo_table_too=args.zoo_table,
                      grid_per_axis=args.grid_per_axis)
    print((Path(args.out) / "report.md").read_text())
    print(f"\nwrote {args.out}/report.json, report.md and plots ({report['seconds']:.0f} s)")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    from .zoo import load_zoo

    zoo = load_zoo(args.zoo, args.tasks)
    tv = zoo.task_vectors()
    print(f"{zoo.name} zoo: tasks {list(zoo.task_names)}; {tv.num_params:,} merged parameters")
    print("task-vector cosine similarities:\n" + np.array2string(tv.cosine_similarity(), precision=3))
    return 0


def _plot_fronts(fronts: dict, names, path: Path) -> None:
    from . import plots

    if len(names) == 2:
        plots.plot_front_2d(fronts, names, lines={k: k.startswith("PWE") for k in fronts}, path=path)
    else:
        plots.plot_pairwise(fronts, names, path=path)


def _cmd_run(args: argparse.Namespace) -> int:
    """map / bayes / nested / moe on a config."""
    from .store import EvaluationStore

    config = load_config(args.config)
    out = Path(config.get("out", f"outputs/{args.command}"))
    out.mkdir(parents=True, exist_ok=True)
    store = EvaluationStore(config.get("store", out / "evaluations.sqlite"))
    objective, names, zoo = build_objective(config, store=store)
    executor = build_executor(config)
    if executor is not None:
        objective.executor = executor  # evaluations on Ray workers; this process proposes and stores
    try:
        return _run_command(args, config, out, store, objective, names, zoo)
    finally:
        if executor is not None:
            executor.shutdown()


def _run_command(args, config, out, store, objective, names, zoo) -> int:
    num = len(names)
    seed = config.get("seed", 0)
    bounds = tuple(config.get("bounds", (0.0, 1.0)))
    preference = config.get("preference", [1.0] * num)
    if len(preference) != num:
        raise ConfigError(f"{args.config}: field 'preference' has {len(preference)} weights for {num} tasks {names}")
    summary: dict[str, Any] = {"command": args.command, "tasks": names}
    if args.command in ("map", "bayes"):
        from .bayes import BayesianMAP
        from .map import MAP

        options = dict(bounds=bounds, design=config.get("design", "map"), link=config.get("link", "auto"), seed=seed)
        if args.command == "map":
            result = MAP(num_samples=config.get("num_samples"), **options).fit(objective, num)
        else:
            result = BayesianMAP(budget=config.get("budget"), acquisition=config.get("acquisition", "nehvi"), **options).fit(objective, num, progress=True)
        result = result.refine(objective, reevaluations=10, rounds=2)  # 5 front points, refit, 5 more
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        _plot_fronts({"predicted": result.front, "real (re-evaluated)": result.real_front, "all real evaluations": result.evaluated_front()},
                     names, out / "front.png")
        chosen = result.select(preference)
        summary.update(evaluations=result.num_evaluations + len(result.real_front), diagnostics=result.diagnostics(), coeffs=chosen.tolist())
    elif args.command == "nested":
        from .nested import nested_merge

        def objective_for(idx):
            return objective.for_tasks([names[i] for i in idx])

        result = nested_merge(objective_for, num, preference, samples_per_stage=config.get("samples_per_stage", 10), bounds=bounds, seed=seed,
                              schedule=config.get("schedule", "sequential"))
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
        summary.update(evaluations=result.num_evaluations, task_evaluations=result.task_evaluations, coeffs=result.coeffs.tolist(),
                       metrics=result.metrics.tolist())
    else:  # moe
        from .moe import simplex_lattice

        moe, info, moe_objective = fit_moe(config, objective, zoo, checkpoint=out, store=store)
        preferences = simplex_lattice(num, 0.1 if num == 2 else 0.25)
        metrics = moe_objective(preferences)
        _plot_fronts({f"PWE-MoE ({info['method'].upper()}), unloaded": metrics}, names, out / "front.png")
        weights = np.asarray(preference, dtype=float) / float(np.sum(preference))
        path = out / "merged_for_preference.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in moe.unload(weights).state_dict().items()}, str(path),
                  metadata={"preference": json.dumps(weights.tolist()), "tasks": json.dumps(names)})
        (out / "result.json").write_text(json.dumps({"fit": info, "preferences": preferences.tolist(), "metrics": metrics.tolist()}, indent=1))
        summary.update(fit=info, saved=str(path), coefficients={g: w.tolist() for g, w in moe.coefficients(weights).items()})
    if args.command != "moe":
        path = out / "merged_for_preference.safetensors"
        objective.task_vectors.save_merged(path, summary["coeffs"], method=objective.method)
        summary["saved"] = str(path)
    print(json.dumps(summary, indent=1, default=float))
    print(f"preference {preference}; wrote {out}/result.json, {out}/front.png and {summary['saved']}" if args.command != "nested"
          else f"wrote {out}/result.json and {summary['saved']}")
    return 0


def _cmd_save(args: argparse.Namespace) -> int:
    from .zoo import load_zoo

    zoo = load_zoo(args.zoo, args.tasks)
    tv = zoo.task_vectors()
    coeffs = [float(x) for x in args.coeffs.split(",")]
    if args.out.endswith(".safetensors"):
        path = tv.save_merged(args.out, coeffs, method=args.method)
    else:
        path = tv.save_merged(args.out, coeffs, method=args.method, model=zoo.new_encoder())
    print(f"saved merged model to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="map-merge", description="Pareto fronts of merged models (MAP, Bayesian, nested, MoE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole story on the offline text zoo; write report and plots")
    demo.add_argument("--out", default="outputs/demo", help="output folder (holds the evaluation store too)")
    demo.add_argument("--zoo", choices=["text", "vision"], default="text",
                      help="the bundled zoo (text: the demo, about 9 minutes; vision: a one-minute preview)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--val-examples", type=int, default=100, help="validation examples per task the methods are scored on (0: all 200)")
    demo.add_argument("--moe-steps", type=int, default=100, help="PWE-MoE router training steps (0 skips MoE)")
    demo.add_argument("--moe-methods", nargs="+", default=["ls"], choices=["ls", "epo"], help="PWE-MoE training objectives")
    demo.add_argument("--all-baselines", action="store_true",
                      help="also random search and NSGA-II, and every baseline on the 3-task problem (about 5 minutes more)")
    demo.add_argument("--zoo-table", action="store_true", help="add the zoo table (test accuracies; about 2 minutes more)")
    demo.add_argument("--grid-per-axis", type=int, default=None, help="add a grid of real evaluations to the reference front")
    demo.set_defaults(fn=_cmd_demo)
    zoo = sub.add_parser("zoo", help="build (or load) a bundled model zoo and describe it")
    zoo.add_argument("zoo", choices=["text", "vision"])
    zoo.add_argument("--tasks", nargs="*", default=None)
    zoo.set_defaults(fn=_cmd_zoo)
    helps = {"map": "MAP: sample, fit quadratic surrogates, search the front, re-evaluate",
             "bayes": "Bayesian MAP: adaptive sampling where the surrogates are unsure",
             "nested": "nested merging: pairwise stages for the config's preference",
             "moe": "PWE-MoE: train preference routers, save the unloaded model for the config's preference"}
    for command, text in helps.items():
        run = sub.add_parser(command, help=text + " (models and settings in a YAML/JSON config)", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        run.add_argument("--config", required=True, help="YAML or JSON file (fields above)")
        run.set_defaults(fn=_cmd_run)
    save = sub.add_parser("save", help="save a merged zoo model for given coefficients")
    save.add_argument("zoo", choices=["text", "vision"])
    save.add_argument("--coeffs", required=True, help="comma-separated, one per task")
    save.add_argument("--tasks", nargs="*", default=None)
    save.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties", "dare", "breadcrumbs", "della"])
    save.add_argument("--out", required=True, help="a .safetensors file or a folder")
    save.set_defaults(fn=_cmd_save)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the per-load weight bars drown the real progress
    except ImportError:
        pass
    try:
        return args.fn(args)
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"map-merge {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
