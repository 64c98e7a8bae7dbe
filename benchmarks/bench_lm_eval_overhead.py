"""Per-call cost of an ``LMEvalTask`` evaluation against lm-eval's model call alone.

On config-built Llama models (the test suite's tiny one and a wider one; the tokenizer is
MiniLM's, shipped with the project) and two local lm-eval tasks (a ``multiple_choice`` task and a
``loglikelihood_rolling`` perplexity task over generated texts, read from local jsonl files):

- ``direct``: a prebuilt ``HFLM`` around the model answering the same requests, built with lm-eval's
  own API (``TaskManager.load`` + ``build_all_requests``): ``lm.loglikelihood(requests)`` or
  ``lm.loglikelihood_rolling(requests)``, nothing else. The floor.
- ``LMEvalTask``: ``task(model)``: the model's answers plus lm-eval's filters, ``process_results``
  and aggregation, as an objective calls it (median of repeated calls; the first, which wraps the
  model in ``HFLM``, is reported separately).
- ``overhead``: what ``LMEvalTask`` adds to the model call, measured alone: the same call with the
  wrapped model's answers replayed instantly (resetting the requests, lm-eval's filters,
  ``process_results`` and aggregation). On a shared machine the two calls above vary by tens of
  percent from run to run; this one does not, and ``direct + overhead`` is the cost goal's ratio.
- ``simple_evaluate`` (full run only): what an evaluation cost before the task was prepared once:
  ``lm_eval.simple_evaluate`` with a fresh ``TaskManager`` (built-in tasks included) per call.

Goal: ``LMEvalTask`` at most 1.2x ``direct``.

    python benchmarks/bench_lm_eval_overhead.py --out benchmarks/results [--quick]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import map_merge as mm  # noqa: E402

WORDS = ("the a film plot cast script scene actor music story great awful slow superb dull joy mess wonderful tedious "
         "brilliant weak ending camera light colour sound voice moment minute hour").split()


def write_tasks(folder: Path, num_docs: int) -> dict[str, Path]:
    """A multiple-choice and a perplexity task over ``num_docs`` generated reviews, as local YAMLs."""
    rng = np.random.default_rng(0)
    rows = [{"text": " ".join(rng.choice(WORDS, size=int(rng.integers(8, 24)))), "label": int(rng.integers(0, 2))} for _ in range(num_docs)]
    data = folder / "reviews.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (folder / "bench_choice.yaml").write_text(
        "task: bench_choice\n" + head + 'output_type: multiple_choice\ndoc_to_text: "Review: {{text}}\\nSentiment:"\n'
        'doc_to_choice: ["negative", "positive"]\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "bench_ppl.yaml").write_text(
        "task: bench_ppl\n" + head + 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n')
    return {"multiple_choice": folder / "bench_choice.yaml", "loglikelihood_rolling": folder / "bench_ppl.yaml"}


def build_model(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def lm_eval_requests(path: Path, name: str) -> tuple[str, list]:
    """The task's requests built with lm-eval's own API (independently of ``LMEvalTask``)."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(path.parent), include_defaults=False).load([name])["tasks"][name]
    task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=0)
    task.build_all_requests(limit=None, rank=0, world_size=1)
    kind = task.instances[0].request_type
    return kind, [inst for inst in task.instances for _ in range(inst.repeats)]


