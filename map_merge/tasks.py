"""Task adapters: ready-made metrics for :class:`~map_merge.ModelObjective`.

Each is a callable ``metric(model) -> float`` that also carries its ``sense`` (``"max"`` or
``"min"``), the surrogate ``link`` that suits its values, and a ``fingerprint`` of the data it
scores on (mixed into the evaluation store's key, so new data never reuse old results). Pass
them as the values of ``tasks``::

    objective = mm.ModelObjective(model, tv, {
        "code": mm.HeldOutLoss(code_texts, tokenizer, max_length=512),
        "arc":  mm.LMEvalTask("arc_easy", tokenizer=tokenizer, limit=200),  # lm-evaluation-harness, live model
    })

Evaluation runs on the model's device, in inference mode, in batches; long evaluations show a
progress bar (``progress=True``).

- :class:`HeldOutLoss`: mean token cross-entropy (or perplexity) of a causal LM on given texts.
- :class:`Classification`: accuracy (or cross-entropy) of an encoder plus a fixed task head on
  labelled texts (what the bundled text zoo does).
- :class:`LMEvalTask`: any lm-evaluation-harness task (a registered name or a local task YAML
  with local data files, which is how it runs offline) on the merged model held in memory
  (:mod:`map_merge.lm_eval_task`).

Fingerprints hash every byte of the data (token ids, labels, a head's parameters and buffers,
lm-eval's documents and requests; :func:`~map_merge.fingerprint.content_digest`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .fingerprint import content_digest
from .lm_eval_task import LMEvalTask

__all__ = ["HeldOutLoss", "Classification", "LMEvalTask", "chunked_cross_entropy", "load_texts"]


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


def _callable_digest(fn: Callable) -> str:
    try:
        return content_digest("callable", fn)
    except TypeError:  # not hashable by content: its name (logged)
        logging.getLogger(__name__).warning("the pooling function %r cannot be fingerprinted by content; keyed by its name", fn)
        return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


class HeldOutLoss:
    """Mean token cross-entropy of a causal LM on held-out texts (sense ``"min"``).

    The texts are tokenized once (truncated to ``max_length`` tokens); each evaluation is forward
    passes only. The loss is the mean over all predicted tokens of all texts (token-weighted): the
    model's logits at position t score token t + 1; padding is never scored.

    The cross-entropy is computed from the logits in the model's dtype, a chunk of positions at
    a time, with fp32 arithmetic and float64 accumulation: besides the logits themselves, the
    loss holds at most one chunk in fp32 (a batch's full ``B x L x V`` logits are never copied).

    Args:
        texts: strings, or a ``.txt`` / ``.jsonl`` / ``.json`` file (see :func:`load_texts`).
        tokenizer: a Hugging Face tokenizer (needs a pad token, or an eos token to pad with).
        max_length: tokens per text at most.
        batch_size: texts per forward pass.
        perplexity: report ``exp(loss)`` instead of the loss.
        link: surrogate link (``"softplus"`` for a positive loss, or ``"identity"``).
        progress: a progress bar over batches.
        chunk_size: positions per fp32 chunk (default: as many as fit ``2**24`` logits, 64 MiB).
    """

    sense = "min"

    def __init__(self, texts: str | os.PathLike | Sequence[str], tokenizer: Any, max_length: int = 512, batch_size: int = 8,
                 perplexity: bool = False, link: str = "softplus", progress: bool = False, chunk_size: int | None = None) -> None:
        if int(max_length) < 2:
            raise ValueError(f"max_length must be at least 2 tokens (one to predict from, one to score), got {max_length}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be at least 1 position, got {chunk_size}")
        self.chunk_size = None if chunk_size is None else int(chunk_size)
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
            self._batches.append(pad_token_ids([ids[i] for i in order[start : start + self.batch_size]]))
        self.num_tokens = scored
        self.fingerprint = content_digest("held_out_loss", ids, self.max_length, self.perplexity)

    @property
    def metric_name(self) -> str:
        """What the metric is, for figures' labels."""
        return "held-out perplexity" if self.perplexity else "held-out loss"

    @property
    def metric_unit(self) -> str | None:
        """``"nats/token"`` for the loss; perplexity has no unit."""
        return None if self.perplexity else "nats/token"

    def __call__(self, model: nn.Module) -> float:
        device = _device_of(model)
        total = torch.zeros((), dtype=torch.float64, device=device)
        with torch.inference_mode():
            for input_ids, mask in tqdm(self._batches, desc="held-out loss", disable=not self.progress, leave=False):
                input_ids, mask = input_ids.to(device), mask.to(device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, L, V), the model's dtype
                # position t scores token t + 1; each row's last position and padding score nothing
                targets = torch.full_like(input_ids, -1)
                targets[:, :-1] = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -1)
                total += chunked_cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), self.chunk_size)
        loss = float(total) / self.num_tokens
        return math.exp(loss) if self.perplexity else loss

    def __repr__(self) -> str:
        return f"HeldOutLoss({len(self.texts)} texts, {self.num_tokens} scored tokens, max_length={self.max_length})"


