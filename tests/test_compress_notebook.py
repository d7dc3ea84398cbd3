"""notebooks/09_pruning.ipynb runs top to bottom offline on the demo model, like the notebooks that
tests/test_notebooks.py executes (same checks: no errors, an inline plotly figure, no CDN)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "09_pruning.ipynb"


def test_pruning_notebook_is_stripped_and_sets_up():
    import nbformat

    book = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    src = "\n".join(c.source for c in code)
    assert "from workbench.notebook import setup" in src and "setup()" in src


@pytest.mark.slow
def test_pruning_notebook_runs_offline(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKBENCH_NB_APP", "0")
    monkeypatch.setenv("WORKBENCH_NB_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("WORKBENCH_PLOTLY_RENDERER", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [o for c in book.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outs if o.output_type == "error"]
    assert "application/vnd.plotly.v1+json" in {k for o in outs for k in o.get("data", {})}
    text = json.dumps(outs)
    # plotly.js is embedded, never loaded from a URL (its own source mentions CDN URLs for map tiles)
    assert not re.search(r"""<script[^>]*src=[\\"']*[^>]*plot""", text, re.I) and "IProgress" not in text
    # the exactness cell: the pruned checkpoint equals the base model with the ban (fp32 round-off only)
    line = next(s for o in outs for s in o.get("text", "").splitlines() if s.startswith("max |pruned"))
    assert float(line.split("=")[1]) < 1e-4
