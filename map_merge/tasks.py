"""Task adapters: ready-made metrics for :class:`~map_merge.ModelObjective`.

Each is a callable ``metric(model) -> float`` that also carries its ``sense`` (``"max"`` or
``"min"``), the surrogate ``link`` that suits its values, and a ``fingerprint`` of the data it
scores on (mixed into the evaluation store's key, so new data never reuse old results). Pass
them as the values of ``tasks``::

    objective = mm.ModelObjective(model, tv, {
        "code": mm.HeldOutLoss(code_texts, tokenizer, max_length=512),
        "arc":  mm.LMEvalTask("arc_easy", limit=200),            # lm-evaluation-harness, live model
    })

Evaluation runs on the model's device, in inference mode, in batches; long evaluations show a
progress bar (``progress=True``).

- :class:`HeldOutLoss`: mean token cross-entropy (or perplexity) of a causal LM on given texts.
- :class:`Classification`: accuracy (or cross-entropy) of an encoder plus a fixed task head on
  labelled texts (what the bundled text zoo does).
- :class:`LMEvalTask`: any lm-evaluation-harness task (a registered name or a local task YAML
  with local data files, which is how it runs offline) on the merged model held in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["HeldOutLoss", "Classification", "LMEvalTask", "load_texts"]


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def load_texts(source: str | os.PathLike | Sequence[str], field: str = "text") -> list[str]:
    """Texts from a list, a ``.txt`` file (one per line), or a ``.jsonl`` / ``.json`` file (the
    ``field`` of each record). Empty texts are dropped; none left is an error."""
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix in (".txt", ".jsonl", ".json"):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"text file {path} does not exist")
        if path.suffix == ".txt":
            texts = path.read_text().splitlines()
        else:
            lines = path.read_text().splitlines() if path.suffix == ".jsonl" else None
            records = [json.loads(line) for line in lines if line.strip()] if lines is not None else json.loads(path.read_text())
            missing = [i for i, r in enumerate(records) if not isinstance(r, Mapping) or field not in r]
            if missing:
                raise ValueError(f"record {missing[0]} of {path} has no field {field!r}")
            texts = [str(r[field]) for r in records]
    elif isinstance(source, str):
        raise ValueError(f"texts must be a list of strings or a .txt/.jsonl/.json file, got the string {source[:40]!r}")
    else:
        texts = [str(t) for t in source]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"no texts to score in {source if isinstance(source, (str, os.PathLike)) else 'the given list'}")
    return texts


def _digest(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class HeldOutLoss:
    """Mean token cross-entropy of a causal LM on held-out texts (sense ``"min"``).

    The texts are tokenized once (truncated to ``max_length`` tokens); each evaluation is forward
    passes only. The loss is the mean over all predicted tokens of all texts (token-weighted): the
    model's logits at position t score token t + 1; padding is never scored.

    Args:
        texts: strings, or a ``.txt`` / ``.jsonl`` / ``.json`` file (see :func:`load_texts`).
        tokenizer: a Hugging Face tokenizer (needs a pad token, or an eos token to pad with).
        max_length: tokens per text at most.
        batch_size: texts per forward pass.
        perplexity: report ``exp(loss)`` instead of the loss.
        link: surrogate link (``"softplus"`` for a positive loss, or ``"identity"``).
        progress: a progress bar over batches.
    """

    sense = "min"

    def __init__(self, texts: str | os.PathLike | Sequence[str], tokenizer: Any, max_length: int = 512, batch_size: int = 8,
                 perplexity: bool = False, link: str = "softplus", progress: bool = False) -> None:
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 tokens (one to predict from, one to score), got {max_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.texts = load_texts(texts)
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.perplexity = bool(perplexity)
        self.link = link
        self.progress = progress
        encoded = tokenizer(self.texts, truncation=True, max_length=self.max_length, add_special_tokens=True)
        ids = [list(x) for x in encoded["input_ids"]]
        scored = sum(max(0, len(x) - 1) for x in ids)
        if scored == 0:
            raise ValueError("the texts give no token to score (each needs at least two tokens after tokenization)")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: little padding
        self._batches = []
        for start in range(0, len(order), self.batch_size):
            group = [ids[i] for i in order[start : start + self.batch_size]]
            width = max(len(x) for x in group)
            input_ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros(len(group), width, dtype=torch.long)
            for row, x in enumerate(group):
                input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, : len(x)] = 1
            self._batches.append((input_ids, mask))
        self.num_tokens = scored
        self.fingerprint = _digest("held_out_loss", ids, self.max_length, self.perplexity)

    def __call__(self, model: nn.Module) -> float:
        device = _device_of(model)
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for input_ids, mask in tqdm(self._batches, desc="held-out loss", disable=not self.progress, leave=False):
                input_ids, mask = input_ids.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
                targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum").double()
        loss = float(total) / self.num_tokens
        return math.exp(loss) if self.perplexity else loss

    def __repr__(self) -> str:
        return f"HeldOutLoss({len(self.texts)} texts, {self.num_tokens} scored tokens, max_length={self.max_length})"


class Classification:
    """Accuracy (sense ``"max"``) or cross-entropy (``"min"``) of an encoder with a fixed task
    head on labelled texts: ``head(pool(encoder(texts)))`` against ``labels``.

    Args:
        texts: the inputs.  labels: ``(N,)`` integer classes.
        tokenizer: a Hugging Face tokenizer.
        head: the task's classification head (not merged; kept as it is).
        pooling: ``"mean"`` (attention-masked mean of the last hidden state), ``"cls"`` (first
            token), or a callable ``pool(encoder, inputs) -> (B, H)``.
        metric: ``"accuracy"`` or ``"loss"``.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any, head: nn.Module,
                 pooling: str | Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = "mean", metric: str = "accuracy",
                 max_length: int = 128, batch_size: int = 32, progress: bool = False) -> None:
        texts = [str(t) for t in texts]
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if not texts:
            raise ValueError("no texts to classify")
        if labels.shape != (len(texts),):
            raise ValueError(f"got {len(texts)} texts but labels of shape {tuple(labels.shape)}")
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
        if isinstance(pooling, str) and pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean', 'cls' or a callable, got {pooling!r}")
        self.head, self.pooling, self.metric = head, pooling, metric
        self.sense = "max" if metric == "accuracy" else "min"
        self.link = "sigmoid" if metric == "accuracy" else "softplus"
        self.batch_size, self.progress = int(batch_size), progress
        self.inputs = dict(tokenizer(texts, truncation=True, max_length=int(max_length), padding=True, return_tensors="pt"))
        self.labels = labels
        self.fingerprint = _digest("classification", self.inputs["input_ids"], labels, metric,
                                   pooling if isinstance(pooling, str) else getattr(pooling, "__qualname__", "callable"),
                                   [p.detach() for p in head.parameters()])

    def _pool(self, encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if callable(self.pooling):
            return self.pooling(encoder, inputs)
        hidden = encoder(**inputs).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def __call__(self, encoder: nn.Module) -> float:
        device = _device_of(encoder)
        self.head.to(device).eval()
        correct, loss = 0, 0.0
        count = len(self.labels)
        with torch.inference_mode():
            for start in tqdm(range(0, count, self.batch_size), desc="classification", disable=not self.progress, leave=False):
                batch = {k: v[start : start + self.batch_size].to(device) for k, v in self.inputs.items()}
                width = int(batch["attention_mask"].sum(1).max())
                batch = {k: v[:, :width] for k, v in batch.items()}
                logits = self.head(self._pool(encoder, batch)).float()
                labels = self.labels[start : start + self.batch_size].to(device)
                correct += int((logits.argmax(-1) == labels).sum())
                loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
        return correct / count if self.metric == "accuracy" else loss / count


_LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "bpb", "loss", "ter")
_PREFERRED = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity", "perplexity", "bits_per_byte")


