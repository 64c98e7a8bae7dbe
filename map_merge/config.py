"""The objective a run description gives: the models, the merge and the tasks a validated config
(:mod:`map_merge.config_read`: reading and validating) names, built for the command line.

A run on your own models builds its live model only when a merge is first evaluated: a rerun whose
evaluations are all in the store never loads it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config_read import (CHOICES, COMMANDS, FIELDS, RAY_KEYS, TASK_KINDS, ConfigError, _relative, check_run, config_method,
                          default_out, load_config, parse_groups, run_inputs, source_paths, task_names_of)

__all__ = ["ConfigError", "load_config", "parse_groups", "resolve_callable", "build_objective", "build_executor", "fit_moe",
           "task_names_of", "source_paths", "run_inputs", "check_run", "build_task_vectors", "config_method", "default_out",
           "FIELDS", "CHOICES", "COMMANDS", "RAY_KEYS", "TASK_KINDS"]


def resolve_callable(spec: str, folder: str | os.PathLike = ".") -> Callable[..., Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` (relative to ``folder``) -> the callable."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} must be 'module:function' or 'file.py:function'")
    if module_name.endswith(".py"):
        file = _relative(folder, module_name)
        if not file.exists():
            raise FileNotFoundError(f"{spec!r}: file {file} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"map_merge_user_{file.stem}", file)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {module_name} has no callable {attr!r}")
    return fn


def _source_digest(fn: Callable[..., Any]) -> str:
    import hashlib
    import inspect

    try:
        source = inspect.getsource(inspect.getmodule(fn) or fn)
    except (OSError, TypeError):
        source = getattr(fn, "__qualname__", repr(fn))
    return hashlib.blake2b(source.encode(), digest_size=8).hexdigest()


def build_objective(config: dict[str, Any], store: Any = None, progress: bool = True):
    """The objective a validated config describes: ``(objective, task_names, zoo)``.

    ``zoo`` is ``None`` for a run on your own models. The objective merges the fine-tuned
    models' task vectors into one model of the pretrained architecture and scores each task
    with the evaluator. On your own models the live model is built on the first evaluation (a
    run answered by the store never loads it); a ``model:`` factory is looked up now."""
    from .objective import ModelObjective, Task

    method = config_method(config)
    groups = parse_groups(config.get("groups"))
    if "zoo" in config:
        from .zoo import load_zoo

        zoo = load_zoo(config["zoo"], config.get("tasks"), progress=progress)
        names = list(zoo.task_names)
        return zoo.objective(names, method=method, store=store, progress=progress, groups=groups), names, zoo
    folder = Path(config["_path"]).parent
    names = list(config.get("tasks", config["finetuned"]))
    specs = config["tasks"] if isinstance(config.get("tasks"), dict) else None
    if "model" in config:
        resolve_callable(config["model"], folder)  # a factory that is not there: a config error now, not at the first evaluation
    # built on first use, here or on each Ray worker (only this recipe travels)
    model = functools.partial(_build_model, config["_path"], config.get("model"), config["pretrained"], bool(specs), config.get("dtype"))
    device = "auto" if "ray" in config else None  # a Ray worker given a GPU evaluates on it
    tv = build_task_vectors(config)
    if specs is not None:
        tasks = _spec_tasks(config, specs)
        key = json.dumps({"specs": specs, "dtype": config.get("dtype")}, sort_keys=True, default=str)
        return ModelObjective(model, tv, tasks, method=method, store=store, key=key, progress=progress, device=device, groups=groups), names, None
    evaluate = resolve_callable(config["evaluator"], folder)
    sense = config.get("sense", "max")
    link = config.get("link", "identity")
    noisy = bool(config.get("noisy", False))  # a noisy estimate: picks score real evaluations by the model
    tasks = {n: Task(lambda m, n=n: evaluate(m, n), sense=sense, link=link, noisy=noisy) for n in names}  # values checked by the objective
    # stored results are keyed by the evaluator's source too: editing it starts afresh (data it reads are not seen)
    key = json.dumps({"evaluator": config["evaluator"], "source": _source_digest(evaluate), "sense": sense})
    return ModelObjective(model, tv, tasks, method=method, store=store, key=key, progress=progress, device=device, groups=groups), names, None


def build_task_vectors(config: dict[str, Any]):
    """The task vectors of a validated config on your own models (the tasks it names)."""
    from .task_vectors import TaskVectors

    names = task_names_of(config)
    return TaskVectors.from_models(config["pretrained"], {n: config["finetuned"][n] for n in names})


def _build_model(config_path: str, model_spec: str | None, pretrained: str, causal: bool, dtype_name: str | None):
    """The live model of a config on your own models (``model:`` callable, else the HF folder)."""
    import torch

    dtype = getattr(torch, dtype_name) if dtype_name else None
    if model_spec is not None:
        model = resolve_callable(model_spec, Path(config_path).parent)()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"{config_path}: field 'model': {model_spec} returned a {type(model).__name__}, not an nn.Module")
    else:
        if not Path(pretrained).is_dir():
            raise ConfigError(f"{config_path}: field 'model' is required when 'pretrained' is a weights file, not a Hugging Face folder")
        import transformers

        auto = transformers.AutoModelForCausalLM if causal else _architecture_class(pretrained) or transformers.AutoModel
        model = auto.from_pretrained(pretrained, local_files_only=True, **({"dtype": dtype} if dtype else {}))
    return model.to(dtype) if dtype is not None else model


def _architecture_class(folder: str):
    """The class a Hugging Face folder's ``config.json`` names in ``architectures`` (None if unknown)."""
    import transformers

    config_file = Path(folder) / "config.json"
    if not config_file.exists():
        return None
    names = json.loads(config_file.read_text()).get("architectures") or []
    return next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)


