"""What map_merge wrote in a folder: the one rule by which ``overwrite=True`` replaces anything.

Every folder map_merge writes into keeps, in its ``map_merge.json`` (beside a merged model's
coefficients and sources), a manifest of the entries it wrote there::

    "_manifest": {"kind": "folder", "tag": "<pid>-<hex>", "entries": ["config.json", "model.safetensors", ...]}

``kind``: ``"folder"``, a folder saved whole (a merged model, an adapter; ``entries``: every file
and folder in it, as relative paths); ``"run"``, a command line run's output folder (its results
beside the evaluation store: never a save destination); ``"files"``, a folder map_merge wrote
single files into (a ``.safetensors``, a recipe). ``tag``: the save that wrote a whole folder.

An existing path may be replaced only when map_merge wrote it: a file that its folder's manifest
lists, a folder whose every entry its own manifest lists. Anything else in the way (a user's
notes, another tool's model, an evaluation store, a config, a folder saved by a map_merge that
kept no manifest) is never replaced nor deleted: the save is refused, naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST", "read_manifest", "write_manifest", "record", "mark_run", "unlisted", "check_ours", "entries_of"]

log = logging.getLogger(__name__)

MANIFEST = "map_merge.json"
_KEY = "_manifest"
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


def write_manifest(folder: Path, kind: str, entries: Iterable[str], tag: str | None = None) -> bool:
    """Write ``folder``'s manifest into its ``map_merge.json`` (other keys kept; written beside,
    flushed to disk, renamed into place). A ``map_merge.json`` that is no JSON object is not
    map_merge's and is left alone (returns False: nothing recorded)."""
    payload = _read_json(folder)
    if payload is None:
        log.warning("%s is not map_merge's (no JSON object): what map_merge wrote in %s is not recorded", folder / MANIFEST, folder)
        return False
    payload[_KEY] = {"kind": kind, "entries": sorted(set(entries)), **({"tag": tag} if tag is not None else {})}
    temp = folder / f".{MANIFEST}.partial-{os.getpid()}"
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


def record(folder: Path, names: Iterable[str], kind: str = "files") -> None:
    """Add ``names`` (entries map_merge just wrote in ``folder``) to its manifest; ``kind`` for a
    new manifest (an existing one keeps its own, except that ``"run"`` always wins)."""
    manifest = read_manifest(folder) or {"kind": kind, "entries": []}
    new_kind = "run" if kind == "run" else manifest.get("kind", kind)
    write_manifest(folder, new_kind, [*manifest["entries"], *names], manifest.get("tag"))


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


def unlisted(path: Path) -> list[Path]:
    """What of an existing ``path`` map_merge did not write: ``[path]`` for a file its folder's
    manifest does not list; for a folder, each entry its own manifest does not list (a folder
    not listed counts as one entry)."""
    if path.is_symlink() or not path.is_dir():
        manifest = read_manifest(path.parent)
        return [] if manifest is not None and path.name in manifest["entries"] else [path]
    manifest = read_manifest(path)
    listed = set(manifest["entries"]) if manifest is not None else set()
    out = []
    for root, dirs, files in os.walk(path):
        base = Path(root).relative_to(path)
        for name in sorted(files):
            if (base / name).as_posix() not in listed and not (base == Path(".") and name == MANIFEST and manifest is not None):
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
                              "does not list it); overwrite replaces only what map_merge wrote. Move it away or choose another "
                              "destination")
    names = ", ".join(str(item.relative_to(path)) for item in foreign[:_SHOWN]) + (", ..." if len(foreign) > _SHOWN else "")
    raise FileExistsError(f"refusing to replace {shown}: it holds {len(foreign)} item(s) map_merge did not write ({names}: "
                          f"the manifest in its {MANIFEST} does not list them); overwrite replaces only what map_merge wrote "
                          "there. Move them away or choose another folder")
