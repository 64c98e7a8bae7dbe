"""What map_merge wrote in a folder: the one rule by which ``overwrite=True`` replaces anything.

Every folder map_merge writes into keeps, in its ``map_merge.json`` (beside a merged model's
coefficients and sources), a manifest of the entries it wrote there::

    "_manifest": {"kind": "folder", "tag": "<pid>-<hex>", "entries": ["config.json", "model.safetensors", ...],
                  "stats": {"config.json": [size, mtime_ns], ...}}

``kind``: ``"folder"``, a folder saved whole (a merged model, an adapter; ``entries``: every file
and folder in it, as relative paths); ``"run"``, a command line run's output folder (its results
beside the evaluation store: never a save destination); ``"files"``, a folder map_merge wrote
single files into (a ``.safetensors``, a recipe). ``tag``: the save that wrote a whole folder.
``stats``: each file's size and modification time as map_merge left it (renames keep both).

An existing path may be replaced only when map_merge wrote it: a file that its folder's manifest
lists, unchanged since (its recorded size and modification time), a folder whose every entry its
own manifest lists so. Anything else in the way (a user's notes, another tool's model, an
evaluation store, a config, a folder saved by a map_merge that kept no manifest, a file a user
rewrote under a name map_merge wrote: ``save_pretrained`` into a merged folder) is never replaced
nor deleted: the save is refused, naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "RUN_RESULTS", "read_manifest", "write_manifest", "record", "mark_run", "unlisted", "check_ours", "entries_of",
           "file_stats", "manifest_temp"]

log = logging.getLogger(__name__)

MANIFEST = "map_merge.json"
_KEY = "_manifest"
RUN_RESULTS = ("result.json", "front.png", "report.md", "report.json")
"""What a command line run writes into its folder that only the run itself replaces (never a save:
its pick, ``merged/``, and recipe, ``mergekit.yaml``, are saves' destinations too)."""
_SHOWN = 5  # names a message lists


def _read_json(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``map_merge.json`` (``{}``: none; ``None``: a file of that name that is no JSON object)."""
    try:
        payload = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder`` (``None``: none, or unreadable: then nothing there counts as ours)."""
    manifest = (_read_json(folder) or {}).get(_KEY)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        return None
    return manifest


def _stat(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of the file ``path`` (a link itself, not followed); None for a folder or nothing."""
    try:
        info = path.lstat()
    except OSError:
        return None
    return None if path.is_dir() and not path.is_symlink() else [info.st_size, info.st_mtime_ns]


def file_stats(folder: Path, names: Iterable[str]) -> dict[str, list[int]]:
    """``name -> [size, mtime_ns]`` of the files ``names`` (relative paths) in ``folder`` as they are now."""
    out = {}
    for name in names:
        stat = _stat(folder / name)
        if stat is not None:
            out[name] = stat
    return out


def write_manifest(folder: Path, kind: str, entries: Iterable[str], tag: str | None = None,
                   stats: dict[str, list[int]] | None = None) -> bool:
    """Write ``folder``'s manifest into its ``map_merge.json`` (other keys kept; written beside,
    flushed to disk, renamed into place). ``stats``: the files' recorded sizes and times (default:
    every entry's, as it is now). A ``map_merge.json`` that is no JSON object is not map_merge's and
    is left alone (returns False: nothing recorded)."""
    payload = _read_json(folder)
    if payload is None:
        log.warning("%s is not map_merge's (no JSON object): what map_merge wrote in %s is not recorded", folder / MANIFEST, folder)
        return False
    entries = sorted(set(entries))
    stats = file_stats(folder, entries) if stats is None else stats
    payload[_KEY] = {"kind": kind, "entries": entries, **({"tag": tag} if tag is not None else {}),
                     "stats": {name: stats[name] for name in entries if name in stats}}
    temp = folder / manifest_temp(os.getpid())
    try:
        with open(temp, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, folder / MANIFEST)
    finally:
        if temp.exists():
            temp.unlink()
    return True


def manifest_temp(pid: int) -> str:
    """The name :func:`write_manifest` writes the manifest under before renaming it into place."""
    return f".{MANIFEST}.partial-{pid}"


def record(folder: Path, names: Iterable[str], kind: str = "files") -> None:
    """Add ``names`` (entries map_merge just wrote in ``folder``) to its manifest; ``kind`` for a
    new manifest (an existing one keeps its own, except that ``"run"`` always wins)."""
    names = list(names)
    manifest = read_manifest(folder) or {"kind": kind, "entries": []}
    new_kind = "run" if kind == "run" else manifest.get("kind", kind)
    kept = {name: stat for name, stat in _stats_of(manifest).items() if name not in names}  # never re-stamp a file it did not write now
    write_manifest(folder, new_kind, [*manifest["entries"], *names], manifest.get("tag"), {**kept, **file_stats(folder, names)})


def mark_run(folder: Path) -> None:
    """Mark ``folder`` as a command line run's output folder (never a save destination)."""
    record(folder, [], kind="run")


def entries_of(folder: Path) -> list[str]:
    """Every file and folder under ``folder`` as relative POSIX paths (links not followed), its
    manifest left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        out += [(base / name).as_posix() for name in [*dirs, *files]]
    return [name for name in out if name != MANIFEST]


def _stats_of(manifest: dict[str, Any]) -> dict[str, Any]:
    stats = manifest.get("stats")
    return stats if isinstance(stats, dict) else {}


def _ours(manifest: dict[str, Any] | None, name: str, path: Path) -> bool:
    """Whether ``manifest`` lists ``name`` (the file ``path``) and the file is as map_merge left it
    (a manifest of no ``stats``, written before they were kept: the name alone)."""
    if manifest is None or name not in manifest["entries"]:
        return False
    recorded = _stats_of(manifest).get(name)
    return recorded is None or _stat(path) == list(recorded)


def unlisted(path: Path) -> list[Path]:
    """What of an existing ``path`` map_merge did not write: ``[path]`` for a file its folder's
    manifest does not list (or that changed since it was written); for a folder, each entry its
    own manifest does not list so (a folder not listed counts as one entry)."""
    if path.is_symlink() or not path.is_dir():
        return [] if _ours(read_manifest(path.parent), path.name, path) else [path]
    manifest = read_manifest(path)
    listed = set(manifest["entries"]) if manifest is not None else set()
    out = []
    for root, dirs, files in os.walk(path):
        base = Path(root).relative_to(path)
        for name in sorted(files):
            if base == Path(".") and name == MANIFEST and manifest is not None:
                continue
            if not _ours(manifest, (base / name).as_posix(), Path(root) / name):
                out.append(Path(root) / name)
        stray = [name for name in dirs if (base / name).as_posix() not in listed]
        out += [Path(root) / name for name in sorted(stray)]
        dirs[:] = [name for name in dirs if name not in stray]  # a folder not ours: whole, not its insides
    return out


def check_ours(path: Path, shown: Path) -> None:
    """Raise unless map_merge wrote all of the existing ``path`` (``shown``: the path as the user
    gave it, for messages).

    Raises:
        ValueError: ``path`` is a command line run's output folder (results, evaluation store).
        FileExistsError: ``path`` is, or holds, something map_merge did not write."""
    if path.is_dir() and not path.is_symlink() and (read_manifest(path) or {}).get("kind") == "run":
        raise ValueError(f"refusing to save into {shown}: it is the output folder of a command line run (its results and "
                         "evaluation store are kept there); choose another folder")
    foreign = unlisted(path)
    if not foreign:
        return
    if foreign == [path]:
        raise FileExistsError(f"refusing to replace {shown}: map_merge did not write it (the manifest in the {MANIFEST} beside it "
                              "does not list it, or it changed since map_merge wrote it); overwrite replaces only what map_merge "
                              "wrote. Move it away or choose another destination")
    names = ", ".join(str(item.relative_to(path)) for item in foreign[:_SHOWN]) + (", ..." if len(foreign) > _SHOWN else "")
    raise FileExistsError(f"refusing to replace {shown}: it holds {len(foreign)} item(s) map_merge did not write ({names}: "
                          f"the manifest in its {MANIFEST} does not list them, or they changed since map_merge wrote them); "
                          "overwrite replaces only what map_merge wrote "
                          "there. Move them away or choose another folder")
