"""Tokens: the captured text coloured by each token's expert in one layer; click a token for its route.

The route view follows MoELens: one column per MoE layer, the token's experts in it sized by routing
weight, its top-1 expert joined across layers.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import ALL, Input, Output, State, ctx as dash_ctx, dash_table, dcc, html, no_update

from .state import TABLE_HINTS, Unavailable
from .ui import GRAPH_CONFIG, Page, expert_colour, notice

WINDOW = 400  # tokens rendered at once; long documents get an offset slider
MAX_DOC_OPTIONS = 3000


def _doc_label(row: dict, labels: list[str]) -> str:
    lab = " ".join(f"{c}={row[c]}" for c in labels if row.get(c) is not None)
    prev = (row.get("preview") or "").replace("\n", " ")
    return f"doc {row['doc_id']} · {row['n_tokens']} tok · {lab} · {prev}"[:120]


def layout(app_ctx):
    run = app_ctx.run
    for t in ("tokens", "routing"):
        if not run.has(t):
            return html.Div([html.H2("Tokens"), notice(Unavailable(f"This run has no `{t}` table.", TABLE_HINTS[t]))])
    docs = app_ctx.data.docs()
    labels = [c for c in run.label_columns if c in docs.columns]
    rows = docs.head(MAX_DOC_OPTIONS).to_dicts()
    options = [{"label": _doc_label(r, labels), "value": int(r["doc_id"])} for r in rows]
    more = docs.height > MAX_DOC_OPTIONS
    layers = run.moe_layers
    return html.Div([
        html.H2("Tokens"),
        html.Div([
            html.Div([html.Label("document" + (f" (first {MAX_DOC_OPTIONS:,} of {docs.height:,})" if more else "")),
                      dcc.Dropdown(id="tok-doc", options=options, value=options[0]["value"] if options else None,
                                   clearable=False)], style={"flex": "3", "minWidth": "420px"}),
            html.Div([html.Label("or doc id"), dcc.Input(id="tok-doc-id", type="number", min=0, debounce=True,
                                                          style={"width": "110px"})]),
            html.Div([html.Label("colour by the top expert of layer"),
                      dcc.Dropdown(id="tok-layer", options=[{"label": f"layer {lay}", "value": lay} for lay in layers],
                                   value=layers[0], clearable=False)]),
            html.Div([html.Label("tokens from"), dcc.Slider(id="tok-offset", min=0, max=0, step=WINDOW, value=0,
                                                              marks=None, tooltip={"placement": "bottom"})],
                     style={"minWidth": "220px"}),
        ], className="controls"),
        html.Div(id="tok-doc-error", className="error"),
        html.Div(id="tok-legend", className="legend"),
        html.Div(id="tok-text", className="tokens"),
        dcc.Store(id="tok-sel"),
        html.H3("Route of the selected token"),
        html.Div("Click a token above to see which experts it used in every layer.", id="tok-route-title",
                 style={"fontSize": "13px"}),
        html.Div([html.Div(dcc.Graph(id="tok-route", config=GRAPH_CONFIG, figure=_empty_route()), className="col"),
                  html.Div(dash_table.DataTable(id="tok-route-table", style_cell={"fontSize": 13,
                           "fontFamily": "ui-monospace, monospace", "textAlign": "left"}), className="col")],
                 className="row"),
    ])


def _empty_route():
    fig = go.Figure()
    fig.update_layout(height=320, margin=dict(l=40, r=10, t=30, b=40), xaxis_title="layer", yaxis_title="expert",
                      template="plotly_white")
    return fig


def route_figure(layers, ex: np.ndarray, w: np.ndarray, n_experts: int, token: str):
    """ex, w: [L, K] experts and weights of one token (model's order: slot 0 is its top choice)."""
    fig = go.Figure()
    xs, ys, sizes, colours, text = [], [], [], [], []
    for li, lay in enumerate(layers):
        for k in range(ex.shape[1]):
            e = int(ex[li, k])
            if e < 0:
                continue
            xs.append(lay)
            ys.append(e)
            sizes.append(10 + 40 * float(w[li, k]))
            colours.append(expert_colour(e, n_experts))
            text.append(f"layer {lay} · expert {e} · slot {k} · weight {w[li, k]:.3f}")
    top = [(lay, int(ex[li, 0])) for li, lay in enumerate(layers) if ex[li, 0] >= 0]
    fig.add_trace(go.Scatter(x=[a for a, _ in top], y=[b for _, b in top], mode="lines",
                             line=dict(color="#868e96", width=1.5), hoverinfo="skip", name="top-1 path"))
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", text=text, hoverinfo="text", name="experts",
                             marker=dict(size=sizes, color=colours, line=dict(color="#343a40", width=1))))
    fig.update_layout(height=340, margin=dict(l=40, r=10, t=36, b=40), template="plotly_white", showlegend=False,
                      title=dict(text=f"route of {token!r}", font=dict(size=14)),
                      xaxis=dict(title="layer", tickmode="array", tickvals=list(layers)),
                      yaxis=dict(title="expert", range=[-1, n_experts]))
    return fig


