"""Analysis pages: each shows what `workbench.analysis.<name>` returns (figures + tables), never recomputes it.

A section is a part of a page filled from one analysis. It renders at once: the result if cached,
otherwise a "computing" notice and a 1 s poll until the background worker has it. Missing inputs
(no expert stats, no language labels) arrive as Unavailable and show what to capture.

A loop section is the closed-loop half of an analysis (pruning, interventions, steering): the same
analysis with the live model, started by a button because it runs the model for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import plotly.express as px
import polars as pl
from dash import MATCH, Input, Output, ctx as dash_ctx, dash_table, dcc, html, no_update

from ..analysis.registry import ANALYSES
from ..plots import colour_map, polish
from .state import CAPTURE_HINTS, TABLE_HINTS, Unavailable
from .ui import GRAPH_CONFIG, Page, computing, graph, notice, table_browser, table_page

FIRST_WAIT = 1.0  # seconds a page waits for a fresh analysis before showing "computing"


@dataclass
class Loop:
    """The closed-loop variant of an analysis: extra options that need the live model."""

    button: str
    what: str
    options: object  # (app_ctx) -> dict of analyze() keyword arguments (the model included)


@dataclass
class Section:
    key: str
    analysis: str
    render: object  # (app_ctx, key, result, figures) -> children
    requires: tuple = ()  # run tables without which the analysis cannot run
    requires_labels: tuple = ()  # label columns (any of) the analysis needs
    loop: Loop | None = None

    page: str = ""  # the path of the page it is on (for links from other runs)
    @property
    def variant(self) -> str | None:
        return f"{self.analysis}:loop" if self.loop else None


SECTIONS: dict[str, Section] = {}


def section(key, analysis, render, requires=None, requires_labels=None, loop=None) -> Section:
    """requires / requires_labels default to the analysis' row in workbench.analysis.registry (the optional
    tables only: every run has routing and tokens)."""
    spec = ANALYSES.get(analysis)
    if requires is None:
        requires = [t for t in (spec.requires_tables if spec else ()) if t not in ("routing", "tokens")]
    if requires_labels is None:
        requires_labels = spec.requires_labels if spec else ()
    SECTIONS[key] = Section(key, analysis, render, tuple(requires), tuple(requires_labels), loop)
    return SECTIONS[key]


# What a run must hold for an analysis to apply: every table of the first, a label of the second.
NEEDS = {"stats": (("routing",), ()), "super-experts": (("expert_stats",), ()), "lrc": (("routing",), ()),
         "multilingual": (("routing",), ("lang",)), "behavior": (("routing",), ("class",)),
         "atlas": (("routing",), ())}


def why_not(run, analysis: str, requires=(), requires_labels=()) -> Unavailable | None:
    """Why `analysis` cannot run on `run` (a missing table or label, with what to capture), or None."""
    tables, labels = NEEDS.get(analysis, ((), ()))
    for t in dict.fromkeys((*requires, *tables)):
        if not run.has(t):
            return Unavailable(f"This run has no `{t}` table, which the {analysis} analysis needs.",
                               TABLE_HINTS.get(t, CAPTURE_HINTS.get(analysis, "")))
    labels = tuple(requires_labels) or labels
    if labels and not set(labels) & set(run.label_columns):
        need = " or ".join(f"`{c}`" for c in labels)
        return Unavailable(f"This run's records have no {need} label, which the {analysis} analysis needs.",
                           CAPTURE_HINTS.get(analysis, ""))
    return None


def model_check(app_ctx) -> Unavailable | None:
    run = app_ctx.run
    if app_ctx.service is None:
        return Unavailable("This needs the live model; the dashboard was started without one.",
                           f"workbench app {run.path} --model {run.model_info.get('spec') or 'MODEL'}")
    mm = app_ctx.service.mm
    if list(mm.moe_layers) != list(run.moe_layers) or mm.n_experts != run.n_experts:
        return Unavailable(f"The live model ({mm.spec}) is not the model this run captured "
                           f"({run.model_info.get('spec')}): its MoE layers or expert count differ.",
                           f"workbench app {run.path} --model {run.model_info.get('spec') or 'MODEL'}")
    return None


def _precheck(data, sec: Section) -> Unavailable | None:
    return why_not(data.run, sec.analysis, sec.requires, sec.requires_labels)


def runs_it_applies_to(app_ctx, sec: Section) -> list[tuple[str, str]]:
    """(run name, link to this page of it) for the other served runs this section's analysis applies to."""
    apps = getattr(app_ctx.app.server, "workbench_apps", None) or {}
    out = []
    for name, other in list(apps.items()):
        run = getattr(getattr(other, "workbench", None), "run", None)
        if run is None or str(run.path) == str(app_ctx.run.path):
            continue
        if why_not(run, sec.analysis, sec.requires, sec.requires_labels) is None:
            out.append((name, other.get_relative_path(sec.page or "/")))
    return out


