"""``map-merge demo`` and ``map-merge zoo``: the bundled offline zoos."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

__all__ = ["cmd_demo", "cmd_zoo"]


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    args.store_path = Path(args.out) / "evaluations.sqlite"  # what a Ctrl-C reports
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    report = run_demo(out=args.out, zoo=args.zoo, seed=args.seed, moe_steps=args.moe_steps, moe_methods=args.moe_methods,
                      val_examples=None if args.val_examples == 0 else args.val_examples, all_baselines=args.all_baselines,
                      zoo_table_too=args.zoo_table,
                      grid_per_axis=args.grid_per_axis, skip=args.skip)
    print((Path(args.out) / "report.md").read_text())
    print(f"\nwrote {args.out}/report.json, report.md and plots ({report['seconds']:.0f} s)")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from ..zoo import load_zoo

    zoo = load_zoo(args.zoo, args.tasks)
    tv = zoo.task_vectors()
    print(f"{zoo.name} zoo: tasks {list(zoo.task_names)}; {tv.num_params:,} merged parameters")
    print("task-vector cosine similarities:\n" + np.array2string(tv.cosine_similarity(), precision=3))
    return 0