def timed(fns: list, repeats: int) -> list[float]:
    """Median seconds of each function, calls interleaved (a load change hits all alike)."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def replayed_overhead(task, model, repeats: int) -> float:
    """Median seconds of ``task(model)`` minus the model: its lm-eval wrapper answers each request
    type with the answers of a real call, instantly."""
    lm = task._wrap(model)  # the HFLM the task reuses for this model
    kinds = list(task._ensure_prepared().requests)
    answers = {kind: getattr(lm, kind)(task._ensure_prepared().requests[kind], disable_tqdm=True) for kind in kinds}
    for kind in kinds:
        setattr(lm, kind, lambda requests, disable_tqdm=True, _answers=answers[kind]: list(_answers))
    try:
        return timed([lambda: task(model)], repeats)[0]
    finally:
        for kind in kinds:
            delattr(lm, kind)


def old_per_call(model, tokenizer, path: Path, name: str) -> float:
    """One evaluation the way ``LMEvalTask`` did it before: a fresh TaskManager (built-in tasks
    included) and ``simple_evaluate`` on a fresh ``HFLM`` at every call."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    manager = TaskManager(include_path=str(path.parent))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
    lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, task_manager=manager, log_samples=False, bootstrap_iters=0)
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__, "benchmarks/results")
    args = p.parse_args()
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from map_merge.zoo.text import minilm_path

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"  # lm-eval prefixes loglikelihoods with one of them
    num_docs = 12 if args.quick else 60
    repeats = 3 if args.quick else 15
    models = [("tiny", 8, 1)] if args.quick else [("tiny", 8, 1), ("small", 128, 2)]
    scratch = tempfile.TemporaryDirectory(prefix="bench_lm_eval_")
    tasks = write_tasks(Path(scratch.name), num_docs)
    rows = []
    for label, hidden, layers in models:
        model = build_model(tokenizer, hidden, layers)
        params = sum(p.numel() for p in model.parameters())
        for kind, path in tasks.items():
            name = path.stem
            start = time.perf_counter()
            task = mm.LMEvalTask(path, tokenizer=tokenizer, batch_size=8)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            value = task(model)
            first_s = time.perf_counter() - start
            request_type, requests = lm_eval_requests(path, name)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8, device="cpu")
            run = getattr(lm, request_type)
            with torch.inference_mode():
                run(requests, disable_tqdm=True)  # warm-up
                direct, wrapped = timed([lambda: run(requests, disable_tqdm=True), lambda: task(model)], repeats)
                overhead = replayed_overhead(task, model, repeats=5 * repeats)
                if not np.isclose(task(model), value, rtol=1e-9, atol=0.0):  # the replay must leave the task as it was
                    raise RuntimeError(f"{name}: a call after the replay gave another value")
            row = {"model": label, "parameters": params, "task": kind, "metric": task.metric, "sense": task.sense, "value": value,
                   "documents": num_docs, "requests": len(requests), "build_s": build_s, "first_call_s": first_s,
                   "direct_s": direct, "lm_eval_task_s": wrapped, "measured_ratio": wrapped / direct, "overhead_ms": 1e3 * overhead,
                   "ratio": (direct + overhead) / direct}
            if not args.quick and label == "tiny":
                row["simple_evaluate_s"] = old_per_call(model, tokenizer, path, name)
            rows.append(row)
            print(f"{label} {kind}: direct {direct * 1e3:.1f} ms, LMEvalTask {wrapped * 1e3:.1f} ms, its own overhead "
                  f"{overhead * 1e3:.2f} ms ({row['ratio']:.3f}x)", flush=True)
    scratch.cleanup()
    out = write(args.out, "lm_eval_overhead", {"rows": rows, "goal_ratio": 1.2, "repeats": repeats})
    plot(rows, Path(args.out) / "lm_eval_overhead.png")
    print(table(rows, ["model", "parameters", "task", "requests", "direct_s", "lm_eval_task_s", "measured_ratio", "overhead_ms", "ratio",
                       "first_call_s", "build_s", "simple_evaluate_s"]))
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['task']}" for r in rows]
    x = np.arange(len(rows))
    series = [("direct HFLM call", "direct_s"), ("LMEvalTask call", "lm_eval_task_s"), ("before: simple_evaluate per call", "simple_evaluate_s")]
    series = [(name, key) for name, key in series if any(key in r for r in rows)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(rows), 4.2))
    for k, (name, key) in enumerate(series):
        values = [r.get(key, np.nan) for r in rows]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width, label=name)
    for i, r in enumerate(rows):
        ax.annotate(f"+{r['overhead_ms']:.1f} ms\n{r['ratio']:.3f}x", (x[i], r["lm_eval_task_s"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("seconds per evaluation (log)")
    ax.set_title("LMEvalTask per-call cost against lm-eval's model call (goal <= 1.2x)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