def _missing(app_ctx, sec: Section, why: Unavailable):
    """The notice, led by links to the served runs this page does apply to (the demo's matching run)."""
    others = runs_it_applies_to(app_ctx, sec)
    if not others:
        return notice(why)
    links = []
    for i, (name, href) in enumerate(others):
        links += ([html.Span(" · ")] if i else []) + [html.A(name, href=href)]
    return html.Div([html.Div(["Open this page on a run it applies to: ", *links, "."], className="notice"),
                     html.Details([html.Summary("why not on this run", style={"fontSize": "13px"}), notice(why)])])


_model_check = model_check  # the old name, used by tests


def stored_loop(run, analysis: str) -> dict | None:
    """The options (less the model) of the newest closed-loop result of `analysis` stored in the run folder
    for the run as it is now and the run's own model, or None."""
    import json
    from pathlib import Path

    from ..analysis.persist import FOLDER, RESULT, run_fingerprint

    spec = run.model_info.get("spec")
    best, when, fp = None, -1.0, None
    for p in (Path(run.path) / FOLDER / analysis.replace("/", "_")).glob(f"*/{RESULT}"):
        try:
            info = json.loads(p.read_text())
            opts = info.get("options") or {}
            if spec is None or opts.get("model") != spec:
                continue
            fp = fp or run_fingerprint(run)
            if info.get("run") == fp and p.stat().st_mtime > when:
                best, when = {k: v for k, v in opts.items() if k != "model"}, p.stat().st_mtime
        except (OSError, ValueError):
            continue
    return best


def _body(app_ctx, sec: Section):
    """(children, done) for a section in its current state."""
    data = app_ctx.data
    pre = _precheck(data, sec)
    if pre is not None:
        return _missing(app_ctx, sec, pre), True
    if sec.loop:
        pre = model_check(app_ctx)
        if pre is not None:
            return notice(pre), True
        res = data.analysis(sec.analysis, variant=sec.variant, start=False)
        if res is None and data.started(sec.variant) is None and (stored := stored_loop(data.run, sec.analysis)):
            # a closed loop already stored in the run folder (the demo's, a CLI run): load it, no button
            data.analysis(sec.analysis, variant=sec.variant, options={**stored, "model": app_ctx.service.mm},
                          lock=app_ctx.service.lock)
        if res is None and data.started(sec.variant) is None:
            return html.Div([html.Span(sec.loop.what + " "),
                             html.Button(sec.loop.button, id={"type": "loop-go", "sec": sec.key}, n_clicks=0)],
                            style={"fontSize": "13px"}), True
        figs = data.figures(sec.variant)
    else:
        res = data.analysis(sec.analysis)
        figs = data.figures(sec.analysis)
    if res is None:
        key = sec.variant or sec.analysis
        busy = computing(sec.analysis + (" closed-loop" if sec.loop else ""), data.started(key), data.running(key),
                         model=bool(sec.loop), behind=data.behind(key))
        return html.Div([busy, progress_bar(data.progress(key))]), False
    if isinstance(res, Unavailable):
        return notice(res), True
    return sec.render(app_ctx, sec.key, res, figs), True


def progress_bar(p: dict | None):
    """The running step: a bar and 'stats: 41% read (12 chunks)' for a pass over the run, 'interventions: 5 of
    20 done' for counted steps (reported with chunks == done); nothing before the first report."""
    if not p or not p.get("total"):
        return html.Span()
    frac = min(1.0, p["done"] / p["total"])
    if p["chunks"] == p["done"]:
        text = f"{p['desc']}: {p['done']:,} of {p['total']:,} done ({100 * frac:.0f}%)"
    else:
        text = f"{p['desc']}: {100 * frac:.0f}% read ({p['chunks']} chunk{'s' if p['chunks'] != 1 else ''})"
    return html.Div([html.Progress(value=f"{frac:.3f}", max="1", style={"width": "240px", "marginRight": "8px"}),
                     html.Span(text)], className="progress", style={"fontSize": "13px"})


