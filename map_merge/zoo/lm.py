"""The language-model zoo: a Llama pretrained from scratch here and domain experts fine-tuned
from it, saved as Hugging Face folders the way real checkpoints are shared.

- Base: a ``LlamaForCausalLM`` (untied embeddings) with a byte-level BPE tokenizer trained here,
  pretrained on a mixture of the four domains of :mod:`map_merge.zoo.lm_data`; saved in bf16
  with its tokenizer, so ``AutoModelForCausalLM.from_pretrained(zoo.base_path)`` and
  ``AutoTokenizer.from_pretrained(zoo.base_path)`` load it.
- Experts, one per domain: full fine-tunes saved as sharded bf16 safetensors folders (several
  shards plus ``model.safetensors.index.json``) or PEFT LoRA adapter folders (safetensors), as
  :data:`LM_SIZES` says. :meth:`LMZoo.task_vectors` reads them through
  ``TaskVectors.from_models(base folder, {name: folder})``: streamed, LoRA or mixed storage.
- Objectives per domain: held-out loss (:class:`~map_merge.HeldOutLoss` on validation or test
  texts) and an lm-eval multiple-choice task (:class:`~map_merge.LMEvalTask` on a generated
  local YAML + jsonl; one task per split, so that selection never sees test).

Everything is built once (minutes at ``size="small"`` on 2 CPU cores; seconds at ``"tiny"``),
seeded, and cached under ``$MAP_MERGE_CACHE``; ``"large"`` is meant for a GPU.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..deprecation import renamed
from ..groups import Groups
from ..merge_methods import MergeMethod
from ..moe.pareto_moe import CORNERS, ROUTER_STEPS
from ..objective import ModelObjective
from ..store import EvaluationStore
from ..task_vectors import TaskVectors
from ..task_vectors.saving import process_alive
from .base import cache_root, fit_cached_moe
from .lm_data import CORPORA, LM_DOMAINS, SOURCES, choice_docs, domain_texts, write_choice_task

__all__ = ["LMZooSettings", "LM_SIZES", "LMZoo", "load_lm_zoo"]

log = logging.getLogger(__name__)

_VERSION = "v1"
_TASKS_VERSION = 1  # bump when the questions' recipe (lm_data.choice_docs) changes


@dataclass(frozen=True)
class LMZooSettings:
    """Everything that decides a zoo's weights (with the seed and the texts): a size of
    :data:`LM_SIZES`, or your own for ``load_lm_zoo(size=...)`` (formerly ``LMRecipe``).

    Model: ``vocab_size``, ``hidden``, ``layers``, ``heads``, ``ffn``; ``max_length`` tokens per
    training row and per held-out text. Pretraining: ``pretrain_steps`` batches of
    ``batch_size`` rows at peak ``pretrain_lr``, rows drawn from the corpora
    (:data:`~map_merge.zoo.lm_data.CORPORA`: general prose and the expert domains) by ``mix``.
    Experts: ``kinds`` (domain -> ``"full"`` or ``"lora"``), ``expert_steps`` at ``expert_lr``
    (full) or ``lora_lr`` with rank ``lora_rank``. Data: ``max_chars`` training characters per
    domain, ``tokenizer_chars`` of them train the tokenizer; ``val_texts`` / ``test_texts``
    held-out texts per domain; ``choice_val`` / ``choice_test`` lm-eval questions per domain.
    ``shard_size``: the full fine-tunes' safetensors shard size."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    max_length: int
    batch_size: int
    pretrain_steps: int
    expert_steps: int
    pretrain_lr: float = 3e-3
    expert_lr: float = 2e-3
    lora_lr: float = 5e-3
    lora_rank: int = 16
    mix: tuple[tuple[str, float], ...] = (("prose", 0.5), ("code", 0.125), ("medical", 0.125), ("legal", 0.125), ("arithmetic", 0.125))
    kinds: tuple[tuple[str, str], ...] = (("code", "full"), ("medical", "lora"), ("legal", "full"), ("arithmetic", "lora"))
    max_chars: int = 1_500_000
    tokenizer_chars: int = 300_000
    val_texts: int = 32
    test_texts: int = 128
    choice_val: int = 100
    choice_test: int = 300
    shard_size: str = "300KB"


