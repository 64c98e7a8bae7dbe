"""Command line: ``map-merge {demo, zoo, map, bayes, nested, moe, save}``; ``map-merge <command>
--help`` shows each command's own options first, then the shared ones, and a worked example.

``map-merge map --config run.yaml`` runs MAP (``bayes``: Bayesian MAP, ``nested``: nested merging
for the config's preference, ``moe``: PWE-MoE) on the models a YAML or JSON file describes
(:mod:`map_merge.config_read`), and writes to the config's ``out`` folder ``result.json``,
``front.png``, the model picked for the config's preference as a Hugging Face folder,
``merged/``, and the run report ``report.md`` / ``report.json`` (:mod:`.report`).
``map-merge save --config run.yaml --coeffs 0.3,0.5`` writes the merge for given coefficients
(``--preference 1,2``: the point a finished map/bayes run's front picks) and prints its report block.

Modules: :mod:`.parser` (arguments and help; texts in :mod:`.help_text`), :mod:`.runs` (the run
commands), :mod:`.save`, :mod:`.zoos` (demo and zoo), :mod:`.outputs` (files written besides models),
:mod:`.report` and :mod:`.report_text` (the run report).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_config
from .parser import build_parser
from .save import parse_floats as _parse_floats  # noqa: F401 - the name tests and older code import

__all__ = ["main", "build_parser", "load_config", "ConfigError"]


def _commands() -> dict[str, Any]:
    from .runs import cmd_run
    from .save import cmd_save
    from .zoos import cmd_demo, cmd_zoo

    return {"demo": cmd_demo, "zoo": cmd_zoo, "map": cmd_run, "bayes": cmd_run, "nested": cmd_run, "moe": cmd_run, "save": cmd_save}


def main(argv: list[str] | None = None) -> int:
    """Run ``map-merge`` with ``argv`` (default: the process's arguments); the exit status: 0, 2 for
    an error in the config or the arguments (printed as one line), 1 for an error of the file system
    (permission denied, disk full; one line too), 130 after Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # the per-load weight bars drown the real progress; transformers reads this when it is imported (a
    # run that needs it imports it later; importing it here only to switch them off costs a second)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _commands()[args.command](args)
    except (ValueError, ImportError, FileNotFoundError, FileExistsError) as error:
        print(f"map-merge {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # permission denied, disk full, not a directory...: one line, no traceback
        print(f"map-merge {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(_interrupted(args, sys.argv[1:] if argv is None else argv), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace, argv: list[str]) -> str:
    """What a Ctrl-C leaves: how many evaluations the store keeps and the command that resumes."""
    import shlex

    from ..store import EvaluationStore

    store = getattr(args, "store_path", None)
    saved = getattr(args, "saved", None)
    if saved is not None:  # save, interrupted while it wrote the recipe or evaluated the saved model
        recipe = getattr(args, "saved_recipe", None)
        wrote = f" and the mergekit recipe to {recipe}" if recipe is not None else (
            "; the mergekit recipe was not written" if getattr(args, "emit_mergekit", None) else "")
        return f"map-merge {args.command}: interrupted; the merged model was saved to {saved} (complete){wrote}; the report block was not printed"
    if store is None:
        return f"map-merge {args.command}: interrupted; nothing was written (temporary files are removed)"
    try:
        opened = EvaluationStore(store) if Path(store).exists() else None
        count: Any = opened.count() if opened is not None else 0
        if opened is not None:
            opened.close()
    except Exception:  # noqa: BLE001 - a store that cannot be read now: say so, no traceback
        count = "an unknown number of"
    return (f"map-merge {args.command}: interrupted; the evaluation store {store} keeps {count} task evaluation(s). "
            f"Run the same command again to resume (stored evaluations are not repeated):\n  map-merge {shlex.join(argv)}")
