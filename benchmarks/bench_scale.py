"""Task vectors at scale: streamed merges of Llama-architecture models written as sharded bf16
safetensors, against model size, the number of tasks, LoRA ranks, and mergekit.

Models are built from a ``transformers`` config (random weights; fine-tunes = base + small
perturbations), written tensor by tensor so that building them never holds a whole model.
Every measurement runs in a fresh child process so its peak resident memory is its own:

- ``merge_into``: a live bf16 model (allocated once, pages touched) merged in place; peak extra
  memory = peak RSS during the merge minus RSS before it; time against reading the same bytes
  (every tensor of the T + 1 checkpoints, chunk by chunk, same page-cache state);
- ``save_merged``: the merged model streamed into a sharded HF folder (peak RSS of the process);
- mergekit's ``task_arithmetic`` and ``ties`` on the same folders (``mergekit-yaml``, CPU, from
  its own virtual environment: ``benchmarks/_mergekit.py``): time, peak RSS, and the largest
  difference of its merged tensors from ours;
- LoRA adapters of rank 8/16/64 (all attention and MLP projections) against full fine-tunes;
- the operators (DARE, TIES, Breadcrumbs) against task arithmetic at the largest size, T = 2:
  ``merge_into`` time (warm) and its ratio to task arithmetic's, the one-off ``prepare`` (TIES's
  and Breadcrumbs' thresholds), peak extra memory.

    python benchmarks/bench_scale.py --out benchmarks/results            # ~30 min, ~30 GB of disk
    python benchmarks/bench_scale.py --sweeps methods --sizes 4.1GB --threads 1 --name scale_methods --work /tmp/scale
    python benchmarks/bench_scale.py --quick --out /tmp/scale            # seconds (jobs run in-process)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

from map_merge import plots  # noqa: E402
from map_merge.task_vectors.safetensors_io import plan_shards, write_safetensors  # noqa: E402

SIZES = {  # name -> (hidden, layers, intermediate, vocab)
    "tiny": (64, 2, 160, 1000),
    "small": (96, 2, 256, 2000),
    "0.4GB": (1024, 12, 2816, 32000),
    "1.3GB": (1536, 20, 4096, 32000),
    "4.1GB": (2560, 24, 6912, 32000),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------- building models
def llama_config(size: str):
    from transformers import LlamaConfig

    hidden, layers, inter, vocab = SIZES[size]
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=max(1, hidden // 128) if hidden >= 128 else 2, num_key_value_heads=None,
                       max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="bfloat16",
                       architectures=["LlamaForCausalLM"])


def shapes_of(config) -> list[tuple[str, tuple[int, ...]]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(abs(hash((seed, key))) % (2**62))
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    return torch.randn(shape, generator=generator) * 0.02


def write_model(folder: Path, config, seed: int | None, base_seed: int = 0, noise: float = 0.002, shard_bytes: int = 2 * 10**9) -> Path:
    """A bf16 sharded folder: the base (``seed=None``) or base + noise * N(0, 1) of ``seed``."""
    if (folder / "done").exists():
        config.save_pretrained(folder)
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    entries = shapes_of(config)
    shards = plan_shards([(k, int(np.prod(s)) * 2) for k, s in entries], shard_bytes)
    shape = dict(entries)
    weight_map = {}
    for number, keys in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"

        def pieces(keys=keys):
            for key in keys:
                tensor = _tensor(key, shape[key], base_seed)
                if seed is not None and not key.endswith("norm.weight"):
                    tensor += noise * _tensor(key, shape[key], 1000 + seed)
                yield key, tensor.to(torch.bfloat16)

        write_safetensors(folder / name, [(k, torch.bfloat16, shape[k]) for k in keys], pieces(), {"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    (folder / "done").write_text("")
    return folder


def write_adapter(folder: Path, config, rank: int, seed: int) -> Path:
    """A PEFT-format LoRA adapter on every attention and MLP projection (random factors)."""
    if (folder / "done").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes_of(config):
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and module.split(".")[-1] in LORA_TARGETS:
            out_features, in_features = shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                            "target_modules": LORA_TARGETS, "base_model_name_or_path": None}))
    (folder / "done").write_text("")
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------- child jobs
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(job: dict) -> dict:
    import map_merge as mm

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    from map_merge.task_vectors.safetensors_io import SafetensorsCheckpoint

    kind = job["kind"]
    sources = [Path(p) for p in job["sources"]]
    if kind == "read":  # the same bytes a merge reads, chunk by chunk
        from map_merge.merge_methods import CHUNK

        checkpoints = [SafetensorsCheckpoint(p) for p in sources]
        buffer = torch.empty(CHUNK * 8, dtype=torch.uint8)
        start = time.perf_counter()
        total = 0
        for checkpoint in checkpoints:
            for key, info in checkpoint.tensors.items():
                for s in range(0, info.numel, CHUNK):
                    total += checkpoint.read(key, s, min(s + CHUNK, info.numel), buffer).numel() * info.itemsize
        return {"seconds": time.perf_counter() - start, "bytes": total}
    tv = mm.TaskVectors.from_models(sources[0], sources[1:])
    tv.progress = False
    # TIES with every c_i = 0.5 is mergekit's ties (equal weights, normalize) with lambda 0.5
    name = job.get("method", "ta")
    coeffs = np.full(tv.num_tasks, 0.5) if name == "ties" else np.linspace(0.2, 0.6, tv.num_tasks)
    method = {"ta": None, "ties": mm.Ties(k=job.get("k", 0.2), scope="tensor"), "dare": mm.Dare(p=0.5, seed=0),
              "breadcrumbs": mm.Breadcrumbs(density=0.9, gamma=0.01)}[name]
    if kind == "merge_into":
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(sources[0])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # touch every page: the live model is resident before the merge
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        before = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        tv.prepare(method)  # TIES: the thresholds' two streamed passes, once per method
        prepared = time.perf_counter()
        tv.merge_into(model, coeffs, method)
        first = time.perf_counter() - prepared
        start, cpu = time.perf_counter(), time.process_time()
        tv.merge_into(model, coeffs[::-1].copy(), method)  # warm: what each evaluation of an objective pays
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        extra = max(0, _status("VmHWM") - before)
        # CPU seconds (all threads) tell the work apart from waiting when other processes share the cores
        return {"seconds": seconds, "cpu_seconds": cpu_seconds, "first_seconds": first, "prepare_seconds": prepared - t0, "peak_extra_bytes": extra,
                "model_bytes": model_bytes, "storage": tv.storage, "dtype_after": str(next(model.parameters()).dtype)}
    if kind == "save":
        start = time.perf_counter()
        tv.save_merged(job["out"], coeffs, method, max_shard_size="2GB")
        # VmHWM, not ru_maxrss: Linux carries a forking parent's peak into ru_maxrss across exec
        return {"seconds": time.perf_counter() - start, "peak_rss_bytes": _status("VmHWM")}
    raise ValueError(kind)


IN_PROCESS = {"on": False}  # --quick: jobs run in this process (the child entry point is still run once)


def run_child(job: dict) -> dict:
    if IN_PROCESS["on"]:
        return child(job)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_mergekit(sources: list[Path], out: Path, method: str, k: float) -> dict | None:
    from _mergekit import mergekit_bin

    try:
        exe = str(mergekit_bin() / "mergekit-yaml")
    except (OSError, subprocess.CalledProcessError) as error:
        return {"error": f"no mergekit environment: {error}"}
    coeffs = np.linspace(0.2, 0.6, len(sources) - 1)  # as the child jobs use for task arithmetic
    models = []
    for path, c in zip(sources[1:], coeffs):
        params = {"weight": float(c)} if method == "task_arithmetic" else {"weight": 1.0, "density": k}
        models.append({"model": str(path), "parameters": params})
    config = {"merge_method": method, "base_model": str(sources[0]), "models": models, "dtype": "float32", "out_dtype": "bfloat16",
              "parameters": {"normalize": method == "ties"}}
    if method == "ties":  # equal weights and normalize: the disjoint mean, times lambda = our c_i = 0.5
        config["parameters"]["lambda"] = 0.5
    cfg = out.with_suffix(".yml")
    cfg.write_text(json.dumps(config))
    shutil.rmtree(out, ignore_errors=True)
    code = ("import resource, subprocess, sys, time; s = time.perf_counter(); "
            f"subprocess.run([{exe!r}, {str(cfg)!r}, {str(out)!r}, '--quiet', '--no-copy-tokenizer', '--out-shard-size', '2B', '-j', '2'], check=True); "
            "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    seconds, peak = result.stdout.split()
    return {"seconds": float(seconds), "peak_rss_bytes": int(peak)}


def max_difference(ours: Path, theirs: Path) -> dict:
    from map_merge.task_vectors.safetensors_io import SafetensorsCheckpoint

    a, b = SafetensorsCheckpoint(ours), SafetensorsCheckpoint(theirs)
    worst, differing, total = 0.0, 0, 0
    for key in a.tensors:
        if key not in b.tensors:
            continue
        x, y = a.read(key).float(), b.read(key).float()
        diff = (x - y).abs()
        worst = max(worst, float(diff.max()))
        differing += int((diff > 0).sum())
        total += x.numel()
    return {"max_abs_diff": worst, "share_differing": differing / max(total, 1)}


# ---------------------------------------------------------------------- the benchmark
THREADS = {"n": 0}


def measure(sources: list[Path], work: Path, label: dict, mergekit: bool, method: str = "ta", save: bool = True) -> dict:
    os.sync()  # no write-back of freshly generated files during the timings
    run_child({"kind": "read", "sources": [str(p) for p in sources]})  # page cache as for a merge
    read = run_child({"kind": "read", "sources": [str(p) for p in sources]})
    merge = run_child({"kind": "merge_into", "sources": [str(p) for p in sources], "method": method, "threads": THREADS["n"]})
    row = {**label, "method": method, "model_GB": merge["model_bytes"] / 1e9, "read_s": read["seconds"], "read_GB": read["bytes"] / 1e9,
           "prepare_s": merge["prepare_seconds"], "first_merge_s": merge["first_seconds"], "merge_into_s": merge["seconds"], "merge_into_cpu_s": merge["cpu_seconds"],
           "merge_vs_read": merge["seconds"] / read["seconds"],
           "peak_extra_GB": merge["peak_extra_bytes"] / 1e9, "peak_extra_share": merge["peak_extra_bytes"] / merge["model_bytes"],
           "dtype_after": merge["dtype_after"]}
    if not save:
        return row
    out = work / "out_ours"
    shutil.rmtree(out, ignore_errors=True)
    saved = run_child({"kind": "save", "sources": [str(p) for p in sources], "out": str(out), "method": method})
    row.update({"save_s": saved["seconds"], "save_peak_rss_GB": saved["peak_rss_bytes"] / 1e9})
    if mergekit:
        theirs = work / "out_mergekit"
        mk = run_mergekit(sources, theirs, {"ta": "task_arithmetic", "ties": "ties"}[method], 0.2)
        if mk and "error" not in mk:
            row.update({"mergekit_s": mk["seconds"], "mergekit_peak_rss_GB": mk["peak_rss_bytes"] / 1e9, **max_difference(out, theirs)})
        elif mk:
            row["mergekit_error"] = mk["error"][-300:]
        shutil.rmtree(theirs, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results")
    p.add_argument("--work", default=None, help="folder for the generated models (default: a temporary folder)")
    p.add_argument("--sizes", default="0.4GB,1.3GB,4.1GB")
    p.add_argument("--tasks", default="1,2,4,8", help="T sweep at the smallest size")
    p.add_argument("--ranks", default="8,16,64")
    p.add_argument("--no-mergekit", action="store_true")
    p.add_argument("--sweeps", default="tasks,size,lora,methods", help="which sweeps to run (comma-separated)")
    p.add_argument("--methods", default="ta,dare,ties,breadcrumbs", help="operators of the methods sweep (ta first)")
    p.add_argument("--name", default="scale", help="name of the JSON and the plots (e.g. scale_methods for --sweeps methods)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the measuring processes (0: torch's default); "
                   "1 gives steadier numbers on cores other processes share")
    p.add_argument("--child", default=None, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import tempfile

    sizes = ["tiny", "small"] if args.quick else args.sizes.split(",")
    task_counts = [1, 2] if args.quick else [int(t) for t in args.tasks.split(",")]
    ranks = [4] if args.quick else [int(r) for r in args.ranks.split(",")]
    sweeps = set(args.sweeps.split(","))
    THREADS["n"] = args.threads
    work = Path(args.work or tempfile.mkdtemp(prefix="map_merge_scale_"))
    use_mergekit = not args.no_mergekit and not args.quick
    if args.quick:  # a smoke run: one job through the child entry point, the rest in this process
        run_child({"kind": "read", "sources": [str(write_model(work / sizes[0] / "base", llama_config(sizes[0]), None))]})
        IN_PROCESS["on"] = True
    rows = []
    # 1. against T at the smallest size
    if "tasks" in sweeps:
        config = llama_config(sizes[0])
        base = write_model(work / sizes[0] / "base", config, None)
        for num in task_counts:
            fts = [write_model(work / sizes[0] / f"ft{i}", config, i) for i in range(num)]
            rows.append(measure([base] + fts, work, {"sweep": "tasks", "size": sizes[0], "tasks": num, "kind": "full"}, False))
            print(table(rows[-1:], list(rows[-1])), flush=True)
    # 2. against model size at T = 2, with mergekit side by side (task arithmetic and TIES)
    if "size" in sweeps:
        for size in sizes:
            config = llama_config(size)
            folders = [write_model(work / size / "base", config, None)] + [write_model(work / size / f"ft{i}", config, i) for i in range(2)]
            for method in ("ta", "ties"):
                if method == "ties" and size != sizes[min(1, len(sizes) - 1)]:
                    continue  # TIES once, at the middle size
                rows.append(measure(folders, work, {"sweep": "size", "size": size, "tasks": 2, "kind": "full"}, use_mergekit, method))
                print(table(rows[-1:], list(rows[-1])), flush=True)
    # 3. LoRA adapters against full fine-tunes, middle size, T = 2
    if "lora" in sweeps:
        size = sizes[min(1, len(sizes) - 1)]
        config = llama_config(size)
        base = write_model(work / size / "base", config, None)
        for rank in ranks:
            adapters = [write_adapter(work / size / f"lora_r{rank}_{i}", config, rank, seed=i) for i in range(2)]
            row = measure([base] + adapters, work, {"sweep": "lora", "size": size, "tasks": 2, "kind": f"lora r={rank}"}, False)
            row["adapter_MB"] = sum((a / "adapter_model.safetensors").stat().st_size for a in adapters) / 1e6
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)
    # 4. the operators against task arithmetic, largest size, T = 2 (merge_into only)
    if "methods" in sweeps:
        size = sizes[-1]
        config = llama_config(size)
        folders = [write_model(work / size / "base", config, None)] + [write_model(work / size / f"ft{i}", config, i) for i in range(2)]
        ta = None
        for method in args.methods.split(","):
            row = measure(folders, work, {"sweep": "methods", "size": size, "tasks": 2, "kind": "full", "threads": args.threads or torch.get_num_threads()},
                          False, method, save=False)
            ta = row if method == "ta" else ta
            if ta is not None:
                row["merge_vs_ta"] = row["merge_into_s"] / ta["merge_into_s"]
                row["cpu_vs_ta"] = row["merge_into_cpu_s"] / ta["merge_into_cpu_s"]
            rows.append(row)
            print(table(rows[-1:], list(rows[-1])), flush=True)

    write(args.out, args.name, {"rows": rows, "goals": {"peak_extra_share": 0.10, "merge_vs_read": 3.0, "merge_vs_ta": 2.0}})
    tasks_rows = [r for r in rows if r["sweep"] == "tasks"]
    size_rows = [r for r in rows if r["sweep"] == "size" and r["method"] == "ta"]
    method_rows = [r for r in rows if r["sweep"] == "methods"]
    if method_rows:
        plot_methods(method_rows, Path(args.out) / f"{args.name}_methods.png")
    if tasks_rows:
        plots.plot_curves({"merge_into / read": ([r["tasks"] for r in tasks_rows], [r["merge_vs_read"] for r in tasks_rows], None),
                           "peak extra / model size": ([r["tasks"] for r in tasks_rows], [r["peak_extra_share"] for r in tasks_rows], None)},
                          "task vectors T", "ratio", title=f"streamed merge_into, Llama {sizes[0]}, bf16, CPU",
                          path=Path(args.out) / f"{args.name}_tasks.png")
    if size_rows:
        plots.plot_curves({"merge_into (s)": ([r["model_GB"] for r in size_rows], [r["merge_into_s"] for r in size_rows], None),
                           "read same bytes (s)": ([r["model_GB"] for r in size_rows], [r["read_s"] for r in size_rows], None),
                           "save_merged (s)": ([r["model_GB"] for r in size_rows], [r["save_s"] for r in size_rows], None),
                           **({"mergekit TA (s)": ([r["model_GB"] for r in size_rows], [r["mergekit_s"] for r in size_rows], None)}
                              if all("mergekit_s" in r for r in size_rows) else {})},
                          "model size (GB, bf16)", "seconds", title="T = 2, streamed, CPU (2 cores)", path=Path(args.out) / f"{args.name}_size.png")
    print(table(rows, ["sweep", "size", "tasks", "kind", "method", "model_GB", "prepare_s", "first_merge_s", "merge_into_s", "merge_vs_ta", "cpu_vs_ta", "read_s", "merge_vs_read",
                       "peak_extra_GB", "peak_extra_share", "save_s", "save_peak_rss_GB", "mergekit_s", "mergekit_peak_rss_GB",
                       "max_abs_diff"]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


def plot_methods(rows: list[dict], path: Path) -> None:
    """Bars: warm ``merge_into`` seconds per operator (ratio to task arithmetic on top), and the
    one-off ``prepare`` seconds."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    names = [r["method"] for r in rows]
    x = np.arange(len(rows))
    merge = [r["merge_into_s"] for r in rows]
    ax.bar(x - 0.2, merge, 0.4, label="merge_into (warm)")
    ax.bar(x + 0.2, [r["prepare_s"] for r in rows], 0.4, label="prepare (once per operator)")
    for xi, r in zip(x, rows):
        if r.get("merge_vs_ta"):
            ax.annotate(f"x{r['merge_vs_ta']:.2f} (cpu x{r['cpu_vs_ta']:.2f})", (xi - 0.2, r["merge_into_s"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names)
    ax.set_ylabel("seconds")
    ax.set_title(f"operators, Llama {rows[0]['size']}, bf16, T = 2, streamed, CPU", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
