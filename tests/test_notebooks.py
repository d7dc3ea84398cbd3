"""The notebooks are documentation and tests: each runs top to bottom offline on the demo model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXECUTED = ["01_quickstart.ipynb", "02_super_experts.ipynb", "03_routing_locality.ipynb",
            "04_multilingual_routing.ipynb", "05_behaviour_maps.ipynb", "07_compare_checkpoints.ipynb",
            "08_routing_fidelity.ipynb"]


def test_every_notebook_is_listed_and_stripped():
    import nbformat

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert set(EXECUTED) < set(names) and "06_bring_your_own_model.ipynb" in names
    for name in names:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        for cell in book.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name} has outputs committed"


def test_notebooks_draw_offline_and_show_progress():
    """Every notebook sets up offline figures and keeps the library's progress bars on."""
    import nbformat

    for name in EXECUTED:
        src = "\n".join(c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells if c.cell_type == "code")
        assert "setup()" in src and "from workbench.notebook import setup" in src, name
        assert "notebook_connected" not in src and "progress=False" not in src, name


def _no_cdn(text: str) -> None:
    """No plotly.js fetched from the network (plotly.js itself mentions CDN URLs for map tiles: not loads),
    and no IProgress warning."""
    import re

    assert not re.search(r"""<script[^>]*src=[\\"']*[^>]*plot""", text, re.I), "plotly.js loaded from a URL"
    assert "IProgress" not in text


def test_readme_nbconvert_command_draws_offline(tmp_path):
    """`jupyter nbconvert --execute --to html` (the README's command, from the notebooks extra) on a notebook
    that uses setup(): the HTML embeds plotly.js (no CDN), and a library progress bar shows, without the
    IProgress warning."""
    import shutil
    import subprocess
    import sys

    import nbformat

    jupyter = shutil.which("jupyter", path=str(Path(sys.executable).parent)) or shutil.which("jupyter")
    if jupyter is None or subprocess.run([jupyter, "nbconvert", "--version"], capture_output=True).returncode:
        pytest.fail("jupyter nbconvert is missing: install the notebooks extra (pip install -e '.[notebooks]')")
    from workbench.app.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", n_tokens=400, n_layers=2, n_experts=4, seq_len=100,
                              probes=("routing",))
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from workbench.notebook import setup\nprint(setup())"),
        nbformat.v4.new_code_cell("import workbench as wb\nfrom workbench import analysis\n"
                                  f"run = wb.open_run({str(run.path)!r})\n"
                                  "stats = analysis.analyze('stats', run, reuse=False)\nprint('rows', stats.tables['experts'].height)"),
        nbformat.v4.new_code_cell("import plotly.graph_objects as go\ngo.Figure(go.Bar(x=[1, 2], y=[3, 4]))"),
    ]
    path = tmp_path / "check.ipynb"
    nbformat.write(nb, path)
    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_PLOTLY_RENDERER"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([jupyter, "nbconvert", "--execute", "--to", "html", str(path)], capture_output=True, text=True,
                       timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    html = (tmp_path / "check.html").read_text()
    _no_cdn(html)
    assert "plotly_mimetype+notebook" in html and "'progress': 'widgets'" in html
    assert len(html) > 1_000_000 and "plotly.js v" in html.lower()  # plotly.js itself, embedded
    assert "rows" in html
    # the executed notebook: the stats cell shows a progress bar (a widget with a text fallback)
    out = tmp_path / "check_run.ipynb"
    r = subprocess.run([jupyter, "nbconvert", "--execute", "--to", "notebook", "--output", out.name, str(path)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cell = nbformat.read(out, as_version=4).cells[1]
    mimes = {k for o in cell.outputs for k in o.get("data", {})}
    assert "application/vnd.jupyter.widget-view+json" in mimes, cell.outputs
    _no_cdn(json.dumps(cell.outputs))


def test_setup_without_ipywidgets_uses_text_bars(monkeypatch):
    import tqdm.auto
    import tqdm.std

    from workbench.notebook import setup

    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)  # restored after the test
    monkeypatch.setattr(tqdm.auto, "trange", tqdm.auto.trange)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # import ipywidgets -> ImportError
    import plotly.io as pio

    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    assert setup(renderer="json") == {"renderer": "json", "progress": "text"}
    assert tqdm.auto.tqdm is tqdm.std.tqdm and pio.renderers.default == "json"


@pytest.mark.slow
@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_runs_offline(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("WORKBENCH_NB_APP", "0")
    monkeypatch.setenv("WORKBENCH_NB_RUNS", str(tmp_path / "runs"))
    monkeypatch.delenv("WORKBENCH_PLOTLY_RENDERER", raising=False)  # the notebooks' own offline renderer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # figures render inline: at least one plotly output in every executed notebook
    mimes = {k for c in book.cells if c.cell_type == "code" for o in c.outputs for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in mimes, mimes
    # offline: plotly.js embedded, never fetched from a CDN; progress shown without the IProgress warning
    _no_cdn(json.dumps([c.outputs for c in book.cells if c.cell_type == "code"]))
    assert any("plotly.js v" in o.get("data", {}).get("text/html", "").lower()
               for c in book.cells if c.cell_type == "code" for o in c.outputs)
