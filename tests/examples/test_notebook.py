"""examples/notebook.ipynb runs top to bottom on the tiny checkpoint on the CPU, executed with nbclient
as a user's Jupyter would: load, chat about an image and a video with streaming, LoRA steps, adapter save and
reload, dry-run push. Its cells assert what they show; the committed notebook carries no outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("peft")
pytest.importorskip("av")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "notebook.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 7
    assert all(c.outputs == [] and c.execution_count is None for c in code)


def test_notebook_runs_end_to_end(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError (with the cell's traceback) if any cell or assertion fails
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "reloaded adapter: identical logits" in text
    assert "2 frames of" in text and "step 3: loss" in text
