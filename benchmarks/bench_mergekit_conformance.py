"""Conformance of the merge operators with mergekit 0.1.5, on the same tensors.

Tiny config-made Llama folders (a base and two fine-tunes = base + N(0, 0.02^2) per entry), stored
in float32 (no tied magnitudes) and in bfloat16 (many tied magnitudes), merged by ``mergekit-yaml``
with ``dtype: float32`` (mergekit in its own virtual environment, ``benchmarks/_mergekit.py``) and
by ``TaskVectors.merge`` with the operator that mirrors the mergekit recipe:

- ``task_arithmetic`` with weights ``c``  <->  ``merge(c)``;
- ``ties`` (weight 1, ``normalize``, ``lambda: lam``)  <->  ``Ties(k=density, scope="tensor")``, every ``c_i = lam``;
- ``breadcrumbs`` (weights ``c``)  <->  ``Breadcrumbs(density, gamma)``; ``breadcrumbs_ties``
  (weight 1, ``lambda: lam``)  <->  ``Breadcrumbs(..., consensus="sum")``, every ``c_i = lam``;
- ``della`` keep probabilities: mergekit's ``della_magprune`` with ``torch.bernoulli`` replaced by a
  recorder, against ``Della.keep_probabilities``; means over 200 seeds: mergekit's own Bernoulli
  masks with its L1 rescale against ours (``rescale="l1"``), and ours (``"l1"`` and the paper's
  ``"inverse"``) against the unpruned task vectors.

Emitted configs (the other direction): ``TaskVectors.mergekit_config(c, method, groups)`` written as
YAML and run by ``mergekit-yaml`` as it is (``dtype: float32``), against ``save_merged``'s folder for
the same coefficients: task arithmetic, TIES (``k = 0.6``: mergekit keeps ``int(k n)`` entries per
tensor, we keep ``round(k n)``; ``k = 0.5``: both counts agree on every tensor), Breadcrumbs, task
arithmetic with depth knots (``Groups.by_depth(3)``: per-layer weight lists) and with attention /
MLP / rest substring groups (filtered weights), Breadcrumbs with depth knots. Per row: the largest
difference, in absolute terms and in bf16 ulps of the entry's scale (``max(|base|, |merged|)``);
the entries over one such ulp; the share of entries whose mergekit value rounded to the file's
dtype differs from ours.

Recipes as read (``mm.from_mergekit``, issue 27): mergekit configs written as YAML, run by
``mergekit-yaml`` and read by ``from_mergekit``, merged by ``TaskVectors.merge`` with the recipe's
operator, groups and coefficients, on a 4-layer variant of the models (so that gradients
interpolate between knots): weight forms mixed across models (a gradient, filters), gradients
inside filters (task arithmetic and Breadcrumbs), ``1e-1`` weights (strings in YAML 1.1), quoted
true/false settings (``normalize: "false"``, read as pydantic's bool), ``weight: true`` (1.0),
filters without a catch-all (the unmatched tensors take the top-level ``weight``: a number, or its
own filters and gradient), ``linear`` with an unlisted base (mergekit adds it with the
top-level weight), models whose filters differ (the groups: the cells of the joint partition), a
filter matching no tensor, top-level fields mergekit ignores, gradients on a one-layer model (the
layer at the gradient's end, t = 1), and ``linear`` with an unlisted base and no top-level weight
(mergekit refuses it: the row says so; we average the fine-tunes, with a warning).

Per recipe: the largest difference (over all entries, and over the entries whose keep/drop decision,
``merged != base``, is the same on both sides), the share of entries that differ, and the share
whose keep/drop decision differs.

    python benchmarks/bench_mergekit_conformance.py --out benchmarks/results   # minutes; creates the venv once
    python benchmarks/bench_mergekit_conformance.py --only read --out /tmp/mk   # the recipes as read only

Not part of the test suite: it needs the package index (pip) for mergekit's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import parser, table, write  # noqa: E402
from _conformance_compare import compare, compare_files, explain, load_raw  # noqa: E402
from _conformance_recipes import DENSITY, EPSILON, GAMMA, LAMBDA, emitted_recipes, one_layer_recipes, read_recipes, recipes  # noqa: E402
from _mergekit import mergekit_bin, run_in_mergekit  # noqa: E402

import map_merge as mm  # noqa: E402

SEEDS = 200


# ---------------------------------------------------------------------- models
def build_models(root: Path, dtype: torch.dtype, layers: int = 2) -> list[Path]:
    """A tiny Llama base and two fine-tunes as HF folders in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    folders = [root / name for name in ("base", "ft0", "ft1")]
    if all((f / "config.json").exists() for f in folders):
        return folders
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.to(dtype).save_pretrained(folders[0])
    for i, folder in enumerate(folders[1:]):
        model = LlamaForCausalLM(config)
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for (name, p), (_, b) in zip(model.named_parameters(), base.named_parameters()):
                p.copy_(b + 0.02 * torch.randn(p.shape, generator=generator))
        model.to(dtype).save_pretrained(folder)
    return folders


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return {k: v.float() for k, v in out.items()}