def async_section(app_ctx, key: str) -> html.Div:
    sec = SECTIONS[key]
    if not sec.loop and _precheck(app_ctx.data, sec) is None:
        app_ctx.data.analysis(sec.analysis, wait=FIRST_WAIT)
    body, done = _body(app_ctx, sec)
    return html.Div([dcc.Interval(id={"type": "poll", "sec": key}, interval=1000, disabled=done),
                     html.Div(body, id={"type": "body", "sec": key})])


def _result_for(app_ctx, key):
    sec = SECTIONS.get(key)
    if sec is None:
        return None
    if sec.loop:
        return app_ctx.data.analysis(sec.analysis, variant=sec.variant, start=False)
    return app_ctx.data.analysis(sec.analysis)


def register_async(app, app_ctx) -> None:
    @app.callback(Output({"type": "body", "sec": MATCH}, "children"),
                  Output({"type": "poll", "sec": MATCH}, "disabled"),
                  Input({"type": "poll", "sec": MATCH}, "n_intervals"), prevent_initial_call=True)
    def poll(_n):
        key = dash_ctx.triggered_id["sec"]
        return _body(app_ctx, SECTIONS[key])

    @app.callback(Output({"type": "body", "sec": MATCH}, "children", allow_duplicate=True),
                  Output({"type": "poll", "sec": MATCH}, "disabled", allow_duplicate=True),
                  Input({"type": "loop-go", "sec": MATCH}, "n_clicks"), prevent_initial_call=True)
    def start_loop(n):
        key = dash_ctx.triggered_id["sec"]
        sec = SECTIONS[key]
        if not n or sec.loop is None or model_check(app_ctx) is not None:
            return no_update, no_update
        app_ctx.data.analysis(sec.analysis, variant=sec.variant, options=sec.loop.options(app_ctx),
                              lock=app_ctx.service.lock)
        return _body(app_ctx, sec)

    @app.callback(Output({"type": "tbl", "page": MATCH}, "data"), Output({"type": "tbl", "page": MATCH}, "columns"),
                  Output({"type": "tbl", "page": MATCH}, "page_count"),
                  Input({"type": "tbl-select", "page": MATCH}, "value"),
                  Input({"type": "tbl", "page": MATCH}, "page_current"),
                  Input({"type": "tbl", "page": MATCH}, "page_size"), Input({"type": "tbl", "page": MATCH}, "sort_by"))
    def table(name, page_current, page_size, sort_by):
        key = dash_ctx.outputs_list[0]["id"]["page"]
        res = _result_for(app_ctx, key)
        if res is None or isinstance(res, Unavailable) or name not in res.tables:
            return [], [], 1
        if dash_ctx.triggered_id and dash_ctx.triggered_id.get("type") == "tbl-select":
            page_current = 0
        return table_page(res.tables[name], page_current, page_size or 15, sort_by)

    # A dropdown choosing among a group of figures (e.g. one per layer or per label).
    @app.callback(Output({"type": "fig-pick-graph", "sec": MATCH}, "figure"),
                  Input({"type": "fig-pick", "sec": MATCH}, "value"), prevent_initial_call=True)
    def pick(name):
        key = dash_ctx.triggered_id["sec"]
        sec = SECTIONS[key]
        figs = app_ctx.data.figures(sec.variant or sec.analysis)
        return figs.get(name, no_update)


def figure_list(key, figs, names, pick_groups=()):
    """Graphs for `names`; names starting with a pick-group prefix share one graph and a dropdown."""
    out, shown = [], set()
    grouped = {g: [n for n in names if n.startswith(g)] for g in pick_groups}
    for n in names:
        group = next((g for g in pick_groups if n.startswith(g) and len(grouped[g]) > 1), None)
        if group is None:
            out.append(graph(figs[n]))
        elif group not in shown:
            shown.add(group)
            members = grouped[group]
            out.append(html.Div([
                html.Div([html.Div([html.Label(group.rstrip("_").replace("_", " ")),
                                    dcc.Dropdown(id={"type": "fig-pick", "sec": key}, clearable=False,
                                                 value=members[0], options=[{"label": m, "value": m}
                                                                            for m in members])],
                                   style={"minWidth": "300px"})], className="controls"),
                dcc.Graph(id={"type": "fig-pick-graph", "sec": key}, figure=figs[members[0]], config=GRAPH_CONFIG),
            ]))
    return out


