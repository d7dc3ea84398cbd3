"""Super experts (Su et al., "Unveiling Super Experts in MoE LLMs", ICLR 2026).

From `expert_stats/` (max |down_proj output| per token and routed slot, before the routing weight):
a[l, e] = max over calibration tokens, with the channel and the token where it happened; the paper's
rule marks (l, e) a super expert iff l is in the first round(0.75 L) decoder layers and
a > percentile_99.5(A) and a > floor(max(A) / 10), A = {a[l, e] of those layers}. Also: massive
activations per layer (`hidden/`), the router scores the sink token gives each expert (`routing.logits`),
and with `prune=True` perplexity and attention-sink decay with the SEs zeroed vs random experts.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult

MODES = ("true", "first_row")
_MODE_ALIASES = {"first": "first_row", "reference": "first_row", "max": "true"}
_MAX_SCHEMA = {"layer": pl.Int16, "expert": pl.Int16, "max_abs": pl.Float64, "channel": pl.Int32,
               "doc_id": pl.Int64, "pos": pl.Int32, "selections": pl.Int64}


def expert_max(run, mode: str = "true", chunk_rows: int | None = None, progress: bool = False) -> pl.DataFrame:
    """a[l, e] per (layer, expert): max |down_proj output|, its channel and (doc_id, pos); `selections` rows seen.

    mode "true": the max over every routed row. mode "first_row" reproduces the authors' hook: for
    routed experts only the first row each forward call (= each calibration sequence) routed to the
    expert counts; shared experts (-1) keep the true max.

    Streams `expert_stats/` part by part in batches of `chunk_rows` rows (default: the chunk size in
    tokens x 64) and merges per-chunk maxima exactly (ties: the first row in file order; in first_row
    mode the earliest (doc_id, pos)). first_row keeps one candidate row per (document, layer, expert)
    until the end: memory follows documents x layers x experts, not rows.
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; choose true or first_row")
    if not run.has("expert_stats"):
        raise WorkbenchError(f"run {run.path} has no expert_stats table; capture with --probes routing,experts")
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from .common import chunk_tokens, progress_update

    step = int(chunk_rows) if chunk_rows else chunk_tokens() * 64
    files = run.files("expert_stats")
    cols = ["doc_id", "pos", "layer", "expert", "out_maxabs", "out_argmax"]
    acc = None  # per (layer, expert) running max row: a frame, merged per chunk
    cand = []  # first_row: candidate rows per (doc, layer, expert)
    counts = None
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    bar = tqdm(total=total, desc="super experts", unit="row", unit_scale=True, disable=not progress,
               dynamic_ncols=True)
    seq = n_chunks = 0
    progress_update("super experts", 0, total, 0)
    for f in files:
        for b in pq.ParquetFile(f).iter_batches(batch_size=step, columns=cols):
            bar.update(b.num_rows)
            n_chunks += 1
            progress_update("super experts", seq + b.num_rows, total, n_chunks)
            d = {c: b.column(c).to_numpy(zero_copy_only=False) for c in cols}
            v = d["out_maxabs"].astype(np.float64)
            ok = ~np.isnan(v)  # nulls arrive as NaN
            d = {c: x[ok] for c, x in d.items()}
            d["out_maxabs"] = v[ok]
            d["seq"] = np.arange(len(v), dtype=np.int64)[ok] + seq  # file order, for ties
            seq += len(v)
            key = d["layer"].astype(np.int64) * 65536 + d["expert"].astype(np.int64) + 1
            uk, inv = _dense_inverse(key) if len(key) else (key, key)
            c = pl.DataFrame({"k": uk, "selections": np.bincount(inv, minlength=len(uk)).astype(np.int64)})
            counts = c if counts is None else pl.concat([counts, c]).group_by("k").agg(pl.col("selections").sum())
            if mode == "first_row":
                routed = d["expert"] >= 0
                r = {c_: x[routed] for c_, x in d.items()}
                rk = key[routed]
                o = np.lexsort((r["seq"], r["pos"], rk, r["doc_id"]))  # earliest row per (doc, layer, expert)
                dk, kk = r["doc_id"][o], rk[o]
                first = np.flatnonzero(np.concatenate([[True], (dk[1:] != dk[:-1]) | (kk[1:] != kk[:-1])])) \
                    if len(o) else np.zeros(0, np.int64)
                cand.append({c_: x[o][first] for c_, x in r.items()} | {"k": kk[first]})
                d = {c_: x[~routed] for c_, x in d.items()}
                key = key[~routed]
            best = _chunk_max_fast(d, key)
            acc = best if acc is None else _chunk_max(_concat([acc, best]), _concat([acc, best])["k"], by_doc=False)
    bar.close()
    if mode == "first_row" and cand:
        r = _concat(cand)
        o = np.lexsort((r["seq"], r["pos"], r["k"], r["doc_id"]))
        dk, kk = r["doc_id"][o], r["k"][o]
        first = np.flatnonzero(np.concatenate([[True], (dk[1:] != dk[:-1]) | (kk[1:] != kk[:-1])]))
        r = {c_: x[o][first] for c_, x in r.items()}
        best = _chunk_max(r, r["k"], by_doc=True)
        parts = [best] + ([acc] if acc is not None else [])
        acc = _chunk_max(_concat(parts), _concat(parts)["k"], by_doc=True)
    if acc is None or len(acc["k"]) == 0:
        raise WorkbenchError(f"run {run.path}: expert_stats has no rows")
    df = pl.DataFrame({"layer": acc["k"] // 65536, "expert": acc["k"] % 65536 - 1, "max_abs": acc["out_maxabs"],
                       "channel": acc["out_argmax"], "doc_id": acc["doc_id"], "pos": acc["pos"], "k": acc["k"]})
    df = df.join(counts, on="k", how="left").drop("k")
    out = df.cast(_MAX_SCHEMA).sort("layer", "expert")
    n = run.model_info.get("n_layers")
    if n:  # lets find_super_experts refuse an n_layers that contradicts the run this table came from
        out._wb_n_layers = int(n)
    return out


