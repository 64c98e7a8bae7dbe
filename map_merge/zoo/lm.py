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
seeded, and cached under ``$MAP_MERGE_CACHE``; ``"large"`` is meant for a GPU. This module is the
cache: one folder per recipe, seed and data, built under a lock by one process at a time and
renamed into place; the sizes are in :mod:`.lm_sizes`, the building in :mod:`.lm_build`, the zoo
once built (models, metrics, objectives) in :mod:`.lm_zoo`.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..deprecation import renamed
from ..task_vectors.saving import process_alive
from .base import build_threads, cache_root
from .lm_build import build_models as _build  # looked up here at each build (tests replace it)
from .lm_build import lm_texts, write_tasks
from .lm_data import CORPORA, LM_DOMAINS, SOURCES
from .lm_sizes import LM_SIZES, LMZooSettings
from .lm_zoo import LMZoo

__all__ = ["LMZooSettings", "LM_SIZES", "LMZoo", "load_lm_zoo"]

log = logging.getLogger(__name__)

_VERSION = "v1"


def _digest(*parts: Any) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(part, (bytes, str)) else
                      (part.encode() if isinstance(part, str) else part))
        digest.update(b"\0")
    return digest.hexdigest()


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

    return holder is not None and holder[1] == socket.gethostname() and not process_alive(holder[0])


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
    try:
        pinned = int(threads) if threads is not None and device.type == "cpu" else None
        if pinned is not None:
            info["threads"] = pinned
        with build_threads(pinned):
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
    texts = lm_texts(recipe, seed)
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
        choice = write_tasks(folder, recipe, texts, seed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "base"))
    held_out = {d: {"val": texts[d]["val"][: recipe.val_texts], "test": texts[d]["test"][: recipe.test_texts]} for d in names}
    kinds = dict(recipe.kinds)
    train = {d: texts[d]["train"][:512] for d in names}  # what PWE-MoE's routers train on
    return LMZoo(folder=folder, base_path=folder / "base", experts={d: folder / "experts" / d for d in names},
                 kinds={d: kinds[d] for d in names}, texts=held_out, choice_tasks={d: choice[d] for d in names}, tokenizer=tokenizer,
                 recipe=recipe, info=info, device=device, eval_dtype=eval_dtype or torch.bfloat16, train_texts=train)


__getattr__ = renamed(globals(), {"LMRecipe": "LMZooSettings"}, "map_merge.Recipe is the job an executor runs")
