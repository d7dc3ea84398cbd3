"""Pruning page: choose a criterion and a ratio, see what the run predicts it costs, measure it on the live
model, and take away the plan (a --ban SPEC, pruning plan JSON, the `workbench prune` command) or the
checkpoint itself.

Everything comes from `workbench.compress`: the saliency scores (`saliency.scores`), the choice
(`prune.choose`), the predicted cost (`prune.predicted_cost`: the share of the run's routing weight on
the removed experts) and the checkpoint writer (`prune.prune`). Scores are cached per (run, criterion).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import polars as pl
from dash import Input, Output, State, dcc, html, no_update

from ..errors import WorkbenchError
from .state import Unavailable
from .ui import Page, graph, notice

CRITERIA = {"reap": "REAP (router-weighted output norm)", "frequency": "frequency", "random": "random (seed 0)",
            "attribution": "attribution (needs the model)"}
RATIOS = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75]
MEASURE_TOKENS = 1024
_CACHE: dict = {}
_LOCK = threading.Lock()


def _scores(run, by: str, mm=None):
    from ..compress.saliency import scores

    key = (str(run.path), by)
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = scores(run, by, model=mm, seed=0, max_tokens=2048)
        return _CACHE[key]


def _protected(run, protect: bool) -> list:
    from ..compress.prune import protected_experts

    if not protect:
        return []
    key = (str(run.path), "super-experts")
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = protected_experts("super-experts", run)
        return _CACHE[key]


def plan_for(run, by: str, ratio: float, protect: bool = False, mm=None):
    """{removed, ban, predicted (per-layer frame), protected, n_removed} or Unavailable with one sentence."""
    from ..compress.prune import choose, predicted_cost
    from ..probes.interventions import format_spec

    if by == "attribution" and mm is None:
        return Unavailable("Attribution runs the model on the run's documents; this dashboard has no model.",
                           f"workbench app {run.path} --model MODEL")
    if by == "reap" and not run.has("expert_stats") and mm is None:
        return Unavailable("REAP needs the expert_stats table (routing weight and output norm per token), or the "
                           "model to compute it.", "workbench capture MODEL --data DATA --probes routing,experts --out RUN")
    if protect and not run.has("expert_stats"):
        return Unavailable("Protecting super experts needs the expert_stats table to find them.",
                           "workbench capture MODEL --data DATA --probes routing,experts --out RUN")
    try:
        sc = _scores(run, by, mm)
        prot = _protected(run, protect)
        removed = choose(sc, ratio, run.n_experts, run.top_k, prot, normalise=by != "attribution")
        pred = predicted_cost(run, removed)
    except WorkbenchError as e:
        return Unavailable(str(e), kind="unavailable")
    ban = format_spec(sorted((layer, e) for layer, rem in removed.items() for e in rem))
    return {"removed": removed, "ban": ban, "predicted": pred, "protected": format_spec(sorted(prot)),
            "n_removed": len(next(iter(removed.values()))), "criterion": by, "ratio": ratio,
            "scores": sc}


def measure(mm, run, ban: str, max_tokens: int = MEASURE_TOKENS) -> dict:
    """Perplexity of the run's documents (first max_tokens tokens) without and with the plan as a ban."""
    from ..analysis.common import doc_token_ids
    from ..attribution import make_batches, objective

    seqs, n = [], 0
    for ids in doc_token_ids(run).values():
        if n >= max_tokens:
            break
        ids = ids[: max_tokens - n]
        if len(ids) >= 2:
            seqs.append(ids)
            n += len(ids)
    if not seqs:
        raise WorkbenchError("the run has no documents of two or more tokens to measure on")
    batches = make_batches(mm, seqs, None, None, None, 4)
    base = objective(mm, batches)
    banned = objective(mm, batches, {"ban": ban})
    import math

    return {"tokens": n, "ppl": math.exp(base), "ppl_pruned": math.exp(banned), "ratio": math.exp(banned - base)}


def _figure(pred: pl.DataFrame):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=pred["layer"].to_list(), y=pred["removed_mass"].to_list()))
    fig.update_layout(title="Predicted cost per layer: share of the run's routing weight on the removed experts",
                      xaxis_title="layer", yaxis_title="routing weight removed", yaxis_tickformat=".0%",
                      template="plotly_white", height=320)
    return fig


