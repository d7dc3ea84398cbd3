"""One look for every figure the workbench shows (dashboard and HTML report).

- A label keeps its colour in every plot: `colour_of(label)` draws from one palette of 48 distinct
  colours (enough for the 21 languages of the bundled data and 30+ experts), keyed by the label's
  text, the bundled datasets' labels in a fixed order first so they match between processes.
- `polish(fig, analysis, name)` fixes what the analyses' figures leave to the viewer: ratios and
  lifts (heatmaps centred at 1) on a log2 colour scale centred at 1, titles on every axis and colour
  bar, readable ticks on a second y axis, perplexity changes as ratios, percent where the summary
  says percent, super-expert rings that stand out, and a title that the plotly toolbar never covers.

Only plotly is imported; the analyses' own `figures()` are left as they are (this runs after them).
"""

from __future__ import annotations

import colorsys
import logging
import math
import threading

log = logging.getLogger("workbench.plots")

# Plotly's Alphabet (26) then Dark24 (24) less the near-duplicates: 48 colours a reader can tell apart.
_ALPHABET = ["#AA0DFE", "#3283FE", "#85660D", "#782AB6", "#565656", "#1C8356", "#16FF32", "#F7E1A0", "#E2E2E2",
             "#1CBE4F", "#C4451C", "#DEA0FD", "#FE00FA", "#325A9B", "#FEAF16", "#F8A19F", "#90AD1C", "#F6222E",
             "#1CFFCE", "#2ED9FF", "#B10DA1", "#C075A6", "#FC1CBF", "#B00068", "#FBE426", "#FA0087"]
_DARK24 = ["#2E91E5", "#E15F99", "#1CA71C", "#FB0D0D", "#DA16FF", "#222A2A", "#B68100", "#750D86", "#EB663B",
           "#511CFB", "#00A08B", "#FB00D1", "#FC0080", "#B2828D", "#6C7C32", "#778AAE", "#862A16", "#A777F1",
           "#620042", "#1616A7", "#DA60CA", "#6C4516", "#0D2A63", "#AF0038"]
# Dark24 first (they read on white), then Alphabet without its pale greys/yellows.
PALETTE = _DARK24 + [c for c in _ALPHABET if c not in ("#E2E2E2", "#F7E1A0", "#FBE426", "#16FF32")]

# The bundled datasets' label values, in a fixed order: the same colour in every process and report.
KNOWN_LABELS = ["en", "de", "fr", "es", "it", "pt-BR", "nl", "ca", "eu", "pl", "cs", "sl", "da", "el", "tr", "ru",
                "id", "ja", "ko", "zh-CN", "zh-TW",
                "code", "literature", "maths", "multilingual", "technical", "control", "target", "question",
                "refusal", "prose"]

_assigned: dict[str, str] = {}
_lock = threading.Lock()


def colour_of(label) -> str:
    """The colour of a label value (a language, a domain, a class, an expert): the same in every plot."""
    key = str(label)
    with _lock:
        if key not in _assigned:
            if not _assigned:
                for i, k in enumerate(KNOWN_LABELS):
                    _assigned[k] = PALETTE[i % len(PALETTE)]
            if key not in _assigned:
                n = len(_assigned)
                if n < len(PALETTE):
                    _assigned[key] = PALETTE[n]
                else:  # beyond the palette: golden-angle hues, still distinct from their neighbours
                    h = (n * 0.618033988749895) % 1.0
                    r, g, b = colorsys.hls_to_rgb(h, 0.42, 0.75)
                    _assigned[key] = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
        return _assigned[key]


def colour_map(labels) -> dict[str, str]:
    """{label: colour} for plotly express' color_discrete_map."""
    return {str(v): colour_of(v) for v in labels}


# Titles the analyses leave out: (analysis, figure name prefix) -> layout updates.
_TITLES = {
    ("stats", "coactivation"): {"xaxis_title": "other expert (same layer)", "yaxis_title": "expert",
                                "colorbar": "P(other | expert)"},
    ("stats", "transitions"): {"xaxis_title": "expert in the next layer", "yaxis_title": "expert",
                               "colorbar": "P(next | expert)"},
    ("stats", "label_"): {"yaxis_title": "label value"},
    ("stats", "load_balance"): {"yaxis_title": "CV of expert load (std / mean)"},
    ("super-experts", "ranked"): {"xaxis_title": "expert (layer:expert)",
                                  "yaxis_title": "max |down_proj output| (log scale)"},
    ("super-experts", "massive_activations"): {"yaxis_title": "max |h| in the residual stream (log scale)"},
    ("lrc", "srp_layers"): {"xaxis_title": "window m (tokens)"},
    ("multilingual", "pairwise_"): {"xaxis_title": "language", "yaxis_title": "language"},
    ("atlas", ""): {"xaxis_title": "UMAP 1", "yaxis_title": "UMAP 2"},
}
# Quantities the summaries give in percent: the plots do too.
_PERCENT = {"lrc": ("SRP", "hit rate", "SCH")}


