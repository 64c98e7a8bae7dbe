"""Helpers shared by the benchmark scripts: output folder, JSON writing, a short table."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help="output folder for JSON and PNG")
    p.add_argument("--quick", action="store_true", help="tiny configuration (checks that the script runs)")
    return p


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def source_commit() -> str | None:
    """The map_merge checkout's commit, ``-dirty`` when its code (the package or the benchmark
    scripts, not their results) has uncommitted changes; ``None`` outside git. It says which code
    made a result row (``--update`` tables hold rows of several runs)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return None
    changed = git("status", "--porcelain", "--", "map_merge", "benchmarks", ":(exclude)benchmarks/results")
    return commit + ("-dirty" if changed else "")


def write(out: str | Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out>/<name>.json`` whole or not at all (a temporary file renamed over it): a
    crash mid-write never leaves a table that hours of runs made half-written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    partial = out / f".{name}.json.{os.getpid()}.partial"
    try:
        partial.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def hv_ratios(reference, grid_metrics):
    """The two reference points of the front-quality benchmarks, ``tight`` (the reference front's
    nadir minus 0.1) and ``worst`` (the grid's worst value per task), and a function
    ``points (N, M) -> {"hv_tight": ..., "hv_worst": ...}``: hypervolume ratios to ``reference``."""
    import map_merge as mm

    refs = {"tight": reference.min(axis=0) - 0.1, "worst": grid_metrics.min(axis=0)}
    full = {k: mm.hypervolume(reference, r) for k, r in refs.items()}
    return refs, lambda points: {f"hv_{k}": mm.hypervolume(points, r) / full[k] for k, r in refs.items()}
