"""``map-merge save``: the merge for given coefficients, or the pick of a finished map/bayes run's
front for a preference, as a Hugging Face folder or one ``.safetensors`` file (and optionally as a
mergekit recipe). With ``--config`` it then prints the saved model's block of the run report
(:func:`.report.save_report`): its prediction, one real evaluation of the saved weights, and the
comparison as the run's store holds it (the store is read, never written)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..config import config_method, default_out, load_config, parse_groups, run_inputs, source_paths
from .outputs import write_recipe

__all__ = ["cmd_save", "parse_floats", "parse_method"]


def parse_floats(text: str, what: str) -> list[float]:
    """``"0.5,-1e-1"`` as ``[0.5, -0.1]`` (the numbers YAML and mergekit read); errors name ``what``."""
    from ..numeric import parse_number

    try:
        return [parse_number(x) for x in text.split(",")]
    except ValueError as error:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}: {error}") from None


def parse_method(text: str):
    """``--method``: an operator name, or its settings as a config writes them (YAML / JSON
    ``{name: ties, k: 0.6}``), as a :class:`~map_merge.MergeMethod`."""
    from ..merge_methods import method_from_settings

    spec: Any = text
    if text.lstrip().startswith("{"):
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"--method {text!r} is not a valid mapping: {error}") from None
    try:
        return method_from_settings(spec)
    except ValueError as error:
        raise ValueError(f"--method: {error}") from None


def cmd_save(args: argparse.Namespace) -> int:
    from ..task_vectors.saving import check_destination

    if (args.config is None) == (args.zoo is None):
        raise ValueError("save needs either a bundled zoo (map-merge save text ...) or --config run.yaml")
    if (args.coeffs is None) == (args.preference is None):
        raise ValueError("save needs --coeffs c1,c2,... or --preference w1,w2,... (the latter picks from a finished map/bayes run)")
    method = parse_method(args.method) if args.method else None
    override = method
    config: dict[str, Any] = {}
    picked: dict[str, Any] = {}
    if args.config is not None:
        config = load_config(args.config, mergekit=args.mergekit)
        run_out = default_out(config, "map")
        out = Path(args.out) if args.out else run_out / "merged"
        check_destination(out, source_paths(config), args.overwrite, inputs=run_inputs(config))
        coeffs = _coeffs_for(args, run_out, picked)
        method = method or config_method(config)
        tv, model = _sources(config)
    else:
        if not args.out:
            raise ValueError("save on a bundled zoo needs --out (a .safetensors file or a folder)")
        from ..zoo import load_zoo

        out = Path(args.out)
        coeffs = _coeffs_for(args, None)
        zoo = load_zoo(args.zoo, args.tasks)
        tv = zoo.task_vectors()
        model = None if out.suffix == ".safetensors" or not hasattr(zoo, "new_encoder") else zoo.new_encoder()
    groups = parse_groups(config.get("groups"))
    source = config.get("_recipe")  # saved from a mergekit recipe: its settings (dtype, tokenizer...) kept
    recipe = None
    if args.emit_mergekit:  # checked and built before anything is written: a refused recipe saves nothing
        from ..mergekit_settings import carry_settings

        emit = Path(args.emit_mergekit)
        inputs = run_inputs(config) if config else []
        check_destination(emit, tv.source_paths(), args.overwrite, inputs=[*inputs, out])
        recipe = tv.mergekit_config(coeffs, method, groups)
        recipe = carry_settings(recipe, source.settings) if source is not None else recipe
    if source is not None:  # where the saved folder's dtypes differ from mergekit's output: a warning
        from ..mergekit_settings import warn_dtype

        warn_dtype(source.settings, tv)
    path = tv.save_merged(out, coeffs, method=method, model=model, overwrite=args.overwrite, groups=groups)
    args.saved = path  # what a Ctrl-C from here on reports
    print(f"saved merged model to {path}")
    if recipe is not None:
        write_recipe(recipe, emit, args.overwrite)
        args.saved_recipe = emit
        print(f"wrote the mergekit recipe {args.emit_mergekit}")
    if config:
        _print_block(config, override, coeffs, picked, path, args)
    return 0


def _print_block(config: dict[str, Any], method, coeffs: list[float], picked: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """The saved model's block of the run report, printed (nothing is written)."""
    import sys

    from .report import Chosen, save_report

    from ..merge_methods import resolve_method

    preference = picked.get("preference", config.get("preference"))  # --preference, the config's, else equal
    ran = resolve_method(config_method(config))
    if method is not None and resolve_method(method).spec != ran.spec and picked.get("mean") is not None:
        picked = {**picked, "mean": None, "std": None,
                  "prediction": f"none: the run's model predicts its own operator's merges ({ran.spec}), not --method's ({method.spec})."}
    chosen = Chosen(np.asarray(coeffs, dtype=np.float64), picked.get("mean"), picked.get("std"), picked.get("prediction", ""))
    run_out = default_out(config, "map")
    try:
        text = save_report(config, method, chosen, preference, path, Path(config.get("store", run_out / "evaluations.sqlite")))
    except Exception as error:  # noqa: BLE001 - the model is saved; only its evaluation failed: say so, keep the save
        print(f"map-merge save: the model was saved, but evaluating it failed ({type(error).__name__}: {error}); "
              "no report block", file=sys.stderr)
        return
    print()
    print(text)