def polish(fig, analysis: str = "", name: str = ""):
    """Apply the workbench's conventions to one plotly figure in place; returns it."""
    steps = [lambda: _titles(fig, analysis, name), lambda: _ratio_heatmaps(fig), lambda: _label_colours(fig),
             lambda: _second_axis(fig), lambda: _whole_layers(fig), lambda: _clear_of_toolbar(fig)]
    if analysis == "super-experts" and name == "prune_ppl":
        steps.append(lambda: _perplexity_as_ratio(fig))
    if analysis == "super-experts":
        steps.append(lambda: _visible_rings(fig))
    if analysis in _PERCENT:
        steps.append(lambda: _percent(fig, _PERCENT[analysis]))
    for step in steps:
        try:
            step()
        except Exception:  # a figure a rule does not expect keeps what the analysis drew for that rule
            log.debug("plot rule failed on %s/%s", analysis, name, exc_info=True)
    return fig


def polish_all(analysis: str, figs: dict) -> dict:
    for n, f in (figs or {}).items():
        polish(f, analysis, n)
    return figs


def _titles(fig, analysis, name):
    for (a, prefix), upd in _TITLES.items():
        if a != analysis or not name.startswith(prefix):
            continue
        for k in ("xaxis_title", "yaxis_title"):
            ax = fig.layout[k.split("_")[0]]
            if k in upd and not (ax.title and ax.title.text):
                ax.title = upd[k]
        if "colorbar" in upd:
            for t in fig.data:
                if t.type == "heatmap" and not (t.colorbar.title and t.colorbar.title.text):
                    t.colorbar.title = upd["colorbar"]


def _is_seq(v) -> bool:
    return v is not None and not isinstance(v, str) and hasattr(v, "__len__")


def _array(v):
    """A trace's data as a float array (plotly may hold it as a typed-array dict: dtype, bdata, shape)."""
    import numpy as np

    if isinstance(v, dict) and "bdata" in v:
        import base64

        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        shape = v.get("shape")
        if shape:
            a = a.reshape([int(x) for x in str(shape).split(",")] if isinstance(shape, str) else shape)
        return a.astype(float)
    return np.asarray(v, dtype=float)


def _ratio_heatmaps(fig):
    """A heatmap centred at 1 (a lift or a ratio, never negative) on a log2 scale: 1/4 and 4 equally far
    from 1, and a colour bar that names ratios instead of running below zero."""
    import numpy as np

    for t in fig.data:
        if t.type != "heatmap" or t.zmid != 1 or t.z is None:
            continue
        z = _array(t.z)
        fin = z[np.isfinite(z)]
        if fin.size == 0 or fin.min() < 0:
            continue
        pos = fin[fin > 0]
        floor = max(pos.min() if pos.size else 1 / 64, 1 / 64)
        lz = np.log2(np.clip(z, floor, None))
        span = max(1.0, float(np.nanmax(np.abs(lz[np.isfinite(lz)]))) if np.isfinite(lz).any() else 1.0)
        span = min(span, 6.0)
        ticks = [v for v in range(-6, 7) if abs(v) <= math.ceil(span)]
        title = t.colorbar.title.text if t.colorbar.title and t.colorbar.title.text else "ratio"
        t.update(z=lz, zmid=0, zmin=-span, zmax=span, customdata=z,
                 hovertemplate="x %{x}<br>y %{y}<br>ratio %{customdata:.3g}<extra></extra>",
                 colorbar=dict(title=f"{title} (log scale, 1 = no change)", tickvals=ticks,
                               ticktext=[_ratio_text(v) for v in ticks]))


def _ratio_text(log2v: int) -> str:
    return f"{2 ** log2v:g}" if log2v >= 0 else f"1/{2 ** -log2v:g}"


def _label_colours(fig):
    """Traces named by a label take its colour; figures drawn over a heatmap keep their own contrast."""
    if any(t.type == "heatmap" for t in fig.data):
        return
    for t in fig.data:
        if t.type not in ("scatter", "scattergl", "bar", "box") or not t.name:
            continue
        marker = getattr(t, "marker", None)
        if marker is not None and _is_seq(marker.color):
            continue  # per-point colours carry their own meaning
        c = colour_of(t.name)
        if marker is not None:
            marker.color = c
        if t.type in ("scatter", "scattergl") and t.line is not None:
            t.line.color = c
        if t.type == "box":
            t.line.color = c


def _nice_axis(x: float) -> tuple[float, float]:
    """(top, step) for an axis from 0 past x: a round step (1, 2, 2.5 or 5 times a power of ten) and 4 to 6
    steps, the last at or above x."""
    if x <= 0:
        return 1.0, 0.2
    for k in range(math.floor(math.log10(x)) - 2, math.floor(math.log10(x)) + 2):
        for m in (1, 2, 2.5, 5):
            step = m * 10 ** k
            n = math.ceil(x * 0.9999 / step)
            if 4 <= n <= 6:
                return round(n * step, 12), step
    return x, x / 5


