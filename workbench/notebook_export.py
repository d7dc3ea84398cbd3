"""A notebook as one self-contained HTML page that works offline.

    python -m workbench.notebook_export notebooks/01_quickstart.ipynb             # -> notebooks/html/01_quickstart.html
    python -m workbench.notebook_export notebooks/01_quickstart.ipynb --out /tmp/qs.html

`jupyter nbconvert --execute --to html` gives a page that asks three CDNs for MathJax, require.js and
the widget embedder (blank or broken offline) and keeps the inline dashboard as an iframe to a server
that is gone once the kernel stops. Here the notebook is executed with its runs in a temporary folder
(nothing lands in the checkout), then: widget progress bars keep their text, the widget state and
its embed script are dropped, the dashboard iframe becomes a note with the command that opens it, and
no tag in the page loads anything from the network (plotly.js is embedded by `workbench.notebook.setup`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .errors import WorkbenchError

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_REMOTE_TAG = re.compile(r"<script[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>|<link[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>",
                         re.IGNORECASE)


def default_out(notebook: Path) -> Path:
    """notebooks/html/<name>.html (git-ignored) beside the notebook."""
    return notebook.parent / "html" / f"{notebook.stem}.html"


def export_html(notebook: str | Path, out: str | Path | None = None, runs: str | Path | None = None,
                execute: bool = True, timeout: int = 1800, progress: bool = True) -> Path:
    """Execute `notebook` (unless not `execute`) and write it as an offline HTML page; returns its path.

    runs: where the notebook writes its captures (WORKBENCH_NB_RUNS; default a temporary folder,
    removed afterwards). The dashboard cells run as the notebook says (WORKBENCH_NB_APP).
    """
    try:
        import nbformat
        from nbconvert import HTMLExporter
    except ImportError as e:
        raise WorkbenchError(f"exporting a notebook needs nbformat and nbconvert ({e.name} is missing); "
                             "pip install -e \".[notebooks]\"") from None
    notebook = Path(notebook)
    if not notebook.is_file():
        raise WorkbenchError(f"{notebook} is not a notebook file")
    out = Path(out) if out else default_out(notebook)
    nb = nbformat.read(str(notebook), as_version=4)
    if execute:
        with tempfile.TemporaryDirectory(prefix="wb_nb_runs_") as tmp:
            _execute(nb, notebook.parent, Path(runs) if runs else Path(tmp), timeout, progress)
    offline(nb)
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    body = _REMOTE_TAG.sub("", body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def _execute(nb, cwd: Path, runs: Path, timeout: int, progress: bool) -> None:
    from nbclient import NotebookClient

    before = {k: os.environ.get(k) for k in ("WORKBENCH_NB_RUNS",)}
    os.environ["WORKBENCH_NB_RUNS"] = str(runs)  # the kernel inherits it: captures go there, not into the tree
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
        n = sum(c.cell_type == "code" for c in nb.cells)
        if progress:
            print(f"workbench: executing {n} code cells (captures go to {runs}) ...", flush=True)
        client.execute()
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def offline(nb) -> None:
    """Make an executed notebook's outputs static: widget views become their text, the widget state is
    dropped (its embed script comes from a CDN), a dashboard iframe becomes a note."""
    widgets = (nb.metadata.pop("widgets", None) or {}).get("application/vnd.jupyter.widget-state+json", {})
    state = widgets.get("state", {})
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outs = []
        for o in cell.get("outputs", []):
            data = o.get("data") or {}
            if WIDGET_VIEW in data:
                text = _widget_text(state, data[WIDGET_VIEW].get("model_id")) or data.get("text/plain", "")
                if not text.strip() or re.match(r"^\w+\(", text):  # only a repr like HBox(children=...)
                    continue
                o["data"] = {"text/plain": text}
            html = data.get("text/html", "")
            if "<iframe" in html and re.search(r"src=[\"']https?://(127\.0\.0\.1|localhost)", html):
                o["data"] = {"text/html": _APP_NOTE, "text/plain": "(the dashboard ran inline here)"}
            outs.append(o)
        cell["outputs"] = outs


def _widget_text(state: dict, model_id, depth: int = 0) -> str:
    """A widget's last state as text: a tqdm bar (HBox of label, progress, counts) reads
    'stats: 100%|##########| 49.2k/49.2k [00:00<00:00]'."""
    m = state.get(model_id or "", {})
    name, st = m.get("model_name", ""), m.get("state", {})
    if depth > 4 or not m:
        return ""
    if name in ("HBoxModel", "VBoxModel"):
        parts = [_widget_text(state, c.replace("IPY_MODEL_", ""), depth + 1) for c in st.get("children", [])]
        return " ".join(p for p in parts if p).strip()
    if name in ("HTMLModel", "LabelModel", "TextModel"):
        import html as h

        return h.unescape(re.sub(r"<[^>]+>", "", str(st.get("value", "")))).strip()
    if name in ("FloatProgressModel", "IntProgressModel"):
        top = float(st.get("max") or 0) or 1.0
        k = int(round(10 * min(1.0, float(st.get("value") or 0) / top)))
        return "|" + "#" * k + " " * (10 - k) + "|"
    return ""


_APP_NOTE = ("<div style='padding:10px 14px;border:1px solid #f0d67a;background:#fff8e1;border-radius:6px'>"
             "The dashboard ran here inline while the notebook was executed (an iframe to the kernel's server, "
             "which does not exist in a saved page). Open it with <code>workbench app RUN --model demo</code> "
             "on the run folder this notebook captured.</div>")


def main(argv=None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m workbench.notebook_export",
                                description="Execute a notebook and write it as one HTML page that works offline.")
    p.add_argument("notebook")
    p.add_argument("--out", help="HTML file (default: notebooks/html/<name>.html beside it, git-ignored)")
    p.add_argument("--runs", help="where the notebook's captures go (default: a temporary folder)")
    p.add_argument("--no-execute", action="store_true", help="export the outputs already saved in the notebook")
    a = p.parse_args(argv)
    try:
        path = export_html(a.notebook, a.out, a.runs, execute=not a.no_execute)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (self-contained: opens offline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