def register(app, app_ctx):
    data = app_ctx.data

    @app.callback(Output("tok-doc", "value"), Output("tok-doc-error", "children"), Input("tok-doc-id", "value"),
                  prevent_initial_call=True)
    def doc_by_id(doc_id):
        if doc_id is None:
            return no_update, ""
        ids = data.docs()["doc_id"]
        if int(doc_id) not in set(ids.to_list()):
            return no_update, f"no document {int(doc_id)} in this run"
        return int(doc_id), ""

    @app.callback(Output("tok-offset", "max"), Output("tok-offset", "value"), Output("tok-sel", "data"),
                  Input("tok-doc", "value"))
    def doc_changed(doc_id):
        if doc_id is None:
            return 0, 0, None
        toks, _ = data.doc_routing(doc_id)
        return max(0, (toks.height - 1) // WINDOW * WINDOW), 0, None

    # Clientside colouring would need the routing in the browser; rendering spans server-side keeps the
    # browser light and is ~WINDOW spans per update.
    @app.callback(Output("tok-text", "children"), Output("tok-legend", "children"),
                  Input("tok-doc", "value"), Input("tok-layer", "value"), Input("tok-offset", "value"),
                  Input("tok-sel", "data"))
    def text(doc_id, layer, offset, sel):
        if doc_id is None:
            return "", ""
        toks, per_layer = data.doc_routing(doc_id)
        E = app_ctx.run.n_experts
        if layer not in per_layer:
            return html.Div("this document has no routing rows for that layer", className="error"), ""
        ex, w = per_layer[layer]
        lo = int(offset or 0)
        hi = min(toks.height, lo + WINDOW)
        strs, pos = toks["token"].to_list(), toks["pos"].to_list()
        spans = []
        for i in range(lo, hi):
            e = int(ex[i, 0])
            cls = "tok selected" if sel is not None and sel == pos[i] else "tok"
            tip = f"pos {pos[i]} · " + ", ".join(f"E{int(a)} {b:.2f}" for a, b in zip(ex[i], w[i]) if a >= 0)
            spans.append(html.Span(_visible(strs[i]), id={"type": "tok", "pos": pos[i]}, n_clicks=0, className=cls,
                                   title=tip, style={"backgroundColor": expert_colour(e, E)}))
        used, counts = np.unique(ex[lo:hi, 0], return_counts=True)
        order = np.argsort(-counts)[:24]
        legend = [html.Span(f"layer {layer} top expert:", style={"fontSize": "12px"})] + [
            html.Span(f"E{int(used[j])} ×{int(counts[j])}", style={"backgroundColor": expert_colour(int(used[j]), E)})
            for j in order if used[j] >= 0]
        if len(used) > len(order):
            legend.append(html.Span(f"+{len(used) - len(order)} more"))
        return spans, legend

    @app.callback(Output("tok-sel", "data", allow_duplicate=True), Input({"type": "tok", "pos": ALL}, "n_clicks"),
                  prevent_initial_call=True)
    def click(_clicks):
        trig = dash_ctx.triggered_id
        if not trig or not any(t.get("value") for t in dash_ctx.triggered):
            return no_update  # spans were (re-)rendered, nobody clicked
        return int(trig["pos"])

    @app.callback(Output("tok-route", "figure"), Output("tok-route-table", "data"), Output("tok-route-table", "columns"),
                  Output("tok-route-title", "children"), Input("tok-sel", "data"), State("tok-doc", "value"))
    def route(sel, doc_id):
        if sel is None or doc_id is None:
            return _empty_route(), [], [], "Click a token above to see which experts it used in every layer."
        toks, per_layer = data.doc_routing(doc_id)
        idx = toks["pos"].to_list().index(sel) if sel in toks["pos"].to_list() else None
        if idx is None:
            return _empty_route(), [], [], "that token is not in this document"
        layers = sorted(per_layer)
        ex = np.stack([per_layer[lay][0][idx] for lay in layers])
        w = np.stack([per_layer[lay][1][idx] for lay in layers])
        token = toks["token"][idx]
        rows = [{"layer": lay, "experts (weight)": "  ".join(f"E{int(a)} ({b:.3f})" for a, b in zip(ex[i], w[i])
                                                            if a >= 0)} for i, lay in enumerate(layers)]
        cols = [{"name": c, "id": c} for c in ("layer", "experts (weight)")]
        title = f"doc {doc_id}, position {sel}: {token!r} (token id {toks['token_id'][idx]}, {toks['phase'][idx]})"
        return route_figure(layers, ex, w, app_ctx.run.n_experts, token), rows, cols, title


def _visible(s: str) -> str:
    """Show whitespace-only tokens so they can be clicked."""
    if s == "":
        return "∅"
    if s.isspace():
        return s.replace(" ", "·").replace("\t", "→").replace("\n", "↵\n")
    return s


PAGE = Page("/tokens", "Tokens", layout, register)
