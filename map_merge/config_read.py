"""Run descriptions for the command line, read and validated: a small YAML/JSON file naming the
models, the tasks and the settings, checked field by field before any model loads (errors name
the field). :mod:`map_merge.config` builds the objective a validated description gives.

Two kinds of run:

- a bundled zoo (``zoo: lm``, ``zoo: text`` or ``zoo: vision``, ``tasks:`` a subset of its
  tasks): the zoo supplies models, data and metrics (``lm``: held-out losses, lower is better);
- your own models: ``pretrained:`` and ``finetuned:`` (task -> path) name the weights (a
  Hugging Face folder, ``.safetensors``, ``.bin``/``.pt``), ``evaluator:`` names a Python
  function ``evaluate(model, task) -> float`` as ``"module:function"`` or ``"file.py:function"``,
  and ``model:`` optionally names a factory ``build() -> nn.Module`` for the architecture
  (default: ``transformers.AutoModel`` from the ``pretrained`` folder). ``sense:`` says whether
  the evaluator's score is maximised (default) or minimised, ``noisy: true`` that it is a noisy
  estimate such as accuracy on a few hundred examples (picks then score real evaluations by the
  model; default ``false``). PWE-MoE on your own models also
  needs ``train_loss:``, a function ``loss(model, task) -> scalar tensor`` that draws one
  training batch, runs ``model`` on it and returns a differentiable loss, and optionally
  ``upcycle:`` (``mlp``, the default: each transformer block's MLP; ``all``; or a regular
  expression over module names).

Language models need no Python at all: ``tasks:`` may map each fine-tuned task to a metric spec
instead of listing names, and ``evaluator:`` is then not needed::

    tasks:
      code: {kind: loss, data: code_val.jsonl, max_length: 512}        # HeldOutLoss (min)
      qa:   {kind: lm_eval, task: tasks/qa.yaml, limit: 200, metric: acc, num_fewshot: 0}
    tokenizer: base/            # default: the pretrained folder
    dtype: bfloat16             # the live model's dtype (default: the checkpoint's)

The live model is then ``AutoModelForCausalLM`` of the pretrained folder. An ``lm_eval`` score is
taken as a noisy estimate (``noisy: false`` trusts each measurement; :class:`~map_merge.LMEvalTask`).

``method:`` is an operator name (``ties``: its default settings) or a mapping of a name and
settings, ``{name: ties, k: 0.6, scope: tensor}`` (:mod:`map_merge.merge_methods.settings`).

Relative paths in a config (models, code, data, tokenizer, ``out``, ``store``) are relative to the
config file's folder; the returned mapping holds them absolute. Without ``out``, a command writes
to ``outputs/<command>`` beside the config (:func:`default_out`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .merge_methods import MergeMethod
from .merge_methods.settings import OPERATORS, method_from_settings
from .numeric import parse_number

__all__ = ["ConfigError", "FIELDS", "CHOICES", "load_config", "parse_groups", "task_names_of", "source_paths", "run_inputs",
           "check_run", "config_method", "default_out", "COMMANDS"]

COMMANDS = ("map", "bayes", "nested", "moe")
"""The commands that run on a config (each writes to ``out``, default :func:`default_out`)."""

FIELDS: dict[str, type | tuple[type, ...]] = {
    "zoo": str, "tasks": list, "pretrained": str, "finetuned": dict, "evaluator": str, "model": str, "sense": str,
    "method": (str, dict), "num_samples": int, "bounds": list, "seed": int, "store": str, "out": str, "design": str, "link": str,
    "preference": list, "budget": int, "acquisition": str, "samples_per_stage": int, "moe_method": str, "moe_steps": int,
    "train_loss": str, "upcycle": str, "tokenizer": str, "dtype": str, "ray": dict, "schedule": str, "groups": dict, "sampling": str,
    "noisy": bool,
}
RAY_KEYS = {"num_workers": int, "resources_per_worker": dict, "address": str, "max_retries": int,
            "timeout_s": (int, float), "load_timeout_s": (int, float), "placement_timeout_s": (int, float)}
TASK_KINDS = {  # kind -> (required keys, optional keys) of a metric spec under 'tasks'
    "loss": ({"data"}, {"max_length", "batch_size", "perplexity"}),
    "lm_eval": ({"task"}, {"limit", "num_fewshot", "metric", "batch_size", "noisy"}),
}
CHOICES = {"zoo": ("lm", "text", "vision"), "method": tuple(OPERATORS), "acquisition": ("ehvi", "nehvi", "binned"), "sampling": ("adaptive", "design"),
           "moe_method": ("ls", "epo"), "design": ("map", "sobol", "lhs"), "link": ("sigmoid", "softplus", "identity"),
           "sense": ("max", "min"), "dtype": ("float32", "bfloat16", "float16"), "schedule": ("sequential", "levels")}


def load_config(path: str | os.PathLike, mergekit: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate a YAML or JSON run description; errors name the offending field.

    Relative paths (models, code, data, tokenizer, ``out``, ``store``) are resolved against the
    config's folder; the returned mapping holds them so, plus ``"_path"`` (the config file) and,
    when the config names a ``method``, ``"_method"`` (the operator with its settings).
    ``mergekit``: a mergekit recipe that supplies ``pretrained``, ``finetuned`` (task names from
    the model folders' names), the operator, the coefficient groups and the starting point
    (``"_recipe"``); the config must then not name them itself."""
    path = Path(path)
    config = _read(path)

    def fail(field: str, message: str) -> ConfigError:
        return ConfigError(f"{path}: field {field!r} {message}")

    recipe = None
    if mergekit is not None:
        from .mergekit_config import from_mergekit

        clash = [k for k in ("pretrained", "finetuned", "method", "groups", "zoo") if k in config]
        if clash:
            raise fail(clash[0], f"comes from the mergekit recipe {mergekit}; leave it out of the config")
        recipe = from_mergekit(mergekit)
        config = {**config, "pretrained": recipe.base_model, "finetuned": dict(recipe.models)}
        if recipe.groups is not None:
            spec = recipe.groups.spec
            config["groups"] = spec["patterns"] if recipe.groups.knots is None else {k: spec[k] for k in ("patterns", "knots") if k in spec}
    config = _check_settings(config, path, fail)
    folder = path.parent
    resolved = {**config, "_path": str(path)}
    for key in ("out", "store"):  # outputs too are relative to the config, as every other path in it
        if key in config:
            resolved[key] = str(_relative(folder, config[key]))
    if "method" in config:
        try:
            resolved["_method"] = method_from_settings(config["method"])
        except ValueError as error:
            raise fail("method", f"is wrong: {error}") from None
    specs = isinstance(config.get("tasks"), dict)
    own = [key for key in ("pretrained", "finetuned", "evaluator", "model", "sense", "noisy", "train_loss", "upcycle") if key in config]
    if "zoo" in config:
        if own:
            raise fail(own[0], "belongs to a run on your own models; a run on a bundled zoo ('zoo') takes its models and metrics from the zoo")
        _check_preference(resolved, fail)
        return resolved
    missing = [key for key in ("pretrained", "finetuned") + (() if specs else ("evaluator",)) if key not in config]
    if missing:
        scoring = ("(the metric specs under 'tasks' score them)" if specs else
                   "and 'evaluator' ('module:function' called as evaluate(model, task) -> float, or metric specs under 'tasks')")
        raise fail(missing[0], f"is required: name a bundled 'zoo', or your own models with 'pretrained', 'finetuned' (task -> path) {scoring}")
    if not config["finetuned"]:
        raise fail("finetuned", "must name at least one task -> fine-tuned model path")
    resolved["pretrained"] = _existing(folder, config["pretrained"], "pretrained", fail)
    resolved["finetuned"] = {}
    for task, model_path in config["finetuned"].items():
        if not isinstance(model_path, str):
            raise fail("finetuned", f"maps task {task!r} to {model_path!r}; expected a path")
        resolved["finetuned"][str(task)] = _existing(folder, model_path, f"finetuned.{task}", fail)
    unknown = [t for t in config.get("tasks", []) if t not in resolved["finetuned"]]
    if unknown:
        raise fail("tasks", f"names {unknown}, which 'finetuned' does not; it has {list(resolved['finetuned'])}")
    if specs:
        resolved["tasks"] = {name: _task_spec(folder, name, spec, fail) for name, spec in config["tasks"].items()}
    if "tokenizer" in config:
        resolved["tokenizer"] = _existing(folder, config["tokenizer"], "tokenizer", fail)
    for key in ("evaluator", "model", "train_loss"):
        if key in config and config[key].count(":") != 1:
            raise fail(key, f"must be 'module:function' or 'file.py:function', got {config[key]!r}")
    _check_preference(resolved, fail)
    if recipe is not None:
        resolved["_recipe"] = recipe
        resolved["_mergekit"] = str(Path(mergekit).resolve())  # an input: no output may replace it
    moe_fields = [key for key in ("moe_method", "moe_steps", "upcycle") if key in config]
    if moe_fields and "train_loss" not in config:
        raise fail(moe_fields[0], "needs 'train_loss' ('module:function' called as loss(model, task) -> scalar tensor on a training "
                                  "batch): PWE-MoE trains its routers on your tasks' training losses")
    return resolved


