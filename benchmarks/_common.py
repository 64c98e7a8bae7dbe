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


class RunJournal:
    """Finished runs of a long benchmark, kept as they finish: ``<out>/<name>.runs.jsonl``, a header
    line (the settings the rows depend on, and the commit) and one JSON line per run, each flushed and synced
    before the next run starts. A run that is stopped (Ctrl-C, a kill, a crash) keeps every run it
    finished: started again with the same settings it reads them back instead of running them
    again. A journal of other settings is never overwritten or deleted: it is renamed aside
    (``.runs.<time>.jsonl``) and a new one started. :meth:`close` removes the journal once the
    benchmark's own JSON holds its rows."""

    def __init__(self, out: str | Path, name: str, settings: dict[str, Any]) -> None:
        self.path = Path(out) / f"{name}.runs.jsonl"
        commit = source_commit()  # rows of other code are never read back; uncommitted code's rows only within its own run
        commit = commit if commit and not commit.endswith("-dirty") else f"{commit}@{time.time()}"
        self.header = json.loads(json.dumps({**settings, "commit": commit}))  # as JSON reads it back (tuples as lists, ...)
        self.rows: dict[str, dict[str, Any]] = {}
        self.used: set[str] = set()  # rows read back or added by this run: the ones its JSON will hold
        self.note = ""
        if self.path.exists():
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            try:
                first = json.loads(lines[0]) if lines else None
            except json.JSONDecodeError:  # a header torn by a kill: kept aside like another run's journal
                first = None
            if first == {"header": self.header}:
                for line in lines[1:]:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a run killed mid-write: that run is redone
                        continue
                    self.rows[entry["key"]] = entry["row"]
                self.note = f"{self.path}: {len(self.rows)} finished runs read back"
                self._rewrite()  # without a torn last line
                return
            aside = self._set_aside()
            self.note = f"{self.path} was made with other settings: kept as {aside.name}"
        self._rewrite()

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.partial")
        try:
            partial.write_text("".join(json.dumps(e) + "\n" for e in [{"header": self.header},
                                                                     *({"key": k, "row": r} for k, r in self.rows.items())]))
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        """The finished run's row under ``key``, or ``None``."""
        if key in self.rows:
            self.used.add(key)
        return self.rows.get(key)

    def add(self, key: str, row: dict[str, Any]) -> None:
        """Keep a finished run's ``row`` (JSON-serialisable) under ``key``."""
        self.rows[key] = json.loads(json.dumps(row))
        self.used.add(key)
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"key": key, "row": self.rows[key]}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def close(self) -> None:
        """The runs are in the benchmark's JSON: the journal goes, unless it holds runs this one did
        not use (a restart with fewer methods or seeds): then it is kept aside whole."""
        if set(self.rows) <= self.used:
            self.path.unlink(missing_ok=True)
            return
        self._set_aside()

    def _set_aside(self) -> Path:
        """Rename the journal to ``<name>.runs.<time>[-n].jsonl``, never over an earlier one kept aside."""
        stem, stamp, count = self.path.name[: -len(".runs.jsonl")], time.strftime("%Y%m%d-%H%M%S"), 0
        aside = self.path.with_name(f"{stem}.runs.{stamp}.jsonl")
        while aside.exists():
            count += 1
            aside = self.path.with_name(f"{stem}.runs.{stamp}-{count}.jsonl")
        os.replace(self.path, aside)
        return aside