# ---------------------------------------------------------------------- mergekit runs
def run_mergekit_yaml(folders: list[Path], out: Path, method: str, weights: list[float], parameters: dict, shared: dict) -> dict[str, torch.Tensor]:
    config = {"merge_method": method, "base_model": str(folders[0]), "dtype": "float32", "out_dtype": "float32",
              "models": [{"model": str(f), "parameters": {"weight": w, **parameters}} for f, w in zip(folders[1:], weights)],
              "parameters": shared}
    path = out.with_suffix(".yml")
    if not (path.exists() and path.read_text() == json.dumps(config) and any(out.glob("*.safetensors"))):  # else: reuse (--work)
        path.write_text(json.dumps(config))
        exe = str(mergekit_bin() / "mergekit-yaml")
        subprocess.run([exe, str(path), str(out), "--quiet", "--no-copy-tokenizer", "--random-seed", "0"], check=True,
                       capture_output=True, text=True)
    return load(out)


DELLA_SCRIPT = r"""
import sys, torch
from safetensors.torch import load_file, save_file
from mergekit.sparsify import della_magprune, RescaleNorm
density, epsilon, seeds = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
deltas = load_file(sys.argv[1])
out = {}
recorded = []
original = torch.bernoulli
def record(p, *args, **kwargs):
    recorded.append(p.clone())
    return torch.ones_like(p)
for key, delta in deltas.items():
    recorded.clear()
    torch.bernoulli = record
    della_magprune(delta, density, epsilon, rescale_norm=None)
    torch.bernoulli = original
    out["probs/" + key] = recorded[0].reshape(delta.shape).contiguous()
    total = torch.zeros_like(delta, dtype=torch.float64)
    squares = torch.zeros_like(total)
    for seed in range(seeds):
        torch.manual_seed(seed)
        pruned = della_magprune(delta, density, epsilon, rescale_norm=RescaleNorm.l1).double()
        total += pruned
        squares += pruned * pruned
    out["mean/" + key] = (total / seeds).contiguous()
    out["var/" + key] = (squares / seeds - (total / seeds) ** 2).clamp_min(0).contiguous()
save_file(out, sys.argv[2])
"""


# ---------------------------------------------------------------------- recipes as read and emitted configs
def read_rows(folders: list[Path], work: Path, label: str, dtype: torch.dtype, recipes: list[tuple] | None = None) -> list[dict]:
    """Each of ``recipes`` (default :func:`read_recipes`) through ``mergekit-yaml`` and through
    ``from_mergekit`` + ``merge``; a recipe mergekit refuses gives a row with its error."""
    import yaml

    exe = str(mergekit_bin() / "mergekit-yaml")
    rows = []
    for name, method, weights, params, shared, *extra in (read_recipes() if recipes is None else recipes):
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        config = {"merge_method": method, "base_model": str(folders[0]), "dtype": "float32", "out_dtype": "float32",
                  "models": [{"model": str(f), "parameters": {"weight": w, **params}} for f, w in zip(folders[1:], weights)],
                  **({"parameters": shared} if shared else {}), **(extra[0] if extra else {})}
        path, theirs_folder = work / f"read_{slug}.yml", work / f"read_{slug}_mergekit"
        text = yaml.safe_dump(config, sort_keys=False)
        refused = None
        if not (path.exists() and path.read_text() == text and any(theirs_folder.glob("*.safetensors"))):  # else: reuse (--work)
            path.write_text(text)
            run = subprocess.run([exe, str(path), str(theirs_folder), "--quiet", "--no-copy-tokenizer", "--random-seed", "0"],
                                 capture_output=True, text=True)
            if run.returncode:
                refused = (run.stderr.strip().splitlines() or ["(no message)"])[-1].replace(str(work), "<work>")
        recipe = mm.from_mergekit(path)  # the same file mergekit read
        row = {"files": label, "recipe": name, "mergekit": method, "weights": json.dumps(weights),
               "groups": None if recipe.groups is None else recipe.groups.spec, "ours": json.dumps(recipe.method.spec),
               "c": recipe.flat_coeffs.tolist(), "notes": recipe.notes}
        if refused is not None:
            rows.append({**row, "mergekit_refused": refused})
            print(f"{label} {name}: mergekit-yaml refuses it ({refused}); ours: {recipe.notes}", flush=True)
            continue
        ours = recipe.task_vectors().merge(recipe.flat_coeffs, recipe.method, dtype=torch.float32, groups=recipe.groups)
        theirs = load_raw(theirs_folder)
        row.update(compare_files(ours, theirs, load_raw(folders[0]), dtype))
        if row["entries_over_one_ulp"]:
            row["over_one_ulp_by_cause"] = explain(ours, theirs, folders, recipe.method)
        rows.append(row)
        print(table([row], ["files", "recipe", "max_abs_diff", "max_bf16_ulps", "entries_over_one_ulp"]), flush=True)
    return rows


