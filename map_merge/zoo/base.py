"""What every model zoo shares: task data, per-task heads, cached fine-tuned encoders, objectives.

A zoo holds one pretrained *encoder* and, per task, a fine-tuned copy of it plus the task's own
classification head. Task vectors are encoder deltas; a merged encoder is scored on task ``t``
with head ``t``. Zoos are built by :mod:`map_merge.zoo.text` and :mod:`map_merge.zoo.vision`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..groups import Groups
from ..merge_methods import MergeMethod
from ..moe.pareto_moe import CORNERS, ROUTER_STEPS
from ..objective import ModelObjective, Task
from ..store import EvaluationStore, as_store
from ..task_vectors import TaskVectors
from .cache_files import load_zoo_weights, save_zoo_weights  # noqa: F401  (the zoos import them from here)

__all__ = ["Split", "ZooTask", "Zoo", "ZooObjective", "cache_root"]

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where zoos are cached: ``$MAP_MERGE_CACHE`` or ``~/.cache/map_merge``."""
    return Path(os.environ.get("MAP_MERGE_CACHE") or Path.home() / ".cache" / "map_merge")


@dataclass
class Split:
    """Model inputs (a dict of tensors with a leading example axis) and integer labels ``(N,)``."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        out = []
        for start in range(0, len(self), batch_size):
            sl = slice(start, start + batch_size)
            out.append(({k: v[sl] for k, v in self.inputs.items()}, self.labels[sl]))
        return out


@dataclass
class ZooTask:
    """One task: its splits, its head and class names."""

    name: str
    classes: list[str]
    splits: dict[str, Split]
    head: nn.Module
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class ZooObjective:
    """The objective every zoo gives (:meth:`objective`; a base of :class:`Zoo` and
    :class:`~map_merge.zoo.lm_zoo.LMZoo`), made of what each zoo says: its metrics
    (``_scored_tasks``), where its task vectors merge (``_vector_options``), its live model
    (``_live_model``) and its store key (``_store_key``)."""

    default_metric = "accuracy"
    """The metric :meth:`objective` scores unless told otherwise."""

    def objective(
        self,
        names: Sequence[str] | None = None,
        split: str = "val",
        metric: str | None = None,
        method: str | MergeMethod | None = None,
        store: EvaluationStore | str | os.PathLike | None = None,
        task_vectors: TaskVectors | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        scored: Sequence[str] | None = None,
        groups: Groups | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> ModelObjective:
        """A :class:`~map_merge.ModelObjective` merging the named tasks' vectors (``task_vectors``:
        given ones, of those tasks in that order) into one live model and scoring ``scored``
        (default: the same tasks) on ``split`` by ``metric`` (default :attr:`default_metric`): for
        the vision and text zoos ``"accuracy"`` (max, sigmoid link, ``noisy``: an estimate from a
        few hundred examples, so MAP's picks score real evaluations by the model) or ``"loss"``
        (min, softplus link); for the LM zoo ``"loss"``, held-out loss (min, softplus link), or ``"lm_eval"``,
        multiple-choice accuracy (max). Results are kept in ``store`` (a path or a store);
        ``groups``: coefficient groups; ``device``: where the live model runs; ``dtype``: its dtype
        (the LM zoo; default its ``eval_dtype``)."""
        metric = self.default_metric if metric is None else metric
        names = self._names(names)
        scored_names = self._names(scored) if scored is not None else names
        tv = task_vectors if task_vectors is not None else self.task_vectors(names, **self._vector_options(device))
        if list(tv.names) != names:
            raise ValueError(f"task vectors are for {list(tv.names)}, objective asked for {names}")
        tasks = self._scored_tasks(scored_names, split, metric)
        return ModelObjective(self._live_model(tv, device, dtype), tv, tasks, method=method, store=as_store(store),
                              key=self._store_key(split, metric, dtype), progress=progress, groups=groups)

    # what each zoo says
    def _names(self, names: Sequence[str] | None) -> list[str]:
        raise NotImplementedError

    def task_vectors(self, names: Sequence[str] | None = None, **options: Any) -> TaskVectors:
        raise NotImplementedError

    def _scored_tasks(self, names: Sequence[str], split: str, metric: str) -> dict[str, Any]:
        """``name -> task`` scoring each of ``names`` on ``split`` by ``metric`` (ValueError naming a bad one)."""
        raise NotImplementedError

    def _vector_options(self, device: str | torch.device | None) -> dict[str, Any]:
        """Options of :meth:`task_vectors` for an objective running on ``device``."""
        raise NotImplementedError

    def _live_model(self, tv: TaskVectors, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
        raise NotImplementedError

    def _store_key(self, split: str, metric: str, dtype: torch.dtype | None) -> str:
        raise NotImplementedError


@dataclass
class Zoo(ZooObjective):
    """A pretrained encoder, fine-tuned encoders (state dicts) and tasks.

    Attributes:
        name: zoo name.  pretrained: the pretrained encoder.  finetuned: ``task -> state dict``.
        tasks: ``task -> ZooTask``.  features: ``features(encoder, inputs) -> (B, D)``.
        info: build statistics and the per-task report.  upcycle: PWE-MoE's upcycling pattern.
    """

    name: str
    pretrained: nn.Module
    finetuned: dict[str, dict[str, torch.Tensor]]
    tasks: dict[str, ZooTask]
    features: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    eval_batch_size: int = 128
    info: dict[str, Any] = field(default_factory=dict)
    upcycle: str = "mlp"  # which encoder modules PWE-MoE turns into routed experts (see ParetoMoE)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def _names(self, names: Sequence[str] | None) -> list[str]:
        names = list(names) if names is not None else list(self.tasks)
        unknown = [n for n in names if n not in self.tasks]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown} in zoo {self.name!r}; it has {list(self.tasks)}")
        return names

    def task_vectors(self, names: Sequence[str] | None = None, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TaskVectors:
        """Task vectors of the named tasks' fine-tuned encoders."""
        names = self._names(names)
        return TaskVectors.from_models(self.pretrained, {n: self.finetuned[n] for n in names}, device=device, dtype=dtype)

    def new_encoder(self, device: str | torch.device | None = None) -> nn.Module:
        """A fresh copy of the pretrained encoder (e.g. the live model of an objective)."""
        model = copy.deepcopy(self.pretrained)
        return model.to(device) if device is not None else model

    def _logits(self, encoder: nn.Module, task: str, split: str):
        """Yield ``(logits, labels)`` batches of ``encoder`` with ``task``'s head on one split."""
        zoo_task = self.tasks[task]
        device = next(encoder.parameters()).device
        head = zoo_task.head.to(device)
        with torch.inference_mode():
            for inputs, labels in zoo_task.splits[split].batches(self.eval_batch_size):
                inputs = {k: v.to(device) for k, v in inputs.items()}
                yield head(self.features(encoder, inputs)), labels.to(device)

    def accuracy(self, encoder: nn.Module, task: str, split: str = "val") -> float:
        """Accuracy of ``encoder`` with ``task``'s head on one split."""
        correct = sum(int((logits.argmax(-1) == labels).sum()) for logits, labels in self._logits(encoder, task, split))
        return correct / len(self.tasks[task].splits[split])

    def evaluate_model(self, encoder: nn.Module, names: Sequence[str] | None = None, split: str = "test") -> np.ndarray:
        """``(len(names),)`` metrics of one model (the zoo's objective metric: accuracy here)."""
        return np.array([self.accuracy(encoder, n, split) for n in self._names(names)])

    def loss(self, encoder: nn.Module, task: str, split: str = "val") -> float:
        """Mean cross-entropy of ``encoder`` with ``task``'s head on one split."""
        total = sum(float(nn.functional.cross_entropy(logits, labels, reduction="sum")) for logits, labels in self._logits(encoder, task, split))
        return total / len(self.tasks[task].splits[split])

    def limit_split(self, split: str, num_examples: int | None) -> str:
        """Register the first ``num_examples`` of ``split`` (every task; a random subset, since
        splits are shuffled) as a split named ``"{split}[:{num_examples}]"`` and return its name;
        ``None`` returns ``split`` itself. Cheaper evaluations at the cost of resolution."""
        if num_examples is None:
            return split
        if int(num_examples) < 1:
            raise ValueError(f"num_examples must be at least 1, got {num_examples}")
        name = f"{split}[:{int(num_examples)}]"
        for task in self.tasks.values():
            if split not in task.splits:
                raise ValueError(f"task {task.name!r} has no split {split!r}; it has {list(task.splits)}")
            whole = task.splits[split]
            n = min(int(num_examples), len(whole))
            task.splits[name] = type(whole)({k: v[:n] for k, v in whole.inputs.items()}, whole.labels[:n])
        return name

    def train_loss(self, task: str, batch_size: int = 8, generator: torch.Generator | None = None) -> Callable[[nn.Module], torch.Tensor]:
        """``loss(encoder) -> scalar``: cross-entropy of ``task``'s head on a fresh random
        training minibatch of ``batch_size`` examples per call (PWE-MoE router training)."""
        zoo_task = self.tasks[self._names([task])[0]]
        data = zoo_task.splits["train"]
        generator = generator if generator is not None else torch.Generator().manual_seed(0)

        def loss(encoder: nn.Module) -> torch.Tensor:
            index = torch.randint(0, len(data), (batch_size,), generator=generator)
            inputs = {k: v[index] for k, v in data.inputs.items()}
            if "attention_mask" in inputs:  # trim padding to the longest example of the batch
                width = int(inputs["attention_mask"].sum(1).max())
                inputs = {k: v[:, :width] for k, v in inputs.items()}
            return nn.functional.cross_entropy(zoo_task.head(self.features(encoder, inputs)), data.labels[index])

        return loss

    def fit_moe(
        self,
        names: Sequence[str] | None = None,
        method: str = "ls",
        steps: int = ROUTER_STEPS,
        batch_size: int = 8,
        lr: float = 1e-2,
        init_lambda: float = 0.3,
        seed: int = 0,
        checkpoint: str | os.PathLike | None = None,
        progress: bool = True,
        corners: float = CORNERS,
    ):
        """Build a :class:`~map_merge.moe.ParetoMoE` over the named tasks and train its routers
        (``method`` ``"ls"`` or ``"epo"``) on training minibatches. With ``checkpoint`` (a folder),
        trained routers are saved there under a key of every setting and re-used on the next call.

        Returns ``(moe, info)``; ``info`` as :meth:`ParetoMoE.fit_or_load`, plus the batch size
        and the settings' key. ``corners``: share of steps at a one-task preference."""
        names = self._names(names)
        return fit_cached_moe(self.pretrained, self.task_vectors(names), names, self.train_loss, upcycle=self.upcycle, method=method,
                              steps=steps, batch_size=batch_size, lr=lr, init_lambda=init_lambda, seed=seed, corners=corners,
                              checkpoint=checkpoint, progress=progress, key_settings=[self.upcycle], prefix="moe_routers")

    def moe_objective(self, moe, names: Sequence[str] | None = None, split: str = "val", store: EvaluationStore | str | os.PathLike | None = None,
                      progress: bool = True):
        """An objective over *preference vectors* ``(K, T)``: accuracies ``(K, T)`` of the dense
        models ``moe.unload(r)`` (results kept in ``store`` under the routers' key; noisy estimates,
        as the zoo's own accuracy objective)."""
        names = self._names(names)
        key = json.dumps({"zoo": self.name, "split": split, "data": self.info.get("data_hash", "")})
        tasks = {n: (lambda model, n=n: self.accuracy(model, n, split)) for n in names}
        return moe.objective(tasks, key=key, store=as_store(store), progress=progress, noisy=[True] * len(names))

    def _scored_tasks(self, names: Sequence[str], split: str, metric: str) -> dict[str, Task]:
        """``metric``: accuracy (max, sigmoid link) or loss (min, softplus link) on ``split``."""
        if metric not in ("accuracy", "loss"):
            raise ValueError(f"metric must be 'accuracy' or 'loss', got {metric!r}")
        tasks = {}
        for name in names:
            if metric == "accuracy":
                # an estimate from a few hundred examples: noisy (see objective's docstring)
                tasks[name] = Task(lambda m, n=name: self.accuracy(m, n, split), sense="max", link="sigmoid", metric_name="accuracy",
                                   noisy=True)
            else:
                tasks[name] = Task(lambda m, n=name: self.loss(m, n, split), sense="min", link="softplus", metric_name="cross-entropy",
                                   metric_unit="nats")
        return tasks

    def _vector_options(self, device: str | torch.device | None) -> dict[str, Any]:
        return {"device": device}  # merged where the objective runs

    def _live_model(self, tv: TaskVectors, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
        if dtype is not None:
            raise TypeError(f"the {self.name!r} zoo's objective takes no dtype (its encoders are fp32)")
        return self.new_encoder(tv.device)

    def _store_key(self, split: str, metric: str, dtype: torch.dtype | None) -> str:
        return json.dumps({"zoo": self.name, "split": split, "metric": metric, "data": self.info.get("data_hash", "")})

    def evaluate_coeffs(self, coeffs: np.ndarray, names: Sequence[str] | None = None, split: str = "test", method: str | MergeMethod | None = None,
                        groups: Groups | None = None) -> np.ndarray:
        """Accuracies ``(K, M)`` of merged encoders on a split (no store; e.g. test-set reports)."""
        names = self._names(names)
        tv = self.task_vectors(names)
        encoder = self.new_encoder()
        out = np.zeros((len(np.atleast_2d(coeffs)), len(names)))
        for i, c in enumerate(np.atleast_2d(coeffs)):
            tv.merge_into(encoder, c, method, groups=groups)
            encoder.eval()
            out[i] = [self.accuracy(encoder, n, split) for n in names]
        return out


def fit_cached_moe(model: nn.Module, tv: TaskVectors, names: Sequence[str], train_loss: Callable[..., Callable], *, upcycle: Any,
                   method: str, steps: int, batch_size: int, lr: float, init_lambda: float, seed: int, corners: float,
                   checkpoint: str | os.PathLike | None, progress: bool, key_settings: Sequence[Any], prefix: str):
    """A zoo's PWE-MoE: :class:`~map_merge.moe.ParetoMoE` over ``model`` and ``tv``, its routers
    trained on ``train_loss(name, batch_size, generator)`` per task, or loaded from
    ``checkpoint/<prefix>_<names>_<method>_<key>.pt`` where ``key`` hashes every setting (plus
    ``key_settings``). Returns ``(moe, info)``."""
    from ..moe import ParetoMoE

    moe = ParetoMoE(model, tv, upcycle=upcycle, init_lambda=init_lambda, seed=seed)
    settings = [tv.fingerprint(), method, steps, batch_size, lr, init_lambda, seed, *key_settings, corners]
    key = hashlib.blake2b(json.dumps(settings).encode(), digest_size=8).hexdigest()
    path = Path(checkpoint) / f"{prefix}_{'-'.join(names)}_{method}_{key}.pt" if checkpoint is not None else None
    generator = torch.Generator().manual_seed(seed)
    losses = {n: train_loss(n, batch_size, generator) for n in names}
    info = moe.fit_or_load(losses, path, steps=steps, method=method, lr=lr, seed=seed, corners=corners, progress=progress)
    return moe, {**info, "batch_per_task": batch_size, "key": key}


BUILD_THREADS = 1
"""Torch CPU threads the vision zoo trains with, whatever the caller's (a constant: the cache's
name carries its version): a float sum split over more threads rounds differently, so the weights
(and every score of the zoo) would depend on who built the cache first (a notebook on torch's
default of one thread per core, a 1-thread test worker or benchmark)."""


@contextmanager
def build_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch CPU threads, restored after (``None``: nothing is set)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def finetune(
    encoder: nn.Module,
    head: nn.Module,
    features: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor],
    data: Split,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    frozen: Callable[[str], bool] | None = None,
    desc: str = "fine-tuning",
    progress: bool = True,
) -> list[float]:
    """Train ``encoder`` and ``head`` jointly with AdamW and cross-entropy (in place).

    Parameters whose name satisfies ``frozen`` stay fixed. Returns the loss per step."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    for name, param in encoder.named_parameters():
        param.requires_grad_(not (frozen and frozen(name)))
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    encoder.train()
    head.train()
    losses = []
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            for start in range(0, len(data), batch_size):
                index = order[start : start + batch_size]
                inputs = {k: v[index] for k, v in data.inputs.items()}
                logits = head(features(encoder, inputs))
                loss = nn.functional.cross_entropy(logits, data.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    encoder.eval()
    head.eval()
    for param in encoder.parameters():
        param.requires_grad_(True)
    return losses
