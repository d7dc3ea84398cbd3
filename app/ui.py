"""Shared pieces of the dashboard: style, notices, figures, the table browser, expert colours."""

from __future__ import annotations

import colorsys
import time

import polars as pl
from dash import dash_table, dcc, html

from .state import Unavailable

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #f6f7f9; }
#wb-nav { display: flex; flex-wrap: wrap; gap: 2px; padding: 6px 12px; background: #1d2330; align-items: center; }
#wb-nav a { color: #d6dbe6; text-decoration: none; padding: 6px 10px; border-radius: 4px; font-size: 14px; }
#wb-nav a:hover { background: #323a4d; }
#wb-nav a.active { background: #4c6ef5; color: white; }
#wb-nav .brand { color: white; font-weight: 600; margin-right: 14px; }
#wb-page { padding: 14px 20px; }
h2 { margin: 6px 0 12px 0; font-size: 22px; }
h3 { margin: 14px 0 6px 0; font-size: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: white; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px 14px; min-width: 220px; flex: 1; }
.card dt { font-size: 12px; color: #667; } .card dd { margin: 0 0 6px 0; font-size: 14px; word-break: break-word; }
.notice { background: #fff8e1; border: 1px solid #f0d67a; border-radius: 6px; padding: 10px 14px; margin: 8px 0; }
.notice.failed { background: #fdecea; border-color: #f3a9a0; }
.notice code, .hint { display: block; background: #1d2330; color: #e8ecf4; padding: 6px 10px; border-radius: 4px;
  margin-top: 6px; font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; }
.computing { color: #555; padding: 10px 0; }
.summary { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; background: white;
  border: 1px solid #dde1e8; border-radius: 6px; padding: 8px 12px; }
.tokens { background: white; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px; line-height: 1.9;
  font-family: ui-monospace, monospace; font-size: 14px; white-space: pre-wrap; max-height: 420px; overflow-y: auto; }
.tok { cursor: pointer; padding: 1px 0; margin-right: 1px; border-radius: 2px; }
.tok:hover { outline: 1px solid #333; }
.tok.selected { outline: 2px solid #d6336c; }
.tok.changed { background: #ffd8a8; text-decoration: underline wavy #e8590c; }
.row { display: flex; gap: 16px; flex-wrap: wrap; align-items: flex-start; }
.col { flex: 1; min-width: 320px; }
.controls { display: flex; gap: 14px; flex-wrap: wrap; align-items: flex-end; margin-bottom: 10px; }
.controls > div { min-width: 160px; }
.controls label { font-size: 12px; color: #556; display: block; }
.chip { display: inline-block; padding: 2px 8px; margin: 2px; border-radius: 10px; font-size: 13px; color: white; }
.chip.ban { background: #e03131; } .chip.force { background: #2f9e44; } .chip.boost { background: #1971c2; }
.chip.zero { background: #495057; }
.error { color: #c92a2a; font-size: 13px; min-height: 1em; }
.gen { background: white; border: 1px solid #dde1e8; border-radius: 6px; padding: 10px; white-space: pre-wrap;
  font-family: ui-monospace, monospace; font-size: 14px; min-height: 3em; }
.legend span { display: inline-block; padding: 1px 6px; margin: 1px; border-radius: 3px; font-size: 12px; }
"""

INDEX = """<!DOCTYPE html>
<html>
    <head>
        {%metas%}
        <title>{%title%}</title>
        {%favicon%}
        {%css%}
        <style>""" + CSS + """</style>
    </head>
    <body>
        {%app_entry%}
        <footer>
            {%config%}
            {%scripts%}
            {%renderer%}
        </footer>
    </body>
</html>"""

GRAPH_CONFIG = {"displaylogo": False, "responsive": True}


def expert_colour(e: int, n_experts: int) -> str:
    """A light, distinct background colour per expert (golden-angle hues), readable under dark text."""
    if e < 0:
        return "#e9ecef"
    h = (e * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(h, 0.80, 0.70)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def notice(u: Unavailable) -> html.Div:
    body = [html.Div(u.message)]
    if u.hint:
        body.append(html.Div(["To fill this page: ", html.Code(u.hint)]))
    return html.Div(body, className=f"notice {u.kind}")


def computing(what: str, started: float | None, running: float | None = None, model: bool = False,
              behind: str | None = None) -> html.Div:
    """The notice of a section still being computed: queued (behind what, for how long) or running."""
    if started and running is None and (behind or model):
        ahead = (f"it starts when the {behind.replace(':loop', ' closed-loop')} analysis before it is done" if behind
                 else "the live model is busy (a capture, another closed loop or the Steering lab); it starts "
                      "when the model is free")
        return html.Div(f"Queued: the {what} analysis ({time.time() - started:.0f} s so far); {ahead}. "
                        "This page fills in when it is ready.", className="computing")
    secs = f" ({time.time() - (running or started):.0f} s so far)" if (running or started) else ""
    return html.Div(f"Computing the {what} analysis{secs}. It is computed once per run and cached; "
                    "this page fills in when it is ready.", className="computing")


def graph(fig, gid=None, height=None) -> dcc.Graph:
    kw = {"id": gid} if gid is not None else {}
    if height:
        fig.update_layout(height=height)
    return dcc.Graph(figure=fig, config=GRAPH_CONFIG, **kw)


def card(title: str, items: list[tuple[str, object]]) -> html.Div:
    dl = []
    for k, v in items:
        dl += [html.Dt(k), html.Dd(v if v not in (None, "") else "-")]
    return html.Div([html.H3(title), html.Dl(dl)], className="card")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# -- the table browser: any table of a page, paged and sorted on the server -----------------------

PAGE_SIZE = 15


def table_browser(page: str, tables: dict[str, pl.DataFrame], first: str | None = None) -> html.Div:
    names = [n for n, t in tables.items() if isinstance(t, pl.DataFrame)]
    if not names:
        return html.Div()
    first = first if first in names else names[0]
    return html.Div([
        html.H3("Tables"),
        html.Div([html.Div([html.Label("table"),
                            dcc.Dropdown(id={"type": "tbl-select", "page": page}, clearable=False,
                                         options=[{"label": f"{n} ({tables[n].height:,} rows)", "value": n}
                                                  for n in names], value=first)], style={"minWidth": "340px"}),
                  html.Div([dcc.Link("download it on the Export page", href="/export")])], className="controls"),
        dash_table.DataTable(id={"type": "tbl", "page": page}, page_current=0, page_size=PAGE_SIZE,
                             page_action="custom", sort_action="custom", sort_mode="single", sort_by=[],
                             style_table={"overflowX": "auto"},
                             style_cell={"fontFamily": "ui-monospace, monospace", "fontSize": 13,
                                         "maxWidth": 360, "overflow": "hidden", "textOverflow": "ellipsis"}),
    ])


def table_page(df: pl.DataFrame, page_current: int, page_size: int, sort_by) -> tuple[list, list, int]:
    """One page of a frame as DataTable rows; lists shown as text, floats rounded for reading."""
    if sort_by:
        col = sort_by[0]["column_id"]
        if col in df.columns and not isinstance(df.schema[col], (pl.List, pl.Array, pl.Struct)):
            df = df.sort(col, descending=sort_by[0]["direction"] == "desc", nulls_last=True)
    n_pages = max(1, -(-df.height // page_size))
    page_current = min(max(int(page_current or 0), 0), n_pages - 1)
    part = df.slice(page_current * page_size, page_size)
    exprs = []
    for c, t in part.schema.items():
        if isinstance(t, (pl.List, pl.Array)):
            exprs.append(pl.col(c).cast(pl.List(pl.Utf8)).list.join(", ").alias(c))
        elif isinstance(t, pl.Struct) or t == pl.Object:
            exprs.append(pl.col(c).cast(pl.Utf8, strict=False).alias(c))
        elif t.is_float():
            exprs.append(pl.col(c).round_sig_figs(5).alias(c))
        elif t.is_temporal():
            exprs.append(pl.col(c).cast(pl.Utf8))
    if exprs:
        part = part.with_columns(exprs)
    columns = [{"name": c, "id": c} for c in df.columns]
    return part.to_dicts(), columns, n_pages


class Page:
    """A dashboard page: its path, its navigation title, a layout builder and its callbacks."""

    def __init__(self, path: str, title: str, layout, register=None):
        self.path, self.title, self._layout, self._register = path, title, layout, register

    def layout(self, ctx):
        return self._layout(ctx)

    def register(self, app, ctx) -> None:
        if self._register:
            self._register(app, ctx)