def _concat(parts: list[dict]) -> dict:
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def _chunk_max_fast(d: dict, key: np.ndarray) -> dict:
    """_chunk_max in file order, linear time: maximum.at per key, then each key's first row at its max."""
    if len(key) == 0:
        return dict(d, k=key)
    uk, inv = np.unique(key, return_inverse=True) if len(key) < 4096 else _dense_inverse(key)
    best = np.full(len(uk), -np.inf)
    np.maximum.at(best, inv, d["out_maxabs"])
    hit = np.flatnonzero(d["out_maxabs"] == best[inv])
    _, first = np.unique(inv[hit], return_index=True)
    rows = hit[first]
    return {c: x[rows] for c, x in d.items()} | {"k": key[rows]}


def _dense_inverse(key: np.ndarray):
    """np.unique(key, return_inverse=True) for keys in a small range, without sorting."""
    lo = int(key.min())
    present = np.bincount(key - lo) > 0
    uk = np.flatnonzero(present) + lo
    lut = np.cumsum(present) - 1
    return uk, lut[key - lo]


def _chunk_max(d: dict, key: np.ndarray, by_doc: bool) -> dict:
    """One row per key: the largest out_maxabs; ties go to the smallest (doc_id, pos, seq) when by_doc,
    else the smallest seq (file order), as polars' arg_max on the dense table."""
    d = dict(d, k=key)
    if len(key) == 0:
        return d
    v = d["out_maxabs"]
    ties = (d["seq"], d["pos"], d["doc_id"]) if by_doc else (d["seq"],)
    o = np.lexsort(ties + (-v, key))
    kk = key[o]
    first = np.flatnonzero(np.concatenate([[True], kk[1:] != kk[:-1]]))
    return {c: x[o][first] for c, x in d.items()}


