"""What the commands write besides models: files written then renamed into place (and listed in
their folder's manifest of what map_merge wrote), mergekit recipes, and which files a run's
outputs must never replace."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config_read import run_inputs, source_paths

__all__ = ["RESULTS", "atomic_write", "write_recipe", "check_out"]

RESULTS = ("result.json", "front.png", "merged", "mergekit.yaml", "report.md", "report.json")
"""What a run writes into 'out' (the evaluation store stays)."""


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> None:
    """``write(temporary path)`` then rename into place (a crash leaves the old file or none; the
    file is added to its folder's manifest of what map_merge wrote; ``overwrite=False``: a file
    that appeared there meanwhile is kept, :class:`FileExistsError`)."""
    from ..task_vectors.saving import atomic_path

    with atomic_path(path, folder=False, overwrite=overwrite) as temp:
        write(temp)


def write_recipe(recipe: dict[str, Any], path: Path, overwrite: bool = True) -> Path:
    """A mergekit recipe (from ``TaskVectors.mergekit_config``) as a YAML file ``mergekit-yaml`` reads."""
    from ..mergekit_config import recipe_yaml

    atomic_write(path, lambda temp: temp.write_text(recipe_yaml(recipe)), overwrite)
    return path


def check_out(config: dict[str, Any], out: Path, overwrite: bool, emit_mergekit: bool = False) -> None:
    """Refuse an 'out' that is or lies in a model source, a result that would replace an input of
    the run (config, code, data, store) or anything map_merge did not write (even with
    ``overwrite``), or an 'out' holding an earlier run's results (unless ``overwrite``); nothing is
    created here."""
    from ..task_vectors.saving import check_destination

    earlier = [name for name in RESULTS if (out / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(f"{out} holds the results of an earlier run ({', '.join(earlier)}); pass --overwrite to replace "
                              "them (the evaluation store is kept and reused either way), or choose another 'out'")
    # out/mergekit.yaml may be the recipe this run reads (a rerun of an emitted pick)
    for name in ("result.json", "front.png", "merged", "report.md", "report.json") + (("mergekit.yaml",) if emit_mergekit else ()):
        check_destination(out / name, source_paths(config), overwrite=True, inputs=run_inputs(config), run_results=True)
