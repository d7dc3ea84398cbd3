"""Today's (pre-streaming) atlas profiles, token sample and super-experts maxima, kept verbatim as the
references the streamed versions must equal."""
# ruff: noqa
from __future__ import annotations

import numpy as np
import polars as pl

from workbench.analysis.common import RoutingArrays, routing_arrays
from workbench.analysis.super_experts import MODES, _MAX_SCHEMA, _MODE_ALIASES
from workbench.errors import WorkbenchError


def expert_max(run, mode: str = "true") -> pl.DataFrame:
    """a[l, e] per (layer, expert): max |down_proj output|, its channel and (doc_id, pos); `selections` rows seen.

    mode "true": the max over every routed row. mode "first_row" reproduces the authors' hook: for
    routed experts only the first row each forward call (= each calibration sequence) routed to the
    expert counts; shared experts (-1) keep the true max.
    """
    mode = _MODE_ALIASES.get(mode, mode)
    if mode not in MODES:
        raise WorkbenchError(f"unknown mode {mode!r}; choose true or first_row")
    if not run.has("expert_stats"):
        raise WorkbenchError(f"run {run.path} has no expert_stats table; capture with --probes routing,experts")
    lf = run.expert_stats.select("doc_id", "pos", "layer", "expert", "out_maxabs", "out_argmax") \
        .filter(pl.col("out_maxabs").is_not_nan() & pl.col("out_maxabs").is_not_null())
    counts = lf.group_by("layer", "expert").agg(pl.len().alias("selections"))
    if mode == "first_row":
        first = (lf.filter(pl.col("expert") >= 0)
                 .sort("doc_id", "pos")
                 .group_by("doc_id", "layer", "expert", maintain_order=True).first())
        lf = pl.concat([first.select(lf.collect_schema().names()), lf.filter(pl.col("expert") < 0)])
    agg = (lf.group_by("layer", "expert")
           .agg(pl.col("out_maxabs").max().cast(pl.Float64).alias("max_abs"),
                pl.col("out_argmax").get(pl.col("out_maxabs").arg_max()).alias("channel"),
                pl.col("doc_id").get(pl.col("out_maxabs").arg_max()).alias("doc_id"),
                pl.col("pos").get(pl.col("out_maxabs").arg_max()).alias("pos"))
           .join(counts, on=["layer", "expert"], how="left"))
    df = agg.collect()
    if df.height == 0:
        raise WorkbenchError(f"run {run.path}: expert_stats has no rows")
    out = df.cast(_MAX_SCHEMA).sort("layer", "expert")
    n = run.model_info.get("n_layers")
    if n:  # lets find_super_experts refuse an n_layers that contradicts the run this table came from
        out._wb_n_layers = int(n)
    return out



def _token_frame(run, ra, labels, phase) -> pl.DataFrame:
    """tokens/ rows aligned with the RoutingArrays rows (sorted by doc_id, pos)."""
    lf = run.tokens
    if phase is not None:
        lf = lf.filter(pl.col("phase") == phase)
    tok = lf.select("doc_id", "pos", "token_id", "token", *labels).unique(["doc_id", "pos"]).collect()
    keys = pl.DataFrame({"doc_id": ra.doc, "pos": ra.pos})
    return keys.join(tok, on=["doc_id", "pos"], how="left", maintain_order="left")


def expert_profiles(run, labels=None, top_tokens: int = 200, phase: str | None = None):
    """Per (layer, expert): selection counts per label value and per frequent token.

    Returns (index frame [layer, expert, n_selections], {block name: (values, counts [L*E, n_values])}).
    Block "token" holds the `top_tokens` most frequent tokens plus "<other>".
    """
    labels = list(labels)
    ra = routing_arrays(run, phase=phase)
    tok = _token_frame(run, ra, labels, phase)
    t, nl, k = ra.experts.shape
    E = ra.n_experts
    ex = ra.experts.astype(np.int64)
    ok = (ex >= 0) & (ex < E)
    le = np.arange(nl)[None, :, None] * E + ex  # [T, L, K] flat (layer, expert) index
    n_sel = np.bincount(le[ok], minlength=nl * E)
    blocks = {}
    for col in labels + ["token"]:
        if col == "token":
            ids = tok["token_id"].fill_null(-1).to_numpy()
            uniq, cnt = np.unique(ids, return_counts=True)
            keep = uniq[np.argsort(-cnt, kind="stable")[:top_tokens]]
            names = dict(zip(tok["token_id"].to_list(), tok["token"].to_list()))
            values = [names.get(int(u), str(u)) for u in keep] + ["<other>"]
            lut = {int(u): i for i, u in enumerate(keep)}
            codes = np.array([lut.get(int(i), len(keep)) for i in ids], np.int64)
        else:
            s = tok[col].cast(pl.Utf8).fill_null("<none>")
            values = sorted(s.unique().to_list())
            lut = {v: i for i, v in enumerate(values)}
            codes = np.array([lut[v] for v in s.to_list()], np.int64)
        nv = len(values)
        flat = (le * nv + codes[:, None, None])[ok]
        blocks[col] = (values, np.bincount(flat, minlength=nl * E * nv).reshape(nl * E, nv))
    index = pl.DataFrame({"layer": np.repeat(np.asarray(ra.layers), E).astype(np.int16),
                          "expert": np.tile(np.arange(E), nl).astype(np.int16), "n_selections": n_sel})
    return index, blocks



def token_sample(run, labels, max_tokens: int = 5000, seed: int = 0, phase=None):
    """The dense token atlas' sample: (RoutingArrays of the rows, their token frame)."""
    ra = routing_arrays(run, phase=phase)
    tok = _token_frame(run, ra, list(labels), phase)
    n = len(ra.doc)
    rows = np.arange(n)
    if n > max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_tokens, replace=False))
    sub = RoutingArrays(ra.doc[rows], ra.pos[rows], ra.layers, ra.experts[rows], ra.weights[rows], ra.n_experts)
    return sub, tok[rows].select("doc_id", "pos", "token", *labels)
