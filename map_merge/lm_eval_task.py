"""An lm-evaluation-harness task scored on the merged model held in memory.

Everything that does not depend on the model is built once, at construction: lm-eval's task
manager, the task objects (a task, or a group and its subtasks), their documents and requests,
the metric and its sense. An evaluation only runs the live model on the prepared requests through
lm-eval's own ``HFLM`` (one per model object, reused) and aggregates with the task's own
``process_results`` and aggregation functions, so its value equals ``lm_eval.simple_evaluate``
on the same model.
"""

from __future__ import annotations

import math
import os
import random
import threading
from collections import defaultdict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .fingerprint import content_digest

__all__ = ["LMEvalTask"]

_PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "perplexity", "bits_per_byte")
# lm-eval's metric names as figures spell them, and their units where they have one
_SPELLED = {"acc": "accuracy", "acc_norm": "normalized accuracy", "exact_match": "exact match", "f1": "F1", "mcc": "Matthews correlation",
            "word_perplexity": "word perplexity", "byte_perplexity": "byte perplexity", "bits_per_byte": "bits per byte"}
_UNITS = {"bits_per_byte": "bits/byte"}


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ImportError("LMEvalTask needs lm-evaluation-harness: pip install 'map_merge[lm]' (or lm-eval)") from None
    return TaskManager, HFLM


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's generators as ``simple_evaluate`` does, and restore them
    afterwards (no global state leaks out)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@dataclass
class _Prepared:
    """lm-eval's objects for one task name, built once per process."""

    tasks: dict[str, Any]  # leaf task name -> lm-eval Task
    groups: list[Any]  # lm-eval Groups, children before parents
    requests: dict[str, list[Any]]  # request type -> Instances (each repeated ``repeats`` times), all tasks
    instances: list[Any]  # every Instance once
    docs: dict[str, list[tuple[int, Any]]]  # task -> (doc_id, doc) scored
    by_doc: dict[str, dict[int, list[Any]]]  # task -> doc_id -> its Instances in order
    data: str  # fingerprint of the requests and documents


