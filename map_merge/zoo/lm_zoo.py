"""The language-model zoo once built: its models, task vectors, metrics and objectives
(:class:`LMZoo`; built and cached by :func:`~map_merge.zoo.lm.load_lm_zoo`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..groups import Groups
from ..merge_methods import MergeMethod
from ..moe.pareto_moe import CORNERS, ROUTER_STEPS
from ..store import EvaluationStore, as_store
from ..task_vectors import TaskVectors
from .base import ZooObjective, fit_cached_moe
from .lm_sizes import LMZooSettings

__all__ = ["LMZoo"]


@dataclass
class LMZoo(ZooObjective):
    """A pretrained causal LM and its domain experts on disk, with their objectives.

    Attributes:
        folder: the zoo's cache folder.  base_path: the pretrained model's HF folder (bf16).
        experts: ``domain -> folder`` (a sharded bf16 HF folder or a PEFT LoRA adapter folder).
        kinds: ``domain -> "full" | "lora"``.  texts: ``domain -> split -> held-out texts``
        (``"val"``, ``"test"``).  choice_tasks: ``domain -> split -> lm-eval task YAML``.
        tokenizer: the zoo's tokenizer.  recipe: its :class:`LMZooSettings`.  info: build record
        (seconds, final training losses, sources, data hash).  device: where objectives evaluate.
        eval_dtype: the live model's dtype in objectives.
    """

    folder: Path
    base_path: Path
    experts: dict[str, Path]
    kinds: dict[str, str]
    texts: dict[str, dict[str, list[str]]]
    choice_tasks: dict[str, dict[str, Path]]
    tokenizer: Any
    recipe: LMZooSettings
    info: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_dtype: torch.dtype = torch.bfloat16
    name: str = "lm"
    train_texts: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _losses: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    default_metric = "loss"  # held-out loss; "lm_eval": multiple-choice accuracy (not a field)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self.experts)

    @property
    def description(self) -> str:
        """One line: the base model and the experts' kinds."""
        experts = ", ".join(f"{n} ({'LoRA' if self.kinds[n] == 'lora' else 'full fine-tune'})" for n in self.experts)
        return (f"a Llama pretrained here, {self.recipe.layers} layers, width {self.recipe.hidden}, vocabulary {self.recipe.vocab_size}; "
                f"experts: {experts}")

    def _names(self, names: Sequence[str] | None) -> list[str]:
        names = list(self.experts) if names is None else [str(n) for n in names]
        unknown = [n for n in names if n not in self.experts]
        if unknown or not names:
            raise ValueError(f"unknown or no domain(s) {unknown} in the lm zoo; it has {list(self.experts)}")
        return names

    @staticmethod
    def _split(split: str) -> str:
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        return split

    # ------------------------------------------------------------------ models
    def task_vectors(self, names: Sequence[str] | None = None, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> TaskVectors:
        """Task vectors of the named experts, read from their folders by
        ``TaskVectors.from_models(base folder, {name: folder})`` (streamed / LoRA / mixed)."""
        names = self._names(names)
        return TaskVectors.from_models(str(self.base_path), {n: str(self.experts[n]) for n in names}, device=device, dtype=dtype)

    def new_model(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """The pretrained model loaded from :attr:`base_path` (default: :attr:`device`,
        :attr:`eval_dtype`), in eval mode."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(self.base_path), dtype=dtype or self.eval_dtype)
        return model.to(device if device is not None else self.device).eval()

    def expert_model(self, name: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
        """Expert ``name`` as a full model (a one-hot merge of its task vector: the fine-tune itself,
        or the base with the LoRA update added)."""
        model = self.new_model(device, dtype)
        self.task_vectors([name]).merge_into(model, np.ones(1))
        return model

    # ------------------------------------------------------------------ metrics
    def held_out_loss(self, name: str, split: str = "val"):
        """A :class:`~map_merge.HeldOutLoss` on domain ``name``'s held-out texts of ``split``
        (mean token cross-entropy in nats, texts cut at ``recipe.max_length`` tokens)."""
        from ..tasks import HeldOutLoss

        key = (self._names([name])[0], self._split(split))
        if key not in self._losses:
            self._losses[key] = HeldOutLoss(self.texts[name][split], self.tokenizer, max_length=self.recipe.max_length, batch_size=16)
        return self._losses[key]

    def lm_eval_task(self, name: str, split: str = "val", limit: int | None = None, batch_size: int = 16):
        """A :class:`~map_merge.LMEvalTask` on domain ``name``'s multiple-choice questions of
        ``split`` (metric ``acc``, sense max)."""
        from ..tasks import LMEvalTask

        path = self.choice_tasks[self._names([name])[0]][self._split(split)]
        return LMEvalTask(path, tokenizer=self.tokenizer, limit=limit, batch_size=batch_size, metric="acc")

    def loss(self, model: nn.Module, name: str, split: str = "val") -> float:
        """Held-out loss (nats per token) of ``model`` on domain ``name``."""
        return self.held_out_loss(name, split)(model)

    def accuracy(self, model: nn.Module, name: str, split: str = "val", limit: int | None = None) -> float:
        """lm-eval multiple-choice accuracy of ``model`` on domain ``name``."""
        return self.lm_eval_task(name, split, limit)(model)

    def lm_eval_folder(self, folder: str | os.PathLike, names: Sequence[str] | None = None, split: str = "test",
                       batch_size: int = 16, dtype: str = "bfloat16") -> np.ndarray:
        """``(len(names),)`` multiple-choice accuracies of a model saved as a Hugging Face folder,
        scored by lm-eval loading the folder itself (``simple_evaluate(model="hf",
        model_args="pretrained=<folder>,...")``): the check that a saved merge is the model that
        was evaluated in memory."""
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager

        names = self._names(names)
        split = self._split(split)
        paths = [self.choice_tasks[n][split] for n in names]
        manager = TaskManager(include_path=str(paths[0].parent), include_defaults=False)
        tasks = [p.stem for p in paths]
        out = simple_evaluate(model="hf", model_args=f"pretrained={Path(folder)},tokenizer={self.base_path},dtype={dtype}", tasks=tasks,
                              task_manager=manager, batch_size=batch_size, bootstrap_iters=0, device=str(self.device), log_samples=False)
        return np.array([float(out["results"][t]["acc,none"]) for t in tasks])

    def _tasks(self, names: Sequence[str], split: str, metric: str) -> dict[str, Any]:
        if metric not in ("loss", "lm_eval"):
            raise ValueError(f"metric must be 'loss' (held-out loss) or 'lm_eval' (multiple-choice accuracy), got {metric!r}")
        if metric == "loss":
            return {n: self.held_out_loss(n, split) for n in names}
        return {n: self.lm_eval_task(n, split) for n in names}

    def _scored_tasks(self, names: Sequence[str], split: str, metric: str) -> dict[str, Any]:
        return self._tasks(names, self._split(split), metric)

    def _vector_options(self, device: str | torch.device | None) -> dict[str, Any]:
        return {}  # merged on the CPU, written into the live model where it is

    def _live_model(self, tv: TaskVectors, device: str | torch.device | None, dtype: torch.dtype | None) -> nn.Module:
        return self.new_model(device, dtype)

    def _store_key(self, split: str, metric: str, dtype: torch.dtype | None) -> str:
        return json.dumps({"zoo": self.name, "key": self.info.get("key", ""), "split": split, "metric": metric,
                           "dtype": str(dtype or self.eval_dtype)})

    def evaluate_coeffs(self, coeffs: np.ndarray, names: Sequence[str] | None = None, split: str = "test",
                        method: str | MergeMethod | None = None, metric: str = "loss", groups: Groups | None = None) -> np.ndarray:
        """Metrics ``(K, M)`` (held-out loss, or lm-eval accuracy) of the merged models for
        ``coeffs: (K, T)`` on ``split`` (no store; e.g. test-set reports)."""
        names = self._names(names)
        coeffs = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))
        tv = self.task_vectors(names)
        model = self.new_model()
        tasks = self._tasks(names, self._split(split), metric)
        out = np.zeros((len(coeffs), len(names)))
        for i, c in enumerate(coeffs):
            tv.merge_into(model, c, method, groups=groups)
            model.eval()
            out[i] = [float(tasks[n](model)) for n in names]
        return out

    def evaluate_model(self, model: nn.Module, names: Sequence[str] | None = None, split: str = "test", metric: str = "loss") -> np.ndarray:
        """``(len(names),)`` metrics of one model (held-out loss, or lm-eval accuracy) on ``split``."""
        tasks = self._tasks(self._names(names), self._split(split), metric)
        model.eval()
        with torch.inference_mode():
            return np.array([float(task(model)) for task in tasks.values()])

    def limit_split(self, split: str, num_examples: int | None) -> str:
        """The split itself: the held-out sets are already small (``recipe.val_texts`` texts)."""
        return self._split(split)

    # ------------------------------------------------------------------ PWE-MoE
    def train_loss(self, name: str, batch_size: int = 8, generator: torch.Generator | None = None):
        """``loss(model) -> scalar``: mean token cross-entropy of a causal LM on ``batch_size``
        random training texts of domain ``name`` per call (PWE-MoE router training)."""
        from ..tasks import pad_token_ids

        name = self._names([name])[0]
        texts = self.train_texts.get(name)
        if not texts:
            raise ValueError(f"the lm zoo keeps no training texts of {name!r}")
        encoded = self.tokenizer(texts, truncation=True, max_length=self.recipe.max_length, add_special_tokens=True)["input_ids"]
        encoded = [ids for ids in encoded if len(ids) >= 2]
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def loss(model: nn.Module) -> torch.Tensor:
            index = torch.randint(0, len(encoded), (batch_size,), generator=generator).tolist()
            ids, mask = pad_token_ids([encoded[i] for i in index], pad)
            device = next((p.device for p in model.parameters()), self.device)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)

        return loss

    def fit_moe(self, names: Sequence[str] | None = None, method: str = "ls", steps: int = ROUTER_STEPS, batch_size: int = 8,
                lr: float = 1e-2, init_lambda: float = 0.3, seed: int = 0, checkpoint: str | os.PathLike | None = None,
                progress: bool = True, corners: float = CORNERS):
        """A :class:`~map_merge.moe.ParetoMoE` over the Llama's MLP blocks of the named experts, its
        routers trained (``"ls"`` / ``"epo"``) on training texts; cached in ``checkpoint`` (a folder).
        Returns ``(moe, info)``."""
        names = self._names(names)
        return fit_cached_moe(self.new_model(dtype=torch.float32), self.task_vectors(names), names, self.train_loss, upcycle="mlp",
                              method=method, steps=steps, batch_size=batch_size, lr=lr, init_lambda=init_lambda, seed=seed, corners=corners,
                              checkpoint=checkpoint, progress=progress, key_settings=[self.info.get("key", "")], prefix="moe_routers_lm")

    def moe_objective(self, moe, names: Sequence[str] | None = None, split: str = "val", store: EvaluationStore | str | os.PathLike | None = None,
                      progress: bool = True):
        """An objective over *preference vectors* ``(K, T)``: held-out losses ``(K, T)`` of the dense
        models ``moe.unload(r)`` (sense min)."""
        names = self._names(names)
        key = json.dumps({"zoo": self.name, "key": self.info.get("key", ""), "split": split, "metric": "loss"})
        tasks = {n: self.held_out_loss(n, self._split(split)) for n in names}
        return moe.objective(tasks, senses=["min"] * len(names), key=key, store=as_store(store), progress=progress)

    def table(self, split: str = "test", lm_eval: bool = True) -> list[dict[str, Any]]:
        """Per domain: held-out loss of the base and of the domain's expert, and (``lm_eval``)
        their multiple-choice accuracy with lm-eval's standard error ``sqrt(p (1 - p) / (n - 1))``."""
        base = self.new_model()
        rows = []
        for name in self.task_names:
            expert = self.expert_model(name)
            row: dict[str, Any] = {"domain": name, "kind": self.kinds[name], "base_loss": self.loss(base, name, split),
                                   "expert_loss": self.loss(expert, name, split)}
            if lm_eval:
                task = self.lm_eval_task(name, split)
                count = sum(1 for line in Path(self.choice_tasks[name][split]).with_suffix(".jsonl").read_text().splitlines() if line.strip())
                for who, model in (("base", base), ("expert", expert)):
                    acc = task(model)
                    row[f"{who}_acc"] = acc
                    row[f"{who}_acc_stderr"] = float(np.sqrt(acc * (1 - acc) / max(count - 1, 1)))
                row["questions"] = count
            rows.append(row)
        return rows