LM_SIZES: dict[str, LMZooSettings] = {
    "tiny": LMZooSettings(vocab_size=384, hidden=32, layers=2, heads=2, ffn=64, max_length=64, batch_size=8, pretrain_steps=40,
                          expert_steps=25, lora_rank=4, max_chars=60_000, tokenizer_chars=20_000, val_texts=6, test_texts=6,
                          choice_val=12, choice_test=12, shard_size="20KB"),
    "small": LMZooSettings(vocab_size=2048, hidden=64, layers=4, heads=4, ffn=192, max_length=128, batch_size=16, pretrain_steps=640,
                           expert_steps=120, shard_size="300KB"),
    "large": LMZooSettings(vocab_size=8192, hidden=512, layers=8, heads=8, ffn=1376, max_length=256, batch_size=32, pretrain_steps=4000,
                           expert_steps=800, pretrain_lr=1e-3, expert_lr=2e-4, lora_lr=1e-3, max_chars=6_000_000, tokenizer_chars=1_000_000,
                           val_texts=64, test_texts=256, choice_test=500, shard_size="20MB"),
}


def _digest(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(part, (bytes, str)) else
                      (part.encode() if isinstance(part, str) else part))
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class LMZoo:
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

    def objective(
        self,
        names: Sequence[str] | None = None,
        split: str = "val",
        metric: str = "loss",
        method: str | MergeMethod | None = None,
        store: EvaluationStore | str | os.PathLike | None = None,
        task_vectors: TaskVectors | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        scored: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        groups: Groups | None = None,
    ) -> ModelObjective:
        """A :class:`~map_merge.ModelObjective` merging the named experts into one live model
        (:meth:`new_model`) and scoring ``scored`` (default: the same domains) on ``split``:
        ``metric="loss"`` held-out loss (min, softplus link) or ``"lm_eval"`` multiple-choice
        accuracy (max). Results are kept in ``store`` (a path or a store); ``groups``: coefficient groups."""
        names = self._names(names)
        scored_names = self._names(scored) if scored is not None else names
        tv = task_vectors if task_vectors is not None else self.task_vectors(names)
        if list(tv.names) != names:
            raise ValueError(f"task vectors are for {list(tv.names)}, objective asked for {names}")
        tasks = self._tasks(scored_names, self._split(split), metric)
        if store is not None and not isinstance(store, EvaluationStore):
            store = EvaluationStore(store)
        key = json.dumps({"zoo": self.name, "key": self.info.get("key", ""), "split": split, "metric": metric,
                          "dtype": str(dtype or self.eval_dtype)})
        return ModelObjective(self.new_model(device, dtype), tv, tasks, method=method, store=store, key=key, progress=progress, groups=groups)

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
        if store is not None and not isinstance(store, EvaluationStore):
            store = EvaluationStore(store)
        key = json.dumps({"zoo": self.name, "key": self.info.get("key", ""), "split": split, "metric": "loss"})
        tasks = {n: self.held_out_loss(n, self._split(split)) for n in names}
        return moe.objective(tasks, senses=["min"] * len(names), key=key, store=store, progress=progress)

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


# ---------------------------------------------------------------------- building
def _texts(recipe: LMZooSettings, seed: int) -> dict[str, dict[str, list[str]]]:
    return {d: domain_texts(d, seed=seed, max_chars=recipe.max_chars) for d in CORPORA}


def _write_tasks(folder: Path, recipe: LMZooSettings, texts: dict[str, dict[str, list[str]]], seed: int) -> dict[str, dict[str, Path]]:
    """The lm-eval questions and YAMLs (one task per domain and split) under ``folder/tasks``."""
    tasks = folder / "tasks"
    marker = tasks / "root.json"
    stamp = {"root": str(folder.resolve()), "version": _TASKS_VERSION, "val": recipe.choice_val, "test": recipe.choice_test}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return {d: {s: tasks / f"lmzoo_{d}_{s}.yaml" for s in ("val", "test")} for d in LM_DOMAINS}
    tmp = folder / f"tasks.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"val": recipe.choice_val, "test": recipe.choice_test}
    for domain in LM_DOMAINS:
        for split, lm_split in (("val", "validation"), ("test", "test")):
            docs = choice_docs(domain, texts[domain][split], texts[domain]["train"], counts[split], seed=seed + (split == "test"),
                               general_texts=texts["prose"]["train"], context_chars=min(240, 2 * recipe.max_length))  # ~2 characters a token
            # the YAML names its data where it will live (after the rename below)
            yaml = write_choice_task(tmp, f"lmzoo_{domain}_{split}", docs, lm_split)
            yaml.write_text(yaml.read_text().replace(str(tmp.resolve()), str(tasks.resolve())))
    (tmp / "root.json").write_text(json.dumps(stamp))
    shutil.rmtree(tasks, ignore_errors=True)
    os.replace(tmp, tasks)
    return {d: {s: tasks / f"lmzoo_{d}_{s}.yaml" for s in ("val", "test")} for d in LM_DOMAINS}


