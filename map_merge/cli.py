"""Command line: ``map-merge {demo, zoo, map, save}``.

``map-merge map --config merge.yaml`` runs MAP on models described in a small YAML/JSON file::

    pretrained: path/to/base            # HF folder or .safetensors
    finetuned:                          # name -> path
      task_a: path/to/a
      task_b: path/to/b
    zoo: text                           # or: evaluate on a bundled zoo's tasks instead of paths
    tasks: [sentiment, med_subject]     # zoo tasks to merge and score
    method: task_arithmetic             # ties / dare
    num_samples: 12
    bounds: [0.0, 1.0]
    seed: 0
    store: outputs/evals.sqlite
    out: outputs/map
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

__all__ = ["main", "load_config"]

_CONFIG_FIELDS = {
    "zoo": str, "tasks": list, "method": str, "num_samples": int, "bounds": list, "seed": int,
    "store": str, "out": str, "design": str, "link": str, "preference": list, "pretrained": str, "finetuned": dict,
}


class ConfigError(ValueError):
    """A config file field is missing or wrong."""


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a YAML or JSON run description; errors name the offending field."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        config = yaml.safe_load(text)
    else:
        config = json.loads(text)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields, got {type(config).__name__}")
    for key, value in config.items():
        if key not in _CONFIG_FIELDS:
            raise ConfigError(f"{path}: unknown field {key!r}; known fields: {sorted(_CONFIG_FIELDS)}")
        expected = _CONFIG_FIELDS[key]
        if expected is float and isinstance(value, int):
            continue
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: field {key!r} must be a {expected.__name__}, got {value!r}")
    if "zoo" not in config:
        raise ConfigError(
            f"{path}: field 'zoo' is required (evaluating arbitrary model paths needs a task metric: use the Python API "
            "ModelObjective for that, see README)"
        )
    if config["zoo"] not in ("text", "vision"):
        raise ConfigError(f"{path}: field 'zoo' must be 'text' or 'vision', got {config['zoo']!r}")
    bounds = config.get("bounds", [0.0, 1.0])
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) for b in bounds) or not bounds[0] < bounds[1]:
        raise ConfigError(f"{path}: field 'bounds' must be [low, high] with low < high, got {bounds!r}")
    return config


def _load_zoo(name: str, tasks: list[str] | None, progress: bool = True):
    from .zoo import load_text_zoo, load_vision_zoo

    return load_text_zoo(tasks, progress=progress) if name == "text" else load_vision_zoo(tasks, progress=progress)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(out=args.out, seed=args.seed, moe_steps=args.moe_steps)
    print((Path(args.out) / "report.md").read_text())
    print(f"\nwrote {args.out}/report.json, report.md and plots ({report['seconds']:.0f} s)")
    return 0


def _cmd_zoo(args: argparse.Namespace) -> int:
    zoo = _load_zoo(args.zoo, args.tasks)
    tv = zoo.task_vectors()
    print(f"{zoo.name} zoo: tasks {list(zoo.task_names)}; {tv.num_params:,} merged parameters")
    print("task-vector cosine similarities:\n" + np.array2string(tv.cosine_similarity(), precision=3))
    return 0


def _cmd_map(args: argparse.Namespace) -> int:
    from . import plots
    from .map import MAP
    from .store import EvaluationStore

    config = load_config(args.config)
    out = Path(config.get("out", "outputs/map"))
    out.mkdir(parents=True, exist_ok=True)
    zoo = _load_zoo(config["zoo"], config.get("tasks"))
    store = EvaluationStore(config.get("store", out / "evaluations.sqlite"))
    objective = zoo.objective(config.get("tasks"), method=config.get("method"), store=store)
    num = objective.num_coeffs
    result = MAP(num_samples=config.get("num_samples"), bounds=tuple(config.get("bounds", (0.0, 1.0))),
                 design=config.get("design", "map"), link=config.get("link", "sigmoid"), seed=config.get("seed", 0)).fit(objective, num)
    result.reevaluate(objective, max_points=10)
    (out / "map_result.json").write_text(json.dumps(result.to_dict(), indent=1))
    if num == 2:
        plots.plot_front_2d({"MAP predicted": result.front, "MAP real": result.real_front}, result.task_names,
                            samples=result.samples.metrics, path=out / "front.png")
    else:
        plots.plot_pairwise({"MAP predicted": result.front, "MAP real": result.real_front}, result.task_names, path=out / "front.png")
    preference = config.get("preference", [1.0] * len(result.task_names))
    chosen = result.select(preference)
    print(f"MAP: {result.num_evaluations} evaluations; diagnostics {json.dumps(result.diagnostics())}")
    print(f"preference {preference} -> coefficients {np.round(chosen, 4).tolist()}")
    print(f"wrote {out}/map_result.json and {out}/front.png")
    return 0


def _cmd_save(args: argparse.Namespace) -> int:
    zoo = _load_zoo(args.zoo, args.tasks)
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
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--moe-steps", type=int, default=100, help="PWE-MoE router training steps (0 skips MoE)")
    demo.set_defaults(fn=_cmd_demo)
    zoo = sub.add_parser("zoo", help="build (or load) a bundled model zoo and describe it")
    zoo.add_argument("zoo", choices=["text", "vision"])
    zoo.add_argument("--tasks", nargs="*", default=None)
    zoo.set_defaults(fn=_cmd_zoo)
    run = sub.add_parser("map", help="run MAP as described by a YAML/JSON config")
    run.add_argument("--config", required=True)
    run.set_defaults(fn=_cmd_map)
    save = sub.add_parser("save", help="save a merged zoo model for given coefficients")
    save.add_argument("zoo", choices=["text", "vision"])
    save.add_argument("--coeffs", required=True, help="comma-separated, one per task")
    save.add_argument("--tasks", nargs="*", default=None)
    save.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties", "dare"])
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