def emitted_rows(folders: list[Path], work: Path, label: str, dtype: torch.dtype) -> list[dict]:
    """Our emitted configs through ``mergekit-yaml`` against ``save_merged`` (see the module docstring)."""
    import yaml

    tv = mm.TaskVectors.from_models(folders[0], folders[1:])
    exe = str(mergekit_bin() / "mergekit-yaml")
    rows = []
    for name, c, method, groups in emitted_recipes():
        slug = "".join(ch if ch.isalnum() else "_" for ch in name)
        config = tv.mergekit_config(c, method, groups=groups)
        path = work / f"emitted_{slug}.yml"
        theirs_folder = work / f"emitted_{slug}_mergekit"
        text = yaml.safe_dump(config, sort_keys=False)
        if not (path.exists() and path.read_text() == text and any(theirs_folder.glob("*.safetensors"))):  # else: reuse (--work)
            path.write_text(text)
            subprocess.run([exe, str(path), str(theirs_folder), "--quiet", "--no-copy-tokenizer", "--random-seed", "0"], check=True,
                           capture_output=True, text=True)
        ours_folder = tv.save_merged(work / f"emitted_{slug}_ours", c, method, groups=groups, overwrite=True)
        ours, theirs = load_raw(ours_folder), load_raw(theirs_folder)
        row = {"files": label, "recipe": name, "c": c, "groups": None if groups is None else groups.spec,
               "ours": "task arithmetic" if method is None else json.dumps(method.spec), "config": config,
               **compare_files(ours, theirs, load_raw(folders[0]), dtype)}
        if row["entries_over_one_ulp"]:
            row["over_one_ulp_by_cause"] = explain(ours, theirs, folders, method)
        rows.append(row)
        print(table([row], ["files", "recipe", "max_abs_diff", "max_bf16_ulps", "entries_over_one_ulp", "share_differing_after_rounding"]), flush=True)
    return rows