def render_generic(app_ctx, key, res, figs, include=None, exclude=(), pick_groups=(), only_new_of=None):
    """Summary, the figures (filtered by name prefix), then every table in the browser.

    only_new_of: a base analysis name; show only the figures and tables this result adds to it.
    """
    base_figs, base_tables = {}, {}
    if only_new_of:
        base = app_ctx.data.analysis(only_new_of, start=False)
        if base is not None and not isinstance(base, Unavailable):
            base_figs, base_tables = app_ctx.data.figures(only_new_of), base.tables
    out = []
    if res.summary and not only_new_of:
        out.append(html.Div(res.summary, className="summary"))
    names = [n for n in figs if (include is None or any(n.startswith(i) for i in include))
             and not any(n.startswith(x) for x in exclude) and n not in base_figs]
    out += figure_list(key, figs, names, pick_groups)
    tables = {k: v for k, v in res.tables.items() if k not in base_tables}
    if not names and not tables:
        out.append(html.Div("Nothing more to show for this run.", className="computing"))
    out.append(table_browser(key, tables, first=res.main if res.main in tables else None))
    return out


def _generic(**kw):
    def render(app_ctx, key, res, figs):
        return render_generic(app_ctx, key, res, figs, **kw)
    return render


def analysis_page(path, title, intro, key, analysis, render=None, requires=None, requires_labels=None, loop=None,
                  loop_title=None, register=None, extra=None) -> Page:
    section(key, analysis, render or _generic(), requires, requires_labels).page = path
    if loop:
        section(f"{key}-loop", analysis, _generic(only_new_of=analysis), requires, requires_labels, loop).page = path

    def layout(app_ctx):
        parts = [html.H2(title), html.P(intro), async_section(app_ctx, key)]
        if loop:
            parts += [html.H3(loop_title or "Closed loop"), async_section(app_ctx, f"{key}-loop")]
        for extra_title, extra_key in extra or ():  # further sections (their own analyses) on the same page
            parts += [html.H3(extra_title), async_section(app_ctx, extra_key)]
        return html.Div(parts)

    return Page(path, title, layout, register)


def _with_model(**opts):
    def make(app_ctx):
        return dict(opts, model=app_ctx.service.mm)
    return make


# -- Experts: stats figures plus an inspector for one expert -------------------------------------------------


def _render_experts(app_ctx, key, res, figs):
    if "experts" not in res.tables or not {"layer", "expert", "count"} <= set(res.tables["experts"].columns):
        return render_generic(app_ctx, key, res, figs, pick_groups=("label_",))
    run = app_ctx.run
    layers = run.moe_layers
    ex = res.tables["experts"]
    top = (ex.filter(pl.col("label").is_null()) if "label" in ex.columns else ex).sort("count", descending=True).head(1)
    first = top.row(0, named=True) if top.height else {"layer": layers[0], "expert": 0}
    inspector = html.Div([
        html.H3("Inspect one expert (or click a cell of the share heatmap)"),
        html.Div([
            html.Div([html.Label("layer"), dcc.Dropdown(id="exp-layer", clearable=False, value=int(first["layer"]),
                                                        options=[{"label": f"layer {v}", "value": v} for v in layers])]),
            html.Div([html.Label("expert"), dcc.Dropdown(id="exp-expert", clearable=False, value=int(first["expert"]),
                                                         options=[{"label": f"expert {e}", "value": e}
                                                                  for e in range(run.n_experts)])]),
        ], className="controls"),
        html.Div(id="exp-inspect"),
    ])
    names = list(figs)
    share = [graph(figs["expert_share"], gid="exp-share")] if "expert_share" in figs else []
    rest = [n for n in names if n != "expert_share"]
    out = [html.Div(res.summary, className="summary")] if res.summary else []
    out += [html.Div([html.Div(share, className="col", style={"flex": "3"}),
                      html.Div(inspector, className="col", style={"flex": "2"})], className="row")]
    out += figure_list(key, figs, rest, pick_groups=("label_",))
    out.append(table_browser(key, res.tables, first=res.main))
    return out