class LMEvalTask:
    """An lm-evaluation-harness task scored on the merged model in memory.

    The live model is wrapped as lm-eval's ``HFLM(pretrained=model, tokenizer=...)`` at each
    evaluation (never saved and reloaded). Offline, point ``task`` at a local task YAML whose
    ``dataset_path: json`` reads local ``data_files``; its folder becomes lm-eval's
    ``include_path``.

    Args:
        task: a registered task name, or the path of a task YAML (its ``task:`` field names it).
        limit: score the first ``limit`` documents only (``None``: all).
        num_fewshot: few-shot examples per prompt.
        metric: the reported metric to return (``"acc"``, ``"acc_norm"``, ``"word_perplexity"``...;
            default: the first of acc / acc_norm / exact_match / f1 / perplexities the task reports).
        batch_size: lm-eval's batch size.  tokenizer: the model's tokenizer (required).
        include_path: extra folder(s) of task YAMLs.
        sense: ``"max"`` / ``"min"``; default from the metric (perplexities, bits per byte: min).
    """

    def __init__(self, task: str | os.PathLike, tokenizer: Any = None, limit: int | float | None = None, num_fewshot: int = 0,
                 metric: str | None = None, batch_size: int = 8, include_path: str | os.PathLike | Sequence | None = None,
                 sense: str | None = None, seed: int = 0) -> None:
        if tokenizer is None:
            raise ValueError("LMEvalTask needs the model's tokenizer (tokenizer=...)")
        paths = [] if include_path is None else [str(p) for p in ([include_path] if isinstance(include_path, (str, os.PathLike)) else include_path)]
        path = Path(task)
        if str(task).endswith((".yaml", ".yml")):
            if not path.exists():
                raise FileNotFoundError(f"task YAML {path} does not exist")
            name = _yaml_task_name(path)
            paths.append(str(path.parent.resolve()))
            self.yaml_text = path.read_text()
        else:
            name, self.yaml_text = str(task), None
        self.task, self.tokenizer, self.limit, self.num_fewshot = name, tokenizer, limit, int(num_fewshot)
        self.metric, self.batch_size, self.include_path, self.seed = metric, batch_size, paths or None, seed
        self._sense = sense
        self.link = "identity"
        self.last_results: dict[str, Any] | None = None
        self.fingerprint = _digest("lm_eval", name, self.yaml_text, limit, self.num_fewshot, metric)

    @property
    def sense(self) -> str:
        if self._sense is not None:
            return self._sense
        return "min" if self.metric and any(word in self.metric for word in _LOWER_IS_BETTER) else "max"

    def __call__(self, model: nn.Module) -> float:
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError:
            raise ImportError("LMEvalTask needs lm-evaluation-harness: pip install 'map_merge[lm]' (or lm-eval)") from None
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=self.include_path)
        if self.task not in manager.all_tasks:
            close = [t for t in manager.all_tasks if self.task.split("_")[0] in t][:5]
            raise ValueError(f"lm-eval has no task {self.task!r}" + (f" (similar: {close})" if close else "")
                             + ("" if self.include_path else "; pass a task YAML path for a local task"))
        was_training = model.training
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, device=str(_device_of(model)))
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[self.task], num_fewshot=self.num_fewshot, limit=self.limit,
                                          task_manager=manager, log_samples=False, random_seed=self.seed, numpy_random_seed=self.seed,
                                          torch_random_seed=self.seed, fewshot_random_seed=self.seed, bootstrap_iters=0)
        except Exception as error:  # noqa: BLE001 - name the task: lm-eval's own errors rarely do
            raise RuntimeError(f"lm-eval failed on task {self.task!r}: {type(error).__name__}: {error}") from error
        finally:
            model.train(was_training)
        results = (out or {}).get("results", {}).get(self.task)
        if not results:
            raise ValueError(f"lm-eval returned no results for task {self.task!r} (is its dataset empty?)")
        self.last_results = results
        reported = {key.split(",")[0]: value for key, value in results.items() if "," in key and not key.split(",")[0].endswith("_stderr")}
        name = self.metric or next((m for m in _PREFERRED if m in reported), None)
        if name is None or name not in reported:
            raise ValueError(f"task {self.task!r} does not report metric {name!r}; it reports {sorted(reported)}")
        if self.metric is None:
            self.metric = name
        value = reported[name]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"metric {name!r} of task {self.task!r} is {value!r}, not a number")
        return float(value)

    def __repr__(self) -> str:
        return f"LMEvalTask({self.task!r}, limit={self.limit}, num_fewshot={self.num_fewshot}, metric={self.metric!r})"


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
