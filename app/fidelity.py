"""Fidelity page: are this run's routes what the model would choose (replay), and how fragile are its routing
decisions under other numerics (stability)?

Nothing is computed here: the page reads the result folders `workbench replay` and `workbench stability`
wrote (under RUN/fidelity/, or a replay of this run beside it) and draws them with
workbench.fidelity.figures. A replay needs the model, so it is run from the command line, not the app.
"""

from __future__ import annotations

from dash import Input, Output, dash_table, dcc, html

from .state import Unavailable
from .ui import Page, graph, notice, table_page

PATH = "/fidelity"
ROWS = 12


def _results(app_ctx) -> dict:
    from ..fidelity.figures import find_results

    return find_results(app_ctx.run)


def _table(tid: str, df, limit: int = 2000):
    rows, cols, _ = table_page(df.head(limit), 0, limit, [])
    return dash_table.DataTable(id=tid, data=rows, columns=cols, page_size=ROWS, sort_action="native",
                                style_table={"overflowX": "auto"},
                                style_cell={"fontFamily": "ui-monospace, monospace", "fontSize": 12})


def _replay_body(app_ctx, res) -> list:
    import polars as pl

    from ..fidelity.commands import format_replay
    from ..fidelity.figures import replay_figures

    figs = replay_figures(res)
    worst = res.tokens.sort("kl", descending=True).head(200)
    if app_ctx.run.has("tokens"):  # the token text, for reading
        tok = app_ctx.run.tokens.select("doc_id", "pos", "token").collect()
        worst = worst.join(tok, on=["doc_id", "pos"], how="left").select("doc_id", "pos", "token", pl.exclude(
            "doc_id", "pos", "token"))
    return [html.Div(format_replay(res.summary, res.layers), className="summary"),
            html.Div([html.Div(graph(figs["agreement"]), className="col"),
                      html.Div(graph(figs["kl"]), className="col")], className="row"),
            html.H3("Per layer"), _table("fid-layers", res.layers),
            html.H3("Tokens whose next-token distribution moved most"), _table("fid-tokens", worst)] + (
        [html.H3("Disagreement rate by the router's own margin"), _table("fid-rep-margins", res.margins)]
        if res.margins is not None else [])


def _stability_body(res) -> list:
    import polars as pl

    from ..fidelity.commands import format_stability
    from ..fidelity.figures import stability_figures

    figs = stability_figures(res)
    top = res.experts.filter(pl.col("kind") == "first").head(200)
    return [html.Div(format_stability(res.summary), className="summary"),
            graph(figs["layers"]), graph(figs["margins"]),
            html.H3("(layer, expert) pairs most often in a first flip"), _table("fid-experts", top),
            html.H3("Flip rate by margin"), _table("fid-margins", res.margins)]


def body(app_ctx, name: str | None):
    from ..errors import WorkbenchError
    from ..fidelity.figures import open_result

    found = _results(app_ctx)
    if name not in found:
        return notice(Unavailable(f"no fidelity result named {name!r} belongs to this run"))
    try:
        res = open_result(found[name])
    except (WorkbenchError, OSError, ValueError) as e:
        return notice(Unavailable(f"cannot read {found[name]}: {e}", kind="failed"))
    return _replay_body(app_ctx, res) if res.summary.get("kind") == "replay" else _stability_body(res)


def layout(app_ctx):
    run = app_ctx.run
    found = _results(app_ctx)
    intro = html.P("Replay forces this run's recorded routes on a model: per layer, the share of tokens whose own "
                   "top-k equals the recorded one, and what the forced routes do to each next-token distribution "
                   "(the question an engine trace raises: would a trainer route like the engine did?). Stability "
                   "reruns the same tokens under another dtype, batch size, experts kernel or device and counts "
                   "the routing decisions that flip, first flips apart from inherited ones, against each "
                   "decision's router margin.")
    spec = (run.model_info or {}).get("spec") or "MODEL"
    if not found:
        return html.Div([html.H2("Routing fidelity"), intro, notice(Unavailable(
            "No replay or stability result belongs to this run yet.",
            f"workbench replay {spec} {run.path} --out {run.path}/fidelity/replay\n"
            f"workbench stability {spec} DATA --vary dtype=float32,bfloat16 --vary batch=1,8 "
            f"--out {run.path}/fidelity/stability"))])
    names = list(found)
    return html.Div([
        html.H2("Routing fidelity"), intro,
        html.Div([html.Div([html.Label("result"), dcc.Dropdown(id="fid-pick", options=names, value=names[0],
                                                               clearable=False)], style={"minWidth": "320px"})],
                 className="controls"),
        dcc.Loading(html.Div(body(app_ctx, names[0]), id="fid-body")),
    ])


def register(app, app_ctx) -> None:
    @app.callback(Output("fid-body", "children"), Input("fid-pick", "value"), prevent_initial_call=True)
    def pick(name):
        return body(app_ctx, name)


PAGE = Page(PATH, "Fidelity", layout, register)
