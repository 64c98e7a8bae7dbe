"""The quickstart notebook runs end to end (so it cannot rot)."""

import json
import os
from pathlib import Path

import nbformat
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any(o.get("output_type") == "display_data" or "image/png" in o.get("data", {}) for o in outputs)
    assert not any(o.get("output_type") == "error" for o in outputs)


def test_map_vs_moe_notebook_executes_on_the_vision_zoo(tmp_path):
    """The text-zoo comparison notebook, run with its parameters cell switched to the vision zoo."""
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "map_vs_moe.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    params = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith("# parameters")]
    assert len(params) == 1 and 'ZOO = "text"' in params[0].source
    params[0].source = (f'ZOO = "vision"\nTASKS = ["rotated", "inverted", "mirrored_parity"]\nVAL_EXAMPLES = None\nMOE_STEPS = 10\n'
                        f'OUT = {str(tmp_path / "out")!r}')
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # parity, pairwise, 3-D
    table = next(o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert table.count("| PWE-MoE") == 2 and "| MAP |" in table
    text = "".join(o.get("text", "") for o in outputs)
    assert "MAP coefficients" in text and "PWE-MoE (LS) unloaded" in text


def test_llm_merge_notebook_executes_on_the_tiny_lm_zoo(tmp_path):
    """The language-model example (the LM zoo's sharded full fine-tune and LoRA adapter read from their
    folders, held-out-loss objectives, MAP against a dense grid, a saved HF folder scored by lm-eval),
    run with its parameters cell switched to the tiny zoo and small budgets."""
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "llm_merge.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    params = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith("# parameters")]
    assert len(params) == 1 and 'SIZE = "small"' in params[0].source
    out = tmp_path / "outputs" / "llm_merge"  # where examples/llm_run.yaml (copied to tmp_path/examples) finds it
    params[0].source = f"SIZE = 'tiny'\nGRID = 3\nREEVALUATIONS = 4\nOUT = {str(out)!r}"
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "storage='mixed'" in text and "real evaluations in" in text and "saved to" in text and "lm-eval code multiple choice" in text
    assert (out / "merged" / "config.json").exists() and (out / "front.png").exists()
    # the files examples/llm_run.yaml names
    for name in ("base/config.json", "code/model.safetensors.index.json", "medical/adapter_config.json", "code_val.jsonl", "medical_val.jsonl",
                 "code_choice_val.yaml"):
        assert (out / name).exists(), name
    # the saved folder scores as the in-memory merge did (same held-out losses)
    line = next(l for l in text.splitlines() if l.startswith("validation losses in memory"))
    memory, saved = (np.array(part.split("[")[1].split("]")[0].split(), dtype=float) for part in line.split("|"))
    np.testing.assert_allclose(saved, memory, atol=1e-3)

    # examples/llm_run.yaml runs from the command line on the files the notebook wrote
    import shutil

    from map_merge.cli import main

    (tmp_path / "examples").mkdir()
    config = shutil.copy(ROOT / "examples" / "llm_run.yaml", tmp_path / "examples" / "llm_run.yaml")
    cwd = Path.cwd()
    try:
        os.chdir(tmp_path)  # the config's 'out' is relative to where the command runs
        assert main(["map", "--config", str(config)]) == 0
    finally:
        os.chdir(cwd)
    summary = json.loads((out / "cli" / "result.json").read_text())["summary"]
    assert summary["tasks"] == ["code", "medical"] and len(summary["coeffs"]) == 2 and (out / "cli" / "front.png").exists()
    # the saved pick is the zoo's experts merged at the chosen coefficients: same held-out losses
    import torch
    from transformers import AutoModelForCausalLM

    from map_merge.zoo import load_zoo

    zoo = load_zoo("lm", ["code", "medical"], size="tiny", progress=False)
    saved = AutoModelForCausalLM.from_pretrained(out / "cli" / "merged", dtype=torch.bfloat16).eval()
    expected = zoo.evaluate_coeffs(np.array([summary["coeffs"]]), ["code", "medical"], split="val")[0]
    np.testing.assert_allclose(zoo.evaluate_model(saved, ["code", "medical"], split="val"), expected, atol=1e-3)
