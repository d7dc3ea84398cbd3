"""Reading fidelity results back, finding the ones that belong to a run, and their plotly figures (shared by
the dashboard's Fidelity page and the notebook)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ..errors import WorkbenchError

FOLDER = "fidelity"  # RUN/fidelity/<name>/ is where the docs suggest writing a run's results


def open_result(path):
    """A replay or stability result folder -> ReplayResult / StabilityResult (tables read back)."""
    p = Path(path)
    if (p / "replay.json").is_file():
        from .replay import ReplayResult

        m = pl.read_parquet(p / "margins.parquet") if (p / "margins.parquet").is_file() else None
        return ReplayResult(pl.read_parquet(p / "layers.parquet"), pl.read_parquet(p / "tokens.parquet"),
                            json.loads((p / "replay.json").read_text()), p, margins=m)
    if (p / "stability.json").is_file():
        from .stability import StabilityResult

        t = {n: pl.read_parquet(p / f"{n}.parquet") for n in ("layers", "margins", "experts", "decisions")}
        return StabilityResult(t["layers"], t["margins"], t["experts"], t["decisions"],
                               json.loads((p / "stability.json").read_text()), p)
    raise WorkbenchError(f"{p} holds no replay or stability result (replay.json / stability.json)")


def find_results(run) -> dict[str, Path]:
    """Result folders that belong to `run`: any under RUN/fidelity/, and replays beside the run (in its parent
    folder) whose replay.json names it. name -> folder."""
    root = Path(run.path if hasattr(run, "path") else run).resolve()
    out: dict[str, Path] = {}
    cands = []
    if (root / FOLDER).is_dir():
        cands += [(d, True) for d in sorted((root / FOLDER).iterdir()) if d.is_dir()]
    if root.parent.is_dir():
        cands += [(d, False) for d in sorted(root.parent.iterdir()) if d.is_dir() and d != root]
    for d, inside in cands:
        for kind in ("replay", "stability"):
            f = d / f"{kind}.json"
            if not f.is_file():
                continue
            try:
                s = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if inside or (kind == "replay" and Path(str(s.get("run", ""))).resolve() == root):
                out[f"{kind}: {d.name}"] = d
    return out


def replay_figures(res) -> dict:
    """agreement per layer (replayed and free forward) and the distribution of next-token KL."""
    import plotly.graph_objects as go

    lay = res.layers.sort("layer")
    x = [f"L{v}" for v in lay["layer"].to_list()]
    fig = go.Figure([go.Bar(name="own top-k = recorded (replayed inputs)", x=x, y=lay["agreement"].to_list()),
                     go.Bar(name="free forward (flips carried forward)", x=x, y=lay["agreement_free"].to_list())])
    fig.update_layout(title="Agreement with the recorded routes per MoE layer", barmode="group",
                      yaxis={"title": "share of tokens", "range": [0, 1.02]}, legend={"orientation": "h"})
    kl = res.tokens["kl"]
    kfig = go.Figure(go.Histogram(x=kl.to_list(), nbinsx=60))
    kfig.update_layout(title="Next-token KL(own || replayed) per token", xaxis_title="KL (nats)",
                       yaxis={"title": "tokens", "type": "log"})
    return {"agreement": fig, "kl": kfig}


def stability_figures(res) -> dict:
    """flip rate per layer (first and inherited, per variant) and flip rate against the router margin."""
    import plotly.graph_objects as go

    lay = res.layers.sort("variant", "layer")
    fig = go.Figure()
    for v in lay["variant"].unique(maintain_order=True).to_list():
        d = lay.filter(pl.col("variant") == v)
        x = [f"L{i}" for i in d["layer"].to_list()]
        fig.add_bar(name=f"{v}: first", x=x, y=d["first_rate"].to_list(), offsetgroup=v)
        fig.add_bar(name=f"{v}: inherited", x=x, y=d["inherited_rate"].to_list(), offsetgroup=v,
                    base=d["first_rate"].to_list())
    fig.update_layout(title="Flipped routing decisions per MoE layer (first + inherited)", barmode="group",
                      yaxis_title="share of decisions", legend={"orientation": "h"})
    m = res.margins
    mfig = go.Figure()
    for v in m["variant"].unique(maintain_order=True).to_list():
        d = m.filter(pl.col("variant") == v)
        labels = [f"[{lo:g}, {hi:g})" for lo, hi in zip(d["margin_lo"].to_list(), d["margin_hi"].to_list())]
        mfig.add_scatter(name=v, x=labels, y=d["first_rate"].to_list(), mode="lines+markers",
                         text=[f"{n:,} decisions" for n in d["decisions"].to_list()])
    mfig.update_layout(title="First-flip rate by router margin of the reference decision", xaxis_title="margin",
                       yaxis_title="flip rate", legend={"orientation": "h"})
    return {"layers": fig, "margins": mfig}
