"""Command line: ``map-merge {demo, zoo, map, bayes, nested, moe, save}``.

``map-merge map --config run.yaml`` runs MAP (``bayes``: Bayesian MAP, ``nested``: nested
merging for the config's preference, ``moe``: PWE-MoE) on the models a YAML or JSON file
describes, and writes to the config's ``out`` folder: ``result.json``, ``front.png`` and the
model picked for the config's preference as a Hugging Face folder, ``merged/``, that
``AutoModelForCausalLM`` / ``AutoModel.from_pretrained`` loads. Results of an earlier run there
are never replaced without ``--overwrite`` (which replaces only what map_merge wrote there); the
evaluation store (``evaluations.sqlite``) is kept, so an interrupted run resumes (Ctrl-C prints how
many evaluations it keeps and the command to run again). The whole config is checked before any
model is loaded, and a config error creates nothing.

Your own models (paths relative to the config; ``out`` and ``store`` to the working directory)::

    pretrained: base/                   # HF folder, .safetensors, .bin or .pt
    finetuned:                          # task -> fine-tuned model: HF folder, file, or PEFT LoRA adapter folder
      task_a: a/
      task_b: b-lora/
    evaluator: my_eval.py:evaluate      # evaluate(model, task) -> float, or "package.module:function"
    model: my_eval.py:build             # optional: build() -> nn.Module (default: the class config.json names, else AutoModel,
                                        #   AutoModelForCausalLM with metric specs under 'tasks')
    sense: max                          # or min (the evaluator's score is a loss)
    link: identity                      # surrogate link: sigmoid / softplus / identity

Language models need no Python: ``tasks`` maps each task to a metric spec (then no 'evaluator')::

    tasks:
      code: {kind: loss, data: code_val.jsonl, max_length: 512, batch_size: 8, perplexity: false}
      qa:   {kind: lm_eval, task: tasks/qa.yaml, limit: 200, metric: acc, num_fewshot: 0, batch_size: 8}
    tokenizer: base/                    # default: the pretrained folder
    dtype: bfloat16                     # float32 / bfloat16 / float16: the live model's dtype

Held-out data for ``kind: loss``: a ``.jsonl`` file with one JSON object per line holding the text
under ``"text"`` (``{"text": "def f(x): ..."}``), a ``.txt`` file with one text per line, or a
``.json`` list of such objects. ``kind: lm_eval``: a registered lm-evaluation-harness task name
or a local task YAML (``dataset_path: json`` with local ``data_files``: how it runs offline).

Or a bundled zoo (models, data and metrics come with it)::

    zoo: lm                             # the language-model zoo (held-out losses, lower is better); or text, vision
    tasks: [code, medical]              # default: the zoo's tasks

Settings (all optional)::

    method: task_arithmetic             # ties / dare
    preference: [1, 1]                  # the model to pick and save (nested merging's target); one weight per task
    seed: 0
    bounds: [0.0, 1.0]                  # the coefficient box searched
    out: outputs/map                    # result.json, front.png, merged/ (default outputs/<command>)
    store: outputs/map/evaluations.sqlite   # evaluation store (default out/evaluations.sqlite; resumes a run)
    num_samples: 12                     # map: real evaluations for the surrogates (default (T+1)(T+2))
    design: map                         # map / sobol / lhs: how the samples are placed
    budget: 16                          # bayes: total real evaluations
    acquisition: nehvi                  # bayes: nehvi / binned
    samples_per_stage: 10               # nested: real evaluations per pairwise stage
    schedule: sequential                # nested: sequential (one pair at a time) / levels (disjoint pairs at once)
    moe_method: ls                      # moe: ls / epo
    moe_steps: 2000                     # moe: router training steps
    train_loss: my_eval.py:loss         # moe on own models: loss(model, task) -> scalar tensor on a training batch
    upcycle: mlp                        # moe on own models: mlp / all / a regex over module names
    groups:                             # coefficient groups: a coefficient per task and group (T x G, task-major,
      attn: self_attn                   #   named task/group); regexes over tensor names, first match wins,
      mlp: "\\.mlp\\."                     #   every tensor in exactly one group (end with a catch-all);
      rest: ".*"                        #   or {knots: 3}: depth knots interpolated over the layers (a mergekit gradient)
    ray:                                # evaluations on Ray workers (pip install 'map_merge[ray]'); omit to run here
      address: auto                     # join a running cluster; omit for a local runtime
      num_workers: 8                    # default: as many as the resources fit
      resources_per_worker: {GPU: 1}    # or {GPU: 0.25}: four small models per GPU; {CPU: 1} by default
      max_retries: 2                    # re-queues of an evaluation whose worker died or timed out
      timeout_s: 3600                   # an evaluation running longer has its worker killed and is re-queued
      load_timeout_s: 1800              # bound on a worker's first set-up of a model (not counted in timeout_s)
      placement_timeout_s: 300          # a worker Ray cannot place in this time is dropped (an error when none is left)

``map-merge save --config run.yaml --coeffs 0.3,0.5`` writes the merge for given coefficients
(``--preference 1,2``: the point a finished map/bayes run's front picks for that preference).
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

from .config import ConfigError, build_executor, build_objective, check_run, fit_moe, load_config, run_inputs, source_paths

__all__ = ["main", "load_config"]

_RESULTS = ("result.json", "front.png", "merged", "mergekit.yaml")  # what a run writes into 'out' (the store stays)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    args.store_path = Path(args.out) / "evaluations.sqlite"  # what a Ctrl-C reports
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    report = run_demo(out=args.out, zoo=args.zoo, seed=args.seed, moe_steps=args.moe_steps, moe_methods=args.moe_methods,
                      val_examples=None if args.val_examples == 0 else args.val_examples, all_baselines=args.all_baselines,
                      zoo_table_too=args.zoo_table,
                      grid_per_axis=args.grid_per_axis, skip=args.skip)
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


def _atomic_write(path: Path, write) -> None:
    """``write(temporary path)`` then rename into place (a crash leaves the old file or none; the
    file is added to its folder's manifest of what map_merge wrote)."""
    from .task_vectors.saving import atomic_path

    with atomic_path(path, folder=False) as temp:
        write(temp)


def _plot_fronts(fronts: dict, names, path: Path, senses=None, labels=None, pick=None, recipe=None) -> None:
    """``labels``: the objective's metric labels; ``pick``: ``(front, preference)``; ``recipe``: ``(coeffs, metrics)``."""
    from . import plots

    pick = plots.pick_mark(*pick, label="your pick (predicted)") if pick is not None else None
    marks = {"your recipe": plots.Mark(recipe[1], recipe[0], "your recipe (evaluated)")} if recipe is not None else None

    def write(temp: Path) -> None:
        if len(names) == 2:
            plots.plot_front_2d(fronts, names, lines={k: k.startswith("PWE") for k in fronts}, senses=senses, labels=labels, pick=pick, marks=marks,
                                path=temp)
        else:
            plots.plot_pairwise(fronts, names, senses=senses, labels=labels, pick=pick, marks=marks, path=temp)

    _atomic_write(path, write)


def _inputs(config: dict[str, Any]) -> list[str]:
    """:func:`~map_merge.config.run_inputs`, plus the commands' default stores when the config
    names neither 'out' nor 'store' (``outputs/<command>/evaluations.sqlite``)."""
    defaults = [] if "out" in config or "store" in config else [f"outputs/{c}/evaluations.sqlite" for c in ("map", "bayes", "nested", "moe")]
    return [*run_inputs(config), *defaults]


def _check_out(config: dict[str, Any], out: Path, overwrite: bool, emit_mergekit: bool = False) -> None:
    """Refuse an 'out' that is or lies in a model source, a result that would replace an input of
    the run (config, code, data, store) or anything map_merge did not write (even with
    ``overwrite``), or an 'out' holding an earlier run's results (unless ``overwrite``); nothing is
    created here."""
    from .task_vectors.saving import check_destination

    earlier = [name for name in _RESULTS if (out / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} holds the results of an earlier run ({', '.join(earlier)}); pass --overwrite to replace "
                              "them (the evaluation store is kept and reused either way), or choose another 'out'")
    # out/mergekit.yaml may be the recipe this run reads (a rerun of an emitted pick)
    for name in ("result.json", "front.png", "merged") + (("mergekit.yaml",) if emit_mergekit else ()):
        check_destination(out / name, source_paths(config), overwrite=True, inputs=_inputs(config))


def _cmd_run(args: argparse.Namespace) -> int:
    """map / bayes / nested / moe on a config."""
    from .store import EvaluationStore
    from .task_vectors.manifest import mark_run

    config = load_config(args.config, mergekit=args.mergekit)
    if args.command == "moe" and "groups" in config:
        raise ConfigError(f"{args.config}: field 'groups' does not apply to 'moe' (PWE-MoE routes whole task vectors per module)")
    if args.command == "moe" and args.emit_mergekit:
        raise ValueError("--emit-mergekit does not apply to 'moe' (PWE-MoE's unloaded model is no mergekit merge)")
    out = Path(config.get("out", f"outputs/{args.command}"))
    args.store_path = Path(config.get("store", out / "evaluations.sqlite"))  # what a Ctrl-C reports
    check_run(config, args.command)  # what the command needs, before any model loads
    _check_out(config, out, args.overwrite, args.emit_mergekit)
    objective, names, zoo = build_objective(config, store=None)  # loads the models; config errors surface here
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


def _run_command(args, config, out: Path, objective, names: list[str], zoo, preference) -> int:
    num = len(names)
    seed = config.get("seed", 0)
    bounds = tuple(config.get("bounds", (0.0, 1.0)))
    summary: dict[str, Any] = {"command": args.command, "tasks": names}
    payload: dict[str, Any]
    if args.command in ("map", "bayes"):
        from .bayes import BayesianMAP
        from .map import MAP

        options = dict(bounds=bounds, design=config.get("design", "map"), link=config.get("link", "auto"), seed=seed)
        dims = objective.num_coeffs  # T, or T x G with coefficient groups
        # a recipe's weights, evaluated first, in the task vectors' order (a config's 'tasks' may reorder or subset the recipe's)
        start = config["_recipe"].coeffs_for(objective.task_vectors.names)[None] if "_recipe" in config else None
        if args.command == "map":
            result = MAP(num_samples=config.get("num_samples"), sampling="design", **options).fit(objective, dims, include=start)
        else:
            result = BayesianMAP(budget=config.get("budget"), acquisition=config.get("acquisition", "nehvi"), **options).fit(
                objective, dims, progress=True, include=start)
        result = result.refine(objective, reevaluations=10, rounds=2)  # 5 front points, refit, 5 more
        payload = result.to_dict()
        recipe = [i for i, c in enumerate(result.samples.coeffs) if start is not None and np.allclose(c, start[0])][:1]  # the recipe's evaluation
        _plot_fronts({"predicted": result.front, "real (re-evaluated)": result.real_front, "all real evaluations": result.evaluated_front()},
                     names, out / "front.png", labels=objective.metric_labels, pick=(result.front, preference),
                     recipe=(start[0], result.samples.metrics[recipe[0]]) if recipe else None)
        chosen = result.select(preference)
        used = np.concatenate([result.samples.coeffs, result.real_front.coeffs])
        summary.update(samples=len(result.samples), reevaluated=len(result.real_front), diagnostics=result.diagnostics(),
                       coeffs=chosen.tolist(), evaluations=len(np.unique(used, axis=0)))
        if objective.coeff_names is not None and len(objective.coeff_names) != num:
            summary["coefficients"] = dict(zip(objective.coeff_names, chosen.tolist()))
    elif args.command == "nested":
        from .nested import nested_merge

        stages = []  # the stages' objectives: their counters are the run's models evaluated

        def objective_for(idx):
            stage = objective.for_tasks([names[i] for i in idx])
            stages.append(stage)
            return stage

        result = nested_merge(objective_for, num, preference, samples_per_stage=config.get("samples_per_stage", 10), bounds=bounds, seed=seed,
                              schedule=config.get("schedule", "sequential"))
        payload = result.to_dict()
        summary.update(evaluations=result.num_evaluations, task_evaluations=result.task_evaluations, coeffs=result.coeffs.tolist(),
                       metrics=result.metrics.tolist())
    else:  # moe
        from .moe import simplex_lattice
        from .task_vectors.saving import save_module

        moe, info, moe_objective = fit_moe(config, objective, zoo, checkpoint=out, store=objective.store)
        preferences = simplex_lattice(num, 0.1 if num == 2 else 0.25)
        metrics = moe_objective(preferences)
        _plot_fronts({f"PWE-MoE ({info['method'].upper()}), unloaded": metrics}, names, out / "front.png", senses=objective.senses,
                     labels=objective.metric_labels)
        weights = np.asarray(preference, dtype=float) / float(np.sum(preference))
        coefficients = {g: w.tolist() for g, w in moe.coefficients(weights).items()}
        meta = {"preference": dict(zip(names, weights.tolist())), "method": f"PWE-MoE ({info['method']})", "coefficients": coefficients}
        tv = objective.task_vectors
        base = tv._base_weights()
        saved = save_module(moe.unload(weights), out / "merged", tv.source_paths(), overwrite=True, source_folder=base.folder,
                            metadata=meta)
        payload = {"fit": info, "preferences": preferences.tolist(), "metrics": metrics.tolist()}
        summary.update(fit=info, evaluations=len(preferences), coefficients=coefficients, saved=str(saved))
    counted = [objective] + (stages if args.command == "nested" else [])
    summary.update(models_evaluated=sum(o.num_evaluations for o in counted), from_store=sum(o.num_cached for o in counted))
    if args.command != "moe":
        recipe = config.get("_recipe")
        if recipe is not None:  # a run from a mergekit recipe: where the saved folder's dtypes differ from mergekit's output
            from .mergekit_settings import warn_dtype

            warn_dtype(recipe.settings, objective.task_vectors)
        summary["saved"] = str(_save_pick(objective, zoo, summary["coeffs"], out / "merged"))
        if args.emit_mergekit:
            from .mergekit_config import RecipeError

            try:
                summary["mergekit"] = str(_emit_mergekit(objective, summary["coeffs"], out / "mergekit.yaml", recipe))
            except RecipeError as error:  # the pick (unequal coefficients under a sign consensus): the results stay
                summary["mergekit"] = f"not written: {error}"
                logging.getLogger(__name__).warning("no mergekit recipe for the pick: %s", error)
    payload = {**payload, "summary": summary}
    _atomic_write(out / "result.json", lambda temp: temp.write_text(json.dumps(payload, indent=1, default=float)))
    print(json.dumps(summary, indent=1, default=float))
    print(f"preference {preference}; wrote {out}/result.json, {out}/front.png and {summary['saved']}" if args.command != "nested"
          else f"wrote {out}/result.json and {summary['saved']}")
    return 0


def _save_pick(objective, zoo, coeffs, path: Path) -> Path:
    """The merged model for ``coeffs`` as a Hugging Face folder (replacing an earlier run's)."""
    tv = objective.task_vectors
    if zoo is not None and hasattr(zoo, "new_encoder"):
        model = zoo.new_encoder()
    else:  # the live model's configs only when the pretrained weights bring none (a bare weights file)
        base = tv._base_weights()
        model = objective.model if base.folder is None and base.config is None else None
    return tv.save_merged(path, coeffs, method=objective.method, model=model, overwrite=True, groups=objective.groups)


def _emit_mergekit(objective, coeffs, path: Path, recipe=None) -> Path:
    """The pick as a mergekit recipe (``mergekit-yaml path out/`` reproduces ``merged/``); ``recipe``:
    the one the run started from, whose settings (dtype, tokenizer...) it keeps."""
    from .mergekit_config import recipe_yaml
    from .mergekit_settings import carry_settings

    config = objective.task_vectors.mergekit_config(coeffs, objective.method, objective.groups)
    config = carry_settings(config, recipe.settings) if recipe is not None else config
    _atomic_write(path, lambda temp: temp.write_text(recipe_yaml(config)))
    return path


def _parse_floats(text: str, what: str) -> list[float]:
    from .numeric import parse_number

    try:
        return [parse_number(x) for x in text.split(",")]
    except ValueError as error:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}: {error}") from None


