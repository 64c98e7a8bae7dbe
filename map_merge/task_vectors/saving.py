"""Saving merged models without ever losing data.

Rules, for every storage and the command line:

- a destination that is, holds or lies inside a source of the task vectors (the pretrained model,
  a fine-tune, an adapter) or an input of a run (its config, code, data, evaluation store) is
  refused, always; so is a command line run's output folder;
- an existing non-empty destination is refused unless ``overwrite=True``, and even then unless
  map_merge wrote all of it (its manifest, :mod:`.manifest`): nothing map_merge did not write is
  ever replaced or deleted;
- everything is written beside the destination under a temporary name, flushed to disk and
  renamed into place at the end, so a crash (or a power loss) leaves the old folder (or nothing),
  never a mix of old and new files, and never stale shards of an earlier save; an error or a
  Ctrl-C removes the temporary, and the next save removes what a killed one left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .manifest import MANIFEST, RUN_RESULTS, check_ours, entries_of, read_manifest, record, write_manifest

__all__ = ["check_destination", "atomic_path", "clean_leftovers", "process_alive", "temp_name", "side_files", "write_side_files", "save_module",
           "write_json", "WEIGHT_SUFFIXES"]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data", ".npz",
                   ".tflite", ".mlmodel", ".index.json")
"""Files of the pretrained folder that hold (or index) weights: never copied beside merged weights."""
_WEIGHT_INDEXES = ("map_merge.json",)


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(path: str | os.PathLike, sources: Iterable[str | os.PathLike], overwrite: bool,
                      inputs: Iterable[str | os.PathLike] = (), run_results: bool = False) -> Path:
    """Validate a save destination; returns it resolved. Removes what saves killed mid-way left
    there (see :func:`clean_leftovers`).

    ``inputs``: other files a run reads or keeps (a command line run's config, code, data, store),
    protected like the sources. ``run_results``: the caller is a command line run writing its own
    results (:data:`.manifest.RUN_RESULTS`) into its folder; no one else replaces them.

    Raises:
        ValueError: the destination is, holds or lies inside one of ``sources`` (files or folders
            the task vectors are read from) or of ``inputs``, or is a command line run's output
            folder or one of its results (``result.json``, ``front.png``...), whatever ``overwrite`` says.
        FileExistsError: it exists (a file, or a non-empty folder) and ``overwrite`` is False, or
            it is or holds anything map_merge did not write (:mod:`.manifest`), whatever
            ``overwrite`` says.
    """
    target = Path(path).expanduser().resolve()
    checks = [(src, "a source of these task vectors (saving there would destroy the weights being merged)") for src in _protected(sources)]
    checks += [(src, "an input of this run (saving there would destroy it)") for src in _protected(inputs)]
    for src, what in checks:
        if _inside(target, src) or _inside(src, target):
            relation = "is" if target == src else ("lies inside" if _inside(target, src) else "holds")
            raise ValueError(f"refusing to save into {Path(path)}: it {relation} {src}, {what}")
    if not run_results and target.name in RUN_RESULTS and (read_manifest(target.parent) or {}).get("kind") == "run":
        raise ValueError(f"refusing to save into {Path(path)}: it is the {target.name} of the command line run in {target.parent}, "
                         "a result of the command line run that only the run itself replaces; choose another destination")
    clean_leftovers(target)
    if not target.exists() and not target.is_symlink():
        return target
    if target.is_dir() and not any(target.iterdir()):
        return target
    check_ours(target, Path(path))
    if not overwrite:
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


def temp_name(target: Path, kind: str, tag: str) -> str:
    """The hidden name a save gives its temporary (``kind="partial"``) or the previous contents it
    moves away (``"old"``) beside ``target``: ``.model.partial-<pid>-<hex>.safetensors`` (the
    suffix kept: writers that go by it, such as matplotlib, still work)."""
    return f".{target.stem}.{kind}-{tag}{target.suffix}"


_LEFTOVER = re.compile(r"\.(?P<base>.+?)\.(?P<kind>partial|old)-(?P<pid>\d+)(?:-(?P<tag>[0-9a-f]{8}))?(?P<rest>.*)")
_INSIDE = re.compile(r"\.partial-(?P<pid>\d+)-[0-9a-f]{8}")
_MANIFEST_TEMP = re.compile(r"\." + re.escape(MANIFEST) + r"\.partial-(?P<pid>\d+)")  # manifest_temp(pid)


def clean_leftovers(target: Path) -> None:
    """Remove what saves into ``target`` killed mid-way (by processes that are gone) left: a
    partial new file or folder beside it or inside it (a save into an empty folder). The previous
    contents a save moved away (``.old``) are removed only when ``target`` is the complete save
    that replaced them; otherwise they may be the only copy and are kept, with a warning."""
    if target.parent.is_dir():
        for item in target.parent.iterdir():
            match = _LEFTOVER.fullmatch(item.name)
            if match is None or process_alive(int(match["pid"])):
                continue
            base, rest = match["base"], match["rest"]
            if base + rest != target.name and not (base == target.name and rest in ("", ".partial")):
                continue
            if match["kind"] == "partial":
                log.warning("%s is an unfinished save into %s (the process was killed); removed it", item, target)
                _remove(item)
            elif (read_manifest(target) or {}).get("tag") == f"{match['pid']}-{match['tag']}":
                log.info("removed %s: the previous contents of %s, which the save that replaced them was killed before removing",
                         item, target)
                _remove(item)
            else:
                log.warning("%s holds the previous contents of %s, left by a save that was killed between its two renames; "
                            "rename it back (or delete it) by hand", item, target)
    if target.is_dir() and not target.is_symlink():
        for item in target.iterdir():
            match = _INSIDE.fullmatch(item.name)
            if match is not None and not process_alive(int(match["pid"])):
                log.warning("%s is an unfinished save into %s (the process was killed); removed it", item, target)
                _remove(item)
    _clean_manifest_temps(target)


def _clean_manifest_temps(target: Path) -> None:
    """Remove the temporaries of manifests that saves killed while recording (processes that are
    gone) left in ``target``'s folder and, for a folder, in ``target``."""
    folders = [target.parent] + ([target] if target.is_dir() and not target.is_symlink() else [])
    for folder in folders:
        if not folder.is_dir():
            continue
        for item in folder.iterdir():
            match = _MANIFEST_TEMP.fullmatch(item.name)
            if match is not None and item.is_file() and not process_alive(int(match["pid"])):
                log.warning("%s is an unfinished update of %s (the process was killed); removed it", item, folder / MANIFEST)
                item.unlink()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (this process included)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process id can be
        return False
    except OSError:  # exists, but not ours
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to disk; a file system that cannot sync a folder is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under ``path`` (a file: itself) to disk, so that a rename that
    follows never exposes data still in the page cache after a power loss."""
    if not path.is_dir():
        _fsync(path)
        return
    for root, _, files in os.walk(path):
        for name in files:
            if not (Path(root) / name).is_symlink():
                _fsync(Path(root) / name)
        _fsync(Path(root))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (a new folder when ``folder``, else a file path) to
    write into; on success flush it to disk and rename it into place (replacing what was there,
    checked again right before: what appeared there meanwhile and is not map_merge's is never
    replaced, :class:`FileExistsError`; without ``overwrite``, nothing that appeared there meanwhile
    is, even map_merge's: another save's), on any error or interrupt remove it. A folder gets its manifest (every entry listed, see
    :mod:`.manifest`); a file is added to its folder's manifest.

    An existing *empty* folder is kept (its permissions, ownership, a volume mounted there): the
    new files are written into a hidden folder inside it and moved up at the end, the manifest
    first and ``config.json`` last (a save killed mid-way is then no loadable model, and what it
    moved is known to be map_merge's). Call :func:`check_destination` first: this replaces an
    existing ``path``."""
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    into_empty = folder and target.is_dir() and not any(target.iterdir())
    temp = target / f".partial-{tag}" if into_empty else target.with_name(temp_name(target, "partial", tag))
    if folder:
        temp.mkdir()
    try:
        yield temp
        if folder:
            write_manifest(temp, "folder", entries_of(temp), tag)
        _fsync_tree(temp)
        _check_still_free(target, temp if into_empty else None, Path(path), overwrite)
        if into_empty:
            _move_up(temp, target)
            _fsync(target)
        elif not target.exists() or (not folder and not target.is_dir()):
            os.replace(temp, target)  # a new path, or a file replaced atomically
        else:
            old = target.with_name(temp_name(target, "old", tag))
            os.replace(target, old)
            try:
                os.replace(temp, target)
            except BaseException:
                os.replace(old, target)  # put the old one back
                raise
            _fsync(target.parent)  # the new one in place for good before the old one goes
            _remove(old)
        _fsync(target.parent)
        if not folder:
            record(target.parent, [target.name])
    finally:
        if temp.exists() or temp.is_symlink():
            _remove(temp)


def _check_still_free(target: Path, inside: Path | None, shown: Path, overwrite: bool = True) -> None:
    """Right before the renames: refuse (FileExistsError / ValueError, nothing replaced) when what
    is at ``target`` now is not all map_merge's (:func:`.manifest.check_ours`): someone (the user,
    another process) put it there while this save wrote its temporary. ``inside``: the temporary
    a save into an empty folder writes in it (the folder must hold nothing else). Without
    ``overwrite``, what is there now was not when the save was checked (an empty folder aside):
    another save finished meanwhile, and is kept."""
    if inside is not None:
        others = sorted(item.name for item in target.iterdir() if item != inside)
        if others:
            raise FileExistsError(f"refusing to save into {shown}: {len(others)} item(s) appeared in it while this save ran "
                                  f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); nothing was replaced")
    elif target.exists() or target.is_symlink():
        if not overwrite and not (target.is_dir() and not target.is_symlink() and not any(target.iterdir())):
            raise FileExistsError(f"refusing to save into {shown}: it appeared while this save ran (another save?) and overwrite "
                                  "is off; nothing was replaced")
        check_ours(target, shown)


def _move_up(temp: Path, target: Path) -> None:
    """Move every entry of ``temp`` into ``target`` (same file system): the manifest first,
    ``config.json`` last."""
    items = sorted(temp.iterdir(), key=lambda item: (item.name != MANIFEST, item.name == "config.json"))
    for item in items:
        os.replace(item, target / item.name)
    temp.rmdir()


def side_files(source_folder: str | os.PathLike) -> list[Path]:
    """The files of a pretrained folder copied beside merged weights: every plain file but the
    weights and their indexes (:data:`WEIGHT_SUFFIXES`) and hidden ones."""
    return [item for item in Path(source_folder).iterdir() if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES)
            and item.name not in _WEIGHT_INDEXES and not item.name.startswith(".")]


def write_side_files(folder: Path, source_folder: Path | None, config: Any = None, generation_config: Any = None,
                     destination: Path | None = None) -> None:
    """The non-weight files of the pretrained model: ``config.json``, ``generation_config.json``,
    tokenizer files... copied from its folder, or written from a module's configs. ``destination``:
    where ``folder`` is going (for messages)."""
    if source_folder is not None and source_folder.is_dir():
        for item in side_files(source_folder):
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
    with atomic_path(target, folder=True, overwrite=overwrite) as temp:
        if hasattr(module, "save_pretrained"):
            module.save_pretrained(str(temp))
        else:
            state, _ = checkpoint_state(module)
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(temp / "model.safetensors"), metadata={"format": "pt"})
        if source_folder is not None:
            for item in side_files(source_folder):
                if not (temp / item.name).exists():  # save_pretrained's own files win
                    shutil.copy2(item, temp / item.name)
        if metadata is not None:
            write_json(temp / "map_merge.json", metadata)
    return Path(path)
