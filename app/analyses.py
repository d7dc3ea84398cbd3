"""Analysis pages: each shows what `workbench.analysis.<name>` returns (figures + tables), never recomputes it.

A section is a part of a page filled from one analysis. It renders at once: the result if cached,
otherwise a "computing" notice and a 1 s poll until the background worker has it. Missing inputs
(no expert stats, no language labels) arrive as Unavailable and show what to capture.
"""

from __future__ import annotations

from dataclasses import dataclass

from dash import MATCH, Input, Output, ctx as dash_ctx, dcc, html, no_update

from .state import CAPTURE_HINTS, TABLE_HINTS, Unavailable
from .ui import Page, computing, graph, notice, table_browser, table_page

FIRST_WAIT = 1.0  # seconds a page waits for a fresh analysis before showing "computing"


@dataclass
class Section:
    key: str
    analysis: str
    render: object  # (ctx, key, result, figures) -> children
    requires: tuple = ()  # run tables without which the analysis cannot run
    requires_labels: tuple = ()  # label columns (any of) the analysis needs


SECTIONS: dict[str, Section] = {}


def section(key, analysis, render, requires=(), requires_labels=()) -> Section:
    SECTIONS[key] = Section(key, analysis, render, tuple(requires), tuple(requires_labels))
    return SECTIONS[key]


def _precheck(data, sec: Section) -> Unavailable | None:
    for t in sec.requires:
        if not data.run.has(t):
            return Unavailable(f"This run has no `{t}` table, which the {sec.analysis} analysis needs.",
                               TABLE_HINTS.get(t, CAPTURE_HINTS.get(sec.analysis, "")))
    if sec.requires_labels and not set(sec.requires_labels) & set(data.run.label_columns):
        need = " or ".join(f"`{c}`" for c in sec.requires_labels)
        return Unavailable(f"This run's records have no {need} label, which the {sec.analysis} analysis needs.",
                           CAPTURE_HINTS.get(sec.analysis, ""))
    return None


def _body(app_ctx, sec: Section):
    """(children, done) for a section in its current state."""
    data = app_ctx.data
    pre = _precheck(data, sec)
    if pre is not None:
        return notice(pre), True
    res = data.analysis(sec.analysis, wait=0)
    if res is None:
        return computing(sec.analysis, data.started(sec.analysis)), False
    if isinstance(res, Unavailable):
        return notice(res), True
    return sec.render(app_ctx, sec.key, res, data.figures(sec.analysis)), True


def async_section(app_ctx, key: str) -> html.Div:
    sec = SECTIONS[key]
    if _precheck(app_ctx.data, sec) is None:
        app_ctx.data.analysis(sec.analysis, wait=FIRST_WAIT)
    body, done = _body(app_ctx, sec)
    return html.Div([dcc.Interval(id={"type": "poll", "sec": key}, interval=1000, disabled=done),
                     html.Div(body, id={"type": "body", "sec": key})])


def register_async(app, app_ctx) -> None:
    @app.callback(Output({"type": "body", "sec": MATCH}, "children"),
                  Output({"type": "poll", "sec": MATCH}, "disabled"),
                  Input({"type": "poll", "sec": MATCH}, "n_intervals"), prevent_initial_call=True)
    def poll(_n):
        key = dash_ctx.triggered_id["sec"]
        body, done = _body(app_ctx, SECTIONS[key])
        return body, done

    @app.callback(Output({"type": "tbl", "page": MATCH}, "data"), Output({"type": "tbl", "page": MATCH}, "columns"),
                  Output({"type": "tbl", "page": MATCH}, "page_count"),
                  Input({"type": "tbl-select", "page": MATCH}, "value"),
                  Input({"type": "tbl", "page": MATCH}, "page_current"),
                  Input({"type": "tbl", "page": MATCH}, "page_size"), Input({"type": "tbl", "page": MATCH}, "sort_by"))
    def table(name, page_current, page_size, sort_by):
        key = dash_ctx.outputs_list[0]["id"]["page"]
        sec = SECTIONS.get(key)
        res = app_ctx.data.analysis(sec.analysis) if sec else None
        if res is None or isinstance(res, Unavailable) or name not in res.tables:
            return [], [], 1
        if dash_ctx.triggered_id and dash_ctx.triggered_id.get("type") == "tbl-select":
            page_current = 0
        return table_page(res.tables[name], page_current, page_size or 15, sort_by)

    # Figure selectors inside a section (e.g. which layer's co-activation matrix): a dropdown whose
    # value is a figure name of that section's analysis.
    @app.callback(Output({"type": "fig-pick-graph", "sec": MATCH}, "figure"),
                  Input({"type": "fig-pick", "sec": MATCH}, "value"), prevent_initial_call=True)
    def pick(name):
        key = dash_ctx.triggered_id["sec"]
        figs = app_ctx.data.figures(SECTIONS[key].analysis)
        return figs.get(name, no_update)