def pad_token_ids(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids: (B, L)`` and ``attention_mask: (B, L)`` (int64) of ``B`` token-id
    lists, ``L`` the longest; padding holds ``pad_id`` and mask 0."""
    width = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, x in enumerate(rows):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask


def chunked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Summed cross-entropy ``sum_i logsumexp(logits_i) - logits_i[targets_i]`` over the rows whose
    target is not negative, as a float64 scalar.

    ``logits: (N, V)`` stay in their dtype (a contiguous view is never copied whole); each chunk of
    ``chunk_size`` rows (default: ``2**24 // V``) is taken to fp32 once and reduced in place, so
    the only fp32 copy alive is one chunk. ``targets: (N,)`` class indices, negative to skip."""
    rows, vocab = logits.shape
    step = max(1, (1 << 24) // max(vocab, 1)) if chunk_size is None else int(chunk_size)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, rows, step):
        target = targets[start : start + step]
        keep = target >= 0
        if not bool(keep.any()):
            continue
        view = bool(keep.all())
        chunk = logits[start : start + step] if view else logits[start : start + step][keep]  # a view, or a copy of the kept rows
        target = target[keep]
        picked = chunk.gather(1, target[:, None]).squeeze(1).float()
        work = chunk.float()  # the one fp32 chunk (the copy itself when the logits are fp32 and rows were dropped)
        if view and work.data_ptr() == chunk.data_ptr():
            work = work.clone()  # fp32 logits: reduce a copy, never the model's output in place
        peak = work.amax(dim=1, keepdim=True)
        lse = work.sub_(peak).exp_().sum(dim=1).log_() + peak.squeeze(1)
        total += (lse - picked).sum(dtype=torch.float64)
    return total


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
        noisy: whether the score is a noisy estimate (MAP's picks then score real evaluations
            by the model at them). Default ``None``: accuracy is (right or wrong on N examples:
            a standard error of about 2.5 points at N = 300), the cross-entropy is not.
    """

    def __init__(self, texts: Sequence[str], labels: Sequence[int], tokenizer: Any, head: nn.Module,
                 pooling: str | Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] = "mean", metric: str = "accuracy",
                 max_length: int = 128, batch_size: int = 32, progress: bool = False, noisy: bool | None = None) -> None:
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
        if noisy is not None and not isinstance(noisy, (bool, np.bool_)):
            raise ValueError(f"noisy must be True, False or None, got {noisy!r}")
        self.noisy = (metric == "accuracy") if noisy is None else bool(noisy)
        self.head, self.pooling, self.metric = head, pooling, metric
        self.sense = "max" if metric == "accuracy" else "min"
        self.link = "sigmoid" if metric == "accuracy" else "softplus"
        self.batch_size, self.progress = int(batch_size), progress
        self.inputs = dict(tokenizer(texts, truncation=True, max_length=int(max_length), padding=True, return_tensors="pt"))
        self.labels = labels
        pooled = pooling if isinstance(pooling, str) else _callable_digest(pooling)  # a function by its content, not its name
        # every byte of the inputs, labels and the head's parameters and buffers (never their repr)
        self.fingerprint = content_digest("classification", self.inputs, labels, metric, pooled, head.state_dict())

    @property
    def metric_name(self) -> str:
        """What the metric is, for figures' labels."""
        return "accuracy" if self.metric == "accuracy" else "cross-entropy"

    @property
    def metric_unit(self) -> str | None:
        """``"nats"`` for the cross-entropy; accuracy is a fraction in [0, 1]."""
        return None if self.metric == "accuracy" else "nats"

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
