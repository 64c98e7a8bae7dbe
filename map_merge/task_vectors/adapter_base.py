"""Whether a LoRA adapter was trained on the pretrained model it is merged into.

An adapter trained on another base whose module names and shapes match merges without an error;
its ``adapter_config.json`` names the base it was trained on (``base_model_name_or_path``). The
names compared: a local folder by its resolved path (and, when it is a Hugging Face cache
snapshot ``models--org--name/snapshots/...``, as ``org/name``); a hub-style name (or a path that
does not exist here) by itself and its last component, against the pretrained folder's name
and its ``config.json``'s ``_name_or_path``. An adapter that names nothing, or a pretrained model
given as a bare state dict, is not checked.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

__all__ = ["base_names", "warn_if_other_base"]

_CACHE = re.compile(r"models--([^/\\]+?)--([^/\\]+)")


def _local(path: str | os.PathLike) -> Path | None:
    try:
        candidate = Path(path).expanduser()
        return candidate.resolve() if candidate.exists() else None
    except (OSError, ValueError):
        return None


def _hub_names(name: str) -> set[str]:
    """``{name, its last component}`` of a hub-style name (``org/name``), trailing slashes dropped."""
    name = name.strip().rstrip("/\\")
    return {name, re.split(r"[/\\]", name)[-1]} - {""} if name else set()


def _config_name(folder: Path) -> str | None:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name.strip() else None


def _text(source: Any) -> str | None:
    """The path or name a model source goes by: the path itself, or a module's ``_name_or_path``."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    config = getattr(source, "config", None)
    text = getattr(config, "_name_or_path", None) or getattr(source, "name_or_path", None)
    return text if isinstance(text, str) and text.strip() else None


def base_names(source: Any, folder_name: bool = True) -> tuple[set[Path], set[str]]:
    """``(resolved local paths, hub-style names)`` that identify a model given as a path or a
    module (``config._name_or_path``); both empty for anything else (a state dict). A local
    folder's own name counts as a hub-style name only with ``folder_name``."""
    text = _text(source)
    if text is None:
        return set(), set()
    local = _local(text)
    if local is None:
        names = _hub_names(text)
        paths: set[Path] = set()
    else:
        folder = local if local.is_dir() else local.parent
        paths = {local, folder}
        names = {folder.name} if folder_name and local.is_dir() else set()
        inner = _config_name(folder)
        if inner is not None and _local(inner) is None:
            names |= _hub_names(inner)
    match = _CACHE.search(str(local) if local is not None else text.replace("\\", "/"))
    if match:
        names |= _hub_names(f"{match.group(1)}/{match.group(2)}")
    return paths, names


def warn_if_other_base(adapter_path: Path, named: Any, pretrained: Any) -> None:
    """Warn (``UserWarning``) when the adapter at ``adapter_path``, whose config names the base
    ``named`` (``base_model_name_or_path``), was trained on something other than ``pretrained``."""
    if not isinstance(named, str) or not named.strip():
        return
    base_paths, base_hub = base_names(pretrained)
    if not base_paths and not base_hub:
        return  # a state dict: nothing to compare
    own_paths, own_hub = base_names(named, folder_name=False)
    if own_paths & base_paths or own_hub & base_hub:
        return
    warnings.warn(f"LoRA adapter {adapter_path} was trained on base model {named!r} (base_model_name_or_path in its "
                  f"adapter_config.json), but the pretrained model here is {_text(pretrained)!r}: its module names and shapes "
                  "match, so it is merged, but its task vector is only meaningful on the base it was trained on",
                  UserWarning, stacklevel=4)
