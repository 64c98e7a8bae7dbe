"""Building the language-model zoo's files: the tokenizer, the pretrained Llama and its domain
experts (:func:`build_models`), and the lm-eval multiple-choice tasks (:func:`write_tasks`), into
folders :func:`~map_merge.zoo.lm.load_lm_zoo` then renames into place."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .lm_data import CORPORA, LM_DOMAINS, choice_docs, domain_texts, write_choice_task
from .lm_sizes import LMZooSettings

__all__ = ["lm_texts", "write_tasks", "build_models"]

_TASKS_VERSION = 1  # bump when the questions' recipe (lm_data.choice_docs) changes


def lm_texts(recipe: LMZooSettings, seed: int) -> dict[str, dict[str, list[str]]]:
    """``corpus -> split -> texts`` of every corpus (:data:`~map_merge.zoo.lm_data.CORPORA`)."""
    return {d: domain_texts(d, seed=seed, max_chars=recipe.max_chars) for d in CORPORA}


def write_tasks(folder: Path, recipe: LMZooSettings, texts: dict[str, dict[str, list[str]]], seed: int) -> dict[str, dict[str, Path]]:
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


def build_models(folder: Path, recipe: LMZooSettings, texts: dict[str, dict[str, list[str]]], seed: int, device: torch.device,
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
