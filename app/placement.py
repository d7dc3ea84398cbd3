"""Placement: how this run's routing loads the GPUs of an expert-parallel deployment, and a better placement.

Everything shown comes from `workbench.analysis.placement` (balancedness per layer and window for
the engines' contiguous placement and for the EPLB-style suggestion, the replicated experts, the
SGLang placement JSON). One cached result per (EP degree, redundant slots, window), computed on the
app's analysis worker like every other page; counts-only runs (SGLang recorder `stat` dumps) work too.
"""

from __future__ import annotations

import json

from dash import Input, Output, State, dash_table, dcc, html, no_update

from .state import Unavailable
from .ui import GRAPH_CONFIG, Page, computing, graph, notice, table_page

PATH = "/placement"
FIRST_WAIT = 1.0


def ep_choices(n_experts: int) -> list[int]:
    """EP degrees that divide the experts (so the default, one spare slot a GPU, divides evenly)."""
    return [g for g in (1, 2, 4, 8, 16, 32, 64, 128, 256) if g <= n_experts and n_experts % g == 0]


def defaults(app_ctx) -> dict:
    """The options the page opens with: EP 8 (or the largest degree that fits), one spare a GPU, and a
    window giving about eight windows (so half of them are held out) up to the engines' 1024 tokens."""
    E = app_ctx.run.n_experts
    ep = max([g for g in ep_choices(E) if g <= 8] or [1])
    tokens = int(app_ctx.data.summary().get("tokens") or 0)
    window = 1024 if tokens >= 8 * 1024 else max(1, -(-tokens // 8))
    return {"ep": ep, "redundant": ep, "window": window}


def options_from(ep, redundant, window, n_experts: int) -> tuple[dict | None, str | None]:
    """Control values -> analysis options, or a sentence saying what is wrong with them."""
    try:
        ep = int(ep)
        redundant = ep if redundant in (None, "") else int(redundant)
        window = int(window)
    except (TypeError, ValueError):
        return None, "EP degree, redundant slots and window must be whole numbers."
    if ep < 1 or redundant < 0 or window < 1:
        return None, "EP degree and window must be at least 1, redundant slots at least 0."
    if (n_experts + redundant) % ep:
        return None, (f"{n_experts} experts + {redundant} redundant slots do not divide evenly over {ep} GPUs; "
                      f"pick a redundant count that makes {n_experts} + redundant a multiple of {ep}.")
    return {"ep": ep, "redundant": redundant, "window": window}, None


def variant(options: dict) -> str:
    return f"placement:ep{options['ep']}:r{options['redundant']}:w{options['window']}"


def result(app_ctx, options: dict, wait: float = 0.0, start: bool = True):
    """AnalysisResult, Unavailable, or None while computing."""
    return app_ctx.data.analysis("placement", variant=variant(options), options=options, wait=wait, start=start)


def _layers_by_imbalance(res) -> list[int]:
    lay = res.tables["layers"].sort(["balancedness_contiguous", "layer"])
    return [int(x) for x in lay["layer"].to_list()]


def _hot_table(res):
    from ..analysis.placement import hot_experts

    hot = hot_experts(res)
    if hot.height == 0:
        return html.Div("No expert is replicated: with no redundant slots every expert keeps one copy.",
                        className="computing")
    rows, cols, _ = table_page(hot, 0, hot.height, [])
    return dash_table.DataTable(id="pl-hot", data=rows, columns=cols, page_size=15, sort_action="native",
                                style_table={"overflowX": "auto"},
                                style_cell={"fontFamily": "ui-monospace, monospace", "fontSize": 13})


def render(app_ctx, res, figs) -> list:
    """The page body for one result."""
    m = res.meta
    layers = _layers_by_imbalance(res)
    out = [html.Div(res.summary, className="summary")]
    out.append(html.Div([html.Div(graph(figs["balancedness"]), className="col"),
                         html.Div(graph(figs["max_over_mean"]), className="col")], className="row"))
    out += [html.H3("One layer over the windows"),
            html.Div([html.Div([html.Label("layer (least balanced first)"),
                                dcc.Dropdown(id="pl-layer", clearable=False, value=layers[0],
                                             options=[{"label": f"layer {v}", "value": v} for v in layers])],
                               style={"minWidth": "240px"})], className="controls"),
            dcc.Graph(id="pl-window-graph", figure=_window_fig(res, layers[0]), config=GRAPH_CONFIG),
            html.Div([html.Div(graph(figs["windows_contiguous"]), className="col"),
                      html.Div(graph(figs["windows_eplb"]), className="col")], className="row"),
            graph(figs["expert_load"]),
            html.H3("Replicated hot experts (the suggestion)"), _hot_table(res),
            html.H3("Export"),
            html.Div([html.Button("download placement JSON", id="pl-download-go", n_clicks=0),
                      html.Span(f" SGLang's --init-expert-location file: start SGLang with --ep-size {m['ep']} "
                                f"--ep-num-redundant-experts {m['redundant']}. vLLM has no placement file (its "
                                "--enable-eplb rebalances online).", style={"fontSize": "13px"})]),
            dcc.Download(id="pl-download")]
    return out


def _window_fig(res, layer):
    from ..analysis.placement import window_figure

    return window_figure(res, layer)


def body(app_ctx, options: dict | None, error: str | None = None) -> tuple[list | html.Div, bool]:
    """(children, done) for the chosen options in the current state of the computation."""
    if error:
        return html.Div(error, className="notice failed"), True
    res = result(app_ctx, options)
    if res is None:
        return computing("placement", app_ctx.data.started(variant(options))), False
    if isinstance(res, Unavailable):
        return notice(res), True
    return render(app_ctx, res, app_ctx.data.figures(variant(options))), True


def download(app_ctx, options: dict | None) -> dict | None:
    """dcc.Download data: the placement as SGLang's JSON (None until the result is there)."""
    from ..analysis.placement import sglang_map

    res = result(app_ctx, options, start=False) if options else None
    if res is None or isinstance(res, Unavailable):
        return None
    name = f"expert_location_ep{res.meta['ep']}_r{res.meta['redundant']}.json"
    return {"content": json.dumps({"physical_to_logical_map": sglang_map(res)}), "filename": name,
            "type": "application/json"}


def layout(app_ctx):
    run = app_ctx.run
    d = defaults(app_ctx)
    counts_only = not run.has("routing") and run.has("expert_load")
    result(app_ctx, d, wait=FIRST_WAIT)
    children, done = body(app_ctx, d)
    intro = ("Per layer and window of tokens, each GPU's load under expert parallelism and the engines' "
             "balancedness (mean / max GPU load; 1 = even), for the default contiguous placement and for a "
             "DeepSeek-EPLB-style suggestion with replicated hot experts, fitted on the first half of the windows "
             "and judged on the rest (workbench analyze placement).")
    if counts_only:
        intro += " This run holds aggregated counts only: its windows are the recorder's."
    return html.Div([
        html.H2("Expert placement"), html.P(intro),
        html.Div([
            html.Div([html.Label("EP degree (GPUs)"),
                      dcc.Dropdown(id="pl-ep", clearable=False, value=d["ep"],
                                   options=[{"label": str(g), "value": g} for g in ep_choices(run.n_experts)])]),
            html.Div([html.Label("redundant slots per layer"),
                      dcc.Input(id="pl-redundant", type="number", min=0, step=1, value=d["redundant"],
                                debounce=True)]),
            html.Div([html.Label("window (tokens)"),
                      dcc.Input(id="pl-window", type="number", min=1, step=1, value=d["window"], debounce=True,
                                disabled=counts_only)]),
        ], className="controls"),
        dcc.Interval(id="pl-poll", interval=1000, disabled=done),
        html.Div(children, id="pl-body"),
    ])


def register(app, app_ctx) -> None:
    E = app_ctx.run.n_experts

    @app.callback(Output("pl-body", "children"), Output("pl-poll", "disabled"),
                  Input("pl-ep", "value"), Input("pl-redundant", "value"), Input("pl-window", "value"),
                  Input("pl-poll", "n_intervals"), prevent_initial_call=True)
    def update(ep, redundant, window, _n):
        opts, err = options_from(ep, redundant, window, E)
        return body(app_ctx, opts, err)

    @app.callback(Output("pl-window-graph", "figure"), Input("pl-layer", "value"),
                  State("pl-ep", "value"), State("pl-redundant", "value"), State("pl-window", "value"),
                  prevent_initial_call=True)
    def pick_layer(layer, ep, redundant, window):
        opts, err = options_from(ep, redundant, window, E)
        res = result(app_ctx, opts, start=False) if opts else None
        if res is None or isinstance(res, Unavailable) or layer is None:
            return no_update
        return _window_fig(res, layer)

    @app.callback(Output("pl-download", "data"), Input("pl-download-go", "n_clicks"),
                  State("pl-ep", "value"), State("pl-redundant", "value"), State("pl-window", "value"),
                  prevent_initial_call=True)
    def export(n, ep, redundant, window):
        opts, _ = options_from(ep, redundant, window, E)
        data = download(app_ctx, opts) if n else None
        return data if data is not None else no_update


PAGE = Page(PATH, "Placement", layout, register)


def counts_only_overview(app_ctx):
    """For the overview of a run with aggregated counts only (no routing): the load heatmap from the
    placement analysis at the page's defaults, and a pointer to the Placement page."""
    d = defaults(app_ctx)
    res = result(app_ctx, d, wait=FIRST_WAIT)
    lead = html.Div(["This run holds aggregated expert counts only (an engine's recorder dump, no per-token "
                     "routing): load and balance per GPU are on the ",
                     dcc.Link("Placement", href=app_ctx.href(PATH)), " page; token-level analyses need routed "
                     "expert ids (workbench import vllm|sglang, or workbench capture)."], style={"fontSize": "13px"})
    if res is None:
        return html.Div([lead, computing("placement", app_ctx.data.started(variant(d)))])
    if isinstance(res, Unavailable):
        return html.Div([lead, notice(res)])
    return html.Div([lead, graph(app_ctx.data.figures(variant(d))["expert_load"])])
