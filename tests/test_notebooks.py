"""The quickstart notebook runs end to end (so it cannot rot)."""

from pathlib import Path

import nbformat

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


def test_llm_merge_notebook_executes_on_a_tiny_causal_lm(tmp_path):
    """The language-model example (LoRA adapters, lm-eval and held-out loss objectives, MAP, a saved
    HF folder), run with its parameters cell switched to a config-built tiny Llama."""
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "llm_merge.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "commit notebooks with outputs stripped"
    params = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith("# parameters")]
    assert len(params) == 1 and "TINY = False" in params[0].source
    params[0].source = f"TINY = True\nOUT = {str(tmp_path / 'out')!r}"
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "storage='lora'" in text and "real evaluations in" in text and "saved to" in text
    assert (tmp_path / "out" / "merged" / "config.json").exists() and (tmp_path / "out" / "front.png").exists()