def render(run, p, has_model: bool, exact: tuple[bool, str] | None) -> list:
    if isinstance(p, Unavailable):
        return [notice(p)]
    pred = p["predicted"]
    mean = float(pred["removed_mass"].mean())
    cmd = (f"workbench prune {run.model_info.get('path') or run.model_info.get('spec') or 'MODEL'} --run {run.path} "
           f"--ratio {p['ratio']:g} --by {p['criterion']}" + (" --protect super-experts" if p["protected"] else "")
           + " --out pruned/")
    out = [html.Div(f"Removes {p['n_removed']} of {run.n_experts} experts in each of {len(p['removed'])} MoE layers "
                    f"({p['criterion']}). Predicted cost: {mean:.1%} of the run's routing weight falls on them "
                    "(mean over layers)." + (f" Protected: {p['protected']}." if p["protected"] else ""),
                    className="summary")]
    if exact is not None:
        out.append(html.P(("Exact: " if exact[0] else "Note: ") + exact[1] + "."))
    out.append(graph(_figure(pred)))
    out += [html.H3("Take the plan away"),
            html.P("As a run-time ban (workbench steer / capture --ban, or mm.steer(ban=...)):"),
            dcc.Textarea(value=p["ban"], readOnly=True, style={"width": "100%", "height": "70px"}),
            html.P("As a checkpoint, from the command line:"), html.Pre(cmd),
            html.Button("Download the plan (JSON)", id="prn-dl-btn")]
    if not has_model:
        out.append(notice(Unavailable("Measuring the cost and writing the checkpoint here need the model.",
                                      f"workbench app {run.path} --model MODEL")))
    return out


def layout(app_ctx):
    run = app_ctx.run
    if not run.has("routing"):
        return html.Div([html.H2("Pruning"), notice(Unavailable("This run has no routing table.",
                                                                "workbench capture MODEL --data DATA --out RUN"))])
    has_model = app_ctx.service is not None
    crit = [{"label": v, "value": k, "disabled": k == "attribution" and not has_model} for k, v in CRITERIA.items()]
    controls = html.Div([
        html.Div([html.Label("criterion"), dcc.RadioItems(id="prn-by", options=crit, value="reap"
                                                          if run.has("expert_stats") else "frequency", inline=True)]),
        html.Div([html.Label("experts removed per layer"),
                  dcc.Dropdown(id="prn-ratio", value=0.25, clearable=False,
                               options=[{"label": f"{r:.1%}", "value": r} for r in RATIOS])], style={"minWidth": "160px"}),
        dcc.Checklist(id="prn-protect", options=[{"label": "protect super experts", "value": "se"}], value=[]),
    ], className="controls")
    model_part = []
    if has_model:
        model_part = [html.H3("Measured cost (live model)"),
                      html.P(f"Perplexity of the run's first {MEASURE_TOKENS} document tokens with the plan applied "
                             "as a ban, against the plain model (for renormalising routers this is exactly the "
                             "pruned checkpoint)."),
                      html.Button("Measure", id="prn-measure"), dcc.Loading(html.Div(id="prn-measured")),
                      html.H3("Write the checkpoint"),
                      dcc.Input(id="prn-out", placeholder="folder for the pruned checkpoint", style={"width": "60%"}),
                      html.Button("Write", id="prn-write"), dcc.Loading(html.Div(id="prn-written"))]
    return html.Div([
        html.H2("Pruning"),
        html.P("Remove the least salient experts of every MoE layer: pick a criterion computed from this run and a "
               "ratio, see what the run predicts it costs, measure it, and take away the plan or the checkpoint "
               "(workbench prune; docs: Compress)."),
        controls, dcc.Loading(html.Div(id="prn-body")), *model_part, dcc.Download(id="prn-download"),
    ])


def _checked(by, ratio) -> tuple[str, float]:
    """The criterion and ratio a request sent, refused in one sentence unless the page offers them."""
    if by not in CRITERIA:
        raise WorkbenchError(f"unknown criterion {str(by)[:40]!r}; choose one of {', '.join(CRITERIA)}")
    if ratio not in RATIOS:
        raise WorkbenchError(f"unsupported ratio {str(ratio)[:40]!r}; choose one of {', '.join(f'{r:g}' for r in RATIOS)}")
    return by, float(ratio)


