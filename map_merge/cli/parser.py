"""The command line's arguments and help: one parser per command, its own options first, then the
options every command shares, then a worked example (and, for the run commands, every config
field). Negative numbers are values, not options: ``--coeffs -5,1`` parses."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from .help_text import CONFIG_REFERENCE, DESCRIPTIONS, EXAMPLES, OUTPUTS, PATHS, RUN_SETTINGS, SUMMARIES

__all__ = ["build_parser", "RUN_COMMANDS", "NUMBER_OPTIONS"]

RUN_COMMANDS = ("map", "bayes", "nested", "moe")
NUMBER_OPTIONS = ("--coeffs", "--preference")
"""Options whose value is a comma-separated list of numbers, which may start with a minus sign."""

_NEGATIVE = re.compile(r"-\s*(\d|\.\d)")


def join_negative_values(args: Sequence[str]) -> list[str]:
    """``[..., "--coeffs", "-5,1"]`` as ``[..., "--coeffs=-5,1"]``: argparse takes a value starting
    with ``-`` that is not one plain number for an option and refuses it."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + list(args[i:])
        if arg in NUMBER_OPTIONS and i + 1 < len(args) and _NEGATIVE.match(args[i + 1]):
            out.append(f"{arg}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reads ``--coeffs -5,1`` as the value it is (sub-parsers share the class)."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(join_negative_values(list(args)), namespace)


def _command(sub, name: str, own_title: str) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup, argparse._ArgumentGroup]:
    """A sub-parser with its description and its example as epilog: ``(parser, its own options,
    the shared options)``; ``-h`` and ``-v`` are shared (:func:`_finish` adds them last)."""
    parser = sub.add_parser(name, help=SUMMARIES[name], description=DESCRIPTIONS[name], epilog=EXAMPLES[name],
                            formatter_class=argparse.RawDescriptionHelpFormatter, add_help=False)
    own = parser.add_argument_group(own_title)
    shared = parser.add_argument_group("shared options")
    return parser, own, shared


def _finish(shared: argparse._ArgumentGroup) -> None:
    shared.add_argument("-h", "--help", action="help", help="show this help and exit")
    shared.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at INFO level")


def _run_commands(sub) -> None:
    for name in RUN_COMMANDS:
        parser, own, shared = _command(sub, name, f"{name} options")
        parser.description += "\n\n" + RUN_SETTINGS[name]
        parser.epilog = EXAMPLES[name] + "\n" + OUTPUTS + "\n" + PATHS + "\n" + CONFIG_REFERENCE
        own.add_argument("--config", required=True, metavar="RUN.yaml", help="the run's YAML or JSON config (fields below)")
        if name != "moe":
            own.add_argument("--emit-mergekit", action="store_true",
                             help="also write out/mergekit.yaml: the pick as a mergekit recipe (mergekit-yaml reproduces merged/)")
        shared.add_argument("--overwrite", action="store_true",
                            help="replace result.json, front.png, merged/ and the report of an earlier run in 'out' (only what map_merge wrote "
                                 "there; the evaluation store is kept and reused either way)")
        shared.add_argument("--mergekit", default=None, metavar="RECIPE",
                            help="a mergekit recipe (YAML) supplying pretrained, finetuned (task names: the model folders' names), the "
                                 "merge method, per-layer or filtered weights (coefficient groups) and the starting point of the search")
        _finish(shared)
        parser.set_defaults(command=name, emit_mergekit=False)