def find_super_experts(table: pl.DataFrame, n_layers: int, percentile: float = 99.5, ratio: float = 10.0,
                       layer_fraction: float = 0.75) -> tuple[pl.DataFrame, dict]:
    """Apply the paper's rule to a table with columns layer, expert, max_abs (e.g. `expert_max`).

    Candidates: layers < round(layer_fraction * n_layers) (Python round, half to even), n_layers =
    decoder layers. Returns (table sorted by max_abs descending with `candidate`, `is_super_expert`,
    `se_rank`), thresholds dict.
    """
    known = getattr(table, "_wb_n_layers", None)  # set by expert_max(run)
    if known is not None and n_layers != known:
        raise WorkbenchError(f"n_layers={n_layers} contradicts the run, whose model has {known} decoder layers")
    top = table["layer"].max() if table.height else None
    if not isinstance(n_layers, int) or n_layers < 1 or (top is not None and top >= n_layers):
        raise WorkbenchError(f"n_layers={n_layers!r} is impossible for a table with layer {top}: give the model's "
                             "number of decoder layers")
    n_cand_layers = round(layer_fraction * n_layers)
    cand = table["layer"].cast(pl.Int64) < n_cand_layers
    A = table.filter(cand)["max_abs"].to_numpy().astype(np.float64)
    A = A[np.isfinite(A)]
    if A.size == 0:
        raise WorkbenchError(f"no expert statistics in the first {n_cand_layers} layers, where super experts are sought")
    p = float(np.percentile(A, percentile))
    mx = float(A.max())
    floor_ = float(math.floor(mx / ratio))
    out = table.with_columns(cand.alias("candidate"))
    out = out.with_columns((pl.col("candidate") & (pl.col("max_abs") > p) & (pl.col("max_abs") > floor_))
                           .alias("is_super_expert"))
    out = out.sort("max_abs", "layer", "expert", descending=[True, False, False], nulls_last=True)
    rank = out["is_super_expert"].cast(pl.Int32).cum_sum()
    out = out.with_columns(pl.when(pl.col("is_super_expert")).then(rank).otherwise(None).cast(pl.Int32).alias("se_rank"))
    thresholds = {"n_layers": int(n_layers), "candidate_layers": int(n_cand_layers), "percentile": percentile,
                  "p_value": p, "max": mx, "ratio": ratio, "floor_max_over_ratio": floor_,
                  "candidates": int(A.size), "n_super_experts": int(out["is_super_expert"].sum())}
    return out, thresholds


def massive_activations(run) -> pl.DataFrame:
    """Per decoder layer: max |h| of the residual stream after it, its channel and token, the median
    per-token max and their ratio (massive activations are orders of magnitude above the median)."""
    if not run.has("hidden"):
        raise WorkbenchError(f"run {run.path} has no hidden table; capture with --probes ...,hidden")
    return (run.hidden.group_by("layer")
            .agg(pl.col("maxabs").max().cast(pl.Float64).alias("max_abs"),
                 pl.col("argmax").get(pl.col("maxabs").arg_max()).alias("channel"),
                 pl.col("doc_id").get(pl.col("maxabs").arg_max()).alias("doc_id"),
                 pl.col("pos").get(pl.col("maxabs").arg_max()).alias("pos"),
                 pl.col("maxabs").median().cast(pl.Float64).alias("median_token_max"))
            .with_columns((pl.col("max_abs") / pl.col("median_token_max")).alias("ratio_to_median"))
            .sort("layer").collect())


def sink_router_scores(run) -> pl.DataFrame:
    """Per (layer, expert): how often the sink token (position 0) selects it vs other tokens, and with
    logits captured (`--logits`) the router score it gets (the family's scoring: sigmoid for
    DeepSeek-V3-style routers, softmax over experts otherwise) vs the mean over other tokens."""
    E = run.n_experts
    lf = run.routing
    names = lf.collect_schema().names()
    sel = (lf.select("layer", "experts", (pl.col("pos") == 0).alias("sink"))
           .with_columns(pl.len().over("layer", "sink").alias("n"))
           .explode("experts")
           .group_by("layer", "sink", "experts")
           .agg((pl.len() / pl.col("n").first()).alias("rate"))
           .rename({"experts": "expert"}).collect())
    grid = pl.DataFrame({"layer": np.repeat(run.moe_layers, E), "expert": np.tile(np.arange(E), len(run.moe_layers))},
                        schema={"layer": pl.Int16, "expert": pl.Int16})
    out = grid
    for flag, name in ((True, "sink_select_rate"), (False, "other_select_rate")):
        part = sel.filter(pl.col("sink") == flag).select("layer", "expert", pl.col("rate").alias(name))
        out = out.join(part, on=["layer", "expert"], how="left").with_columns(pl.col(name).fill_null(0.0))
    if "logits" in names:
        sigmoid = run.model_info.get("routing_rule") == "sigmoid_bias_group"
        rows = []
        for layer in run.moe_layers:
            d = lf.filter(pl.col("layer") == layer).select("pos", "logits").collect()
            z = d["logits"].list.to_array(E).to_numpy().astype(np.float64)
            s = 1 / (1 + np.exp(-z)) if sigmoid else np.exp(z - z.max(1, keepdims=True))
            if not sigmoid:
                s /= s.sum(1, keepdims=True)
            sink = d["pos"].to_numpy() == 0
            for name, arr in (("sink", sink), ("other", ~sink)):
                if arr.any():
                    rows.append(pl.DataFrame({"layer": [layer] * E, "expert": np.arange(E), "which": [name] * E,
                                              "score": s[arr].mean(0), "logit": z[arr].mean(0)}))
        if rows:
            sc = pl.concat(rows).pivot(on="which", index=["layer", "expert"], values=["score", "logit"])
            sc = sc.cast({"layer": pl.Int16, "expert": pl.Int16})
            out = out.join(sc, on=["layer", "expert"], how="left")
            if "score_sink" in out.columns and "score_other" in out.columns:
                out = out.with_columns((pl.col("score_sink") / pl.col("score_other")).alias("score_ratio"))
    return out.sort("layer", "expert")


