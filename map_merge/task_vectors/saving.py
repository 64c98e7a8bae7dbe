"""Saving merged models without ever losing data.

Rules, for every storage and the command line:

- a destination that is, holds or lies inside a source of the task vectors (the pretrained model,
  a fine-tune, an adapter) is refused, always;
- an existing non-empty destination is refused unless ``overwrite=True``;
- everything is written beside the destination under a temporary name and renamed into place at
  the end, so a crash leaves the old folder (or nothing), never a mix of old and new files, and
  never stale shards of an earlier save.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["check_destination", "atomic_path", "write_side_files", "save_module", "write_json", "WEIGHT_SUFFIXES"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".npz",
                   ".tflite", ".mlmodel", ".index.json")
"""Files of the pretrained folder that hold (or index) weights: never copied beside merged weights."""
_WEIGHT_INDEXES = ("map_merge.json",)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(path: str | os.PathLike, sources: Iterable[str | os.PathLike], overwrite: bool,
                      inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Validate a save destination; returns it resolved.

    ``inputs``: other files a run reads or keeps (a command line run's config, code, data, store),
    protected like the sources.

    Raises:
        ValueError: the destination is, holds or lies inside one of ``sources`` (files or folders
            the task vectors are read from) or of ``inputs``, whatever ``overwrite`` says.
        FileExistsError: it exists (a file, or a non-empty folder) and ``overwrite`` is False.
    """
    target = Path(path).expanduser().resolve()
    checks = [(src, "a source of these task vectors (saving there would destroy the weights being merged)") for src in _protected(sources)]
    checks += [(src, "an input of this run (saving there would destroy it)") for src in _protected(inputs)]
    for src, what in checks:
        if _inside(target, src) or _inside(src, target):
            relation = "is" if target == src else ("lies inside" if _inside(target, src) else "holds")
            raise ValueError(f"refusing to save into {Path(path)}: it {relation} {src}, {what}")
    _warn_leftovers(target)
    if target.exists() and not overwrite:
        if target.is_dir() and not any(target.iterdir()):
            return target
        raise FileExistsError(f"{Path(path)} already exists; pass overwrite=True (command line: --overwrite) to replace it")
    return target


def _protected(sources: Iterable[str | os.PathLike]) -> list[Path]:
    """Every source resolved, plus the resolved targets of the file symlinks a source folder holds
    (a Hugging Face cache snapshot links each file into ``blobs/``: those files are sources too)."""
    out = []
    for source in sources:
        path = Path(source).expanduser()
        out.append(path.resolve())
        if path.is_dir():
            out += [entry.resolve() for entry in path.iterdir() if entry.is_symlink() and entry.is_file()]
    return out


def _warn_leftovers(target: Path) -> None:
    """Warn about what a save killed mid-way left beside ``target`` (by a process that is gone): a
    partial new folder, or the old folder itself when the kill came between the two renames."""
    if not target.parent.is_dir():
        return
    for item in target.parent.glob(f".{glob.escape(target.name)}.*-*-*"):
        kind, _, tag = item.name[len(target.name) + 2 :].partition("-")
        pid = tag.partition("-")[0]
        if kind not in ("old", "partial") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old":
            log.warning("%s holds the previous contents of %s, left by a save that was killed between its two renames; "
                        "rename it back (or delete it) by hand", item, target)
        else:
            log.warning("%s is an unfinished save into %s (the process was killed); delete it", item, target)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but not ours
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a new folder when ``folder``, else a file path) to
    write into; on success rename it into place (replacing what was there), on error remove it.

    An existing *empty* folder is kept (its permissions, ownership, a volume mounted there): the
    new files are written into a hidden folder inside it and moved up at the end, ``config.json``
    last (a save killed mid-way is then no loadable model). Call :func:`check_destination` first:
    this replaces an existing ``path``."""
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    into_empty = folder and target.is_dir() and not any(target.iterdir())
    temp = target / f".partial-{tag}" if into_empty else target.with_name(f".{target.name}.partial-{tag}")
    if folder:
        temp.mkdir()
    try:
        yield temp
        if into_empty:
            _move_up(temp, target)
        elif not target.exists() or (not folder and not target.is_dir()):
            os.replace(temp, target)  # a new path, or a file replaced atomically
        else:
            old = target.with_name(f".{target.name}.old-{tag}")
            os.replace(target, old)
            try:
                os.replace(temp, target)
            except BaseException:
                os.replace(old, target)  # put the old one back
                raise
            _remove(old)
    finally:
        if temp.exists() or temp.is_symlink():
            _remove(temp)


def _move_up(temp: Path, target: Path) -> None:
    """Move every entry of ``temp`` into ``target`` (same file system), ``config.json`` last."""
    items = sorted(temp.iterdir(), key=lambda item: item.name == "config.json")
    for item in items:
        os.replace(item, target / item.name)
    temp.rmdir()


def write_side_files(folder: Path, source_folder: Path | None, config: Any = None, generation_config: Any = None,
                     destination: Path | None = None) -> None:
    """The non-weight files of the pretrained model: ``config.json``, ``generation_config.json``,
    tokenizer files... copied from its folder, or written from a module's configs. ``destination``:
    where ``folder`` is going (for messages)."""
    if source_folder is not None and source_folder.is_dir():
        for item in source_folder.iterdir():
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in _WEIGHT_INDEXES \
                    and not item.name.startswith("."):
                shutil.copy2(item, folder / item.name)
        if (folder / "config.json").exists():
            return
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(str(folder))
        if generation_config is not None and hasattr(generation_config, "save_pretrained"):
            try:
                generation_config.save_pretrained(str(folder))
            except Exception:  # noqa: BLE001 - a default generation config may refuse to save; weights do not need it
                log.debug("generation config not saved", exc_info=True)
        return
    log.warning("saved merged weights to %s without a config.json (the pretrained model is neither a Hugging Face folder nor a "
                "Hugging Face module; pass model= one) - from_pretrained needs one", destination or folder)


def write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def save_module(module: Any, path: str | os.PathLike, sources: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                source_folder: Path | None = None, metadata: Any = None) -> Path:
    """Save a live module as a folder under the same rules: ``save_pretrained`` for a Hugging Face
    model (``model.safetensors`` of its checkpoint-layout tensors otherwise), the pretrained folder's
    tokenizer and other non-weight files, and ``map_merge.json`` (``metadata``)."""
    from safetensors.torch import save_file

    from .keymap import checkpoint_state

    target = check_destination(path, sources, overwrite)
    with atomic_path(target, folder=True) as temp:
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(str(temp))
        else:
            state, _ = checkpoint_state(module)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(temp / "model.safetensors"), metadata={"format": "pt"})
        if source_folder is not None:
            for item in Path(source_folder).iterdir():
                if item.is_file() and not (temp / item.name).exists() and not item.name.endswith(WEIGHT_SUFFIXES) \
                        and item.name not in _WEIGHT_INDEXES and not item.name.startswith("."):
                    shutil.copy2(item, temp / item.name)
        if metadata is not None:
            write_json(temp / "map_merge.json", metadata)
    return Path(path)
