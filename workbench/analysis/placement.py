"""Expert placement: how evenly a run's routing loads the GPUs of an expert-parallel deployment.

Load of an expert = routed (token, slot) pairs in a window of tokens. With EP degree G the experts of a
layer sit on G GPUs; a GPU's load is the sum of its experts' loads (a replicated expert's load split
evenly over its replicas, as the engines dispatch). Balancedness = mean / max GPU load (SGLang's
"utilization rate"; 1 = perfect), per layer and window.

Placements compared: `contiguous` (expert e on GPU e // (E / G), the engines' default) and `eplb`,
the DeepSeek EPLB scheme: give the R redundant slots one at a time to the expert with the highest
load per replica, then pack the replicas onto GPUs heaviest first, each to the least-loaded GPU with
a free slot (every GPU holds (E + R) / G). The placement is fitted on the first `fit_fraction` of the
windows and judged on the rest (held out), so the prediction is not graded on its own data.

Export: SGLang's `--init-expert-location` JSON ({"physical_to_logical_map": [layer][physical]},
physical id = gpu * slots + slot, one row per decoder layer). vLLM has no placement file: its EPLB
rebalances online (`--enable-eplb`, `--eplb-config '{"num_redundant_experts": R}'`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult

PLACEMENTS = ("contiguous", "eplb")


def window_loads(run, window: int = 1024) -> tuple[np.ndarray, list[int], int, str]:
    """counts [W, L, E] per window (of `window` tokens of routing, or the recorder's own windows)."""
    layers = sorted(run.moe_layers)
    E = run.n_experts
    if run.has("routing"):
        from .common import routing_arrays

        ra = routing_arrays(run)
        T = len(ra.doc)
        if window < 1:
            raise WorkbenchError("--window must be at least 1 token")
        W = max(1, -(-T // window))
        win = np.minimum(np.arange(T) // window, W - 1)
        ex = ra.experts.astype(np.int64)
        ok = (ex >= 0) & (ex < E)
        idx = (win[:, None, None] * len(layers) + np.arange(len(layers))[None, :, None]) * E + ex
        counts = np.bincount(idx[ok], minlength=W * len(layers) * E).reshape(W, len(layers), E)
        return counts, layers, min(window, T), "tokens"
    if run.has("expert_load"):
        df = run.table("expert_load").collect()
        W = int(df["window"].max()) + 1
        li = {lay: i for i, lay in enumerate(layers)}
        counts = np.zeros((W, len(layers), E), np.int64)
        counts[df["window"].to_numpy(), [li[int(x)] for x in df["layer"].to_numpy()], df["expert"].to_numpy()] = \
            df["count"].to_numpy()
        # a recorder window with no count is an unused slot of its circular buffer (runs imported before
        # the importer dropped them), not an idle step: fitting or judging on it says nothing
        counts = counts[counts.reshape(W, -1).any(axis=1)]
        if not len(counts):
            raise WorkbenchError(f"run {run.path} holds no expert load: every recorded window is empty")
        return counts, layers, 1, run.manifest.get("import", {}).get("window", "window")
    raise WorkbenchError(f"run {run.path} has neither routing nor expert_load counts")


def contiguous(E: int, ep: int, redundant: int = 0) -> np.ndarray:
    """[G, slots] logical expert per physical slot: experts in order, spare slots repeat 0, 1, ... (p % E)."""
    slots = (E + redundant) // ep
    return (np.arange(ep * slots) % E).reshape(ep, slots)


def eplb(load: np.ndarray, ep: int, redundant: int) -> np.ndarray:
    """DeepSeek-EPLB-style placement of one layer: load [E] -> [G, slots] logical expert per slot."""
    E = len(load)
    slots = (E + redundant) // ep
    load = np.asarray(load, np.float64)
    reps = np.ones(E, np.int64)
    for _ in range(redundant):
        reps[np.argmax(load / reps)] += 1
    items = np.repeat(np.arange(E), reps)
    per = (load / reps)[items]
    order = np.lexsort((items, -per))  # heaviest first, ties by expert id (deterministic)
    gpu_load = np.zeros(ep)
    fill = np.zeros(ep, np.int64)
    out = np.full((ep, slots), -1, np.int64)
    for i in order:
        e = items[i]
        free = fill < slots
        holds = (out == e).any(axis=1)
        cand = np.flatnonzero(free & ~holds)
        if not len(cand):
            cand = np.flatnonzero(free)
        g = cand[np.argmin(gpu_load[cand])]
        out[g, fill[g]] = e
        fill[g] += 1
        gpu_load[g] += per[i]
    return out


def gpu_loads(counts: np.ndarray, placement: np.ndarray) -> np.ndarray:
    """counts [..., E], placement [G, slots] -> load per GPU [..., G] (replicas share evenly)."""
    E = counts.shape[-1]
    reps = np.bincount(placement.reshape(-1), minlength=E).astype(np.float64)
    share = counts / np.where(reps > 0, reps, 1.0)
    return share[..., placement].sum(-1)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """mean / max over the last axis (GPUs); 1 where nothing was routed."""
    mx = loads.max(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mx > 0, loads.mean(-1) / np.where(mx > 0, mx, 1.0), 1.0)


def analyze(run, ep: int = 8, redundant: int | None = None, window: int = 1024, fit_fraction: float = 0.5,
            export: str | None = None, progress: bool = False) -> AnalysisResult:
    """Tables: balance (main; layer x window x placement: max/mean GPU load, balancedness, held_out),
    layers (per layer, held-out windows: mean balancedness and max/mean load before and after),
    placement (layer, gpu, slot, physical, expert of the suggested placement), experts (load, replicas).

    ep: expert-parallel degree (GPUs); redundant: extra physical slots per layer (default ep, one
    spare a GPU); window: tokens per window; export: write SGLang's placement JSON there."""
    E = run.n_experts
    if ep < 1 or ep > E + (redundant or 0):
        raise WorkbenchError(f"--ep must be between 1 and the number of physical experts, got {ep}")
    redundant = ep if redundant is None else int(redundant)
    if redundant < 0 or (E + redundant) % ep:
        raise WorkbenchError(f"experts + redundant ({E} + {redundant}) must divide evenly over --ep {ep} GPUs")
    if not 0 < fit_fraction <= 1:
        raise WorkbenchError("--fit-fraction must be in (0, 1]")
    counts, layers, win_size, unit = window_loads(run, window)
    W = counts.shape[0]
    n_fit = max(1, int(round(W * fit_fraction)))
    held = np.arange(W) >= n_fit if n_fit < W else np.ones(W, bool)  # all windows when nothing is left out
    base = contiguous(E, ep, redundant)  # SGLang's trivial map: physical p holds expert p % E
    rows, lay_rows, pl_rows, ex_rows = [], [], [], []
    for li, layer in enumerate(layers):
        c = counts[:, li, :].astype(np.float64)
        fit_load = c[:n_fit].sum(0)
        plan = eplb(fit_load, ep, redundant)
        reps = np.bincount(plan.reshape(-1), minlength=E)
        summary = {"layer": layer}
        for name, pmap in (("contiguous", base), ("eplb", plan)):
            g = gpu_loads(c, pmap)  # [W, G]
            b = balancedness(g)
            rows.append(pl.DataFrame({"layer": np.full(W, layer, np.int16), "window": np.arange(W, dtype=np.int64),
                                      "placement": [name] * W, "max_load": g.max(-1), "mean_load": g.mean(-1),
                                      "balancedness": b, "held_out": held, "tokens": c.sum(-1) / run.top_k}))
            gh = gpu_loads(c[held].sum(0), pmap)
            summary[f"balancedness_{name}"] = float(b[held].mean())
            summary[f"max_over_mean_{name}"] = float(gh.max() / gh.mean()) if gh.mean() > 0 else 1.0
        lay_rows.append(summary)
        for gi in range(ep):
            for s in range(plan.shape[1]):
                pl_rows.append((layer, gi, s, gi * plan.shape[1] + s, int(plan[gi, s])))
        ex_rows.append(pl.DataFrame({"layer": np.full(E, layer, np.int16), "expert": np.arange(E, dtype=np.int16),
                                     "load_fit": fit_load, "load_held_out": c[held].sum(0), "replicas": reps}))
    balance = pl.concat(rows)
    lay = pl.DataFrame(lay_rows).with_columns(pl.col("layer").cast(pl.Int16))
    placement = pl.DataFrame(pl_rows, schema=["layer", "gpu", "slot", "physical", "expert"], orient="row")
    experts = pl.concat(ex_rows)
    mb, ma = lay["balancedness_contiguous"].mean(), lay["balancedness_eplb"].mean()
    summary = (f"placement over EP={ep} GPUs, {E} experts + {redundant} redundant slots, {W} windows of {win_size} "
               f"{unit} (fit on {n_fit}, judged on {int(held.sum())}{' held out' if n_fit < W else ''}): "
               f"mean balancedness contiguous {mb:.3f} -> eplb {ma:.3f}; max/mean GPU load "
               f"{lay['max_over_mean_contiguous'].mean():.3f} -> {lay['max_over_mean_eplb'].mean():.3f}")
    order = (run.manifest.get("import") or {}).get("window_order", "")
    if order.startswith("unknown"):
        summary += ("\nthe recorder's buffer was full, so it may have wrapped: window order is unknown and the "
                    "held-out windows are not necessarily the later ones")
    res = AnalysisResult("placement", {"balance": balance, "layers": lay, "placement": placement, "experts": experts},
                         main="balance", summary=summary,
                         meta={"ep": ep, "redundant": redundant, "n_layers": int(run.model_info.get("n_layers") or
                                                                             max(layers) + 1),
                               "n_experts": E})
    if export:
        export_sglang(res, export)
        res.summary += f"\nwrote SGLang placement JSON to {export}"
    return res


def sglang_map(result: AnalysisResult) -> list[list[int]]:
    """physical_to_logical_map [decoder layer][physical expert]; dense layers get the trivial map.

    Read from the `placement` table, not `meta`: a result reloaded from RUN/analyses/ has its meta
    through JSON (layer keys become strings, arrays lists)."""
    m = result.meta
    n_phys = int(m["n_experts"]) + int(m["redundant"])
    trivial = [p % int(m["n_experts"]) for p in range(n_phys)]
    rows = [list(trivial) for _ in range(int(m["n_layers"]))]
    for (layer,), g in result.tables["placement"].sort("layer", "physical").group_by("layer", maintain_order=True):
        rows[int(layer)] = [int(x) for x in g["expert"].to_list()]
    return rows


def export_sglang(result: AnalysisResult, path) -> Path:
    """Write the placement as SGLang's `--init-expert-location` JSON (set `--ep-num-redundant-experts`
    to the redundant count and `--ep-size` to the EP degree)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"physical_to_logical_map": sglang_map(result)}))
    return p


def after(result: AnalysisResult, options: dict) -> None:
    """Side effects of the options when a stored result is reused (`analyze` itself was not called)."""
    if options.get("export"):
        export_sglang(result, options["export"])


def hot_experts(result: AnalysisResult) -> pl.DataFrame:
    """The experts the suggestion replicates, hottest first: layer, expert, replicas, load share (fit)."""
    ex = result.tables["experts"]
    return (ex.with_columns((pl.col("load_fit") / pl.col("load_fit").sum().over("layer")).alias("share_fit"),
                            (pl.col("load_fit") / pl.col("load_fit").mean().over("layer")).alias("load_over_mean"))
            .filter(pl.col("replicas") > 1)
            .sort(["load_over_mean", "layer", "expert"], descending=[True, False, False])
            .select("layer", "expert", "replicas", "load_fit", "load_held_out", "share_fit", "load_over_mean"))


def window_figure(result: AnalysisResult, layer: int):
    """Balancedness of one layer over the windows, contiguous vs the suggestion; fitted windows shaded."""
    import plotly.graph_objects as go

    b = result.tables["balance"].filter(pl.col("layer") == int(layer)).sort("window")
    f = go.Figure()
    for name, label in (("contiguous", "contiguous (default)"), ("eplb", "eplb (suggested)")):
        r = b.filter(pl.col("placement") == name)
        f.add_trace(go.Scatter(x=r["window"].to_list(), y=r["balancedness"].to_list(), mode="lines+markers",
                               name=label))
    fit = b.filter((pl.col("placement") == "eplb") & ~pl.col("held_out"))["window"]
    if len(fit) and (~b["held_out"]).any() and b["held_out"].any():
        f.add_vrect(x0=float(fit.min()) - 0.5, x1=float(fit.max()) + 0.5, fillcolor="#adb5bd", opacity=0.2,
                    line_width=0, annotation_text="fit windows", annotation_position="top left")
    f.update_layout(title=f"Layer {int(layer)}: balancedness per window (EP={result.meta['ep']})",
                    xaxis_title="window", yaxis_title="balancedness (mean/max GPU load)", yaxis_range=[0, 1.05],
                    template="plotly_white")
    return f


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    lay = result.tables["layers"].sort("layer")
    figs = {}
    x = [str(v) for v in lay["layer"].to_list()]
    f = go.Figure([go.Bar(name="contiguous", x=x, y=lay["balancedness_contiguous"].to_list()),
                   go.Bar(name="eplb (suggested)", x=x, y=lay["balancedness_eplb"].to_list())])
    f.update_layout(title=f"Balancedness (mean/max GPU load) per layer, EP={result.meta['ep']}, held-out windows",
                    xaxis_title="layer", yaxis_title="balancedness", yaxis_range=[0, 1.05], barmode="group",
                    template="plotly_white")
    figs["balancedness"] = f
    m = go.Figure([go.Bar(name="contiguous", x=x, y=lay["max_over_mean_contiguous"].to_list()),
                   go.Bar(name="eplb (suggested)", x=x, y=lay["max_over_mean_eplb"].to_list())])
    m.update_layout(title="Predicted max / mean GPU load per layer, held-out windows (1 = even)",
                    xaxis_title="layer", yaxis_title="max / mean GPU load", barmode="group", template="plotly_white")
    figs["max_over_mean"] = m
    ex = result.tables["experts"].with_columns((pl.col("load_fit") + pl.col("load_held_out")).alias("load"))
    ex = ex.with_columns((pl.col("load") / pl.col("load").sum().over("layer")).fill_nan(0.0).alias("share"))
    piv = ex.pivot(on="expert", index="layer", values="share", sort_columns=True).sort("layer")
    cols = [c for c in piv.columns if c != "layer"]
    h = go.Figure(go.Heatmap(z=piv.select(cols).to_numpy(), x=cols, y=[str(v) for v in piv["layer"]],
                             colorscale="Viridis", colorbar=dict(title="share")))
    h.update_layout(title="Share of each layer's load per expert (all windows)", xaxis_title="expert",
                    yaxis_title="layer", xaxis_type="category", yaxis_type="category", template="plotly_white")
    figs["expert_load"] = h
    b = result.tables["balance"]
    for name in ("contiguous", "eplb"):
        piv = b.filter(pl.col("placement") == name).pivot(on="window", index="layer", values="balancedness",
                                                           sort_columns=True).sort("layer")
        cols = [c for c in piv.columns if c != "layer"]
        h = go.Figure(go.Heatmap(z=piv.select(cols).to_numpy(), x=cols, y=[str(v) for v in piv["layer"]],
                                 zmin=0, zmax=1, colorscale="Viridis", colorbar=dict(title="balancedness")))
        h.update_layout(title=f"Balancedness per layer and window: {name}", xaxis_title="window",
                        yaxis_title="layer", yaxis_type="category", template="plotly_white")
        figs[f"windows_{name}"] = h
    return figs


def add_arguments(parser) -> None:
    from ..options import at_least, between

    parser.add_argument("--ep", type=at_least(1), default=8, help="expert-parallel degree: GPUs a layer's experts spread over")
    parser.add_argument("--redundant", type=at_least(0), help="redundant expert slots per layer (default: --ep)")
    parser.add_argument("--window", type=at_least(1), default=1024, help="tokens per window (default 1024)")
    parser.add_argument("--fit-fraction", type=between(0, 1, lo_open=True), default=0.5,
                        help="share of windows the placement is fitted on (default 0.5)")
    parser.add_argument("--export-json", metavar="FILE", help="write SGLang's --init-expert-location JSON")


def options_from_args(args) -> dict:
    return {"ep": args.ep, "redundant": args.redundant, "window": args.window, "fit_fraction": args.fit_fraction,
            "export": args.export_json}
