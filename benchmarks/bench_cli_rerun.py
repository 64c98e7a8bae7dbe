"""A fully cached rerun of ``map-merge map`` (same config, every evaluation in the store): how long
it takes, first run vs rerun, on the LM zoo's files as a user has them (a base folder, a sharded
full fine-tune, a LoRA adapter, held-out texts; examples/llm_run.yaml's layout).

    python benchmarks/bench_cli_rerun.py [--size tiny|small] [--profile]

The zoo is built (or loaded) under MAP_MERGE_CACHE (default: the usual cache); the files and the
runs go to a temporary folder. ``--profile`` prints the rerun's cProfile (cumulative, top 30).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_files(folder: Path, size: str) -> Path:
    """The zoo's base, experts and validation texts copied to ``folder``, and a config naming them."""
    from map_merge.zoo import load_zoo

    zoo = load_zoo("lm", ["code", "medical"], size=size, progress=False)
    for name, source in (("base", zoo.base_path), ("code", zoo.experts["code"]), ("medical", zoo.experts["medical"])):
        shutil.copytree(source, folder / name)
    adapter = folder / "medical" / "adapter_config.json"
    if adapter.exists():
        settings = json.loads(adapter.read_text())
        settings["base_model_name_or_path"] = str((folder / "base").resolve())
        adapter.write_text(json.dumps(settings))
    for name in zoo.task_names:
        (folder / f"{name}_val.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in zoo.texts[name]["val"]) + "\n")
    config = folder / "run.yaml"
    config.write_text("pretrained: base\nfinetuned: {code: code, medical: medical}\n"
                      "tasks:\n  code: {kind: loss, data: code_val.jsonl, max_length: 128, batch_size: 16}\n"
                      "  medical: {kind: loss, data: medical_val.jsonl, max_length: 128, batch_size: 16}\n"
                      f"dtype: bfloat16\npreference: [1, 1]\nout: {folder / 'out'}\n")
    return config


def run(config: Path, *extra: str, profile: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = config.parent / "run_cli.py"
    script.write_text("import sys\nfrom map_merge.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    command = [sys.executable] + (["-m", "cProfile", "-o", str(config.parent / "rerun.prof")] if profile else []) + [str(script), "map", "--config", str(config), *extra]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"map-merge failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if profile:
        import pstats

        stats = pstats.Stats(str(config.parent / "rerun.prof"))
        stats.sort_stats("cumulative").print_stats(r"map_merge/(?!.*importlib)", 40)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        config = write_files(folder, args.size)
        first = run(config)
        again = run(config, "--overwrite")
        print(f"LM zoo ({args.size}): first run {first:.1f} s, fully cached rerun {again:.1f} s (wall clock, process start included)")
        if args.profile:
            run(config, "--overwrite", profile=True)


if __name__ == "__main__":
    main()
