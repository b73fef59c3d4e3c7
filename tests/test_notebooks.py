"""The notebooks run top to bottom (small settings through environment variables)."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MC_SHARDS", str(demo_root))
    monkeypatch.setenv("MC_EPISODES", "4")
    monkeypatch.setenv("MC_TRAIN_STEPS", "3")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "episodes per domain" in printed


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
