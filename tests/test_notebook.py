"""The quickstart notebook executes top to bottom (tiny settings)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("RLHF_NOTEBOOK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "ppo" / "hf" / "config.json").exists()
    # The notebook defines nothing of its own: no def/class, only calls into the package.
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "def " not in sources and "class " not in sources