def _read(path: Path) -> dict[str, Any]:
    """The mapping a YAML (``.yaml`` / ``.yml``) or JSON file holds."""
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text)
        else:
            config = json.loads(text)
    except Exception as error:  # yaml.YAMLError / json.JSONDecodeError: report the file, not a traceback
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {error}") from error
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the config must be a mapping of fields, got {type(config).__name__}")
    return config


def _check_settings(config: dict[str, Any], path: Path, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    """Every field known and of its type, choices, counts, preference, ray, groups, bounds and the
    shape of 'tasks' (paths are checked by the caller); returns the config with the preference as numbers."""
    for key, value in config.items():
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown field {key!r}; known fields: {sorted(FIELDS)}")
        if key == "tasks" and isinstance(value, dict):
            continue  # metric specs, checked by the caller
        kinds = FIELDS[key] if isinstance(FIELDS[key], tuple) else (FIELDS[key],)
        if not isinstance(value, kinds) or (int in kinds and isinstance(value, bool)):
            raise fail(key, f"must be a {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    for key, choices in CHOICES.items():
        if key in config and key != "method" and config[key] not in choices:  # method: a name or a mapping, checked by the caller
            raise fail(key, f"must be one of {list(choices)}, got {config[key]!r}")
    for key in ("num_samples", "budget", "samples_per_stage", "moe_steps"):
        if key in config and config[key] < 1:
            raise fail(key, f"must be a positive integer, got {config[key]!r}")
    if "budget" in config and "num_samples" in config and config["budget"] != config["num_samples"]:
        raise fail("num_samples", f"is the older name of budget; they disagree (budget {config['budget']}, "
                   f"num_samples {config['num_samples']}): give one")
    if "preference" in config:
        try:  # '1e-1' is a string in YAML 1.1: read as the number it spells
            config = {**config, "preference": [parse_number(v) for v in config["preference"]]}
        except ValueError as error:
            raise fail("preference", f"must be non-negative numbers, not all zero: {error} (in {config['preference']!r})") from None
        if any(v < 0 for v in config["preference"]) or sum(config["preference"]) <= 0:
            raise fail("preference", f"must be non-negative numbers, not all zero, got {config['preference']!r}")
    for key, value in config.get("ray", {}).items():
        if key not in RAY_KEYS:
            raise fail("ray", f"has unknown key {key!r}; allowed: {sorted(RAY_KEYS)}")
        kind = RAY_KEYS[key]
        if not isinstance(value, kind) or isinstance(value, bool) or (kind == (int, float) and value <= 0):
            raise fail(f"ray.{key}", f"must be a {'positive number of seconds' if kind == (int, float) else kind.__name__}, got {value!r}")
    for key, value in config.get("ray", {}).get("resources_per_worker", {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise fail(f"ray.resources_per_worker.{key}", f"must be a non-negative number, got {value!r}")
    if "groups" in config:
        try:
            parse_groups(config["groups"])
        except (ValueError, TypeError) as error:
            raise fail("groups", f"{error}") from None
    bounds = config.get("bounds", [0.0, 1.0])
    if "bounds" in config:
        try:  # '-5e-1' is a string in YAML 1.1: read as the number it spells, as the preference is
            config = {**config, "bounds": [parse_number(b) for b in bounds]}
        except ValueError as error:
            raise fail("bounds", f"must be [low, high] with low < high: {error} (in {bounds!r})") from None
        bounds = config["bounds"]
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise fail("bounds", f"must be [low, high] with low < high, got {bounds!r}")
    specs = isinstance(config.get("tasks"), dict)
    if "tasks" in config and (not config["tasks"] or not all(isinstance(t, str) for t in config["tasks"])):
        raise fail("tasks", f"must be a non-empty list of task names (or task -> metric spec), got {config['tasks']!r}")
    if specs and "zoo" in config:
        raise fail("tasks", "takes metric specs only on your own models; a zoo brings its own metrics")
    if specs and "evaluator" in config:
        raise fail("evaluator", "and metric specs under 'tasks' both say how to score; keep one")
    if specs and "noisy" in config:
        raise fail("noisy", "is the evaluator's; with metric specs under 'tasks' each spec says it (kind: lm_eval, noisy: false)")
    return config


def config_method(config: dict[str, Any]) -> MergeMethod | None:
    """The operator of a validated config, with its settings: the mergekit recipe's, the config's
    ``method``, or ``None`` (none named: the library's default)."""
    if "_recipe" in config:
        return config["_recipe"].method
    return config.get("_method")


def default_out(config: dict[str, Any], command: str) -> Path:
    """Where ``command`` writes for a validated config: its ``out``, else ``outputs/<command>``
    beside the config file (the working directory for a config without a file)."""
    if "out" in config:
        return Path(config["out"])
    return _relative(Path(config.get("_path", "config")).parent, str(Path("outputs") / command))


def parse_groups(spec: Any):
    """The :class:`~map_merge.Groups` of a config's ``groups:`` field: ``{name: regex, ...}`` (first match
    wins; end with a catch-all such as ``rest: ".*"``), ``{knots: K}`` (depth knots over the layers) or
    ``{knots: K, patterns: {name: regex, ...}}`` (K depth knots per pattern)."""
    from .groups import Groups

    if spec is None:
        return None
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"must be a mapping of group name -> regex, or {{knots: K}}; got {spec!r}")
    if "knots" in spec:
        extra = set(spec) - {"knots", "layer_pattern", "patterns"}
        if extra or not isinstance(spec["knots"], int) or isinstance(spec["knots"], bool) or spec["knots"] < 1:
            raise ValueError(f"with 'knots' takes a positive integer (and optionally 'layer_pattern', 'patterns'), got {spec!r}")
        patterns = spec.get("patterns")
        if patterns is not None and (not isinstance(patterns, dict) or not all(isinstance(v, str) for v in patterns.values())):
            raise ValueError(f"'patterns' maps each group to a regular expression (a string), got {patterns!r}")
        return Groups(patterns, knots=spec["knots"], **({"layer_pattern": spec["layer_pattern"]} if "layer_pattern" in spec else {}))
    if not all(isinstance(v, str) for v in spec.values()):
        raise ValueError(f"maps each group to a regular expression (a string), got {spec!r}")
    return Groups(spec)


def task_names_of(config: dict[str, Any]) -> list[str] | None:
    """The task names a config runs on (``None``: a zoo's defaults, known once it is loaded)."""
    if "tasks" in config:
        return list(config["tasks"])
    if "finetuned" in config:
        return list(config["finetuned"])
    return None


def _check_preference(config: dict[str, Any], fail: Callable[[str, str], ConfigError]) -> None:
    names = task_names_of(config)
    if "zoo" in config and names is None:
        from .zoo import default_tasks

        names = list(default_tasks(config["zoo"]))
    if "preference" in config and names is not None and len(config["preference"]) != len(names):
        raise fail("preference", f"has {len(config['preference'])} weights for {len(names)} tasks {names}")


def source_paths(config: dict[str, Any]) -> list[str]:
    """The model files and folders a config reads (outputs never go there)."""
    if "zoo" in config:
        return []
    return [config["pretrained"], *config["finetuned"].values()]


def run_inputs(config: dict[str, Any]) -> list[str]:
    """What else a run reads or keeps, which no output may replace: the config file, the Python
    files it names, held-out data and lm-eval task files, the tokenizer and the evaluation store."""
    paths = [config["_path"]] if "_path" in config else []
    if "_mergekit" in config:
        paths.append(config["_mergekit"])
    folder = Path(config.get("_path", ".")).parent
    for key in ("evaluator", "model", "train_loss"):
        module = str(config.get(key, "")).partition(":")[0]
        if module.endswith(".py"):
            paths.append(str(_relative(folder, module)))
    if isinstance(config.get("tasks"), dict):
        for spec in config["tasks"].values():
            value = spec.get("data", spec.get("task"))
            if isinstance(value, str) and Path(value).exists():
                paths.append(value)
    if "tokenizer" in config:
        paths.append(config["tokenizer"])
    if "store" in config:
        paths.append(config["store"])
    elif "out" in config:  # the default store of the config's runs
        paths.append(str(Path(config["out"]) / "evaluations.sqlite"))
    else:  # the commands' default stores, outputs/<command>/evaluations.sqlite beside the config
        paths += [str(default_out(config, command) / "evaluations.sqlite") for command in COMMANDS]
    return paths


def check_run(config: dict[str, Any], command: str) -> None:
    """What a command needs of a validated config that can be checked without loading a model:
    a ``model`` factory where ``pretrained`` is a weights file (the architecture comes from it),
    the Python files it names exist (or their modules can be found), ``moe`` on own models has
    ``train_loss`` and a valid ``upcycle``, and Ray is installed when ``ray`` is set.

    Raises ConfigError / ImportError naming the field."""
    path = config.get("_path", "config")
    folder = Path(config.get("_path", ".")).parent
    if "zoo" not in config and "model" not in config and not Path(config["pretrained"]).is_dir():
        raise ConfigError(f"{path}: field 'model' is required when 'pretrained' is a weights file, not a Hugging Face folder "
                          "('module:function' or 'file.py:function' returning the architecture as an nn.Module)")
    for key in ("evaluator", "model", "train_loss"):
        if key not in config:
            continue
        module = config[key].partition(":")[0]
        if module.endswith(".py"):
            if not _relative(folder, module).exists():
                raise ConfigError(f"{path}: field {key!r} names {module}, which does not exist (looked for {_relative(folder, module)})")
        elif importlib.util.find_spec(module.split(".")[0]) is None:
            raise ConfigError(f"{path}: field {key!r} names module {module!r}, which cannot be imported")
    if command == "moe" and "zoo" not in config:
        if "train_loss" not in config:
            raise ConfigError(f"{path}: field 'train_loss' is required by 'moe' on your own models: name a function "
                              "loss(model, task) -> scalar tensor that draws a training batch and returns its differentiable loss")
        upcycle = config.get("upcycle", "mlp")
        if upcycle not in ("mlp", "all"):
            import re

            try:
                re.compile(upcycle)
            except re.error as error:
                raise ConfigError(f"{path}: field 'upcycle' ({upcycle!r}) is neither 'mlp', 'all' nor a regular expression: {error}") from None
    if "ray" in config and importlib.util.find_spec("ray") is None:
        raise ImportError(f"{path}: field 'ray' needs Ray: pip install 'map_merge[ray]'")


def _task_spec(folder: Path, name: str, spec: Any, fail: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    field = f"tasks.{name}"
    if not isinstance(spec, dict) or spec.get("kind") not in TASK_KINDS:
        raise fail(field, f"must be a mapping with 'kind' one of {sorted(TASK_KINDS)}, got {spec!r}")
    required, optional = TASK_KINDS[spec["kind"]]
    keys = set(spec) - {"kind"}
    if required - keys:
        raise fail(field, f"({spec['kind']}) needs {sorted(required - keys)}")
    if keys - required - optional:
        raise fail(field, f"({spec['kind']}) has unknown keys {sorted(keys - required - optional)}; allowed: {sorted(required | optional)}")
    out = dict(spec)
    if spec["kind"] == "loss":
        out["data"] = _existing(folder, str(spec["data"]), f"{field}.data", fail)
    elif str(spec["task"]).endswith((".yaml", ".yml")):
        out["task"] = _existing(folder, str(spec["task"]), f"{field}.task", fail)
    for key in ("max_length", "batch_size", "num_fewshot"):
        if key in spec and (not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < (0 if key == "num_fewshot" else 1)):
            raise fail(f"{field}.{key}", f"must be a {'non-negative' if key == 'num_fewshot' else 'positive'} integer, got {spec[key]!r}")
    if "noisy" in spec and not isinstance(spec["noisy"], bool):
        raise fail(f"{field}.noisy", f"must be true or false, got {spec['noisy']!r}")
    return out


def _relative(folder: str | os.PathLike, value: str) -> Path:
    """``value`` as a path, relative ones taken from ``folder``."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else Path(folder) / path


def _existing(folder: Path, value: str, field: str, fail: Callable[[str, str], ConfigError]) -> str:
    candidate = _relative(folder, value)
    if not candidate.exists():
        raise fail(field, f"points to {value!r}, which does not exist (looked for {candidate})")
    return str(candidate)


