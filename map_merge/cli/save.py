"""``map-merge save``: the merge for given coefficients, or the pick of a finished map/bayes run's
front for a preference, as a Hugging Face folder or one ``.safetensors`` file (and optionally as a
mergekit recipe)."""

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
    config: dict[str, Any] = {}
    if args.config is not None:
        config = load_config(args.config, mergekit=args.mergekit)
        run_out = default_out(config, "map")
        out = Path(args.out) if args.out else run_out / "merged"
        check_destination(out, source_paths(config), args.overwrite, inputs=run_inputs(config))
        coeffs = _coeffs_for(args, run_out)
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
    print(f"saved merged model to {path}")
    if recipe is not None:
        write_recipe(recipe, emit)
        print(f"wrote the mergekit recipe {args.emit_mergekit}")
    return 0


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


def _coeffs_for(args: argparse.Namespace, run_out: Path | None) -> list[float]:
    if args.coeffs is not None:
        return parse_floats(args.coeffs, "--coeffs")
    if run_out is None:
        raise ValueError("--preference picks from a finished run: give --config run.yaml")
    from ..pareto import ParetoFront

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
    pf = ParetoFront(np.asarray(front["coeffs"]), np.asarray(front["metrics"]), names, front["senses"])
    return pf.select(weights).tolist()
