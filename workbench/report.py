"""A self-contained HTML report: analysis summaries, figures and table previews in one file.

plotly.js is inlined once, so the file opens offline in any browser and can be mailed around.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl


@dataclass
class Section:
    title: str
    summary: str = ""
    figures: dict = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    note: str = ""


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2433;background:#f6f7fb}
header{background:#1d2433;color:#fff;padding:18px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d1e3;font-size:14px}
nav{padding:10px 32px;background:#fff;border-bottom:1px solid #dde2ee;position:sticky;top:0;z-index:5}
nav a{margin-right:14px;color:#3556c8;text-decoration:none;font-size:14px}
section{background:#fff;margin:18px 32px;padding:16px 24px;border-radius:8px;border:1px solid #dde2ee}
h2{margin-top:4px}pre{background:#f1f3f9;padding:10px;border-radius:6px;white-space:pre-wrap;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px}td,th{border:1px solid #dde2ee;padding:3px 7px}
th{background:#eef1f8}.note{color:#8a5a00;background:#fff6e0;padding:8px 12px;border-radius:6px}
.figs{display:flex;flex-wrap:wrap;gap:12px}.fig{flex:1 1 560px;min-width:480px}
"""


def _table_html(df: pl.DataFrame, rows: int = 15) -> str:
    head = df.head(rows)
    cols = head.columns
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"]
    for row in head.iter_rows():
        cells = []
        for v in row:
            if isinstance(v, float):
                s = f"{v:.4g}"
            elif isinstance(v, list):
                s = "[" + ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v[:8]) + \
                    (", ..." if len(v) > 8 else "") + "]"
            else:
                s = str(v)
            cells.append(f"<td>{html.escape(s)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    more = f"<p>{df.height} rows in all; first {min(rows, df.height)} shown.</p>" if df.height > rows else ""
    return "".join(out) + more


def write_report(path: str | Path, title: str, subtitle: str, sections: list[Section]) -> Path:
    from plotly.offline import get_plotlyjs

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style><script>{get_plotlyjs()}</script></head><body>",
             f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header><nav>"]
    parts += [f"<a href='#s{i}'>{html.escape(s.title)}</a>" for i, s in enumerate(sections)]
    parts.append("</nav>")
    for i, s in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p class='note'>{html.escape(s.note)}</p>")
        if s.summary:
            parts.append(f"<pre>{html.escape(s.summary)}</pre>")
        if s.figures:
            parts.append("<div class='figs'>")
            for fig in s.figures.values():
                parts.append("<div class='fig'>" + fig.to_html(full_html=False, include_plotlyjs=False, default_width="100%",
                                                             config={"responsive": True}) + "</div>")
            parts.append("</div>")
        for name, df in s.tables.items():
            parts.append(f"<h3>{html.escape(name)}</h3>" + _table_html(df))
        parts.append("</section>")
    # Figures are drawn as their divs are parsed, before the flex layout settles: fit them once it has.
    parts.append("<script>window.addEventListener('load',function(){document.querySelectorAll('.js-plotly-plot')"
                 ".forEach(function(d){Plotly.Plots.resize(d);});});</script>")
    parts.append(f"<footer style='margin:24px 32px;color:#667'>Written {time.strftime('%Y-%m-%d %H:%M')} "
                 "by MoE Workbench.</footer></body></html>")
    path.write_text("".join(parts), encoding="utf-8")
    return path
