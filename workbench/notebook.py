"""Jupyter set-up for the workbench notebooks: figures that draw offline, progress bars that show.

    from workbench.notebook import setup
    setup()          # first cell of every notebook

Why: plotly's `notebook_connected` renderer loads plotly.js from a CDN, so figures stay blank offline.
The default here, "plotly_mimetype+notebook", gives JupyterLab / Notebook 7 the plotly MIME bundle
(drawn by the plotly extension that ships with the `plotly` package) and embeds plotly.js once in the
notebook for classic Jupyter and `nbconvert --to html`: no network either way. Progress: the library
uses `tqdm.auto`, which in Jupyter needs ipywidgets (the `notebooks` extra installs it) and otherwise
warns "IProgress not found"; without ipywidgets, bars are plain text instead, with no warning.
"""

from __future__ import annotations

import os

OFFLINE_RENDERER = "plotly_mimetype+notebook"


def setup(renderer: str | None = None, widgets: bool | None = None) -> dict:
    """Configure plotly and tqdm for this kernel; returns what was chosen.

    `renderer`: a plotly renderer name (default `$WORKBENCH_PLOTLY_RENDERER`, else the offline one above).
    `widgets`: progress bars as ipywidgets (default: when ipywidgets is installed) or plain text.
    """
    import plotly.io as pio

    name = renderer or os.environ.get("WORKBENCH_PLOTLY_RENDERER") or OFFLINE_RENDERER
    pio.renderers.default = name
    if widgets is None:
        try:
            import ipywidgets  # noqa: F401

            widgets = True
        except ImportError:
            widgets = False
    if not widgets:
        import tqdm.auto
        import tqdm.std

        # Every progress bar in the library is created as tqdm.auto.tqdm(...) at call time.
        tqdm.auto.tqdm = tqdm.std.tqdm
        tqdm.auto.trange = tqdm.std.trange
    return {"renderer": name, "progress": "widgets" if widgets else "text"}