def _token_strings(run, df: pl.DataFrame) -> pl.DataFrame:
    if df.height == 0 or not run.has("tokens"):
        return df.with_columns(pl.lit(None, pl.Utf8).alias("token"))
    keys = df.select("doc_id", "pos").drop_nulls().unique()
    tok = run.tokens.select("doc_id", "pos", "token").join(keys.lazy(), on=["doc_id", "pos"], how="semi").collect()
    return df.join(tok.unique(["doc_id", "pos"]), on=["doc_id", "pos"], how="left")


# ----------------------------------------------------------------------------------------------------------
# pruning evaluation (loads the model)


def _sink_means(run) -> pl.DataFrame:
    return run.attention.group_by("layer", "head").agg(pl.col("sink_share").mean().cast(pl.Float64)).collect()


def sink_decay(before, after) -> pl.DataFrame:
    """D_sink = 1 - mean over heads of (sink mass after / before), per layer and overall (layer null).

    before/after: runs (or frames layer, head, sink_share) with attention captures of the same text."""
    b = before if isinstance(before, pl.DataFrame) else _sink_means(before)
    a = after if isinstance(after, pl.DataFrame) else _sink_means(after)
    j = b.join(a, on=["layer", "head"], suffix="_after").with_columns(
        (pl.col("sink_share_after") / pl.col("sink_share")).alias("ratio"))
    per = j.group_by("layer").agg((1 - pl.col("ratio").mean()).alias("d_sink"),
                                  pl.col("sink_share").mean().alias("sink_before"),
                                  pl.col("sink_share_after").mean().alias("sink_after")).sort("layer")
    overall = j.select(pl.lit(None, pl.Int16).alias("layer"), (1 - pl.col("ratio").mean()).alias("d_sink"),
                       pl.col("sink_share").mean().alias("sink_before"), pl.col("sink_share_after").mean().alias("sink_after"))
    return pl.concat([per.cast({"layer": pl.Int16}), overall])


