"""Overview: what the run is (model, data, probes, interventions, sizes) and the layer x expert load."""

from __future__ import annotations

from dash import dcc, html

from .analyses import async_section, section
from .ui import Page, card, graph, human_bytes


def _load_figure(app_ctx, key, res, figs):
    names = [n for n in ("expert_share", "load_balance") if n in figs] or [n for n in figs if "load" in n][:1]
    if not names:
        return html.Div("The stats analysis returned no load figure.", className="computing")
    return [graph(figs[n]) for n in names] + [
        html.Div(["Per-expert statistics, co-activation, transitions and top tokens on the ",
                  dcc.Link("Experts", href=app_ctx.href("/experts")), " page."], style={"fontSize": "13px"})]


section("overview-load", "stats", _load_figure)


def _fmt(v) -> str:
    """A manifest value as a person reads it: 'seq_len 256 · batch_size 8', 'ban L0:E4, L1:E7'; unset
    options (None, empty) are left out."""
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if v else "-"
    if isinstance(v, dict):
        parts = [f"{k.replace('_', ' ')} {_fmt(x)}" if not isinstance(x, bool) else (k.replace("_", " ") if x else "")
                 for k, x in v.items() if x not in (None, "", [], {})]
        parts = [p for p in parts if p]
        return " · ".join(parts) if parts else "-"
    return "-" if v is None else str(v)


def _probe_items(probes: dict) -> list:
    """One line per probe: its table name, then its options in words ('routing: with router logits')."""
    words = {"logits": "with router logits", "margin": "with router margins"}
    out = []
    for name, opts in (probes or {}).items():
        opts = {k: x for k, x in (opts or {}).items() if x not in (None, "", [], {}, False)}
        said = [words[k] for k in opts if k in words and opts[k] is True]
        rest = _fmt({k: x for k, x in opts.items() if k not in words})
        detail = ", ".join(said + ([rest] if rest != "-" else []))
        out.append(html.Div(f"{name}" + (f": {detail}" if detail else "")))
    return out or "-"


def layout(app_ctx):
    run, m, s = app_ctx.run, app_ctx.run.manifest, app_ctx.data.summary()
    mi = m.get("model", {})
    ds = m.get("dataset", {})
    moe = mi.get("moe_layers", [])
    model = card("Model", [
        ("spec", mi.get("spec")), ("model type / family", f"{mi.get('model_type')} / {mi.get('family')}"),
        ("routing rule", mi.get("routing_rule")),
        ("layers", f"{mi.get('n_layers')} decoder layers, {len(moe)} MoE ({_ranges(moe)})"),
        ("experts", f"{mi.get('n_experts')} routed, top-{mi.get('top_k')}, {mi.get('shared_experts', 0)} shared"),
        ("dtype / device", f"{m.get('dtype')} / {m.get('device')}"),
    ])
    data = card("Data", [
        ("dataset", ds.get("name")), ("records", ds.get("records")),
        ("labels", ", ".join(f"{c}: {', '.join(v for v, _ in vals[:6])}{'…' if len(vals) > 6 else ''}"
                             for c, vals in s["labels"].items()) or "-"),
        ("status", f"{m.get('status')} (created {m.get('created', '-')}, finished {m.get('finished', '-')})"),
    ])
    probes = card("Probes and interventions", [
        ("probes", _probe_items(m.get("probes"))),
        ("interventions", _fmt(m.get("interventions"))),
        ("settings", _fmt({k: v for k, v in (m.get("settings") or {}).items() if k != "probes" and v is not None})),
    ])
    sizes = card("Sizes", [("captured", f"{s['tokens']:,} tokens in {s['docs']:,} documents")] + [
        (t, f"{v['rows']:,} rows, {human_bytes(v['bytes'])}, {v['parts']} part{'s' if v['parts'] != 1 else ''}")
        for t, v in s["tables"].items()
    ])
    versions = m.get("versions") or {}
    ver = html.Div(" · ".join(f"{k} {v}" for k, v in versions.items()), style={"fontSize": "12px", "color": "#667",
                                                                                 "marginTop": "6px"})
    return html.Div([
        html.H2(f"Run {run.path.name}"),
        html.Div([model, data, probes, sizes], className="cards"), ver,
        html.H3("Load per layer and expert"),
        _load_section(app_ctx),
    ])


def _load_section(app_ctx):
    run = app_ctx.run
    if not run.has("routing") and run.has("expert_load"):  # an engine's aggregated dump: counts only
        from .placement import counts_only_overview

        return counts_only_overview(app_ctx)
    return async_section(app_ctx, "overview-load")


def _ranges(xs) -> str:
    xs = sorted(int(x) for x in xs)
    if not xs:
        return "-"
    out, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(out)


PAGE = Page("/", "Overview", layout)
