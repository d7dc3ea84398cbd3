"""Steering lab: pick experts (click heatmap cells or type a SPEC), ban/force/boost/zero them, and compare
baseline and steered continuations of a prompt, live.

The toggles live in the browser tab (a session-storage dcc.Store), so every tab steers on its own; the
server only keeps queued jobs, keyed by a random id. Generation runs on the model service's worker
(see service.py) and the page polls for the result, so nothing blocks a request thread.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, ctx as dash_ctx, dash_table, dcc, html, no_update

from ..errors import WorkbenchError
from ..plots import polish
from .service import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MODES, clean_items, spec_of
from .state import Unavailable
from .ui import GRAPH_CONFIG, Page, notice, table_page

MODE_CODE = {m: i + 1 for i, m in enumerate(MODES)}
MODE_COLOUR = {"ban": "#e03131", "force": "#2f9e44", "boost": "#1971c2", "zero": "#495057"}
DEFAULT_PROMPT = "The quick brown fox"


def layout(app_ctx):
    svc = app_ctx.service
    if svc is None:
        return html.Div([html.H2("Steering lab"), notice(Unavailable(
            "The Steering lab needs a live model; this dashboard was started without one.",
            f"workbench app {app_ctx.run.path} --model {app_ctx.run.model_info.get('spec') or 'MODEL'}"))])
    mm = svc.mm
    return html.Div([
        html.H2("Steering lab"),
        html.P(f"Model {mm.spec} ({mm.model.config.model_type}): {len(mm.moe_layers)} MoE layers x {mm.n_experts} "
               f"experts, top-{mm.top_k}. Click cells to toggle experts with the chosen action, or type a SPEC "
               "such as L1:E3,L2:E5. Every change re-runs baseline and steered generation.",
               style={"fontSize": "13px"}),
        html.Div([
            html.Div([
                html.Div([
                    html.Div([html.Label("action for clicks and SPEC"),
                              dcc.RadioItems(id="steer-mode", options=[{"label": m, "value": m} for m in MODES],
                                             value="ban", inline=True, inputStyle={"marginRight": "3px",
                                                                                    "marginLeft": "8px"})]),
                    html.Div([html.Label("boost lambda (x std of logits)"),
                              dcc.Input(id="steer-lambda", type="number", value=0.5, step=0.25,
                                        style={"width": "80px"})]),
                ], className="controls"),
                dcc.Graph(id="steer-map", config=GRAPH_CONFIG, figure=_map_figure(mm, []),
                          style={"height": f"{_map_height(mm)}px"}),
                html.Div([
                    html.Div([html.Label("SPEC"), dcc.Input(id="steer-spec", type="text", placeholder="L1:E3,L2:E5",
                                                            maxLength=2000, style={"width": "220px"})]),
                    html.Button("add", id="steer-add", n_clicks=0),
                    html.Button("clear all", id="steer-clear", n_clicks=0),
                ], className="controls"),
                html.Div(id="steer-spec-error", className="error"),
                html.Div(id="steer-chips"),
            ], className="col"),
            html.Div([
                html.Label("prompt"),
                dcc.Textarea(id="steer-prompt", value=DEFAULT_PROMPT, maxLength=MAX_PROMPT_CHARS,
                             style={"width": "100%", "height": "70px"}),
                html.Div([
                    html.Div([html.Label("new tokens"),
                              dcc.Slider(id="steer-n", min=1, max=MAX_NEW_TOKENS, step=1, value=16,
                                         marks={v: str(v) for v in (1, 16, 32, MAX_NEW_TOKENS)},
                                         tooltip={"placement": "top"})],
                             style={"minWidth": "240px"}),
                    html.Div([dcc.Checklist(id="steer-sample", options=[{"label": " sample", "value": "sample"}],
                                            value=[])]),
                    html.Div([html.Label("seed"), dcc.Input(id="steer-seed", type="number", value=0, min=0,
                                                            style={"width": "80px"})]),
                    html.Button("generate", id="steer-run", n_clicks=0, title="also runs when the prompt loses focus"),
                ], className="controls"),
                html.Div(id="steer-status", style={"fontSize": "13px", "minHeight": "1.2em"}),
                html.Div(id="steer-out"),
            ], className="col"),
        ], className="row"),
        dcc.Store(id="steer-job"),
        dcc.Interval(id="steer-poll", interval=400, disabled=True),
    ])


def _map_figure(mm, items, share=None):
    """Layer x expert grid: selected cells in their action's colour; the others shaded by how often the
    run selected them (`share`: [L, E] array from the stats analysis, when the run is this model's)."""
    layers = mm.moe_layers
    E = mm.n_experts
    row = {lay: i for i, lay in enumerate(layers)}
    z = np.zeros((len(layers), E), np.float32)
    if share is not None:
        z = (share / max(float(share.max()), 1e-12) * 0.999).astype(np.float32)
    text = [[f"L{lay}:E{e}" + (f" · run share {share[i, e]:.3f}" if share is not None else "")
             for e in range(E)] for i, lay in enumerate(layers)]
    for it in items:
        lay, e, mode = int(it[0]), int(it[1]), it[2]
        if lay in row and 0 <= e < E:
            z[row[lay], e] = MODE_CODE.get(mode, 0) + 0.5
            text[row[lay]][e] += f" · {mode}" + (f" {it[3]}" if mode == "boost" and len(it) > 3 else "")
    fig = go.Figure(go.Heatmap(z=z, x=list(range(E)), y=layers, text=text, hoverinfo="text", zmin=0,
                               zmax=len(MODES) + 1, colorscale=_step_scale(), showscale=False, xgap=1, ygap=1))
    fig.update_layout(height=_map_height(mm), margin=dict(l=50, r=10, t=10, b=40),
                      xaxis=dict(title="expert", dtick=max(1, E // 16)), yaxis=dict(title="layer", tickvals=layers,
                                                                                    autorange="reversed"),
                      template="plotly_white", clickmode="event")
    return fig


def run_share(app_ctx):
    """[L, E] selection share per layer from the cached stats analysis, if the run is the live model's."""
    from .analyses import model_check

    res = app_ctx.data.analysis("stats", start=False)
    if app_ctx.service is None or model_check(app_ctx) is not None or res is None or isinstance(res, Unavailable):
        return None
    ex = res.tables.get("experts")
    if ex is None or not {"layer", "expert", "share"} <= set(ex.columns):
        return None
    if "label" in ex.columns:
        ex = ex.filter(ex["label"].is_null())
    layers = app_ctx.service.mm.moe_layers
    out = np.zeros((len(layers), app_ctx.service.mm.n_experts), np.float32)
    row = {lay: i for i, lay in enumerate(layers)}
    for lay, e, v in ex.select("layer", "expert", "share").iter_rows():
        if lay in row and 0 <= e < out.shape[1] and v is not None:
            out[row[lay], e] = v
    return out


def _map_height(mm) -> int:
    return max(220, 26 * len(mm.moe_layers) + 90)


def _step_scale():
    """z in [0, 1): unselected, light to darker grey by run share; z in [k, k+1): action k's colour."""
    n = len(MODES) + 1
    scale = [[0.0, "#f8f9fa"], [0.999 / n, "#909aa5"]]
    for i, m in enumerate(MODES, start=1):
        scale += [[i / n, MODE_COLOUR[m]], [min((i + 1) / n, 1.0) - (1e-9 if i < len(MODES) else 0), MODE_COLOUR[m]]]
    return scale


def _chips(items):
    if not items:
        return html.Div("No experts selected: steered = baseline.", style={"fontSize": "13px", "color": "#667"})
    out = []
    for m in MODES:
        sel = [it for it in items if it[2] == m]
        if sel:
            label = spec_of([(it[0], it[1]) for it in sel])
            if m == "boost":
                label = ",".join(f"L{it[0]}:E{it[1]}={it[3]}" for it in sel)
            out.append(html.Span(f"{m} {label}", className=f"chip {m}"))
    return html.Div(out, id="steer-chip-list")


def _state_items(state, mm) -> list:
    """The steering rows of the browser's state store, checked (service.clean_items): one per model cell."""
    if state is not None and not isinstance(state, dict):
        raise WorkbenchError("the steering selection is malformed (not an object with items)")
    return clean_items((state or {}).get("items", []), mm)


def _toggle(items, layer, expert, mode, value):
    items = [list(it) for it in items or []]
    same = [it for it in items if int(it[0]) == layer and int(it[1]) == expert]
    items = [it for it in items if not (int(it[0]) == layer and int(it[1]) == expert)]
    if not same or same[0][2] != mode:
        items.append([layer, expert, mode, value if mode == "boost" else None])
    return sorted(items, key=lambda it: (it[0], it[1]))


def register(app, app_ctx):
    svc = app_ctx.service

    @app.callback(Output("steer-state", "data"), Output("steer-spec-error", "children"),
                  Output("steer-map", "clickData"),
                  Input("steer-map", "clickData"), Input("steer-add", "n_clicks"), Input("steer-clear", "n_clicks"),
                  State("steer-mode", "value"), State("steer-lambda", "value"), State("steer-spec", "value"),
                  State("steer-state", "data"), prevent_initial_call=True)
    def edit(click, _add, _clear, mode, lam, spec, state):
        if svc is None:
            return no_update, no_update, None
        try:
            items = _state_items(state, svc.mm)
        except WorkbenchError as e:
            return {"items": []}, str(e), None
        lam = float(lam) if lam is not None else 0.5
        trig = dash_ctx.triggered_id
        if trig == "steer-clear":
            return {"items": []}, "", None
        if trig == "steer-map":
            if not click or not click.get("points"):
                return no_update, no_update, None
            pt = click["points"][0]
            return {"items": _toggle(items, int(pt["y"]), int(pt["x"]), mode, lam)}, "", None
        if trig == "steer-add":
            try:
                pairs = svc.parse(spec or "")
            except WorkbenchError as e:
                return no_update, str(e), None
            if not pairs:
                return no_update, "type a SPEC such as L1:E3,L2:E5", None
            for lay, e in pairs:
                items = [it for it in items if not (int(it[0]) == lay and int(it[1]) == e)]
                items.append([lay, e, mode, lam if mode == "boost" else None])
            return {"items": sorted(items, key=lambda it: (it[0], it[1]))}, "", None
        return no_update, no_update, None

    # steer-mode is an input only so that this fires when the page is rendered: the state store lives
    # in the shell and does not change then.
    @app.callback(Output("steer-map", "figure"), Output("steer-chips", "children"), Input("steer-state", "data"),
                  Input("steer-mode", "value"))
    def show(state, _mode):
        if svc is None:
            return no_update, no_update
        try:
            items = _state_items(state, svc.mm)
        except WorkbenchError as e:
            return _map_figure(svc.mm, [], run_share(app_ctx)), html.Span(str(e), className="error")
        return _map_figure(svc.mm, items, run_share(app_ctx)), _chips(items)

    @app.callback(Output("steer-job", "data"), Output("steer-poll", "disabled"), Output("steer-status", "children"),
                  Input("steer-state", "data"), Input("steer-prompt", "n_blur"), Input("steer-run", "n_clicks"),
                  Input("steer-n", "value"), Input("steer-sample", "value"), Input("steer-seed", "value"),
                  State("steer-prompt", "value"), State("session-id", "data"))
    def submit(state, _blur, _run, n_new, sample, seed, prompt, session):
        if svc is None:
            return no_update, True, ""
        try:
            items = _state_items(state, svc.mm)
            job = svc.submit(session or "anon", prompt, items, max_new_tokens=n_new or 16,
                             sample="sample" in (sample or []), seed=seed or 0)
        except WorkbenchError as e:
            return None, True, html.Span(str(e), className="error")
        return {"id": job}, False, "generating…"

    @app.callback(Output("steer-out", "children"), Output("steer-poll", "disabled", allow_duplicate=True),
                  Output("steer-status", "children", allow_duplicate=True),
                  Input("steer-poll", "n_intervals"), State("steer-job", "data"), prevent_initial_call=True)
    def poll(_n, job):
        if svc is None or not job:
            return no_update, True, no_update
        state, payload = svc.poll(job["id"])
        if state == "queued":
            return no_update, False, queue_status(payload)
        if state == "running":
            return no_update, False, f"generating… ({payload:.1f} s)"
        if state == "done":
            res = payload["result"]
            return render_result(res), True, f"done in {payload['seconds']:.2f} s · {_describe(payload['interventions'])}"
        return no_update, True, html.Span(str(payload), className="error")


def queue_status(payload: dict) -> str:
    """What a user waiting in the model queue reads: their place in it."""
    ahead = int(payload["ahead"])
    if ahead == 0:
        return f"starting… ({payload['seconds']:.1f} s)"
    return (f"queued: {ahead} request{'s' if ahead != 1 else ''} ahead of yours ({payload['seconds']:.1f} s); "
            "the model runs one at a time, in turn")


def _describe(inter: dict) -> str:
    if not inter:
        return "no intervention (steered = baseline)"
    parts = []
    for k, v in inter.items():
        parts.append(f"{k} " + (",".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else spec_of(v)))
    return "; ".join(parts)


def render_result(res):
    """Baseline vs steered side by side (changed tokens marked), per-token KL, routing changes.

    `res` is a workbench.steering.SteerResult.
    """
    b_toks, s_toks = list(res.baseline_tokens), list(res.steered_tokens)
    b_ids, s_ids = list(res.baseline_ids), list(res.steered_ids)

    def spans(toks, ids, other_ids, side):
        out = [html.Span(res.prompt, style={"color": "#868e96"})]
        for i, t in enumerate(toks):
            changed = i >= len(other_ids) or other_ids[i] != ids[i]
            out.append(html.Span(t, className="tok changed" if changed else "tok",
                                 title=f"generated token {i}" + (" (differs)" if changed else "")))
        return out

    n_changed = sum(1 for i in range(len(s_ids)) if i >= len(b_ids) or b_ids[i] != s_ids[i])
    first = res.first_divergence
    head = (f"steered: {n_changed} of {len(s_ids)} tokens differ, from token {first}" if first is not None
            else "steered: identical to the baseline")
    out = [html.Div([
        html.Div([html.H3("baseline"), html.Div(spans(b_toks, b_ids, s_ids, "base"), className="gen",
                                                id="steer-baseline")], className="col"),
        html.Div([html.H3(head), html.Div(spans(s_toks, s_ids, b_ids, "steered"), className="gen",
                                          id="steer-steered")], className="col"),
    ], className="row")]
    kl = [float(x) for x in res.kl]
    if kl:
        fig = go.Figure(go.Bar(x=list(range(len(kl))), y=kl, marker_color="#4c6ef5", hoverinfo="text",
                               hovertext=[f"predicting baseline token {i} {b_toks[i]!r}: KL {v:.4f}"
                                          for i, v in enumerate(kl)]))
        fig.update_layout(height=270, margin=dict(l=50, r=10, t=30, b=40), template="plotly_white",
                          title=dict(text="KL(baseline || steered) of the next-token distribution, on the baseline "
                                          "text", font=dict(size=13)),
                          xaxis_title="generated position", yaxis_title="KL (nats)")
        out.append(dcc.Graph(figure=polish(fig), config=GRAPH_CONFIG, id="steer-kl"))  # title clear of the toolbar
    changes = res.routing_changes
    out.append(html.H3(f"Routing changes: {changes.height:,} of {res.n_decisions:,} token x layer decisions differ"))
    if changes.height:
        per = res.changes_by_layer()
        fig = go.Figure(go.Bar(x=per["layer"].to_list(), y=per["changed"].to_list(), marker_color="#e8590c"))
        fig.update_layout(height=200, margin=dict(l=50, r=10, t=10, b=40), template="plotly_white",
                          xaxis=dict(title="layer", tickvals=per["layer"].to_list()), yaxis_title="changed decisions")
        out.append(dcc.Graph(figure=fig, config=GRAPH_CONFIG, id="steer-changes-fig"))
        rows, cols, _ = table_page(changes.head(500), 0, 500, [])
        out.append(dash_table.DataTable(id="steer-changes", data=rows, columns=cols, page_size=12,
                                        style_cell={"fontSize": 13, "fontFamily": "ui-monospace, monospace"},
                                        style_table={"overflowX": "auto"}))
    return out


PAGE = Page("/steering", "Steering lab", layout, register)
