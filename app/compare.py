"""Compare page: this run against another run served by the same dashboard (`workbench app RUN_A RUN_B`).

Everything shown comes from `workbench.analysis.compare.analyze` and its `figures`: layer curves,
the per-expert load shift heatmap, the matched-expert table, and the per-token changed decisions.
Results are cached per (run A, run B, matching), so switching back and forth is instant.
"""

from __future__ import annotations

import threading

import polars as pl
from dash import Input, Output, dash_table, dcc, html

from ..errors import WorkbenchError
from .state import Unavailable
from .ui import Page, graph, notice, table_page

_CACHE: dict = {}
_LOCK = threading.Lock()
ROWS = 10  # rows per table page
MATCHES = {"none": "same expert ids", "routing": "match by co-routing (same tokens)",
           "weights": "match by weights (checkpoints)"}


def served_runs(app_ctx) -> dict:
    """name -> Run of every run this server shows (the current one included)."""
    apps = getattr(app_ctx.app.server, "workbench_apps", None) or {}
    runs = {name: a.workbench.run for name, a in apps.items() if hasattr(a, "workbench")}
    if not runs:
        runs = {app_ctx.run.path.name: app_ctx.run}
    return runs


def result_for(run_a, run_b, match: str):
    """The comparison (cached), or Unavailable with the reason in one sentence."""
    from ..analysis import compare

    key = (str(run_a.path), str(run_b.path), match)
    with _LOCK:  # one comparison at a time (two CPU cores are shared with everything else)
        if key not in _CACHE:
            try:
                res = compare.analyze(run_a, other=run_b, match=match)
                _CACHE[key] = (res, compare.figures(res))
            except WorkbenchError as e:
                _CACHE[key] = (Unavailable(str(e)), {})
    return _CACHE[key]


def _full(df: pl.DataFrame, limit: int = 5000) -> tuple[list, list]:
    rows, cols, _ = table_page(df.head(limit), 0, limit, [])
    return rows, cols


def render(res, figs) -> list:
    """The page body for one comparison: summary, figures, matched experts, changed decisions."""
    if isinstance(res, Unavailable):
        return [notice(res)]
    out = [html.Div(res.summary, className="summary")]
    for name in ("layer_curves", "load_shift", "balance", "label_jsd", "match_similarity", "token_changes"):
        if name in figs:
            out.append(graph(figs[name]))
    t = res.tables
    if "matches" in t:
        m = t["matches"].sort("layer", "expert_a")
        rows, cols = _full(m)
        out += [html.H3(f"Matched experts ({int(m['weak'].sum())} weak)"),
                dash_table.DataTable(id="cmp-matches", data=rows, columns=cols, page_size=ROWS, sort_action="native",
                                     filter_action="native", style_table={"overflowX": "auto"},
                                     style_cell={"fontFamily": "ui-monospace, monospace", "fontSize": 12})]
    if "changes" in t:
        ch = t["changes"]
        rows, cols = _full(ch)
        more = f" (first {len(rows):,} of {ch.height:,})" if ch.height > len(rows) else ""
        out += [html.H3(f"Changed routing decisions per token{more}"),
                dash_table.DataTable(id="cmp-changes", data=rows, columns=cols, page_size=ROWS, sort_action="native",
                                     filter_action="native", style_table={"overflowX": "auto"},
                                     style_cell={"fontFamily": "ui-monospace, monospace", "fontSize": 12})]
    return out


def layout(app_ctx):
    runs = served_runs(app_ctx)
    me = app_ctx.run
    others = [n for n, r in runs.items() if str(r.path) != str(me.path)]
    intro = html.P("What changed between this run (A) and another (B): per layer the share of tokens whose experts "
                   "changed, top-k overlap and routing JSD, the load shift of every expert, and each changed "
                   "decision; runs of different data are compared on load, balance and specialisation. Checkpoints "
                   "with shuffled expert ids: match experts first (workbench compare RUN_A RUN_B --match weights).")
    if not others:
        return html.Div([html.H2("Compare"), intro, notice(Unavailable(
            "Only one run is served, so there is nothing to compare it with.",
            f"workbench app {me.path} OTHER_RUN   (or a folder of runs, e.g. demo_out/runs)"))])
    return html.Div([
        html.H2("Compare"), intro,
        html.Div([
            html.Div([html.Label("A (this run)"), html.Div(me.path.name, style={"padding": "6px 0"})]),
            html.Div([html.Label("B"), dcc.Dropdown(id="cmp-other", options=others, value=others[0], clearable=False)],
                     style={"minWidth": "260px"}),
            html.Div([html.Label("experts"), dcc.RadioItems(id="cmp-match", value="none", inline=True,
                                                           options=[{"label": v, "value": k}
                                                                    for k, v in MATCHES.items()])]),
        ], className="controls"),
        dcc.Loading(html.Div(id="cmp-body")),
    ])


def register(app, app_ctx) -> None:
    @app.callback(Output("cmp-body", "children"), Input("cmp-other", "value"), Input("cmp-match", "value"))
    def show(other, match):
        runs = served_runs(app_ctx)
        if other not in runs:
            return notice(Unavailable(f"run {other!r} is not served here"))
        res, figs = result_for(app_ctx.run, runs[other], match or "none")
        return render(res, figs)


PAGE = Page("/compare", "Compare", layout, register)