def _sources(config: dict[str, Any]):
    """``(task vectors, model or None)`` of a config: the model only where the saved folder needs
    its configs (a weights file as 'pretrained' and a 'model' factory)."""
    if "zoo" in config:
        from ..zoo import load_zoo

        zoo = load_zoo(config["zoo"], config.get("tasks"))
        return zoo.task_vectors(), (zoo.new_encoder() if hasattr(zoo, "new_encoder") else None)
    from ..config import _build_model, build_task_vectors

    tv, model = build_task_vectors(config), None
    if not Path(config["pretrained"]).is_dir() and "model" in config:  # a weights file: the config comes from the model
        model = _build_model(config["_path"], config["model"], config["pretrained"], False, None)
    return tv, model


def _coeffs_for(args: argparse.Namespace, run_out: Path | None, picked: dict[str, Any] | None = None) -> list[float]:
    """The coefficients to save; ``picked`` receives the run's prediction for them where its front
    has them (``mean``, ``std``, ``prediction``) and the preference they were picked for."""
    picked = {} if picked is None else picked
    if args.coeffs is not None:
        coeffs = parse_floats(args.coeffs, "--coeffs")
        _predicted(run_out, coeffs, picked)
        return coeffs
    if run_out is None:
        raise ValueError("--preference picks from a finished run: give --config run.yaml")
    from ..pareto import ParetoFront, cautious_pick

    result_file = run_out / "result.json"
    if not result_file.exists():
        raise FileNotFoundError(f"--preference picks from the front of a finished map/bayes run, but {result_file} does not exist")
    result = json.loads(result_file.read_text())
    if "front" not in result:
        raise ValueError(f"{result_file} holds no front (a {result.get('summary', {}).get('command', 'nested/moe')} run); use --coeffs")
    front = result["front"]
    names = front["task_names"]
    weights = parse_floats(args.preference, "--preference")
    if len(weights) != len(names):
        raise ValueError(f"--preference has {len(weights)} weights for {len(names)} tasks {names}")
    std = None if front.get("std") is None else np.asarray(front["std"], dtype=np.float64)
    pf = ParetoFront(np.asarray(front["coeffs"]), np.asarray(front["metrics"]), names, front["senses"], std=std)
    parts = [result[key] for key in ("samples", "real_front") if result.get(key) and result[key].get("coeffs")]
    if not parts or not all("predicted" in part for part in parts):
        # written before runs handed over by the cautious rule (their result.json keeps no prediction at
        # the real evaluations): that run handed over the predicted front's best point by its mean, and
        # so does this save (the model in its merged/, its report and front.png)
        index = pf.select_index(weights)
        picked.update(preference=weights, **_front_point(front, index))
        return pf.coeffs[index].tolist()
    # the run's real evaluations: a pick among them when one beats the predictions (the run's own rule)
    evaluated = ParetoFront(*(np.concatenate([np.asarray(part[key], dtype=np.float64) for part in parts]) for key in ("coeffs", "metrics")),
                            names, front["senses"], label="all real evaluations")
    mean, std = (np.concatenate([np.asarray(part[key], dtype=np.float64) for part in parts]) for key in ("predicted", "predicted_std"))
    noisy = result.get("noisy") or [False] * len(names)
    if any(noisy):  # noisy metrics: real evaluations scored by the model at them (MAPResult.select), dominated ones included
        handed, index = cautious_pick(pf, weights, evaluated, posterior=(mean, std), noisy=noisy)
    else:
        handed, index = cautious_pick(pf, weights, evaluated.nondominated())
    if handed is pf:
        picked.update(preference=weights, **_front_point(front, index))
        return pf.coeffs[index].tolist()
    coeffs = handed.coeffs[index]
    # a row of the non-dominated subset is an exact copy of a row of ``evaluated`` (duplicates: the same
    # coefficients, the same prediction)
    row = int(np.flatnonzero(np.all(evaluated.coeffs == coeffs, axis=1))[0])
    from .report import real_pick_reason

    why = real_pick_reason(noisy)
    picked.update(preference=weights, mean=mean[row], std=std[row], prediction="the finished run's model at one of its real evaluations "
                  f"(result.json), with its predictive standard deviation: {why}.")
    return coeffs.tolist()


def _front_point(front: dict[str, Any], index: int) -> dict[str, Any]:
    std = front.get("std")
    return {"mean": np.asarray(front["metrics"][index], dtype=np.float64), "std": None if std is None else np.asarray(std[index], dtype=np.float64),
            "prediction": "the finished run's model at this point of its predicted front (result.json), with its predictive standard deviation."}


def _predicted(run_out: Path | None, coeffs: list[float], picked: dict[str, Any]) -> None:
    """The run's prediction for ``coeffs`` when they are a point of its predicted front."""
    result_file = None if run_out is None else run_out / "result.json"
    front = json.loads(result_file.read_text()).get("front") if result_file is not None and result_file.exists() else None
    picked["prediction"] = ("none: the run's model is not kept, and these coefficients are not a point of its predicted front "
                            "(--preference picks one)." if front is not None else "none: no finished map/bayes run to predict with.")
    if front is None or not front.get("coeffs") or len(front["coeffs"][0]) != len(coeffs):
        return
    match = np.flatnonzero(np.all(np.isclose(np.asarray(front["coeffs"]), np.asarray(coeffs), rtol=0, atol=1e-9), axis=1))
    if len(match):
        picked.update(_front_point(front, int(match[0])))