def _small_table(df: pl.DataFrame, tid: str, n: int = 10):
    rows, cols, _ = table_page(df.head(n), 0, n, [])
    return dash_table.DataTable(id=tid, data=rows, columns=cols, style_table={"overflowX": "auto"},
                                style_cell={"fontSize": 12, "fontFamily": "ui-monospace, monospace"})


def inspect_expert(res, layer: int, expert: int):
    """One expert's rows of the stats tables: load, top tokens, top labels, partners, next-layer experts."""
    t = res.tables

    def rows(name):
        df = t.get(name)
        if df is None:
            return pl.DataFrame()
        if "label" in df.columns and name != "top_labels":
            df = df.filter(pl.col("label").is_null())
        return df.filter((pl.col("layer") == layer) & (pl.col("expert") == expert))

    me = rows("experts")
    if me.height == 0:
        return html.Div(f"L{layer}:E{expert} was never selected in this run.", className="computing")
    r = me.row(0, named=True)
    facts = " · ".join(f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}"
                       for k in me.columns if k not in ("label", "value", "layer", "expert"))
    out = [html.Div(f"L{layer}:E{expert}: {facts}", style={"fontSize": "13px"})]
    drop = ["label", "value", "layer", "expert"]
    for name, title, sort in (("top_tokens", "top tokens", "count"), ("top_labels", "labels it prefers", "lift"),
                              ("coactivation", "co-selected in the same layer", "lift"),
                              ("transitions", "next layer's experts", "p_next_given_expert")):
        df = rows(name)
        if df.height:
            df = df.sort(sort, descending=True).drop([c for c in drop if c in df.columns and
                                                      not (name == "top_labels" and c in ("label", "value"))])
            out += [html.H3(title), _small_table(df, f"exp-{name}", 8)]
    return out


def _register_experts(app, app_ctx):
    @app.callback(Output("exp-layer", "value"), Output("exp-expert", "value"), Input("exp-share", "clickData"),
                  prevent_initial_call=True)
    def click(cd):
        if not cd or not cd.get("points"):
            return no_update, no_update
        p = cd["points"][0]
        return int(p["y"]), int(p["x"])

    @app.callback(Output("exp-inspect", "children"), Input("exp-layer", "value"), Input("exp-expert", "value"))
    def inspect(layer, expert):
        res = app_ctx.data.analysis("stats", start=False)
        if res is None or isinstance(res, Unavailable) or layer is None or expert is None:
            return ""
        return inspect_expert(res, int(layer), int(expert))


# -- Atlas: UMAP coordinates from the analysis, coloured by any label -------------------------------------------


def atlas_figure(df: pl.DataFrame, which: str, color: str | None):
    hover = [c for c in ("layer", "expert", "n_selections", "doc_id", "pos", "token", "top_tokens") if c in df.columns]
    if color and color in df.columns and df.schema[color].is_numeric() and df[color].n_unique() <= 64:
        df = df.with_columns(pl.col(color).cast(pl.Utf8))
    discrete = color in df.columns and not df.schema[color].is_numeric()
    fig = px.scatter(df.to_pandas(), x="x", y="y", color=color if color in df.columns else None, hover_data=hover,
                     color_discrete_map=colour_map(df[color].unique().to_list()) if discrete else None,
                     title=("Expert atlas: experts placed by what selects them" if which == "experts"
                            else "Token atlas: tokens placed by their routing"))
    fig.update_traces(marker={"size": 8 if which == "experts" else 4, "opacity": 1.0 if which == "experts" else 0.7})
    fig.update_layout(template="plotly_white", height=520, xaxis={"showticklabels": False, "title": "UMAP 1"},
                      yaxis={"showticklabels": False, "title": "UMAP 2"}, legend={"itemsizing": "constant"})
    return polish(fig, "atlas", which)


def _colour_options(df: pl.DataFrame, which: str) -> list[str]:
    skip = {"x", "y", "method", "doc_id", "pos", "token", "expert", "n_selections", "top_tokens"}
    return [c for c in df.columns if c not in skip and not c.endswith(("_share", "_lift"))]


