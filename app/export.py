"""Export: download any analysis table (and the raw run tables of moderate size) as CSV, Parquet or JSON.

Only names from the run's own table list and the cached analyses can be asked for, so the browser
cannot make the server read any other file.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from dash import Input, Output, State, dcc, html, no_update

from ..analysis import MODULES, write_table
from ..analysis.registry import ANALYSES
from ..errors import WorkbenchError
from .state import analysis_available
from .ui import Page

MAX_RAW_ROWS = 2_000_000  # bigger raw tables go through `workbench export` (streams part files)
FORMATS = ("csv", "parquet", "json")
# need more than this run (a second run, the live model): made by `workbench compare` / `workbench attribute`,
# never by the "compute them now" button, so never listed as pending here
NOT_FROM_ONE_RUN = {n: f"workbench {s.command}" + (" A B" if s.runs == 2 else "")
                    for n, s in ANALYSES.items() if not s.from_one_run}


def applicable(app_ctx) -> list[str]:
    """Analyses that apply to this run alone (it holds the tables and labels they read)."""
    from .analyses import why_not

    return [n for n in MODULES if n not in NOT_FROM_ONE_RUN and analysis_available(n)
            and why_not(app_ctx.run, n) is None]


def computable(app_ctx) -> list[str]:
    """Analyses this page can compute from the run alone and has not yet."""
    done = app_ctx.data.computed_analyses()
    return [n for n in applicable(app_ctx) if n not in done]


def exportable(app_ctx) -> list[dict]:
    """Dropdown options: value 'run/<table>' or 'analysis/<name>/<table>'."""
    opts = []
    sizes = app_ctx.data.summary()["tables"]
    for t, v in sizes.items():
        big = v["rows"] > MAX_RAW_ROWS
        opts.append({"label": f"run · {t} ({v['rows']:,} rows{'; too big here, use the CLI' if big else ''})",
                     "value": f"run/{t}", "disabled": big})
    for name, res in sorted(app_ctx.data.computed_analyses().items()):
        for t, df in res.tables.items():
            opts.append({"label": f"{name} · {t} ({df.height:,} rows)", "value": f"analysis/{name}/{t}"})
    return opts


def layout(app_ctx):
    try:
        opts = exportable(app_ctx)
    except WorkbenchError as e:  # a damaged run: the store names the part
        return html.Div([html.H2("Export"), html.Div(str(e), className="error")])
    pending = computable(app_ctx)
    return html.Div([
        html.H2("Export"),
        html.P("Download a table of this run or of any analysis computed so far. For whole runs use "
               f"`workbench export {app_ctx.run.path} --format parquet --out DIR`; comparisons and attributions "
               "come from " + " and ".join(f"`{c}`" for c in NOT_FROM_ONE_RUN.values()) + ".",
               style={"fontSize": "13px"}),
        html.Div([
            html.Div([html.Label("table"), dcc.Dropdown(id="exp-table", options=opts,
                                                        value=next((o["value"] for o in opts if not o.get("disabled")),
                                                                   None))], style={"minWidth": "460px"}),
            html.Div([html.Label("format"), dcc.RadioItems(id="exp-format", options=list(FORMATS), value="csv",
                                                           inline=True)]),
            html.Button("download", id="exp-go", n_clicks=0),
        ], className="controls"),
        html.Div(id="exp-msg", className="error"),
        html.Div([html.Span("Not computed yet: " + ", ".join(pending) + ". "),
                  html.Button("compute them now", id="exp-warm", n_clicks=0)] if pending else [],
                 style={"fontSize": "13px"}),
        dcc.Download(id="exp-download"),
        dcc.Interval(id="exp-refresh", interval=3000, disabled=not pending),
    ])


def table_for(app_ctx, value: str):
    """The polars frame behind a dropdown value, or a message why not (never a path from the browser)."""
    parts = (value or "").split("/")
    if len(parts) == 2 and parts[0] == "run":
        sizes = app_ctx.data.summary()["tables"]
        if parts[1] not in sizes:
            return None, "unknown table"
        if sizes[parts[1]]["rows"] > MAX_RAW_ROWS:
            return None, f"{parts[1]} has {sizes[parts[1]]['rows']:,} rows; use `workbench export` for it"
        return app_ctx.run.table(parts[1]).collect(), None
    if len(parts) == 3 and parts[0] == "analysis":
        res = app_ctx.data.computed_analyses().get(parts[1])
        if res is None or parts[2] not in res.tables:
            return None, "that analysis table is not computed yet"
        return res.tables[parts[2]], None
    return None, "choose a table"


def register(app, app_ctx):
    @app.callback(Output("exp-download", "data"), Output("exp-msg", "children"), Input("exp-go", "n_clicks"),
                  State("exp-table", "value"), State("exp-format", "value"), prevent_initial_call=True)
    def download(_n, value, fmt):
        if fmt not in FORMATS:
            return no_update, "choose a format"
        try:
            df, why = table_for(app_ctx, value)
        except WorkbenchError as e:
            return no_update, str(e)
        if df is None:
            return no_update, why
        name = value.replace("/", "_") + f".{fmt}"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            write_table(df, path)
            return dcc.send_bytes(path.read_bytes(), name), ""

    @app.callback(Output("exp-table", "options"), Output("exp-refresh", "disabled"), Input("exp-warm", "n_clicks"),
                  Input("exp-refresh", "n_intervals"), prevent_initial_call=True)
    def warm(clicks, _n):
        names = applicable(app_ctx)
        if clicks:
            app_ctx.data.warm(names)
        pending = [n for n in names if app_ctx.data.analysis(n) is None] if clicks else []
        return exportable(app_ctx), not pending


PAGE = Page("/export", "Export", layout, register)
