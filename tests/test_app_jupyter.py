"""The documented notebook usage: make_app(...).run(jupyter_mode="inline") in a real kernel."""

from __future__ import annotations

import socket

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


def test_inline_in_a_kernel_serves_the_app(tmp_path):
    from workbench.app.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", n_tokens=400, n_layers=2, n_experts=4, seq_len=100,
                              probes=("routing",))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("from workbench.app import make_app\n"
                                  f"app = make_app({str(run.path)!r}, warm=())\n"
                                  f"app.run(jupyter_mode='inline', port={port})"),
        nbformat.v4.new_code_cell("import json, urllib.request\n"
                                  f"r = urllib.request.urlopen('http://127.0.0.1:{port}/_dash-layout')\n"
                                  "print(r.status, 'wb-page' in r.read().decode())"),
    ]
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3").execute()
    html = "".join(o.get("data", {}).get("text/html", "") for o in nb.cells[0].outputs)
    assert "<iframe" in html and f"127.0.0.1:{port}" in html
    assert "".join(o.get("text", "") for o in nb.cells[1].outputs).strip() == "200 True"