def render_generic(app_ctx, key, res, figs, include=None, exclude=(), pick_groups=()):
    """Summary, then the figures (filtered by name prefix), then every table in the browser.

    pick_groups: figure-name prefixes whose figures (e.g. one per layer) go behind one dropdown.
    """
    out = []
    if res.summary:
        out.append(html.Div(res.summary, className="summary"))
    names = [n for n in figs if (include is None or any(n.startswith(i) for i in include))
             and not any(n.startswith(x) for x in exclude)]
    grouped = {g: [n for n in names if n.startswith(g)] for g in pick_groups}
    shown_groups = set()
    for n in names:
        group = next((g for g in pick_groups if n.startswith(g) and len(grouped[g]) > 1), None)
        if group is None:
            out.append(graph(figs[n]))
        elif group not in shown_groups:
            shown_groups.add(group)
            members = grouped[group]
            out.append(html.Div([
                html.Div([html.Label(group.rstrip("_")),
                          dcc.Dropdown(id={"type": "fig-pick", "sec": key}, clearable=False, value=members[0],
                                       options=[{"label": m, "value": m} for m in members])],
                         className="controls", style={"maxWidth": "360px"}),
                dcc.Graph(id={"type": "fig-pick-graph", "sec": key}, figure=figs[members[0]],
                          config={"displaylogo": False}),
            ]))
    if not names:
        out.append(html.Div("This analysis returned no figures.", className="computing"))
    out.append(table_browser(key, res.tables, first=res.main))
    return out


def _generic(include=None, exclude=(), pick_groups=()):
    def render(app_ctx, key, res, figs):
        return render_generic(app_ctx, key, res, figs, include=include, exclude=exclude, pick_groups=pick_groups)
    return render


def analysis_page(path, title, intro, key, analysis, render=None, requires=(), requires_labels=()) -> Page:
    section(key, analysis, render or _generic(), requires, requires_labels)

    def layout(app_ctx):
        return html.Div([html.H2(title), html.P(intro), async_section(app_ctx, key)])

    return Page(path, title, layout)


PAGES = [
    analysis_page("/experts", "Experts",
                  "Per-expert load, co-activation within a layer, transitions between layers, and the tokens and "
                  "labels each expert specialises in (workbench analyze stats).", "experts", "stats"),
    analysis_page("/super-experts", "Super experts",
                  "Experts whose down_proj output has rare extreme outliers (Su et al.): the max |output| heatmap, "
                  "the super-expert table, massive activations per layer and pruning results "
                  "(workbench analyze super-experts).", "super-experts", "super-experts", requires=("expert_stats",)),
    analysis_page("/locality", "Locality",
                  "Local routing consistency (Liang et al.): SRP against window length m and SCH against cache size, "
                  "per layer and for the model (workbench analyze lrc).", "locality", "lrc"),
    analysis_page("/multilingual", "Multilingual",
                  "How each language's routing diverges from English per layer, pairwise language divergence and "
                  "language-specific experts (Bandarkar et al.; workbench analyze multilingual).", "multilingual",
                  "multilingual", requires_labels=("lang",)),
    analysis_page("/behavior", "Behaviour maps",
                  "fTRI: which experts light up on target prompts against control prompts, with significance, the "
                  "top-N experts and intervention results (workbench analyze behavior).", "behavior", "behavior"),
    analysis_page("/atlas", "Atlas",
                  "UMAP maps of experts by their routing profiles and of tokens by their routing vectors, coloured "
                  "by label (workbench analyze atlas).", "atlas", "atlas"),
]