def _exact(app_ctx):
    if app_ctx.service is None:
        return None
    from ..compress.prune import router_facts, exactness

    f = router_facts(app_ctx.service.mm)
    return exactness(f["rule"], f["norm_topk_prob"], f["n_group"])


def _mm(app_ctx):
    return app_ctx.service.mm if app_ctx.service is not None else None


def register(app, app_ctx) -> None:
    inputs = [Input("prn-by", "value"), Input("prn-ratio", "value"), Input("prn-protect", "value")]

    @app.callback(Output("prn-body", "children"), *inputs)
    def show(by, ratio, protect):
        by, ratio = _checked(by, ratio)
        mm = _mm(app_ctx)
        if mm is not None and (by == "attribution" or (by == "reap" and not app_ctx.run.has("expert_stats"))):
            with app_ctx.service.lock:
                p = plan_for(app_ctx.run, by, float(ratio), bool(protect), mm)
        else:
            p = plan_for(app_ctx.run, by, float(ratio), bool(protect), mm)
        return render(app_ctx.run, p, mm is not None, _exact(app_ctx))

    @app.callback(Output("prn-download", "data"), Input("prn-dl-btn", "n_clicks"),
                  State("prn-by", "value"), State("prn-ratio", "value"), State("prn-protect", "value"),
                  prevent_initial_call=True)
    def download(n, by, ratio, protect):
        if not n:
            return no_update
        by, ratio = _checked(by, ratio)
        p = plan_for(app_ctx.run, by, float(ratio), bool(protect), _mm(app_ctx))
        if isinstance(p, Unavailable):
            raise WorkbenchError(p.message)
        body = {"criterion": by, "ratio": ratio, "protected": p["protected"], "ban": p["ban"], "run": str(app_ctx.run.path),
                "removed": {str(k): v for k, v in p["removed"].items()},
                "predicted_removed_mass": dict(zip(map(str, p["predicted"]["layer"].to_list()),
                                                   p["predicted"]["removed_mass"].to_list()))}
        return {"content": json.dumps(body, indent=1), "filename": f"pruning_plan_{by}_{ratio:g}.json"}

    if app_ctx.service is None:
        return

    @app.callback(Output("prn-measured", "children"), Input("prn-measure", "n_clicks"), *[State(i.component_id,
                  i.component_property) for i in inputs], prevent_initial_call=True)
    def do_measure(n, by, ratio, protect):
        by, ratio = _checked(by, ratio)
        mm = _mm(app_ctx)
        with app_ctx.service.lock:
            p = plan_for(app_ctx.run, by, float(ratio), bool(protect), mm)
            if isinstance(p, Unavailable):
                return notice(p)
            m = measure(mm, app_ctx.run, p["ban"])
        return html.Div(f"On {m['tokens']} tokens: perplexity {m['ppl']:.4g} -> {m['ppl_pruned']:.4g} "
                        f"(x{m['ratio']:.3f}).", className="summary")

    @app.callback(Output("prn-written", "children"), Input("prn-write", "n_clicks"), State("prn-out", "value"),
                  *[State(i.component_id, i.component_property) for i in inputs], prevent_initial_call=True)
    def write(n, out, by, ratio, protect):
        from ..compress.prune import prune

        by, ratio = _checked(by, ratio)
        if not out or not str(out).strip():
            raise WorkbenchError("type a folder for the checkpoint")
        out = Path(str(out).strip()).expanduser()
        if out.exists() and any(out.iterdir()):
            raise WorkbenchError(f"{out} is not empty; choose a new folder")
        mm = _mm(app_ctx)
        sc = None
        with app_ctx.service.lock:
            if by == "attribution" or (by == "reap" and not app_ctx.run.has("expert_stats")):
                sc = _scores(app_ctx.run, by, mm)
            _, info = prune(mm.path or mm.spec, app_ctx.run, float(ratio), by, out,
                            "super-experts" if protect else None, progress=False, scores=sc)
        return html.Div(f"Wrote {out} ({info['n_experts_after']} experts per layer) with pruning.json.",
                        className="summary")


PAGE = Page("/pruning", "Pruning", layout, register)