def _cmd_save(args: argparse.Namespace) -> int:
    from .task_vectors.saving import check_destination

    if (args.config is None) == (args.zoo is None):
        raise ValueError("save needs either a bundled zoo (map-merge save text ...) or --config run.yaml")
    if (args.coeffs is None) == (args.preference is None):
        raise ValueError("save needs --coeffs c1,c2,... or --preference w1,w2,... (the latter picks from a finished map/bayes run)")
    model = None
    if args.config is not None:
        config = load_config(args.config, mergekit=args.mergekit)
        run_out = Path(config.get("out", "outputs/map"))
        out = Path(args.out) if args.out else run_out / "merged"
        check_destination(out, source_paths(config), args.overwrite, inputs=_inputs(config))
        coeffs = _coeffs_for(args, run_out)
        method = args.method or config.get("method")
        if "zoo" in config:
            from .zoo import load_zoo

            zoo = load_zoo(config["zoo"], config.get("tasks"))
            tv, model = zoo.task_vectors(), (zoo.new_encoder() if hasattr(zoo, "new_encoder") else None)
        else:
            from .config import _build_model, build_task_vectors

            tv = build_task_vectors(config)
            if not Path(config["pretrained"]).is_dir() and "model" in config:  # a weights file: the config comes from the model
                model = _build_model(config["_path"], config["model"], config["pretrained"], False, None)
    else:
        if not args.out:
            raise ValueError("save on a bundled zoo needs --out (a .safetensors file or a folder)")
        from .zoo import load_zoo

        out = Path(args.out)
        coeffs = _coeffs_for(args, None)
        zoo = load_zoo(args.zoo, args.tasks)
        tv, method = zoo.task_vectors(), args.method
        model = None if out.suffix == ".safetensors" or not hasattr(zoo, "new_encoder") else zoo.new_encoder()
    from .config import parse_groups

    groups = parse_groups(config.get("groups")) if args.config is not None else None
    source = config.get("_recipe") if args.config is not None else None  # saved from a mergekit recipe: its settings kept
    if source is not None:
        method = args.method or source.method
    recipe = None
    if args.emit_mergekit:  # checked and built before anything is written: a refused recipe saves nothing
        from .merge_methods import resolve_method
        from .mergekit_settings import carry_settings

        emit = Path(args.emit_mergekit)
        inputs = _inputs(config) if args.config is not None else []
        check_destination(emit, tv.source_paths(), args.overwrite, inputs=[*inputs, out])
        recipe = tv.mergekit_config(coeffs, resolve_method(method), groups)
        recipe = carry_settings(recipe, source.settings) if source is not None else recipe
    if source is not None:  # where the saved folder's dtypes differ from mergekit's output: a warning
        from .mergekit_settings import warn_dtype

        warn_dtype(source.settings, tv)
    path = tv.save_merged(out, coeffs, method=method, model=model, overwrite=args.overwrite, groups=groups)
    print(f"saved merged model to {path}")
    if recipe is not None:
        from .mergekit_config import recipe_yaml

        _atomic_write(emit, lambda temp: temp.write_text(recipe_yaml(recipe)))
        print(f"wrote the mergekit recipe {args.emit_mergekit}")
    return 0