def plot_emitted(rows: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    labels = list(dict.fromkeys(r["recipe"] for r in rows))
    files = list(dict.fromkeys(r["files"] for r in rows))
    width = 0.8 / len(files)
    for j, f in enumerate(files):
        values = [next((max(r["max_bf16_ulps"], 1e-4) for r in rows if r["recipe"] == lab and r["files"] == f), np.nan) for lab in labels]
        ax.bar(np.arange(len(labels)) + j * width, values, width, label=f"{f} files")
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="one bf16 ulp")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(labels)) + width * (len(files) - 1) / 2, labels, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("max |ours - mergekit| in bf16 ulps")
    ax.set_title("save_merged vs mergekit-yaml on TaskVectors.mergekit_config (dtype: float32)", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def della_checks(folders: list[Path], work: Path) -> tuple[dict, dict]:
    """Keep probabilities and 200-seed means, ours against mergekit's and the unpruned vectors."""
    from safetensors.torch import load_file, save_file

    tv = mm.TaskVectors.from_models(folders[0], folders[1:], storage="dense")
    slices = tv.slices()
    deltas = {f"{key}@{t}": tv.vectors[t, sl].reshape(shape).contiguous() for key, (sl, shape) in slices.items() for t in range(tv.num_tasks)}
    save_file(deltas, str(work / "deltas.safetensors"))
    settings = json.dumps([DENSITY, EPSILON, SEEDS])
    if not ((work / "della.safetensors").exists() and (work / "della.json").exists() and (work / "della.json").read_text() == settings):
        run_in_mergekit(DELLA_SCRIPT, str(work / "deltas.safetensors"), str(work / "della.safetensors"), str(DENSITY), str(EPSILON), str(SEEDS))
        (work / "della.json").write_text(settings)
    theirs = load_file(str(work / "della.safetensors"))

    linear = dict(consensus=None, normalize=False)
    probe = mm.Della(DENSITY, EPSILON, rescale=None, **linear)
    state = probe.fit(lambda keys=None: tv.delta_chunks(keys), {k: sl.stop - sl.start for k, (sl, _) in slices.items()},
                      {k: shape for k, (_, shape) in slices.items()})
    ours_p, theirs_p = [], []
    for key, (sl, shape) in slices.items():
        p = probe.keep_probabilities(key, 0, tv.vectors[:, sl], state)
        for t in range(tv.num_tasks):
            ours_p.append(p[t])
            theirs_p.append(theirs[f"probs/{key}@{t}"].reshape(-1))
    ours_p, theirs_p = torch.cat(ours_p), torch.cat(theirs_p)
    probabilities = {"entries": ours_p.numel(), "equal": int((ours_p == theirs_p).sum()), "max_abs_diff": float((ours_p - theirs_p).abs().max()),
                     "min": float(ours_p.min()), "max": float(ours_p.max())}

    runs: dict[str, list[torch.Tensor]] = {"l1": [], "inverse": []}
    for seed in range(SEEDS):
        for rescale in runs:
            runs[rescale].append(tv.prepared(mm.Della(DENSITY, EPSILON, seed=seed, rescale=rescale, **linear)).double().clone())
    unpruned = tv.vectors.double()
    mk_mean = torch.stack([torch.cat([theirs[f"mean/{k}@{t}"].reshape(-1) for k, _ in slices.items()]) for t in range(tv.num_tasks)])
    mk_var = torch.stack([torch.cat([theirs[f"var/{k}@{t}"].reshape(-1) for k, _ in slices.items()]) for t in range(tv.num_tasks)])
    means = {}
    zscores = {}
    for rescale, samples in runs.items():
        stack = torch.stack(samples)
        mean, var = stack.mean(0), stack.var(0, unbiased=False)
        z = (mean - unpruned) / (var / SEEDS).sqrt().clamp_min(1e-30)
        zscores[f"ours {rescale} vs unpruned"] = z[unpruned != 0]
        if rescale == "l1":
            zm = (mean - mk_mean) / ((var + mk_var) / SEEDS).sqrt().clamp_min(1e-30)
            zscores["ours l1 vs mergekit l1"] = zm[unpruned != 0]
        means[rescale] = mean
    mk_z = (mk_mean - unpruned) / (mk_var / SEEDS).sqrt().clamp_min(1e-30)
    zscores["mergekit l1 vs unpruned"] = mk_z[unpruned != 0]
    summary = {name: {"mean_z2": float((z**2).mean()), "share_abs_z_over_4": float((z.abs() > 4).float().mean()),
                      "mean_z": float(z.mean())} for name, z in zscores.items()}
    relative = {name: float((mean - unpruned).norm() / unpruned.norm()) for name, mean in means.items()}
    relative["mergekit l1"] = float((mk_mean - unpruned).norm() / unpruned.norm())
    # the L1 rescale matches norms, not expectations: E[kept] / x = p_i * |x|_1 / E|kept|_1, largest for the largest |x|
    return {"probabilities": probabilities, "seeds": SEEDS, "z": summary, "relative_l2_error_of_mean": relative}, \
        {"ours": ours_p[:20000].numpy(), "theirs": theirs_p[:20000].numpy(), "z": {k: v.numpy() for k, v in zscores.items()}}


def plot(samples: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(samples["theirs"], samples["ours"], ".", ms=1, alpha=0.4)
    ax.plot([DENSITY - EPSILON, DENSITY + EPSILON], [DENSITY - EPSILON, DENSITY + EPSILON], "k-", lw=0.5)
    ax.set_xlabel("mergekit della_magprune keep probability")
    ax.set_ylabel("Della.keep_probabilities")
    ax.set_title("DELLA keep probabilities (float32 tensors)", fontsize=9)
    ax = fig.add_subplot(1, 2, 2)
    bins = np.linspace(-8, 8, 81)
    for name, z in samples["z"].items():
        ax.hist(np.clip(z, -8, 8), bins=bins, histtype="step", density=True, label=name)
    grid = np.linspace(-8, 8, 400)
    ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), "k:", lw=1, label="N(0, 1)")
    ax.set_xlabel(f"z of the mean over {SEEDS} seeds")
    ax.set_title("DELLA means over seeds (z-scores per entry)", fontsize=9)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results")
    p.add_argument("--work", default=None, help="folder for the models and mergekit's outputs (default: a temporary folder)")
    sections = ("operators", "emitted", "della", "read")
    p.add_argument("--only", default=",".join(sections), help=f"comma-separated sections to run, of {','.join(sections)} (default: all; "
                                                              "a partial run writes mergekit_conformance_<sections>.json)")
    args = p.parse_args()
    only = set(args.only.split(","))
    if only - set(sections):
        p.error(f"--only takes {sections}, got {args.only!r}")
    import shutil
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="map_merge_mergekit_"))
    rows, della, emitted, read = [], {}, [], []
    for dtype in (torch.float32, torch.bfloat16):
        label = str(dtype).removeprefix("torch.")
        if "read" in only:
            read += read_rows(build_models(work / label / "layers4", dtype, layers=4), work / label / "layers4", label, dtype)
            read += read_rows(build_models(work / label / "layers1", dtype, layers=1), work / label / "layers1", label, dtype,
                              one_layer_recipes())
        if not only & {"operators", "emitted", "della"}:
            continue
        folders = build_models(work / label, dtype)
        base = load(folders[0])
        tv = mm.TaskVectors.from_models(folders[0], folders[1:])
        one = mm.TaskVectors.from_models(folders[0], folders[1:2])
        for name, method, weights, params, shared, ours, c in (recipes(2) if "operators" in only else []):
            vectors = one if len(weights) == 1 else tv
            folders_used = folders[: 1 + len(weights)]
            theirs = run_mergekit_yaml(folders_used, work / label / f"mk_{method}_{len(weights)}", method, weights, params, shared)
            merged = vectors.merge(c, ours)
            row = {"files": label, "recipe": name, "mergekit": method, "weights": weights, **{f"mk_{k}": v for k, v in {**params, **shared}.items()},
                   "ours": "task arithmetic" if ours is None else json.dumps(ours.spec), "c": c, **compare(merged, theirs, base)}
            rows.append(row)
            print(table([row], ["files", "recipe", "max_abs_diff", "max_abs_diff_same_decisions", "share_differing", "share_decisions_differing"]), flush=True)
        if "emitted" in only:
            emitted += emitted_rows(folders, work / label, label, dtype)
        if dtype == torch.float32 and "della" in only:
            della, samples = della_checks(folders, work / label)
            print(json.dumps(della, indent=1), flush=True)
            Path(args.out).mkdir(parents=True, exist_ok=True)
            plot(samples, Path(args.out) / "mergekit_conformance.png")
    if emitted:
        plot_emitted(emitted, Path(args.out) / "mergekit_emitted.png")
    name = "mergekit_conformance" if only == set(sections) else "mergekit_conformance_" + "_".join(s for s in sections if s in only)
    write(args.out, name, {"rows": rows, "della": della, "emitted": emitted, "read": read,
                           "settings": {"density": DENSITY, "gamma": GAMMA, "epsilon": EPSILON, "lambda": LAMBDA, "seeds": SEEDS,
                                        "mergekit": "0.1.5", "sections": sorted(only)}})
    print(table(rows, ["files", "recipe", "mergekit", "max_abs_diff", "max_abs_diff_same_decisions", "share_differing", "share_decisions_differing"]))
    print(table(emitted, ["files", "recipe", "max_abs_diff", "max_bf16_ulps", "entries_over_one_ulp", "share_over_one_ulp", "share_differing_after_rounding", "worst_tensor"]))
    print(table(read, ["files", "recipe", "mergekit", "max_abs_diff", "max_bf16_ulps", "entries_over_one_ulp", "share_differing_after_rounding", "mergekit_refused"]))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