def _save_command(sub) -> None:
    parser, own, shared = _command(sub, "save", "save options")
    parser.epilog = EXAMPLES["save"] + "\n" + PATHS
    own.add_argument("--coeffs", default=None, metavar="C1,C2,...",
                     help="the coefficients, comma-separated, one per task (T x G, task-major, with the config's groups); "
                          "negative ones too: --coeffs -0.5,1")
    own.add_argument("--preference", default=None, metavar="W1,W2,...",
                     help="preference weights, comma-separated: save the point the front of the config's finished map/bayes run "
                          "picks for them (instead of --coeffs)")
    own.add_argument("--out", default=None, metavar="PATH",
                     help="a folder (Hugging Face layout) or a .safetensors file; default with --config: <out>/merged")
    own.add_argument("--method", default=None, metavar="METHOD",
                     help="the merge operator (default: the config's 'method'): task_arithmetic, ties, dare, breadcrumbs, della, or "
                          "with settings as in a config: \"{name: ties, k: 0.6, scope: tensor}\"")
    own.add_argument("--emit-mergekit", default=None, metavar="YAML", help="also write the merge as a mergekit recipe to this file")
    own.add_argument("zoo", nargs="?", choices=["lm", "text", "vision"], default=None, help="a bundled zoo instead of --config")
    own.add_argument("--tasks", nargs="*", default=None, help="with a bundled zoo: its tasks (default: all)")
    shared.add_argument("--config", default=None, metavar="RUN.yaml",
                        help="a run's YAML/JSON config: its models, method and groups (and, for --preference, its result in 'out')")
    shared.add_argument("--overwrite", action="store_true", help="replace an existing output (only what map_merge wrote)")
    shared.add_argument("--mergekit", default=None, metavar="RECIPE", help="with --config: models, method and groups from a mergekit recipe")
    _finish(shared)
    parser.set_defaults(command="save")


def _demo_command(sub) -> None:
    parser, own, shared = _command(sub, "demo", "demo options")
    own.add_argument("--out", default="outputs/demo", help="output folder (holds the evaluation store too)")
    own.add_argument("--zoo", choices=["lm", "text", "vision"], default="lm",
                     help="the bundled zoo (lm: a Llama pretrained here and its domain experts, the demo; text: sentence "
                          "classifiers on MiniLM; vision: a one-minute preview)")
    own.add_argument("--seed", type=int, default=0)
    own.add_argument("--val-examples", type=int, default=100,
                     help="text/vision zoos: validation examples per task the methods are scored on (0: all 200)")
    own.add_argument("--moe-steps", type=int, default=None,
                     help="PWE-MoE router training steps (default 500 on the lm zoo, 100 on the others; 0 skips MoE)")
    own.add_argument("--moe-methods", nargs="+", default=["ls"], choices=["ls", "epo"], help="PWE-MoE training objectives")
    own.add_argument("--all-baselines", action="store_true",
                     help="also random search and NSGA-II, and every baseline on the 3-task problem (about 5 minutes more)")
    own.add_argument("--zoo-table", action="store_true", default=None,
                     help="add the zoo table (always on the lm zoo; text zoo: test accuracies, about 2 minutes more)")
    own.add_argument("--threads", type=int, default=1,
                     help="torch intra-op threads (default 1: the zoos' models are small, and on a busy machine two threads "
                          "spin-waiting over small matrices ran up to 25x slower than one; 0: torch's default)")
    own.add_argument("--skip", nargs="+", default=[], metavar="METHOD", help="methods to leave out, by their report names (e.g. qNEHVI)")
    own.add_argument("--grid-per-axis", type=int, default=None, help="add a grid of real evaluations to the reference front")
    _finish(shared)
    parser.set_defaults(command="demo")


def _zoo_command(sub) -> None:
    parser, own, shared = _command(sub, "zoo", "zoo options")
    own.add_argument("zoo", choices=["lm", "text", "vision"], help="which bundled zoo")
    own.add_argument("--tasks", nargs="*", default=None, help="its tasks (default: all)")
    _finish(shared)
    parser.set_defaults(command="zoo")


def build_parser() -> argparse.ArgumentParser:
    """The ``map-merge`` parser: ``args.command`` names the command."""
    parser = _Parser(prog="map-merge", description="Pareto fronts of merged models (MAP, Bayesian, nested, MoE).",
                     epilog="Each command has its own help with an example: map-merge <command> --help.\n" + PATHS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,zoo,map,bayes,nested,moe,save}")
    _demo_command(sub)
    _zoo_command(sub)
    _run_commands(sub)
    _save_command(sub)
    return parser
