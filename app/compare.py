"""Compare page: this run against another run served by the same dashboard (`workbench app RUN_A RUN_B`).

Everything shown comes from `workbench.analysis.compare.analyze` and its `figures`: layer curves,
the per-expert load shift heatmap, the matched-expert table, and the per-token changed decisions.
Results are cached per (run A, run B, matching), so switching back and forth is instant.
"""

from __future__ import annotations

import threading
import time

import polars as pl
from dash import Input, Output, dash_table, dcc, html

from ..errors import WorkbenchError
from ..plots import polish_all
from .state import BoundedCache, Unavailable
from .ui import Page, graph, notice, table_page

# (run A, run B, matching) -> (result, figures); LRU-bounded: a comparison holds up to max_changes rows
_CACHE = BoundedCache(max_entries=6, max_bytes=512 << 20)
_LOCK = threading.Lock()  # guards _CACHE and _STARTED only: held for microseconds, never while computing
_COMPUTE = threading.Lock()  # one comparison at a time (two CPU cores are shared with everything else)
_STARTED: dict = {}  # key -> when its background computation started
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


def pair_for(me, runs: dict) -> str | None:
    """The served run that pairs with `me`: the same data (and model) captured another way, e.g. the demo's
    code prompts with the code experts banned against the same prompts as they are; else the same
    dataset name; else the first other run."""
    def ident(r):
        i = r.manifest.get("identity") or {}
        return i.get("data"), (i.get("model") or {}).get("spec"), (r.manifest.get("dataset") or {}).get("name")

    others = {n: r for n, r in runs.items() if str(r.path) != str(me.path)}
    if not others:
        return None
    data, spec, ds = ident(me)
    for rank in ((lambda i: i[0] == data and data is not None and i[1] == spec),
                 (lambda i: i[0] == data and data is not None), (lambda i: i[2] == ds and ds is not None)):
        hit = [n for n, r in others.items() if rank(ident(r))]
        if hit:
            return hit[0]
    return next(iter(others))


def remember(run_a, run_b, match: str, res, figs: dict) -> None:
    """Hand in a comparison computed elsewhere (the demo's), so the page shows it without recomputing."""
    with _LOCK:
        _CACHE[(str(run_a.path), str(run_b.path), match)] = (res, figs)


def cached_result(run_a, run_b, match: str):
    """(result, figures) if computed, else None (then `start` computes it in the background)."""
    return _CACHE.get((str(run_a.path), str(run_b.path), match))


def start(run_a, run_b, match: str) -> float:
    """Compute the comparison on a background thread (once); returns when it started."""
    key = (str(run_a.path), str(run_b.path), match)
    with _LOCK:
        if key not in _STARTED:
            _STARTED[key] = time.time()
            threading.Thread(target=result_for, args=(run_a, run_b, match), name="workbench-compare",
                             daemon=True).start()
        return _STARTED[key]


def result_for(run_a, run_b, match: str):
    """The comparison (cached), or Unavailable with the reason in one sentence."""
    from ..analysis import compare

    key = (str(run_a.path), str(run_b.path), match)
    with _COMPUTE:  # a request thread calling start() or cached_result() meanwhile is never blocked by this
        got = _CACHE.get(key)
        if got is None:
            try:
                res = compare.analyze(run_a, other=run_b, match=match)
                got = (res, polish_all("compare", compare.figures(res)))
            except WorkbenchError as e:
                got = (Unavailable(str(e)), {})
            except Exception as e:  # on a background thread: say it on the page rather than lose it
                got = (Unavailable(f"The comparison failed: {type(e).__name__}: {e}", kind="failed"), {})
            with _LOCK:
                _CACHE[key] = got
    with _LOCK:
        _STARTED.pop(key, None)  # done: if evicted later, a new request starts it again
    return got


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
    waiting = _pending(app_ctx)
    note = html.Div(f"Still being captured, and listed here when ready: {', '.join(waiting)}.",
                    className="computing") if waiting else html.Div()
    if not others:
        return html.Div([html.H2("Compare"), intro, note, notice(Unavailable(
            "Only one run is served, so there is nothing to compare it with.",
            f"workbench app {me.path} OTHER_RUN   (or a folder of runs, e.g. demo_out/runs)"))])
    return html.Div([
        html.H2("Compare"), intro, note,
        html.Div([
            html.Div([html.Label("A (this run)"), html.Div(me.path.name, style={"padding": "6px 0"})]),
            html.Div([html.Label("B (default: the run of the same data)"),
                      dcc.Dropdown(id="cmp-other", options=others, value=pair_for(me, runs), clearable=False)],
                     style={"minWidth": "260px"}),
            html.Div([html.Label("experts"), dcc.RadioItems(id="cmp-match", value="none", inline=True,
                                                           options=[{"label": v, "value": k}
                                                                    for k, v in MATCHES.items()])]),
        ], className="controls"),
        dcc.Interval(id="cmp-poll", interval=1000, disabled=True),
        html.Div(id="cmp-body"),
    ])


def _pending(app_ctx) -> list[str]:
    """Runs a growing dashboard (the demo's) will add later."""
    live = getattr(app_ctx.app.server, "workbench_live", None)
    return live.pending() if live is not None else []


def register(app, app_ctx) -> None:
    @app.callback(Output("cmp-body", "children"), Output("cmp-poll", "disabled"), Input("cmp-other", "value"),
                  Input("cmp-match", "value"), Input("cmp-poll", "n_intervals"))
    def show(other, match, _n):
        runs = served_runs(app_ctx)
        if not isinstance(other, str) or other not in runs:
            return notice(Unavailable(f"run {str(other)[:80]!r} is not served here")), True
        if match is not None and match not in MATCHES:  # a request's own string must not become a cache key
            return notice(Unavailable(f"unknown matching {str(match)[:40]!r}; choose from {', '.join(MATCHES)}")), True
        got = cached_result(app_ctx.run, runs[other], match or "none")
        if got is None:
            since = start(app_ctx.run, runs[other], match or "none")
            return html.Div(f"Comparing {app_ctx.run.path.name} with {other} ({time.time() - since:.0f} s so far): "
                            "routing decisions token by token, load and balance per layer. This fills in when "
                            "it is ready.", className="computing"), False
        return render(*got), True


PAGE = Page("/compare", "Compare", layout, register)
