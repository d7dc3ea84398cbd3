"""A notebook exported as HTML works offline: nothing fetched, no dead dashboard iframe, runs kept out
of the tree, progress bars kept as text."""

from __future__ import annotations

import re
import socket

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")


@pytest.mark.slow
def test_exported_page_fetches_nothing_and_has_no_dead_iframe(tmp_path, monkeypatch):
    from workbench.app.synthetic import write_synthetic_run
    from workbench.notebook_export import export_html

    run = write_synthetic_run(tmp_path / "run", n_tokens=400, n_layers=2, n_experts=4, seq_len=100, probes=("routing",))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("Inline maths: $x^2$ (MathJax from a CDN would render it)."),
        nbformat.v4.new_code_cell("import os\nfrom workbench.notebook import setup\nsetup()\n"
                                  "RUNS = os.environ['WORKBENCH_NB_RUNS']\nprint('runs in', RUNS)"),
        nbformat.v4.new_code_cell("import plotly.graph_objects as go\ngo.Figure(go.Bar(x=['a', 'b'], y=[1, 2]))"),
        nbformat.v4.new_code_cell("from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='counting'): pass"),
        nbformat.v4.new_code_cell("from workbench.app import make_app\n"
                                  f"make_app({str(run.path)!r}, warm=()).run(jupyter_mode='inline', port={port})"),
    ]
    src = tmp_path / "nb" / "demo.ipynb"
    src.parent.mkdir()
    nbformat.write(nb, str(src))
    monkeypatch.chdir(tmp_path / "nb")
    out = export_html(src, progress=False)

    assert out == tmp_path / "nb" / "html" / "demo.html"  # the git-ignored default beside the notebook
    page = out.read_text()
    remote = re.findall(r"<(?:script|link|img|iframe)[^>]*(?:src|href)=[\"']?(?:https?:)?//[^\"' >]+", page)
    assert not remote, remote  # no CDN (MathJax, require.js, widget embedder), nothing fetched
    assert "<iframe" not in page and "workbench app RUN" in page  # the dashboard cell says how to open it
    assert "Plotly.newPlot" in page or "plotly" in page.lower()  # the figure, plotly.js inline
    assert "counting" in page and "3/3" in page  # the progress bar as text, in its final state
    m = re.search(r"runs in (\S+)", page)
    assert m and not m.group(1).startswith(str(tmp_path / "nb"))  # captures went to a temporary folder
    assert sorted(p.name for p in (tmp_path / "nb").iterdir()) == ["demo.ipynb", "html"]  # nothing else left


def test_offline_turns_a_saved_dashboard_iframe_and_widgets_into_static_output():
    from workbench.notebook_export import WIDGET_VIEW, offline

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={
            "text/html": '<iframe src="http://127.0.0.1:8061/" width="100%"></iframe>', "text/plain": "<IPython...>"}),
        nbformat.v4.new_output("display_data", data={WIDGET_VIEW: {"model_id": "box"}, "text/plain": "HBox(children=())"}),
    ]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {
        "box": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]}},
        "a": {"model_name": "HTMLModel", "state": {"value": "stats: 100%"}},
        "b": {"model_name": "FloatProgressModel", "state": {"value": 5, "max": 10}},
        "c": {"model_name": "HTMLModel", "state": {"value": " 10/10 [00:01&lt;00:00]"}}}}}
    offline(nb)
    assert "widgets" not in nb.metadata
    first, second = nb.cells[0].outputs
    assert "<iframe" not in first["data"]["text/html"] and "workbench app" in first["data"]["text/html"]
    assert second["data"] == {"text/plain": "stats: 100% |#####     | 10/10 [00:01<00:00]"}