def prune_evaluation(mm, experts, texts, n_random: int = 3, seed: int = 0, seq_len: int | None = None,
                     max_tokens: int | None = None, batch_size: int = 8, attention: bool = True,
                     progress: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Perplexity on `texts` with `experts` zeroed vs baseline vs `n_random` draws of as many random experts
    from the same layers; and D_sink from attention captures with and without each pruning.
    Returns (prune table: condition, experts, n_experts, ppl, ppl_ratio; sink_decay table)."""
    import tempfile

    from ..capture import capture
    from ..probes.interventions import format_spec
    from ..steering import perplexity, random_experts_like

    experts = [(int(layer), int(e)) for layer, e in experts]
    if not experts:
        raise WorkbenchError("no experts to prune")
    conds = [("baseline", [])]
    conds.append(("super_experts", experts))
    for s in range(n_random):
        conds.append((f"random_{s}", random_experts_like(mm, experts, seed=seed + s)))
    rows, decay = [], []
    from .common import progress_update

    with tempfile.TemporaryDirectory(prefix="wb_prune_") as tmp:
        base_att = None
        for i, (name, ex) in enumerate(conds):
            progress_update("pruning conditions evaluated", i, len(conds), i)  # the dashboard's progress bar
            inter = {"zero": ex} if ex else None
            res = perplexity(mm, texts, interventions=inter, seq_len=seq_len, batch_size=batch_size,
                             max_tokens=max_tokens, progress=progress)
            rows.append({"condition": name, "experts": format_spec(ex), "n_experts": len(ex), "ppl": res["ppl"],
                         "tokens": res.get("tokens")})
            if attention:
                run = capture(mm, texts, f"{tmp}/{name}", probes=["attention"], interventions=inter,
                              batch_size=batch_size, max_tokens=max_tokens, seq_len=seq_len, progress=progress)
                if base_att is None:
                    base_att = _sink_means(run)
                else:
                    decay.append(sink_decay(base_att, _sink_means(run)).with_columns(pl.lit(name).alias("condition")))
        progress_update("pruning conditions evaluated", len(conds), len(conds), len(conds))
    prune = pl.DataFrame(rows)
    base = prune.filter(pl.col("condition") == "baseline")["ppl"][0]
    prune = prune.with_columns((pl.col("ppl") / base).alias("ppl_ratio"))
    dec = pl.concat(decay).select("condition", "layer", "d_sink", "sink_before", "sink_after") if decay else \
        pl.DataFrame(schema={"condition": pl.Utf8, "layer": pl.Int16, "d_sink": pl.Float64,
                             "sink_before": pl.Float64, "sink_after": pl.Float64})
    return prune, dec


# ----------------------------------------------------------------------------------------------------------
# analysis entry points


def analyze(run, mode: str = "true", percentile: float = 99.5, ratio: float = 10.0, prune: bool = False,
            prune_data=None, model=None, n_random: int = 3, seed: int = 0, prune_max_tokens: int | None = 8192,
            prune_seq_len: int | None = None, progress: bool = True) -> AnalysisResult:
    """Tables: experts (main; every expert's a[l,e] ranked, is_super_expert), super_experts, thresholds,
    massive (if hidden/), sink_scores, and with prune=True: prune, sink_decay.

    model (for prune): a loaded MoEModel, or a spec/path; default the run's own model."""
    mode = _MODE_ALIASES.get(mode, mode)
    n_layers = int(run.model_info.get("n_layers") or (max(run.moe_layers) + 1))
    amax = expert_max(run, mode, progress=progress)
    ranked, th = find_super_experts(amax, n_layers, percentile, ratio)
    ranked = _token_strings(run, ranked)
    ranked = ranked.select("se_rank", "layer", "expert", "max_abs", "channel", "doc_id", "pos", "token",
                           "selections", "candidate", "is_super_expert")
    ses = ranked.filter(pl.col("is_super_expert"))
    th["mode"] = mode
    tables = {"experts": ranked, "super_experts": ses, "thresholds": pl.DataFrame([th])}
    notes = []
    if th["floor_max_over_ratio"] == 0:
        # the percentile threshold sits below the top value whenever it is unique, so only the
        # absolute floor(max/ratio) rule can reject the top expert; with max < ratio it cannot
        notes.append(f"max |output| {th['max']:.3g} < {th['ratio']:g}: the floor(max/{th['ratio']:g}) rule is vacuous, "
                     "so the top expert passes by construction (a random or tiny model has no real super experts)")
    if run.has("hidden"):
        tables["massive"] = _token_strings(run, massive_activations(run))
    else:
        notes.append("no hidden/ table: capture with --probes ...,hidden for massive activations")
    if run.has("routing"):
        tables["sink_scores"] = sink_router_scores(run)
        if "score_sink" not in tables["sink_scores"].columns:
            notes.append("router scores of the sink token need logits: capture with --logits (selection rates shown)")
    if prune:
        if ses.height == 0:
            notes.append("no super experts found, nothing to prune")
        else:
            from ..models.loading import MoEModel, load_model

            if isinstance(model, MoEModel):
                mm = model
            else:
                spec = model or run.model_info.get("path") or run.model_info.get("spec")
                if not spec:
                    raise WorkbenchError("the run does not say where its model is; pass --model")
                mm = load_model(spec)
            data = prune_data or "calibration"
            from ..data import load_dataset

            texts = [r["text"] for r in load_dataset(data).records]
            pr, dec = prune_evaluation(mm, list(zip(ses["layer"].to_list(), ses["expert"].to_list())), texts,
                                       n_random=n_random, seed=seed, seq_len=prune_seq_len,
                                       max_tokens=prune_max_tokens, progress=progress)
            tables["prune"] = pr.with_columns(pl.lit(str(data)).alias("data"))
            tables["sink_decay"] = dec
    meta = {"thresholds": th, "notes": notes}
    return AnalysisResult("super-experts", tables, "experts", _summary(tables, th, notes), meta)


def _summary(tables, th, notes) -> str:
    ses = tables["super_experts"]
    lines = [f"super experts ({th['mode']} max; candidates in layers < {th['candidate_layers']} of {th['n_layers']}; "
             f"p{th['percentile']:g} = {th['p_value']:.4g}, floor(max/{th['ratio']:g}) = {th['floor_max_over_ratio']:.4g}): "
             f"{ses.height} found"]
    for r in ses.iter_rows(named=True):
        tok = "" if r.get("token") is None else f" token {r['token']!r}"
        lines.append(f"  #{r['se_rank']} L{r['layer']}:E{r['expert']}  max|out| {r['max_abs']:.4g}  channel {r['channel']}"
                     f"  at doc {r['doc_id']} pos {r['pos']}{tok}")
    if "massive" in tables and tables["massive"].height:
        top = tables["massive"].sort("max_abs", descending=True).row(0, named=True)
        lines.append(f"  largest residual activation: layer {top['layer']} channel {top['channel']} "
                     f"|h| {top['max_abs']:.4g} ({top['ratio_to_median']:.1f}x the median token max)")
    if "prune" in tables:
        for r in tables["prune"].iter_rows(named=True):
            lines.append(f"  ppl {r['condition']:<14s} {r['ppl']:.4g} (x{r['ppl_ratio']:.3f})  {r['experts']}")
        d = tables["sink_decay"].filter(pl.col("layer").is_null())
        for r in d.iter_rows(named=True):
            lines.append(f"  D_sink {r['condition']:<14s} {r['d_sink']:.3f}")
    lines += [f"  note: {n}" for n in notes]
    return "\n".join(lines)


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    figs = {}
    t = result.tables["experts"]
    piv = t.pivot(on="expert", index="layer", values="max_abs", sort_columns=True).sort("layer")
    cols = [c for c in piv.columns if c != "layer"]
    cols = sorted(cols, key=int)
    z = piv.select(cols).to_numpy().astype(float)
    fig = go.Figure(go.Heatmap(z=np.log10(np.where(z > 0, z, np.nan)), x=[("shared" if c == "-1" else c) for c in cols],
                               y=piv["layer"].to_list(), colorscale="Inferno", colorbar=dict(title="log10 max|out|"),
                               customdata=z, hovertemplate="layer %{y} expert %{x}<br>max|out| %{customdata:.4g}<extra></extra>"))
    ses = result.tables["super_experts"]
    if ses.height:
        fig.add_trace(go.Scatter(x=[("shared" if e == -1 else str(e)) for e in ses["expert"].to_list()],
                                 y=ses["layer"].to_list(), mode="markers", name="super expert",
                                 marker=dict(symbol="circle-open", size=14, color="cyan", line=dict(width=2))))
    th = result.tables.get("thresholds")
    if th is not None and th.height:
        fig.add_hline(y=float(th["candidate_layers"][0]) - 0.5, line_dash="dash", line_color="white",
                      annotation_text="candidates below this line", annotation_position="top left")
    fig.update_layout(title="Max |down_proj output| per expert (circles: super experts)", xaxis_title="expert",
                      yaxis_title="layer", xaxis_type="category", template="plotly_white")
    figs["expert_max_heatmap"] = fig
    figs["ranked"] = go.Figure(go.Bar(x=[f"L{r['layer']}:E{r['expert']}" for r in t.head(30).iter_rows(named=True)],
                                      y=t.head(30)["max_abs"].to_list(),
                                      marker_color=["crimson" if s else "gray" for s in t.head(30)["is_super_expert"]]))
    figs["ranked"].update_layout(title="Top experts by max |output| (red: super experts)", yaxis_type="log",
                                 template="plotly_white")
    if "massive" in result.tables:
        m = result.tables["massive"]
        fig = go.Figure([go.Scatter(x=m["layer"].to_list(), y=m["max_abs"].to_list(), mode="lines+markers", name="max |h|"),
                         go.Scatter(x=m["layer"].to_list(), y=m["median_token_max"].to_list(), mode="lines",
                                    name="median token max")])
        fig.update_layout(title="Massive activations: residual stream max |h| per layer", yaxis_type="log",
                          xaxis_title="layer", template="plotly_white")
        figs["massive_activations"] = fig
    if "sink_scores" in result.tables:
        s = result.tables["sink_scores"]
        col = "score_ratio" if "score_ratio" in s.columns else None
        val = (s[col] if col else (s["sink_select_rate"] - s["other_select_rate"]))
        sp = s.with_columns(val.alias("v")).pivot(on="expert", index="layer", values="v", sort_columns=True).sort("layer")
        cs = sorted([c for c in sp.columns if c != "layer"], key=int)
        fig = go.Figure(go.Heatmap(z=sp.select(cs).to_numpy(), x=cs, y=sp["layer"].to_list(), colorscale="RdBu",
                                   zmid=1.0 if col else 0.0,
                                   colorbar=dict(title="sink / other score" if col else "sink - other selection")))
        fig.update_layout(title="Router preference of the sink token (position 0)", xaxis_title="expert",
                          yaxis_title="layer", xaxis_type="category", template="plotly_white")
        figs["sink_router"] = fig
    if "prune" in result.tables:
        p = result.tables["prune"]
        figs["prune_ppl"] = go.Figure(go.Bar(x=p["condition"].to_list(), y=p["ppl"].to_list(), text=p["experts"].to_list()))
        figs["prune_ppl"].update_layout(title="Perplexity with experts zeroed", yaxis_title="perplexity",
                                        template="plotly_white")
        d = result.tables["sink_decay"].filter(pl.col("layer").is_not_null())
        if d.height:
            fig = go.Figure()
            for (c,), g in d.group_by("condition", maintain_order=True):
                fig.add_trace(go.Scatter(x=g["layer"].to_list(), y=g["d_sink"].to_list(), mode="lines+markers", name=c))
            fig.update_layout(title="Attention-sink decay D_sink per layer", xaxis_title="layer", yaxis_title="D_sink",
                              template="plotly_white")
            figs["sink_decay"] = fig
    return figs


def add_arguments(parser) -> None:
    parser.add_argument("--mode", choices=MODES, default="true",
                        help="true: max over all rows (default); first_row: the authors' reference hook")
    from ..options import at_least, between, seed, seq_len

    parser.add_argument("--percentile", type=between(0, 100, lo_open=True), default=99.5,
                        help="super expert if a > this percentile of all a (default 99.5)")
    parser.add_argument("--ratio", type=between(0, 1e9, lo_open=True), default=10.0,
                        help="also require a > floor(max / RATIO) (default 10)")
    parser.add_argument("--prune", action="store_true", help="evaluate perplexity and D_sink with the SEs zeroed")
    parser.add_argument("--prune-data", help="text set for --prune (bundled name or file; default calibration)")
    parser.add_argument("--model", help="model for --prune (default: the run's model)")
    parser.add_argument("--n-random", type=at_least(0, note=" (0 skips the control)"), default=3,
                        help="random-expert control draws for --prune (default 3)")
    parser.add_argument("--prune-max-tokens", type=at_least(1), default=8192, help="tokens --prune evaluates (default 8192)")
    parser.add_argument("--prune-seq-len", type=seq_len, help="pack --prune text into sequences of this length")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the random control (default 0)")


def options_from_args(args) -> dict:
    return {"mode": args.mode, "percentile": args.percentile, "ratio": args.ratio, "prune": args.prune,
            "prune_data": args.prune_data, "model": args.model, "n_random": args.n_random, "seed": args.seed,
            "prune_max_tokens": args.prune_max_tokens, "prune_seq_len": args.prune_seq_len}