def _coeffs_for(args: argparse.Namespace, run_out: Path | None) -> list[float]:
    if args.coeffs is not None:
        return _parse_floats(args.coeffs, "--coeffs")
    if run_out is None:
        raise ValueError("--preference picks from a finished run: give --config run.yaml")
    from .pareto import ParetoFront

    result_file = run_out / "result.json"
    if not result_file.exists():
        raise FileNotFoundError(f"--preference picks from the front of a finished map/bayes run, but {result_file} does not exist")
    result = json.loads(result_file.read_text())
    if "front" not in result:
        raise ValueError(f"{result_file} holds no front (a {result.get('summary', {}).get('command', 'nested/moe')} run); use --coeffs")
    front = result["front"]
    names = front["task_names"]
    weights = _parse_floats(args.preference, "--preference")
    if len(weights) != len(names):
        raise ValueError(f"--preference has {len(weights)} weights for {len(names)} tasks {names}")
    pf = ParetoFront(np.asarray(front["coeffs"]), np.asarray(front["metrics"]), names, front["senses"])
    return pf.select(weights).tolist()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="map-merge", description="Pareto fronts of merged models (MAP, Bayesian, nested, MoE).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole story on a bundled offline zoo (default: the language-model zoo); write report and plots")
    demo.add_argument("--out", default="outputs/demo", help="output folder (holds the evaluation store too)")
    demo.add_argument("--zoo", choices=["lm", "text", "vision"], default="lm",
                      help="the bundled zoo (lm: a Llama pretrained here and its domain experts, the demo; text: sentence "
                           "classifiers on MiniLM; vision: a one-minute preview)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--val-examples", type=int, default=100,
                      help="text/vision zoos: validation examples per task the methods are scored on (0: all 200)")
    demo.add_argument("--moe-steps", type=int, default=None,
                      help="PWE-MoE router training steps (default 500 on the lm zoo, 100 on the others; 0 skips MoE)")
    demo.add_argument("--moe-methods", nargs="+", default=["ls"], choices=["ls", "epo"], help="PWE-MoE training objectives")
    demo.add_argument("--all-baselines", action="store_true",
                      help="also random search and NSGA-II, and every baseline on the 3-task problem (about 5 minutes more)")
    demo.add_argument("--zoo-table", action="store_true", default=None,
                      help="add the zoo table (always on the lm zoo; text zoo: test accuracies, about 2 minutes more)")
    demo.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads (default 1: the zoos' models are small, and on a busy machine two threads "
                           "spin-waiting over small matrices ran up to 25x slower than one; 0: torch's default)")
    demo.add_argument("--skip", nargs="+", default=[], metavar="METHOD", help="methods to leave out, by their report names (e.g. qNEHVI)")
    demo.add_argument("--grid-per-axis", type=int, default=None, help="add a grid of real evaluations to the reference front")
    demo.set_defaults(fn=_cmd_demo)
    zoo = sub.add_parser("zoo", help="build (or load) a bundled model zoo and describe it")
    zoo.add_argument("zoo", choices=["lm", "text", "vision"])
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
        run.add_argument("--overwrite", action="store_true", help="replace result.json, front.png and merged/ of an earlier run in 'out'")
        run.add_argument("--mergekit", default=None, metavar="RECIPE",
                         help="a mergekit recipe (YAML) supplying pretrained, finetuned (task names: the model folders' names), the "
                              "merge method, per-layer or filtered weights (coefficient groups) and the starting point of the search")
        run.add_argument("--emit-mergekit", action="store_true",
                         help="also write out/mergekit.yaml: the pick as a mergekit recipe (mergekit-yaml reproduces merged/)")
        run.set_defaults(fn=_cmd_run)
    save = sub.add_parser("save", help="save a merged model for given coefficients (or a preference) as a Hugging Face folder",
                          description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    save.add_argument("zoo", nargs="?", choices=["lm", "text", "vision"], default=None, help="a bundled zoo (or use --config)")
    save.add_argument("--config", default=None, help="a run's YAML/JSON config: its models (and, for --preference, its result)")
    save.add_argument("--coeffs", default=None, help="comma-separated, one per task (T x G, task-major, with the config's groups)")
    save.add_argument("--preference", default=None, help="comma-separated weights: pick from the front of the config's map/bayes run")
    save.add_argument("--tasks", nargs="*", default=None, help="zoo tasks (with a bundled zoo)")
    save.add_argument("--method", default=None, choices=["task_arithmetic", "ties", "dare", "breadcrumbs", "della"])
    save.add_argument("--out", default=None, help="a folder (or a .safetensors file); default with --config: <out>/merged")
    save.add_argument("--overwrite", action="store_true", help="replace an existing output")
    save.add_argument("--mergekit", default=None, metavar="RECIPE", help="with --config: models, method and groups from a mergekit recipe")
    save.add_argument("--emit-mergekit", default=None, metavar="YAML", help="also write the merge as a mergekit recipe to this file")
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
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as error:
        print(f"map-merge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What a Ctrl-C leaves: how many evaluations the store keeps and the command that resumes."""
    import shlex

    from .store import EvaluationStore

    store = getattr(args, "store_path", None)
    if store is None:
        return f"map-merge {args.command}: interrupted; nothing was written (temporary files are removed)"
    try:
        opened = EvaluationStore(store) if Path(store).exists() else None
        count: Any = opened.count() if opened is not None else 0
        if opened is not None:
            opened.close()
    except Exception:  # noqa: BLE001 - a store that cannot be read now: say so, no traceback
        count = "an unknown number of"
    return (f"map-merge {args.command}: interrupted; the evaluation store {store} keeps {count} task evaluation(s). "
            f"Run the same command again to resume (stored evaluations are not repeated):\n  map-merge {shlex.join(argv)}")

if __name__ == "__main__":
    sys.exit(main())