def build_executor(config: dict[str, Any]):
    """The :class:`~map_merge.RayExecutor` of a config's ``ray:`` field, or ``None``."""
    if "ray" not in config:
        return None
    from .executors import RayExecutor

    return RayExecutor(**config["ray"])


def _spec_tasks(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Task adapters for metric specs: ``loss`` -> :class:`HeldOutLoss`, ``lm_eval`` -> :class:`LMEvalTask`."""
    from transformers import AutoTokenizer

    from .tasks import HeldOutLoss, LMEvalTask

    source = config.get("tokenizer", config["pretrained"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any loading failure: name the field
        raise ConfigError(f"{config['_path']}: field 'tokenizer': no tokenizer could be loaded from {source} ({error})") from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tasks = {}
    for name, spec in specs.items():
        options = {k: v for k, v in spec.items() if k not in ("kind", "data", "task")}
        if spec["kind"] == "loss":
            tasks[name] = HeldOutLoss(spec["data"], tokenizer, **options)
        else:
            tasks[name] = LMEvalTask(spec["task"], tokenizer=tokenizer, **options)
    return tasks


def fit_moe(config: dict[str, Any], objective: Any, zoo: Any = None, checkpoint: str | os.PathLike | None = None,
            store: Any = None, progress: bool = True):
    """PWE-MoE for a validated config: ``(moe, info, preference_objective)``.

    On a zoo, the routers train on the zoo's training data; on your own models, on the config's
    ``train_loss``. Trained routers are kept in ``checkpoint`` (a folder) under a key of every
    setting and reused. ``preference_objective`` maps preference vectors ``(K, T)`` to the
    scores ``(K, T)`` of the unloaded dense models."""
    import hashlib

    from .moe import ParetoMoE
    from .moe.pareto_moe import CORNERS, ROUTER_STEPS

    names = list(objective.task_names)
    method, steps, seed = config.get("moe_method", "ls"), config.get("moe_steps", ROUTER_STEPS), config.get("seed", 0)
    if zoo is not None:
        moe, info = zoo.fit_moe(names, method=method, steps=steps, seed=seed, checkpoint=checkpoint, progress=progress)
        return moe, info, zoo.moe_objective(moe, names, store=store, progress=progress)
    if "train_loss" not in config:
        raise ConfigError(f"{config['_path']}: field 'train_loss' is required by 'moe' on your own models: name a function "
                          "loss(model, task) -> scalar tensor that draws a training batch and returns its differentiable loss")
    folder = Path(config["_path"]).parent
    loss = resolve_callable(config["train_loss"], folder)
    upcycle = config.get("upcycle", "mlp")
    try:
        moe = ParetoMoE(objective.model, objective.task_vectors, upcycle=upcycle, seed=seed)
    except ValueError as error:
        raise ConfigError(f"{config['_path']}: field 'upcycle' ({upcycle!r}): {error}") from error
    settings = [objective.task_vectors.fingerprint(), method, steps, seed, upcycle, config["train_loss"], _source_digest(loss), CORNERS]
    key = hashlib.blake2b(json.dumps(settings).encode(), digest_size=8).hexdigest()
    path = Path(checkpoint) / f"moe_routers_{key}.pt" if checkpoint is not None else None
    losses = {n: (lambda model, n=n: loss(model, n)) for n in names}
    info = {**moe.fit_or_load(losses, path, steps=steps, method=method, seed=seed, progress=progress), "key": key}
    tasks = {n: objective.tasks[n].metric for n in names}
    return moe, info, moe.objective(tasks, senses=objective.senses, key=objective.key or "", store=store, progress=progress,
                                    noisy=objective.noisy)
