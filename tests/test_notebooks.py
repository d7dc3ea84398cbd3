"""The notebooks are documentation and tests: each runs top to bottom offline on the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXECUTED = ["01_quickstart.ipynb", "02_super_experts.ipynb", "03_routing_locality.ipynb",
            "04_multilingual_routing.ipynb", "05_behaviour_maps.ipynb"]


def test_every_notebook_is_listed_and_stripped():
    import nbformat

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(EXECUTED) < set(names) and "06_bring_your_own_model.ipynb" in names
    for name in names:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs committed"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_runs_offline(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKBENCH_NB_APP", "0")
    monkeypatch.setenv("WORKBENCH_NB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_PLOTLY_RENDERER", "json")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # figures render inline: at least one plotly output in every executed notebook
    mimes = {k for c in book.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in mimes or "application/json" in mimes, mimes
