"""A mergekit recipe's top-level settings beside the merge itself: ``dtype``, ``out_dtype``,
``tokenizer_source``, ``tokenizer``, ``chat_template`` (plain data; used by
:mod:`map_merge.mergekit_config` and the CLI).

mergekit 0.1.5 loads every tensor in ``dtype`` (when given), merges, and writes ``out_dtype`` (else
the merge's dtype: ``dtype``, else the checkpoints'); ``config.json``'s ``torch_dtype`` says the
same (``mergekit/io/tasks.py``, ``merge.py``). It knows the dtype names ``bfloat16``, ``float16``,
``float32``, ``float64``, ``int64`` (``torch.`` in front too) and refuses others when it runs.
``tokenizer_source`` (``base``, ``union`` or a model) or ``tokenizer`` (not both: refused) and
``chat_template`` say which tokenizer it writes beside the merge.

map_merge merges in its task vectors' dtype and its saved folder keeps the pretrained checkpoint's
dtypes and tokenizer files. A run started from a recipe keeps these settings as read and writes
them back into the recipe it emits (:func:`carry_settings`); where its saved folder differs from
mergekit's output, a warning says how (:func:`tokenizer_notes` when read, :func:`dtype_note` when saved).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SETTINGS", "DTYPES", "read_settings", "carry_settings", "tokenizer_notes", "dtype_note", "warn_dtype"]

log = logging.getLogger(__name__)

SETTINGS = ("dtype", "out_dtype", "tokenizer_source", "tokenizer", "chat_template")
DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")


def read_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's settings that are set (``SETTINGS`` order), as written. Raises ValueError
    starting ``field ...`` where mergekit would refuse them: an unknown dtype name, both
    ``tokenizer_source`` and ``tokenizer``."""
    settings = {key: config[key] for key in SETTINGS if config.get(key) is not None}
    for key in ("dtype", "out_dtype"):
        if key in settings and _dtype_name(settings[key]) is None:
            raise ValueError(f"field {key!r} is {settings[key]!r}; mergekit reads {list(DTYPES)} (or 'torch.' and one of them)")
    if "tokenizer_source" in settings and "tokenizer" in settings:
        raise ValueError("field 'tokenizer' and 'tokenizer_source' are both given; mergekit takes one of them")
    return settings


def _dtype_name(value: Any) -> str | None:
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    return name if name in DTYPES else None


def carry_settings(emitted: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``emitted`` (a config from :func:`~map_merge.mergekit_config.emit_recipe`) with the read
    recipe's ``settings`` in place of its defaults (its ``dtype: float32`` among them)."""
    return {**emitted, **settings}


def tokenizer_notes(settings: Mapping[str, Any]) -> list[str]:
    """What map_merge's saved folder does differently from mergekit's tokenizer settings."""
    notes = []
    source = settings.get("tokenizer_source")
    if source not in (None, "base") or "tokenizer" in settings:
        shown = f"tokenizer_source: {source!r}" if source is not None else "tokenizer: ..."
        notes.append(f"{shown}: mergekit builds that tokenizer (and may resize the embeddings to it); map_merge's saved folder "
                     "carries the pretrained model's tokenizer files (the setting is kept in an emitted recipe)")
    if "chat_template" in settings:
        notes.append("chat_template: mergekit writes it into the merged tokenizer; map_merge's saved folder keeps the pretrained "
                     "model's (the setting is kept in an emitted recipe)")
    return notes


def dtype_note(settings: Mapping[str, Any], written: Iterable[Any], merged_in: Any) -> str | None:
    """How map_merge's saved folder differs from mergekit's output under the recipe's ``dtype`` /
    ``out_dtype``: ``written``, the saved tensors' dtypes (torch dtypes or names); ``merged_in``,
    the dtype map_merge merges in. None where they agree (or the recipe sets neither)."""
    compute, out = _dtype_name(settings.get("dtype")), _dtype_name(settings.get("out_dtype"))
    expected = out or compute
    if expected is None:
        return None
    names = sorted({n for n in (str(d).removeprefix("torch.") for d in written) if n.startswith(("float", "bfloat"))})
    merged_name = str(merged_in).removeprefix("torch.")
    differences = []
    if names and names != [expected]:  # integer buffers (position ids): copied as they are on both sides
        differences.append(f"mergekit writes {expected} tensors (config.json torch_dtype {expected}), map_merge's saved folder "
                           f"keeps the pretrained checkpoint's dtypes ({', '.join(names)})")
    if compute is not None and compute != merged_name:
        differences.append(f"mergekit merges in {compute}, map_merge in {merged_name}")
    if not differences:
        return None
    asked = ", ".join(f"{k}: {settings[k]}" for k in ("dtype", "out_dtype") if k in settings)
    return f"the mergekit recipe's {asked}: " + "; ".join(differences) + " (the recipe's dtypes are kept in an emitted recipe)"


def warn_dtype(settings: Mapping[str, Any], task_vectors: Any) -> str | None:
    """Log :func:`dtype_note` for a merge ``task_vectors.save_merged`` writes; returns the note."""
    written = [dtype for _, dtype, _ in task_vectors._output_entries()]
    note = dtype_note(settings, written, task_vectors.dtype)
    if note:
        log.warning("%s", note)
    return note
