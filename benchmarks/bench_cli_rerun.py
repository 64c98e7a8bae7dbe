"""A fully cached rerun of ``map-merge map`` (same config, every evaluation in the store): how long
it takes, first run vs rerun, on the LM zoo's files as a user has them (a base folder, a sharded
full fine-tune, a LoRA adapter, held-out texts; examples/llm_run.yaml's layout).

    python benchmarks/bench_cli_rerun.py [--size tiny|small] [--repeat 3] [--code CHECKOUT ...] [--profile] [--out DIR]

The zoo is built (or loaded) under MAP_MERGE_CACHE (default: the usual cache); the files and the
runs go to a temporary folder. ``--code``: checkouts of map_merge to time, alternately (default:
this one; e.g. a worktree of an older commit for a before/after). ``--profile`` prints the
rerun's cProfile (cumulative, top 40 functions of map_merge). Writes ``cli_rerun.json`` to ``--out``
(``--quick``: the tiny zoo, one rerun).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from _common import parser, write  # noqa: E402


def write_files(folder: Path, size: str, lm_eval: bool = False) -> Path:
    """The zoo's base, experts and validation texts copied to ``folder``, and a config naming them
    (``lm_eval``: the code task scored by lm-eval multiple choice instead of its held-out loss)."""
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
    code = "{kind: loss, data: code_val.jsonl, max_length: 128, batch_size: 16}"
    if lm_eval:  # the local task YAML names its data file by an absolute path: rewrite it to the copy
        task_yaml = zoo.choice_tasks["code"]["val"]
        shutil.copy(task_yaml.with_suffix(".jsonl"), folder / "code_choice_val.jsonl")
        (folder / "code_choice_val.yaml").write_text(task_yaml.read_text().replace(str(task_yaml.with_suffix(".jsonl")),
                                                                                    str(folder / "code_choice_val.jsonl")))
        code = "{kind: lm_eval, task: code_choice_val.yaml, metric: acc, batch_size: 16}"
    config = folder / "run.yaml"
    config.write_text("pretrained: base\nfinetuned: {code: code, medical: medical}\n"
                      f"tasks:\n  code: {code}\n"
                      "  medical: {kind: loss, data: medical_val.jsonl, max_length: 128, batch_size: 16}\n"
                      f"dtype: bfloat16\npreference: [1, 1]\nout: {folder / 'out'}\n")
    return config


def write_synthetic(folder: Path, hidden: int, layers: int) -> Path:
    """A Llama of ``hidden`` width and ``layers`` layers with random weights (the small zoo's
    tokenizer and held-out texts), two full fine-tunes of it, and a config naming them: a model
    large enough that loading it shows (``4 * hidden`` MLP width; 16 texts of 32 tokens scored)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from map_merge.zoo import load_zoo

    zoo = load_zoo("lm", ["code", "medical"], size="small", progress=False)
    config = LlamaConfig(vocab_size=len(zoo.tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), max_position_embeddings=64,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(folder / "base")
    zoo.tokenizer.save_pretrained(folder / "base")
    for i, name in enumerate(["code", "medical"]):
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i + 1)).to(p.dtype))
        base.save_pretrained(folder / name)
    for name in zoo.task_names:
        (folder / f"{name}_val.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in zoo.texts[name]["val"][:16]) + "\n")
    path = folder / "run.yaml"
    path.write_text("pretrained: base\nfinetuned: {code: code, medical: medical}\ntasks:\n"
                    "  code: {kind: loss, data: code_val.jsonl, max_length: 32, batch_size: 16}\n"
                    "  medical: {kind: loss, data: medical_val.jsonl, max_length: 32, batch_size: 16}\n"
                    f"dtype: bfloat16\npreference: [1, 1]\nnum_samples: 6\nout: {folder / 'out'}\n")
    return path


def run(config: Path, *extra: str, profile: bool = False, code: Path = ROOT) -> float:
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
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
    p = parser(__doc__.splitlines()[0], "benchmarks/results")
    p.add_argument("--size", default="tiny", choices=["tiny", "small"])
    p.add_argument("--repeat", type=int, default=1, help="reruns per checkout (alternating)")
    p.add_argument("--code", nargs="+", type=Path, default=[ROOT], help="map_merge checkouts to time")
    p.add_argument("--lm-eval", action="store_true", help="score the code task by lm-eval multiple choice")
    p.add_argument("--synthetic", default=None, metavar="HIDDEN,LAYERS",
                   help="instead of the zoo's models: a random Llama of this width and depth (e.g. 768,12: 0.1B parameters)")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.size, args.repeat, args.synthetic = "tiny", 1, None
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        if args.synthetic:
            hidden, layers = (int(x) for x in args.synthetic.split(","))
            config = write_synthetic(folder, hidden, layers)
        else:
            config = write_files(folder, args.size, args.lm_eval)
        times: dict[Path, list[float]] = {code: [] for code in args.code}
        first = run(config, code=args.code[0])
        for _ in range(args.repeat):
            for code in args.code:
                times[code].append(run(config, "--overwrite", code=code))
        label = f"random Llama {args.synthetic}" if args.synthetic else f"LM zoo ({args.size}{', lm-eval' if args.lm_eval else ''})"
        print(f"{label}: first run {first:.1f} s (wall clock, process start included)")
        rows = []
        for code, seconds in times.items():
            median = sorted(seconds)[len(seconds) // 2]
            print(f"  fully cached rerun with {code}: {', '.join(f'{s:.1f}' for s in seconds)} s (median {median:.1f})")
            rows.append({"models": label, "code": str(code), "first_run_s": first, "rerun_s": seconds, "rerun_median_s": median})
        print(f"wrote {write(args.out, 'cli_rerun', {'rows': rows})}")
        if args.profile:
            run(config, "--overwrite", profile=True, code=args.code[0])


if __name__ == "__main__":
    main()