def _render_atlas(app_ctx, key, res, figs):
    out = [html.Div(res.summary, className="summary")] if res.summary else []
    for which in ("experts", "tokens"):
        df = res.tables.get(which)
        if df is None:
            continue
        opts = _colour_options(df, which)
        default = next((c for c in opts if c.startswith("top_")), None) if which == "experts" else None
        default = default or (opts[0] if opts else None)
        out.append(html.Div([
            html.Div([html.Div([html.Label(f"colour the {which} by"),
                                dcc.Dropdown(id=f"atlas-color-{which}", options=opts, value=default, clearable=False)],
                               style={"minWidth": "240px"})], className="controls"),
            dcc.Graph(id=f"atlas-{which}", figure=atlas_figure(df, which, default), config=GRAPH_CONFIG),
        ]))
    out.append(table_browser(key, res.tables, first=res.main))
    return out


def _register_atlas(app, app_ctx):
    for which in ("experts", "tokens"):
        @app.callback(Output(f"atlas-{which}", "figure"), Input(f"atlas-color-{which}", "value"),
                      prevent_initial_call=True)
        def recolour(color, which=which):
            res = app_ctx.data.analysis("atlas", start=False)
            if res is None or isinstance(res, Unavailable) or which not in res.tables:
                return no_update
            return atlas_figure(res.tables[which], which, color)


# Which experts matter (not just fire): workbench.attribution on this run's documents, with the live model.
section("experts-attribution", "attribution", _generic(), loop=Loop(
    "estimate attribution", "The effect of zeroing each expert on the loss of this run's text, for all experts "
    "from one backward pass per batch (first-order estimate; workbench attribute for exact zeroing).",
    _with_model(max_tokens=2048)))

PAGES = [
    analysis_page("/experts", "Experts",
                  "Per-expert load, co-activation within a layer, transitions between layers, and the tokens and "
                  "labels each expert specialises in (workbench analyze stats).", "experts", "stats",
                  render=_render_experts, register=_register_experts,
                  extra=[("Causal attribution", "experts-attribution")]),
    analysis_page("/super-experts", "Super experts",
                  "Experts whose down_proj output has rare extreme outliers (Su et al.): the max |output| heatmap, "
                  "the super-expert table, massive activations per layer and the sink token's router scores "
                  "(workbench analyze super-experts).", "super-experts", "super-experts",
                  loop=Loop("evaluate pruning", "Perplexity and attention-sink decay with the super experts zeroed, "
                            "against the same number of random experts (runs the live model for a while).",
                            _with_model(prune=True)), loop_title="Pruning results"),
    analysis_page("/locality", "Locality",
                  "Local routing consistency (Liang et al.): SRP against window length m and SCH against cache size, "
                  "per layer and for the model (workbench analyze lrc).", "locality", "lrc"),
    analysis_page("/multilingual", "Multilingual",
                  "How each language's routing diverges from English per layer, pairwise language divergence and "
                  "language-specific experts (Bandarkar et al.; workbench analyze multilingual).", "multilingual",
                  "multilingual",
                  render=_generic(pick_groups=("pairwise_",)),
                  loop=Loop("run the steering experiment", "Promote middle-layer task experts on the other languages "
                            "and measure the perplexity change against the paper's controls (runs the live model; "
                            "needs `set` labels task/general).", _with_model(steer=True)),
                  loop_title="Steering experiment"),
    analysis_page("/behavior", "Behaviour maps",
                  "fTRI: which experts light up on target prompts against control prompts, with significance, the "
                  "top-N experts and intervention results (workbench analyze behavior).", "behavior", "behavior",
                  render=_generic(pick_groups=("map_",)),
                  loop=Loop("run the interventions", "Switch the top-10 experts off (ban and drop-slot) and force them "
                            "on, scoring held-out prompts against random experts (runs the live model).",
                            _with_model(intervene=10)), loop_title="Intervention results"),
    analysis_page("/atlas", "Atlas",
                  "UMAP maps of experts by their routing profiles and of tokens by their routing vectors, coloured "
                  "by label (workbench analyze atlas).", "atlas", "atlas", render=_render_atlas,
                  register=_register_atlas),
]