def _build(folder: Path, recipe: LMZooSettings, texts: dict[str, dict[str, list[str]]], seed: int, device: torch.device,
           progress: bool, info: dict[str, Any]) -> None:
    """Train the tokenizer, the base and every expert into ``folder`` (a fresh temporary folder)."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    from .lm_train import LORA_TARGETS, llama_config, pack, train_lm, train_tokenizer

    start = time.perf_counter()
    mix = dict(recipe.mix)
    sample = []
    for domain in CORPORA:  # the tokenizer sees the same share of every corpus
        size = 0
        for text in texts[domain]["train"]:
            if size >= recipe.tokenizer_chars:
                break
            sample.append(text)
            size += len(text)
    tokenizer = train_tokenizer(sample, recipe.vocab_size, recipe.max_length)
    streams = {d: pack(tokenizer, texts[d]["train"], recipe.max_length) for d in CORPORA}
    info["train_tokens"] = {d: int(streams[d].numel()) for d in CORPORA}
    info["seconds_data"] = time.perf_counter() - start

    torch.manual_seed(seed)
    config = llama_config(len(tokenizer), recipe.hidden, recipe.layers, recipe.heads, recipe.ffn, recipe.max_length, tokenizer)
    model = LlamaForCausalLM(config).to(device)
    t0 = time.perf_counter()
    losses = train_lm(model, [streams[d] for d in CORPORA], [mix.get(d, 0.0) for d in CORPORA], recipe.pretrain_steps,
                      recipe.batch_size, recipe.pretrain_lr, seed=seed, weight_decay=0.1, device=device, desc="pretraining lm zoo",
                      progress=progress)
    info["seconds_pretrain"] = time.perf_counter() - t0
    info["pretrain_final_loss"] = float(np.mean(losses[-10:]))
    info["mix"] = {d: mix.get(d, 0.0) for d in CORPORA}
    base_path = folder / "base"
    model.to(torch.bfloat16).save_pretrained(str(base_path))
    tokenizer.save_pretrained(str(base_path))
    del model

    kinds = dict(recipe.kinds)
    info["expert_final_loss"], info["seconds_experts"] = {}, {}
    for k, domain in enumerate(tqdm(LM_DOMAINS, desc="lm zoo experts", disable=not progress)):
        t0 = time.perf_counter()
        torch.manual_seed(seed + 101 + k)
        model = LlamaForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).to(device)
        out = folder / "experts" / domain
        if kinds[domain] == "lora":
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ImportError("the lm zoo trains LoRA experts with peft: pip install 'map_merge[lora]' (or peft)") from None
            lora = LoraConfig(r=recipe.lora_rank, lora_alpha=2 * recipe.lora_rank, target_modules=list(LORA_TARGETS), lora_dropout=0.0,
                              bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(model, lora)
            lr = recipe.lora_lr
        else:
            lr = recipe.expert_lr
        losses = train_lm(model, [streams[domain]], [1.0], recipe.expert_steps, recipe.batch_size, lr, seed=seed + 1 + k,
                          device=device, desc=f"expert {domain}", progress=progress)
        if kinds[domain] == "lora":
            model.save_pretrained(str(out), save_embedding_layers=False)  # LoRA factors only (lm_head has factors too)
            config_file = out / "adapter_config.json"
            adapter = json.loads(config_file.read_text())
            adapter["base_model_name_or_path"] = str(Path(info["folder"]) / "base")
            config_file.write_text(json.dumps(adapter, indent=2))
        else:
            model.to(torch.bfloat16).save_pretrained(str(out), max_shard_size=recipe.shard_size)
            tokenizer.save_pretrained(str(out))
        info["expert_final_loss"][domain] = float(np.mean(losses[-10:]))
        info["seconds_experts"][domain] = time.perf_counter() - t0
        del model


LOCK_TIMEOUT_S = 6 * 3600.0
"""How long a process waits for another one's build of the same zoo before giving up."""


def _lock_holder(handle: Any) -> tuple[int, str] | None:
    """``(pid, host)`` that the lock file open as ``handle`` names (its holder writes them), if any."""
    try:
        handle.seek(0)
        pid, _, host = handle.read().strip().partition("@")
        return (int(pid), host) if pid.isdigit() else None
    except (OSError, ValueError):
        return None