class LMEvalTask:
    """An lm-evaluation-harness task scored on the merged model in memory.

    The metric, its sense and the requests are fixed at construction from the task's config
    (``metric_list`` with its ``higher_is_better``, or lm-eval's defaults for the output type:
    ``loglikelihood_rolling`` reports ``word_perplexity`` / ``byte_perplexity`` /
    ``bits_per_byte``, all minimised; ``multiple_choice`` ``acc`` / ``acc_norm``). Each call wraps
    the live model as lm-eval's ``HFLM(pretrained=model, tokenizer=...)`` (reused while the model
    object is the same; never saved and reloaded), answers the prepared requests and aggregates
    them with the task's own functions. Offline, point ``task`` at a local task YAML whose
    ``dataset_path: json`` reads local ``data_files``; its folder becomes lm-eval's include path.

    Pickling (a Ray worker receives it so) keeps the settings, metric, sense and fingerprint;
    lm-eval's objects are rebuilt on first use there, and a different result of that rebuild
    (other data on that machine) is an error.

    Args:
        task: a registered task or group name, or the path of a task YAML (its ``task:`` field
            names it).
        tokenizer: the model's tokenizer (required).
        limit: score the first ``limit`` documents only (below 1: that fraction; ``None``: all).
        num_fewshot: few-shot examples per prompt (``None``: the task's own, 0 if it sets none;
            a task whose config pins 0 keeps 0, as in lm-eval).
        metric: the reported metric, ``"acc"`` or ``"acc,none"`` (metric, lm-eval filter);
            default: the first of acc / acc_norm / exact_match / f1 / mcc / word_perplexity /
            perplexity / bits_per_byte the task reports, else its first metric. A bare name takes
            the ``"none"`` filter, else the task's first.
        batch_size: lm-eval's batch size.
        include_path: extra folder(s) of task YAMLs.
        sense: ``"max"`` / ``"min"``; default: lm-eval's ``higher_is_better`` for the metric.
        seed: seeds few-shot sampling and lm-eval's random state while the requests are built.
        progress: lm-eval's progress bars.
        noisy: the score is an estimate from a sample of documents (default ``True``; lm-eval's
            own standard error on a few hundred questions is a few points): MAP scores real
            evaluations in it by its model (:meth:`~map_merge.MAPResult.select`). ``False`` trusts
            each measurement as exact.
    """

    def __init__(self, task: str | os.PathLike, tokenizer: Any = None, limit: int | float | None = None, num_fewshot: int | None = None,
                 metric: str | None = None, batch_size: int = 8, include_path: str | os.PathLike | Sequence | None = None,
                 sense: str | None = None, seed: int = 0, progress: bool = False, noisy: bool = True) -> None:
        if tokenizer is None:
            raise ValueError("LMEvalTask needs the model's tokenizer (tokenizer=...)")
        if not isinstance(noisy, (bool, np.bool_)):
            raise ValueError(f"noisy must be True or False, got {noisy!r}")
        if sense is not None and sense not in ("max", "min"):
            raise ValueError(f"sense must be 'max' or 'min', got {sense!r}")
        if limit is not None and not limit > 0:
            raise ValueError(f"limit must be positive (a count, or a fraction below 1), got {limit}")
        paths = [] if include_path is None else [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike)) else include_path)]
        path = Path(task)
        if str(task).endswith((".yaml", ".yml")):
            if not path.exists():
                raise FileNotFoundError(f"task YAML {path} does not exist")
            name = _yaml_task_name(path)
            paths.append(str(path.parent.resolve()))
            self.yaml_text: str | None = path.read_text()
        else:
            name, self.yaml_text = str(task), None
        self.task, self.tokenizer, self.limit = name, tokenizer, limit
        self.num_fewshot = None if num_fewshot is None else int(num_fewshot)
        self.batch_size, self.include_path, self.seed, self.progress = batch_size, paths or None, int(seed), bool(progress)
        self._local_only = self.yaml_text is not None
        self.link = "identity"
        self.noisy = bool(noisy)
        self.last_results: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._lm: tuple[nn.Module, torch.device, Any] | None = None
        self._prepared: _Prepared | None = self._prepare()
        self.metric, self.metric_key = self._choose_metric(metric)
        self.sense = sense or self._default_sense()
        self._data = self._prepared.data
        # the requests are text: the tokenizer that turns them into tokens is part of what is scored
        self.fingerprint = content_digest("lm_eval", self.task, self.metric_key, self._data, _tokenizer_identity(tokenizer))

    # ------------------------------------------------------------------ preparation (once)
    def _manager(self):
        TaskManager, _ = _import_lm_eval()
        if self._local_only:  # a local YAML: index its folder alone (the built-in index costs seconds)
            manager = TaskManager(include_path=self.include_path, include_defaults=False)
            if self.task in manager.all_tasks:
                return manager
        return TaskManager(include_path=self.include_path)

    def _prepare(self) -> _Prepared:
        manager = self._manager()
        if self.task not in manager.all_tasks:
            close = [t for t in manager.all_tasks if self.task.split("_")[0] in t][:5]
            raise ValueError(f"lm-eval has no task {self.task!r}" + (f" (similar: {close})" if close else "")
                             + ("" if self.include_path else "; pass a task YAML path for a local task"))
        with _seeded(self.seed):
            try:
                loaded = manager.load([self.task])
            except Exception as error:  # noqa: BLE001 - name the task: lm-eval's own errors rarely do
                raise RuntimeError(f"lm-eval could not load task {self.task!r}: {type(error).__name__}: {error}") from error
            tasks, groups = dict(loaded["tasks"]), dict(loaded["groups"])
            if self.task not in tasks and self.task not in groups:
                raise ValueError(f"{self.task!r} is an lm-eval tag of {sorted(tasks)[:5]}...; name one task or group")
            requests: dict[str, list[Any]] = defaultdict(list)
            instances, docs, by_doc, data = [], {}, {}, []
            for name, item in tasks.items():
                self._configure(name, item)
                limit = None if self.limit is None else (math.ceil(len(item.eval_docs) * self.limit) if self.limit < 1 else int(self.limit))
                try:
                    item.build_all_requests(limit=limit, rank=0, world_size=1)
                except ValueError as error:
                    if "did not find any docs" in str(error):
                        raise ValueError(f"lm-eval task {name!r} has no documents to score (is its dataset empty?)") from error
                    raise
                docs[name] = list(item.doc_iterator(rank=0, limit=limit, world_size=1))
                grouped: dict[int, list[Any]] = defaultdict(list)
                for instance in item.instances:
                    grouped[instance.doc_id].append(instance)
                    requests[instance.request_type].extend([instance] * instance.repeats)
                    instances.append(instance)
                by_doc[name] = {doc_id: sorted(group, key=lambda x: x.idx) for doc_id, group in grouped.items()}
                _remember_per_document(item)
                data.append((name, item.OUTPUT_TYPE, str(item.VERSION), [inst.arguments for inst in item.instances],
                             [doc for _, doc in docs[name]]))
        ordered: list[Any] = []

        def visit(group: Any) -> None:  # children before parents, each once
            for child in group.get_all_groups(recursive=False):
                visit(child)
            if all(group is not g for g in ordered):
                ordered.append(group)

        for group in groups.values():
            visit(group)
        digest = content_digest(self.yaml_text, sorted(data, key=lambda d: d[0]), sorted(g.name for g in ordered), size=16)
        return _Prepared(tasks, ordered, dict(requests), instances, docs, by_doc, digest)

    def _configure(self, name: str, item: Any) -> None:
        """What ``simple_evaluate`` does to a task before building its requests."""
        if getattr(item, "UNSAFE_CODE", False):
            raise ValueError(f"lm-eval task {name!r} runs untrusted code; LMEvalTask does not run such tasks")
        if getattr(item, "MULTIMODAL", False):
            raise ValueError(f"lm-eval task {name!r} needs a multimodal model; LMEvalTask scores causal language models")
        configured = item.get_config("num_fewshot")
        if self.num_fewshot is not None:
            if configured != 0:  # lm-eval never overrides a task that pins zero shots
                item.set_config(key="num_fewshot", value=self.num_fewshot)
        elif configured is None:
            item.set_config(key="num_fewshot", value=0)
        item.set_fewshot_seed(seed=self.seed)

    def _reported(self) -> dict[str, tuple[list[str], Any]]:
        """metric -> (filters, higher_is_better) of the task (or group) named ``self.task``."""
        prepared = self._prepared
        if self.task in prepared.tasks:
            item = prepared.tasks[self.task]
            filters = [f.name for f in getattr(item, "_filters", [])] or ["none"]
            better = item.higher_is_better() or {}
            return {m: (filters, better.get(m)) for m in list(dict.fromkeys([*item.aggregation(), *better]))}
        group = next(g for g in prepared.groups if g.name == self.task)
        leaves = [t.task_name for t in group.get_all_tasks()]
        out = {}
        for config in group.aggregate_metric_list or []:
            filters = config.filter_list or sorted({f.name for n in leaves for f in getattr(prepared.tasks[n], "_filters", [])} or {"none"})
            votes = {prepared.tasks[n].higher_is_better().get(config.metric) for n in leaves if n in prepared.tasks}
            out[config.metric] = (list(filters), votes.pop() if len(votes) == 1 else None)
        if not out:
            raise ValueError(f"lm-eval group {self.task!r} defines no aggregate metric; name one of its tasks instead ({leaves[:5]})")
        return out

    def _choose_metric(self, metric: str | None) -> tuple[str, str]:
        reported = self._reported()
        name, _, chosen = (metric or "").partition(",")
        if not name:
            name = next((m for m in _PREFERRED if m in reported), next(iter(reported)))
        if name not in reported:
            raise ValueError(f"task {self.task!r} does not report metric {name!r}; it reports {sorted(reported)}")
        filters = reported[name][0]
        if chosen and chosen not in filters:
            raise ValueError(f"task {self.task!r} has no filter {chosen!r} for metric {name!r}; its filters are {filters}")
        chosen = chosen or ("none" if "none" in filters else filters[0])
        return name, f"{name},{chosen}"

    @property
    def metric_name(self) -> str:
        """What the metric is, for figures' labels (``"lm-eval accuracy"``)."""
        return f"lm-eval {_SPELLED.get(self.metric, self.metric)}"

    @property
    def metric_unit(self) -> str | None:
        """The metric's unit (``"bits/byte"``), ``None`` for a unitless one (accuracy)."""
        return _UNITS.get(self.metric)

    def _default_sense(self) -> str:
        better = self._reported()[self.metric][1]
        if better is None:
            raise ValueError(f"lm-eval does not say whether a higher {self.metric!r} of task {self.task!r} is better; "
                             "pass sense='max' or sense='min'")
        return "max" if better else "min"

    # ------------------------------------------------------------------ evaluation (per call)
    def __call__(self, model: nn.Module) -> float:
        with self._lock:  # the prepared requests hold one call's answers at a time
            prepared = self._ensure_prepared()
            lm = self._wrap(model)
            was_training = model.training
            model.eval()
            try:
                for instance in prepared.instances:
                    instance.resps, instance.filtered_resps = [], {}
                for kind, requests in prepared.requests.items():
                    with self._generation_seed(kind, model):
                        answers = getattr(lm, kind)(requests, disable_tqdm=not self.progress)
                    for answer, request in zip(answers, requests, strict=True):
                        request.resps.append(answer)
                results = self._score(prepared)[self.task]
            except Exception as error:  # noqa: BLE001 - name the task: lm-eval's own errors rarely do
                raise RuntimeError(f"lm-eval failed on task {self.task!r}: {type(error).__name__}: {error}") from error
            finally:
                model.train(was_training)
        self.last_results = results
        value = results.get(self.metric_key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ValueError(f"metric {self.metric_key!r} of task {self.task!r} is {value!r}, not a number")
        return float(value)

    @contextmanager
    def _generation_seed(self, kind: str, model: nn.Module) -> Iterator[None]:
        if kind != "generate_until":  # likelihoods are deterministic
            yield
            return
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            yield

    def _score(self, prepared: _Prepared) -> dict[str, dict[str, Any]]:
        """``{task or group: {"metric,filter": value, "sample_len": n, ...}}`` as lm-eval reports them."""
        from lm_eval.api.metrics import mean

        metrics: dict[str, dict[str, Any]] = {}
        for name, item in prepared.tasks.items():
            item.apply_filters()
            raw: dict[tuple[str, str], list] = defaultdict(list)
            by_doc = prepared.by_doc[name]
            for filter_key in item.instances[0].filtered_resps:
                for doc_id, doc in prepared.docs[name]:
                    answers = [request.filtered_resps[filter_key] for request in by_doc[doc_id]]
                    for metric, value in item.process_results(doc, answers).items():
                        raw[(metric, filter_key)].append(value)
            aggregation = item.aggregation()
            out: dict[str, Any] = {"name": name, "sample_len": 0}
            for (metric, filter_key), items in raw.items():
                out[f"{metric},{filter_key}"] = aggregation.get(metric, mean)(items)
                out[f"{metric}_stderr,{filter_key}"] = "N/A"
                out["sample_len"] = max(out["sample_len"], len(items))
            metrics[name] = out
        for group in prepared.groups:
            metrics[group.name] = group.aggregate(metrics)
        return metrics

    def _ensure_prepared(self) -> _Prepared:
        if self._prepared is None:  # unpickled: rebuild here, once, and check it is the same task
            _import_lm_eval()
            prepared = self._prepare()
            if prepared.data != self._data:
                raise ValueError(f"lm-eval task {self.task!r} built here differs from where this LMEvalTask was made (other data "
                                 "files or another lm-eval version on this machine?); its results would not be comparable")
            self._prepared = prepared
        return self._prepared

    def _wrap(self, model: nn.Module) -> Any:
        """lm-eval's ``HFLM`` around the live model: one per model object and device, reused
        (it reads the weights as they are at each call)."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if self._lm is not None and self._lm[0] is model and self._lm[1] == device:
            return self._lm[2]
        _, HFLM = _import_lm_eval()
        self._lm = None
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(device))
        self._lm = (model, device, lm)
        return lm

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_prepared"], state["_lm"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def num_documents(self) -> int:
        """Documents scored per evaluation (all subtasks of a group)."""
        return sum(len(d) for d in self._ensure_prepared().docs.values())

    def __repr__(self) -> str:
        return (f"LMEvalTask({self.task!r}, limit={self.limit}, num_fewshot={self.num_fewshot}, metric={self.metric_key!r}, "
                f"sense={self.sense!r})")


def _remember_per_document(item: Any) -> None:
    """Cache what ``process_results`` derives from a document alone (its target, choices, text:
    lm-eval renders each from its Jinja template, compiling the template on every call) for the
    task's own document objects, so that an evaluation pays for the model's answers only."""
    for name in ("doc_to_target", "doc_to_choice", "doc_to_text"):
        method = getattr(item, name, None)
        if method is None:
            continue
        cache: dict[int, tuple[Any, Any]] = {}

        def remembered(doc: Any, *args: Any, _method: Any = method, _cache: dict = cache, **kwargs: Any) -> Any:
            if args or kwargs:
                return _method(doc, *args, **kwargs)
            hit = _cache.get(id(doc))
            if hit is None or hit[0] is not doc:
                hit = _cache[id(doc)] = (doc, _method(doc))  # the document is kept: its id stays its own
            value = hit[1]
            return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value

        setattr(item, name, remembered)


def _tokenizer_identity(tokenizer: Any) -> str:
    """Digest of what a tokenizer does: its class, its full definition (a fast tokenizer's JSON,
    else its vocabulary), its special tokens and settings lm-eval reads."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        definition: Any = backend.to_str() if backend is not None else None
    except Exception:  # noqa: BLE001 - fall back to the vocabulary
        definition = None
    if definition is None:
        vocab = getattr(tokenizer, "get_vocab", None)
        definition = sorted(vocab().items()) if callable(vocab) else type(tokenizer).__qualname__
    special = {str(k): v for k, v in dict(getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    settings = [getattr(tokenizer, name, None) for name in ("padding_side", "truncation_side", "add_bos_token", "add_eos_token")]
    return content_digest(type(tokenizer).__qualname__, definition, special, [s if isinstance(s, (str, bool)) else None for s in settings],
                          size=16)


def _yaml_task_name(path: Path) -> str:
    import yaml

    class _Loader(yaml.SafeLoader):  # lm-eval YAMLs use !function tags: read the name, not the functions
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load(path.read_text(), Loader=_Loader) or {}
    name = config.get("task") if isinstance(config, dict) else None
    if not name:
        raise ValueError(f"task YAML {path} has no 'task:' field naming the task")
    return str(name)
