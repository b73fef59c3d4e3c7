"""The notebooks run top to bottom (small settings through environment variables) and show what they promise."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def _run(name, demo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MC_SHARDS", str(demo_root))
    monkeypatch.setenv("MC_EPISODES", "3")
    monkeypatch.setenv("MC_TRAIN_STEPS", "3")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return markdown, images


@pytest.mark.slow
def test_few_shot_evaluation_notebook_shows_every_method_and_four_figures(demo_root, tmp_path, monkeypatch):
    markdown, images = _run("few_shot_evaluation.ipynb", demo_root, tmp_path, monkeypatch)
    for method in ("pixels", "zero_shot", "prototype", "linear_probe", "tip_adapter", "projection", "finetune", "dcmcl"):
        assert f"| {method} |" in markdown
    assert "natural 5-way 1-shot" in markdown and "medical 5-way 5-shot" in markdown
    assert images == 4  # accuracy vs shots, vs inner steps, confusion matrices, embedding map


@pytest.mark.slow
def test_domain_shift_notebook_compares_before_after_and_the_unknown_embedding(demo_root, tmp_path, monkeypatch):
    markdown, images = _run("domain_shift.ipynb", demo_root, tmp_path, monkeypatch)
    assert "| align/mmd/natural-medical |" in markdown and "| align/uniformity/medical |" in markdown
    assert "via unknown" in markdown and "natural 5-way 5-shot |" in markdown
    assert images == 1


def test_notebooks_are_stored_without_outputs():
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        assert not any(c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path.name