def _second_axis(fig):
    """Two y axes: each from 0 to a round top with five equal steps, so ticks read (0.2, 0.4, ...) and no
    line runs above the last tick."""
    L = fig.layout
    if "yaxis2" not in L or not L.yaxis2.overlaying:
        return
    for axis, ref in (("yaxis", "y"), ("yaxis2", "y2")):
        ax = L[axis]
        if ax.type == "log":
            continue
        ys = [float(v) for t in fig.data if (t.yaxis or "y") == ref and t.y is not None
              for v in _array(t.y).ravel() if v == v]
        if not ys or min(ys) < 0:
            continue
        top, step = _nice_axis(max(ys))
        ax.update(range=[0, top], tickmode="linear", tick0=0, dtick=step, rangemode=None,
                  showgrid=axis == "yaxis", zeroline=True)


def _whole_layers(fig):
    """A numeric axis of layers (or experts) ticks at whole numbers, not 0.5 steps."""
    L = fig.layout
    for axis in ("xaxis", "yaxis"):
        ax = L[axis]
        title = (ax.title.text or "").lower() if ax.title else ""
        if title in ("layer", "expert") and ax.type not in ("category", "log") and ax.tickmode != "array":
            ax.update(tickformat="d", dtick=None if ax.dtick and ax.dtick >= 1 else 1) if title == "layer" else \
                ax.update(tickformat="d")


def _perplexity_as_ratio(fig):
    """Perplexity bars -> perplexity / baseline on a log axis centred at 1 (9.82 vs 9.87 shows)."""
    bar = next((t for t in fig.data if t.type == "bar"), None)
    if bar is None or bar.x is None or "baseline" not in list(bar.x):
        return
    xs, ys = list(bar.x), [float(v) for v in _array(bar.y)]
    base = ys[xs.index("baseline")]
    if base <= 0:
        return
    ratio = [y / base for y in ys]
    span = max(0.01, max(abs(math.log10(r)) for r in ratio if r > 0)) * 1.25
    bar.update(y=[r - 1 for r in ratio], base=1, customdata=ys, text=[f"×{r:.4g}" for r in ratio],
               textposition="outside", hovertemplate="%{x}: perplexity %{customdata:.4g} (×%{text})<extra></extra>",
               marker_color=["#868e96" if x == "baseline" else colour_of(x) for x in xs])
    fig.update_layout(yaxis=dict(type="log", range=[-span, span], title="perplexity ÷ baseline (log scale)"),
                      xaxis_title="experts zeroed", title="Perplexity with experts zeroed, relative to none zeroed")
    fig.add_hline(y=1, line_color="#343a40", line_width=1)


def _visible_rings(fig):
    """Super-expert circles over the Inferno heatmap: a dark ring under a bright one reads on any cell."""
    import plotly.graph_objects as go

    rings = [t for t in fig.data if t.type == "scatter" and t.name == "super expert"]
    for t in rings:
        t.marker.update(size=16, color="#00e5ff", line=dict(width=3, color="#00e5ff"))
        under = go.Scatter(x=t.x, y=t.y, mode="markers", hoverinfo="skip", showlegend=False,
                           marker=dict(symbol="circle-open", size=20, color="black", line=dict(width=5, color="black")))
        fig.add_trace(under)
    if rings:  # the bright ring on top
        fig.data = tuple([t for t in fig.data if t not in rings] + rings)


def _percent(fig, names):
    L = fig.layout
    for axis in ("xaxis", "yaxis"):
        ax = L[axis]
        if ax.title and ax.title.text and any(n.lower() in ax.title.text.lower() for n in names) and ax.type != "log":
            ax.tickformat = ".0%"
            if "%" not in ax.title.text:
                ax.title.text = f"{ax.title.text} (%)"
    for t in fig.data:
        if t.type == "heatmap" and t.colorbar.title and t.colorbar.title.text in names:
            t.colorbar.tickformat = ".0%"
            t.colorbar.title.text = f"{t.colorbar.title.text} (%)"


def _clear_of_toolbar(fig):
    """Title left-aligned in the top margin, below the band where the plotly toolbar appears; a layer
    dropdown (updatemenus) moves to the top right under the toolbar, clear of both."""
    L = fig.layout
    has_menu = bool(L.updatemenus)
    top = 110 if has_menu else 80
    m = L.margin
    fig.update_layout(margin=dict(t=max(top, m.t or 0), l=m.l if m.l is not None else 70,
                                  r=m.r if m.r is not None else 30, b=m.b if m.b is not None else 60))
    if L.title and L.title.text:
        fig.update_layout(title=dict(x=0, xref="paper", xanchor="left", y=1, yref="paper", yanchor="bottom",
                                     pad=dict(b=44 if has_menu else 12), font=dict(size=15)))
    for menu in L.updatemenus or ():
        menu.update(x=1, xanchor="right", y=1.01, yanchor="bottom", pad=dict(t=0, b=4))
