"""A zoo's cached weights on disk (the vision and text zoos): one build's files written whole into
a temporary folder beside the cache folder and renamed into place, and read back from one folder,
so that every process sharing a cache (two test workers, two notebooks) loads the files of a single
build, never a pretrained encoder of one build with the heads or experts of another.

Layout of a cache folder: ``pretrained.safetensors`` (where the zoo caches its encoder),
``finetuned-<task>.safetensors`` per task, ``heads.safetensors`` (``<task>.<param>``) and
``info.json``; a folder is complete when it holds ``info.json``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_zoo_weights", "load_zoo_weights"]

log = logging.getLogger(__name__)


def save_zoo_weights(folder: Path, pretrained: nn.Module | None, finetuned: dict[str, dict[str, torch.Tensor]], heads: dict[str, nn.Module],
                     info: dict, replace: bool = True) -> bool:
    """Write a zoo's weights (safetensors) and ``info`` (JSON) as the cache folder ``folder``: into
    a new temporary folder beside it, renamed into place once complete. A reader sees the whole
    cache of one build or none; a write that fails leaves ``folder`` as it was.

    ``replace=False`` (a build made because the cache was missing): a complete cache another
    process finished meanwhile is kept (its readers may be using it) and ``False`` returned; load
    it (:func:`load_zoo_weights`) to use the weights every other process uses. ``replace=True`` (a
    rebuild): ``folder`` is replaced. Returns whether ``folder`` now holds these weights."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a fresh name per call (process id for the reader of a listing; unique within a process too)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-{os.getpid()}-", dir=folder.parent))
    try:
        if pretrained is not None:
            save_file({k: v.contiguous() for k, v in pretrained.state_dict().items()}, str(tmp / "pretrained.safetensors"))
        for name, state in finetuned.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / f"finetuned-{name}.safetensors"))
        save_file({f"{name}.{k}": v.contiguous() for name, head in heads.items() for k, v in head.state_dict().items()},
                  str(tmp / "heads.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info, indent=2))
        return _place(tmp, folder, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place


def _place(tmp: Path, folder: Path, replace: bool) -> bool:
    """Rename the complete ``tmp`` to ``folder`` (see :func:`save_zoo_weights`)."""
    while True:
        if not replace and (folder / "info.json").exists():
            log.info("the zoo cache %s was completed by another process meanwhile; using it", folder)
            return False
        try:
            os.rename(tmp, folder)  # atomic; takes the place of a missing or empty folder
            return True
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        # a rebuild, or an incomplete folder (a build killed while writing files one by one): moved
        # aside, ours renamed in, the old one removed
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-{os.getpid()}-", dir=folder.parent))
        try:
            os.rename(folder, old)
        except FileNotFoundError:  # another process moved it meanwhile: look again
            old.rmdir()
            continue
        try:
            os.rename(tmp, folder)
        except OSError as error:  # another process placed its build meanwhile: look again
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return True


def load_zoo_weights(folder: Path, pretrained: nn.Module | None, names: Sequence[str], heads: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]] | None:
    """Load cached weights into ``pretrained`` and ``heads`` and return the fine-tuned states per
    task in ``names``; ``None`` (and the modules untouched) if the cache is incomplete. Every file
    is read from the one folder that was ``folder`` when reading began: a rebuild renaming a new
    cache into place meanwhile never mixes two builds (at worst ``None``: build again)."""
    from safetensors.torch import load

    needed = ["info.json", "heads.safetensors"] + [f"finetuned-{n}.safetensors" for n in names]
    if pretrained is not None:
        needed.append("pretrained.safetensors")
    try:
        states = _read_all(Path(folder), needed)
    except FileNotFoundError:
        return None
    loaded = {name: load(data) for name, data in states.items() if name.endswith(".safetensors")}
    if pretrained is not None:
        pretrained.load_state_dict(loaded["pretrained.safetensors"])
    head_state = loaded["heads.safetensors"]
    for name, head in heads.items():
        head.load_state_dict({k[len(name) + 1 :]: v for k, v in head_state.items() if k.startswith(name + ".")})
    return {n: loaded[f"finetuned-{n}.safetensors"] for n in names}


def _read_all(folder: Path, names: Sequence[str]) -> dict[str, bytes]:
    """The bytes of each file ``names`` of ``folder``, all from the directory ``folder`` named when
    the first was opened (through a directory descriptor where the system has them)."""
    if os.open not in os.supports_dir_fd:
        return {name: (folder / name).read_bytes() for name in names}
    directory = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        out = {}
        for name in names:
            handle = os.open(name, os.O_RDONLY, dir_fd=directory)
            with os.fdopen(handle, "rb") as file:
                out[name] = file.read()
        return out
    finally:
        os.close(directory)