def _holder_gone(holder: tuple[int, str] | None) -> bool:
    """Whether the named holder is a process of this host that no longer runs."""
    import socket

    if holder is None or holder[1] != socket.gethostname() or holder[0] == os.getpid():
        return False
    try:
        os.kill(holder[0], 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def _same_file(path: Path, handle: Any) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _exclusive(path: Path, what: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (``fcntl.flock``; where there is none, no lock).

    The holder writes ``pid@host`` into the file. A waiting process warns (WARNING, then once a
    minute) naming the file and the holder, gives up with ``TimeoutError`` after ``timeout_s``
    (default :data:`LOCK_TIMEOUT_S`), and takes over a lock whose holder process is gone (the lock
    then lingers in a child that inherited the file: the file is replaced by a new one). Taking
    over and writing the holder happen under a second, briefly held lock (``*.takeover.lock``),
    so two processes never both hold the lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    import socket

    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else float(timeout_s)
    guard = path.with_name(path.name.removesuffix(".lock") + ".takeover.lock")
    start = time.monotonic()
    warned: float | None = None
    while True:
        handle = open(path, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(handle)
                shown = f"process {holder[0]} on {holder[1]}" if holder else "an unknown process"
                if _holder_gone(holder):
                    with open(guard, "a") as guarded:
                        fcntl.flock(guarded, fcntl.LOCK_EX)
                        if _same_file(path, handle) and _holder_gone(_lock_holder(handle)):
                            log.warning("the lock %s of the lm zoo %s is held for %s, which is gone; taking it over", path, what, shown)
                            os.unlink(path)
                    continue  # lock the file now at path
                waited = time.monotonic() - start
                if waited >= timeout_s:
                    raise TimeoutError(f"gave up after {waited:.0f} s waiting for the lock {path} of the lm zoo {what}, held by "
                                       f"{shown} (building or loading it; timeout {timeout_s:g} s); if no such process runs, "
                                       "delete the lock file") from None
                if warned is None or time.monotonic() - warned >= 60:
                    log.warning("waiting for the lock %s of the lm zoo %s, held by %s (building or loading it; giving up after "
                                "%g s)", path, what, shown, timeout_s)
                    warned = time.monotonic()
                time.sleep(min(poll_s, timeout_s - waited))
                continue
            with open(guard, "a") as guarded:
                fcntl.flock(guarded, fcntl.LOCK_EX)
                if not _same_file(path, handle):
                    continue  # taken over and replaced meanwhile: lock the new file
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}@{socket.gethostname()}\n")
                handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                handle.flush()
            return
        finally:
            handle.close()  # releases the lock


def _clean_stale(root: Path, folder: Path) -> None:
    """Remove what builds killed mid-way left (the caller holds the zoo's lock): the temporary
    folders of processes that are gone (``<zoo>.tmp-PID``, ``<zoo>/tasks.tmp-PID``). A previous
    build a killed rebuild had moved away (``<zoo>.old-PID``) is put back when nothing replaced it
    (it is the only copy), else removed."""
    leftovers = [(item, item.name[len(folder.name) + 1 :]) for item in root.glob(f"{glob.escape(folder.name)}.*-*")]
    leftovers += [(item, item.name) for item in folder.glob("tasks.tmp-*")]
    for item, rest in leftovers:
        kind, _, pid = rest.partition("-")
        if kind not in ("tmp", "old", "tasks.tmp") or not pid.isdigit() or process_alive(int(pid)):
            continue
        if kind == "old" and not folder.exists():
            log.warning("restoring the lm zoo %s from %s, left by a rebuild that was killed between its two renames", folder.name, item.name)
            os.replace(item, folder)
        else:
            shutil.rmtree(item, ignore_errors=True)


def _build_into(folder: Path, root: Path, recipe: LMZooSettings, texts: dict[str, dict[str, list[str]]], seed: int, device: torch.device,
                progress: bool, threads: int | None, key: str, data_hash: str, rebuild: bool) -> None:
    """Build the zoo in a temporary folder beside ``folder`` and rename it into place (the caller
    holds the zoo's lock). A complete ``folder`` that appeared meanwhile (a builder that took no
    lock) is kept unless ``rebuild``: readers may be using its files."""
    tmp = root / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier attempt of this process (we hold the lock)
    tmp.mkdir(parents=True)
    info: dict[str, Any] = {"key": key, "data_hash": data_hash, "recipe": asdict(recipe), "seed": seed, "folder": str(folder),
                            "device": str(device), "sources": SOURCES, "base_dtype": "bfloat16", "expert_dtype": "bfloat16",
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
    start = time.perf_counter()
    previous = torch.get_num_threads()
    try:
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(int(threads))
            info["threads"] = int(threads)
        _build(tmp, recipe, texts, seed, device, progress, info)
        info["seconds"] = time.perf_counter() - start
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        if (folder / "info.json").exists() and not rebuild:
            log.info("the lm zoo %s was completed by another process meanwhile; using it", folder.name)
            shutil.rmtree(tmp, ignore_errors=True)
        elif folder.exists():
            old = root / f"{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous)


def load_lm_zoo(
    tasks: Sequence[str] | None = None,
    size: str | LMZooSettings = "small",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    eval_dtype: torch.dtype | None = None,
    threads: int | None = 1,
) -> LMZoo:
    """Build (first use: minutes at ``size="small"`` on 2 CPU cores, seconds at ``"tiny"``) or
    load the language-model zoo.

    Args:
        tasks: domains of :data:`~map_merge.zoo.lm_data.LM_DOMAINS` the zoo exposes (default: all;
            every expert is built either way).
        size: a key of :data:`LM_SIZES` (``"tiny"``, ``"small"``, ``"large"`` for a GPU) or a recipe.
        seed: seeds the splits, the questions, the tokenizer's data and all training.
        cache_dir: cache folder (default :func:`~map_merge.zoo.cache_root`).
        rebuild: train again (the old folder is replaced only once the new one is complete).
        device: where training and evaluation run (default: CUDA when present, else CPU).
        eval_dtype: the objectives' live-model dtype (default bf16: the checkpoints' own dtype,
            and the faster one on these CPUs).
        threads: CPU threads while training (torch's setting is restored after). Default 1: on a
            shared 2-core machine, two OpenMP threads that spin-wait trained 5-40x slower than
            one; ``None`` keeps torch's setting.
    """
    recipe = LM_SIZES[size] if isinstance(size, str) and size in LM_SIZES else size
    if not isinstance(recipe, LMZooSettings):
        raise ValueError(f"unknown lm zoo size {size!r}; choose from {list(LM_SIZES)} or pass an LMZooSettings")
    names = list(LM_DOMAINS) if tasks is None else [str(t) for t in tasks]
    unknown = [n for n in names if n not in LM_DOMAINS]
    if unknown or not names:
        raise ValueError(f"unknown lm zoo domain(s) {unknown}; choose from {LM_DOMAINS}")
    missing = [d for d, _ in recipe.kinds if d not in LM_DOMAINS] + [d for d in LM_DOMAINS if d not in dict(recipe.kinds)]
    if missing or any(k not in ("full", "lora") for _, k in recipe.kinds):
        raise ValueError(f"recipe.kinds must give 'full' or 'lora' for each of {LM_DOMAINS}, got {recipe.kinds}")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    texts = _texts(recipe, seed)
    data_hash = _digest(*[t for d in CORPORA for s in ("train", "val", "test") for t in texts[d][s]])
    key = _digest(_VERSION, asdict(recipe), seed, data_hash)
    label = size if isinstance(size, str) else "custom"
    root = cache_root() if cache_dir is None else Path(cache_dir)
    folder = root / f"lm-{_VERSION}-{label}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    # one builder at a time per zoo: a second process waits for the build in progress and reuses it
    with _exclusive(root / f"{folder.name}.lock", folder.name):
        _clean_stale(root, folder)
        if rebuild or not (folder / "info.json").exists():
            _build_into(folder, root, recipe, texts, seed, device, progress, threads, key, data_hash, rebuild)
        info = json.loads((folder / "info.json").read_text())
        choice = _write_tasks(folder, recipe, texts, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "base"))
    held_out = {d: {"val": texts[d]["val"][: recipe.val_texts], "test": texts[d]["test"][: recipe.test_texts]} for d in names}
    kinds = dict(recipe.kinds)
    train = {d: texts[d]["train"][:512] for d in names}  # what PWE-MoE's routers train on
    return LMZoo(folder=folder, base_path=folder / "base", experts={d: folder / "experts" / d for d in names},
                 kinds={d: kinds[d] for d in names}, texts=held_out, choice_tasks={d: choice[d] for d in names}, tokenizer=tokenizer,
                 recipe=recipe, info=info, device=device, eval_dtype=eval_dtype or torch.bfloat16, train_texts=train)


__getattr__ = renamed(globals(), {"LMRecipe": "LMZooSettings"}, "map_merge.Recipe is the job an executor runs")
