"""Merge speed and evaluation throughput, on CPU (and CUDA when present).

1. ``TaskVectors.merge_into`` for T task vectors of MiniLM (22.7M parameters) against one plain
   copy of the same number of bytes into a buffer allocated once (``copy_``).
2. Merged-model evaluations per second of a zoo objective (text zoo, 2 tasks, validation split:
   merge + every task's metric) against the floor of evaluating one fixed model on the same data:
   the merge's share of an evaluation.

    python benchmarks/bench_merge.py --out benchmarks/results
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

import map_merge as mm  # noqa: E402
from map_merge import plots  # noqa: E402


def median_time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def evaluation_throughput(devices: list[str], quick: bool) -> list[dict]:
    """Evaluations per second of a merging objective against evaluating one fixed model."""
    from map_merge.zoo import load_text_zoo, load_vision_zoo

    names = ["rotated", "inverted"] if quick else ["sentiment", "med_subject"]
    zoo = (load_vision_zoo if quick else load_text_zoo)(names, progress=False)
    rows = []
    repeats = 3 if quick else 5
    coeffs = np.random.default_rng(0).uniform(size=(repeats, len(names)))
    for device in devices:
        sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
        objective = zoo.objective(names, device=device, progress=False)
        objective(coeffs[:1])  # warm-up (first merge binds the model to a flat buffer)
        sync()
        start = time.perf_counter()
        objective(coeffs)
        sync()
        merged = time.perf_counter() - start
        fixed = zoo.new_encoder(device).eval()
        start = time.perf_counter()
        for _ in range(repeats):
            [zoo.accuracy(fixed, n, "val") for n in names]
        sync()
        floor = time.perf_counter() - start
        rows.append({"zoo": zoo.name, "device": device, "tasks": len(names), "examples": sum(len(zoo.tasks[n].splits["val"]) for n in names),
                     "evaluations_per_s": repeats / merged, "fixed_model_per_s": repeats / floor, "merge_share": max(0.0, 1 - floor / merged)})
    return rows


def main() -> None:
    args = parser(__doc__, "benchmarks/results").parse_args()
    if args.quick:
        base = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256))
        model_name = "2x Linear(256, 256)"
    else:
        from transformers import AutoModel

        from map_merge.zoo.text import minilm_path

        base = AutoModel.from_pretrained(minilm_path())
        model_name = "all-MiniLM-L6-v2"
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
        for num_tasks in ([2, 8] if args.quick else [1, 2, 4, 8]):
            generator = torch.Generator().manual_seed(num_tasks)
            finetuned = [{k: v + 0.01 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                          for k, v in base.state_dict().items()} for _ in range(num_tasks)]
            tv = mm.TaskVectors.from_models(base, finetuned, device=device)
            del finetuned
            model = type(base)(base.config) if hasattr(base, "config") else torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(2)])
            coeffs = np.full(num_tasks, 0.3)
            merge = median_time(lambda: tv.merge_into(model, coeffs), 3 if args.quick else 7, sync)
            # the plain copy writes into memory allocated once, as merge_into writes into the live model
            # (a fresh clone's time depends on whether the allocator hands back faulted-in pages)
            target = torch.empty_like(tv.base)
            copy = median_time(lambda: target.copy_(tv.base), 3 if args.quick else 7, sync)
            rows.append({
                "device": device, "tasks": num_tasks, "params": tv.num_params, "merge_into_s": merge, "copy_s": copy,
                "merge_per_task_vs_copy": merge / num_tasks / copy, "GB_read_per_s": (num_tasks + 1) * tv.num_params * 4 / merge / 1e9,
            })
            del tv, model, target
    throughput = evaluation_throughput(devices, args.quick)
    path = write(args.out, "merge_speed", {"model": model_name, "rows": rows, "throughput": throughput})
    for device in devices:
        sub = [r for r in rows if r["device"] == device]
        plots.plot_curves({"merge_into": ([r["tasks"] for r in sub], [r["merge_into_s"] * 1e3 for r in sub], None),
                           "copy of P floats": ([r["tasks"] for r in sub], [r["copy_s"] * 1e3 for r in sub], None)},
                          "task vectors T", "milliseconds", title=f"merge_into vs a plain copy, {model_name}, {device}",
                          path=Path(args.out) / f"merge_speed_{device}.png")
    print(table(rows, ["device", "tasks", "params", "merge_into_s", "copy_s", "merge_per_task_vs_copy", "GB_read_per_s"]))
    print(table(throughput, ["zoo", "device", "tasks", "examples", "evaluations_per_s", "fixed_model_per_s", "merge_share"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
