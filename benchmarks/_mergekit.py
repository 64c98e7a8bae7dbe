"""mergekit in a virtual environment of its own, for the benchmarks that compare with it.

mergekit is never a dependency of map_merge: its environment is created on first use (network
access to the package index needed) next to the benchmarks, in ``benchmarks/.mergekit-venv``
(git-ignored), or where ``MAP_MERGE_MERGEKIT_VENV`` points. torch is pinned to the CPU build and
installed in the same pip command, so pip does not fetch a CUDA build for mergekit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"
DEFAULT_VENV = Path(__file__).resolve().parent / ".mergekit-venv"


def mergekit_venv() -> Path:
    return Path(os.environ.get("MAP_MERGE_MERGEKIT_VENV", DEFAULT_VENV))


def mergekit_bin(create: bool = True) -> Path:
    """The ``bin`` folder of the environment (``python``, ``mergekit-yaml``), created if missing."""
    venv = mergekit_venv()
    stamp = venv / f".installed-{MERGEKIT}"
    if not stamp.exists():
        if not create:
            raise FileNotFoundError(f"no mergekit environment at {venv}")
        print(f"creating {venv} with {MERGEKIT} (once; needs the package index)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", TORCH, MERGEKIT], check=True)
        stamp.write_text(f"{TORCH} {MERGEKIT}\n")
    return venv / "bin"


def run_in_mergekit(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python ``code`` (with ``args`` as ``sys.argv[1:]``) in the mergekit environment."""
    return subprocess.run([str(mergekit_bin() / "python"), "-c", code, *args], check=True, capture_output=True, text=True)
