"""Scoring a saved merge: the weights a save wrote, loaded back into an objective's live model and
scored by its tasks, once per content.

:func:`evaluate_saved` reads the saved weights (a Hugging Face folder of safetensors shards or one
``.safetensors`` file) through the same key mapping the run's merges use (as a zero task vector on
the saved weights, so tied, renamed and fused tensors land where a merge puts them), writes them
into the objective's live model (built the way the run builds it) and runs every task once. The
result is kept in the objective's store under a key of the objective's fingerprint and a digest
of the saved weights' bytes: scoring the same bytes again is answered by the store, and other
bytes (another save) are scored afresh. What is scored is the saved file's content, not the
coefficients it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SavedScore", "evaluate_saved", "weights_digest", "weight_files"]

_CHUNK = 1 << 23


@dataclass
class SavedScore:
    """The real metrics of a saved model.

    Attributes:
        metrics: ``(M,)`` one value per task of the objective (NaN where a metric was not finite).
        from_store: the store already held them for these bytes (nothing was evaluated).
        digest: hex digest of the saved weights' bytes (the store key's part that names them).
    """

    metrics: np.ndarray
    from_store: bool
    digest: str


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a saved model's weights: the file itself, or a folder's
    ``*.safetensors`` (its shards), sorted by name. Raises FileNotFoundError naming the path."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{path} holds no saved weights (a .safetensors file, or a folder of them)")
    return files


def weights_digest(path: str | os.PathLike) -> str:
    """Hex digest (16 bytes, BLAKE2b) of a saved model's weight files: their names and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for file in weight_files(path):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
    return digest.hexdigest()


def saved_key(objective: Any, digest: str) -> str:
    """The store fingerprint of a saved model's metrics under ``objective``'s tasks."""
    text = json.dumps(["saved weights", objective.fingerprint(), digest])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


_ROW = np.zeros(1)  # the one coefficient row the saved weights' results are stored under


def evaluate_saved(objective: Any, path: str | os.PathLike) -> SavedScore:
    """Score the model saved at ``path`` with every task of ``objective`` (a
    :class:`~map_merge.ModelObjective`): from its store when these bytes were scored before, else
    by loading the saved weights into its live model and running each task once (the result is
    stored). The live model then holds the saved weights; the objective's next evaluation merges
    over them as over any earlier merge."""
    from .objective import metric_value
    from .task_vectors import TaskVectors

    digest = weights_digest(path)
    key = saved_key(objective, digest)
    names = tuple(objective.task_names)
    store = objective.store
    if store is not None:
        stored = store.get(key, _ROW[None], names)[0]
        if not np.isnan(stored).any():
            return SavedScore(stored, True, digest)
    with warnings.catch_warnings():  # the saved weights against themselves: a zero task vector on purpose
        warnings.filterwarnings("ignore", message=r".*zero task vector.*")
        saved = TaskVectors.from_models(str(path), {"saved": str(path)})
    model = objective.model
    saved.merge_into(model, np.zeros(1))
    model.eval()
    with torch.inference_mode():
        values = np.array([metric_value(task.metric(model), name, _ROW) for name, task in objective.tasks.items()], dtype=np.float64)
    finite = {n: float(v) for n, v in zip(names, values) if np.isfinite(v)}
    if store is not None and finite:
        store.put(key, _ROW, finite)
    return SavedScore(values, False, digest)
