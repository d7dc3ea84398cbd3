"""The dense (pre-streaming) stats implementation, kept verbatim as the reference the chunked one must equal."""
# ruff: noqa
from __future__ import annotations

import numpy as np
import polars as pl

from workbench.analysis import AnalysisResult
from workbench.analysis.common import routing_arrays
from workbench.analysis.stats import _groups, _frame, _fill_nan, _empty, _summary
from workbench.errors import WorkbenchError


def analyze(run, labels=None, top_n: int = 10, always_on: float = 0.99, dead: float = 0.0,
            coactivation: bool = True, transitions: bool = True, max_label_values: int = 64,
            progress: bool = True) -> AnalysisResult:
    """Tables: experts (main), layers, coactivation, transitions, top_tokens, top_labels.

    experts: count (selections), share (of the layer's selections), token_share (of tokens),
    mean_weight, top_token_share (selections from its top_n tokens), is_dead (token_share <= dead),
    is_always_on (token_share >= always_on). layers: cv (std/mean of counts over experts),
    entropy_norm (entropy of the share / log E), n_dead, n_always_on.
    """
    from tqdm.auto import tqdm

    ra = routing_arrays(run)
    T, L, K = ra.experts.shape
    E = ra.n_experts
    if ra.experts.min() < 0 or ra.experts.max() >= E:
        raise WorkbenchError(f"run {run.path}: routing holds expert ids outside 0..{E - 1}")
    keys = pl.DataFrame({"doc_id": ra.doc, "pos": ra.pos})
    tok_cols = [c for c in run.tokens.collect_schema().names()]
    tok = keys.join(run.tokens.select(tok_cols).collect().unique(["doc_id", "pos"]), on=["doc_id", "pos"],
                    how="left", maintain_order="left")
    tok = tok.with_columns(pl.col("phase").fill_null("prefill"), pl.col("token_id").fill_null(-1))
    skipped: list = []
    groups = _groups(run, tok, labels, max_label_values, skipped)
    layers = ra.layers
    ex = ra.experts.astype(np.int64)
    w = ra.weights.astype(np.float64)
    token_id = tok["token_id"].to_numpy().astype(np.int64)
    token_str = tok.select("token_id", "token").unique("token_id")
    lid = np.arange(L)[None, :, None]
    flat_le = (lid * E + ex).reshape(T, -1)  # [T, L*K] layer-expert index

    exp_rows, lay_rows, co_rows, tr_rows, top_rows, lab_rows = [], [], [], [], [], []
    bar = tqdm(groups, desc="stats", disable=not progress, dynamic_ncols=True)
    for label, values, code in bar:
        V = len(values)
        ok = code >= 0
        c_tok = code[ok]
        n_tok = np.bincount(c_tok, minlength=V).astype(np.int64)  # tokens per value
        idx = (c_tok[:, None] * (L * E) + flat_le[ok]).reshape(-1)
        cnt = np.bincount(idx, minlength=V * L * E).reshape(V, L, E)
        wsum = np.bincount(idx, weights=w[ok].reshape(-1), minlength=V * L * E).reshape(V, L, E)
        # top tokens per (value, layer, expert)
        tt = pl.DataFrame({"v": np.repeat(c_tok, L * K), "le": flat_le[ok].reshape(-1),
                           "token_id": np.repeat(token_id[ok], L * K)})
        tok_freq = pl.DataFrame({"v": c_tok, "token_id": token_id[ok]}).group_by("v", "token_id").len("token_count")
        top = (tt.group_by("v", "le", "token_id").len("count")
               .sort(["v", "le", "count", "token_id"], descending=[False, False, True, False])
               .group_by("v", "le", maintain_order=True).head(top_n)
               .with_columns(pl.col("count").cum_count().over("v", "le").alias("rank"))
               .join(tok_freq, on=["v", "token_id"], how="left"))
        top_share = top.group_by("v", "le").agg(pl.col("count").sum().alias("c"))
        ts = np.zeros(V * L * E)
        ts[(top_share["v"].to_numpy() * L * E + top_share["le"].to_numpy())] = top_share["c"].to_numpy()
        ts = ts.reshape(V, L, E)
        with np.errstate(divide="ignore", invalid="ignore"):
            share = cnt / cnt.sum(2, keepdims=True)
            tshare = cnt / n_tok[:, None, None]
            mean_w = wsum / cnt
            top_tok_share = ts / cnt
        vv, ll, ee = np.meshgrid(np.arange(V), np.arange(L), np.arange(E), indexing="ij")
        exp_rows.append(_frame(label, values, vv.reshape(-1), layer=np.asarray(layers)[ll.reshape(-1)].astype(np.int16),
                               expert=ee.reshape(-1).astype(np.int16), count=cnt.reshape(-1),
                               share=share.reshape(-1), token_share=tshare.reshape(-1), mean_weight=mean_w.reshape(-1),
                               top_token_share=top_tok_share.reshape(-1),
                               is_dead=(tshare <= dead).reshape(-1) if dead > 0 else (cnt == 0).reshape(-1),
                               is_always_on=(tshare >= always_on).reshape(-1)))
        mean_c = cnt.mean(2)
        with np.errstate(divide="ignore", invalid="ignore"):
            cv = cnt.std(2) / mean_c
            p = share
            ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).sum(2) / np.log(E) if E > 1 else np.zeros((V, L))
        vv2, ll2 = np.meshgrid(np.arange(V), np.arange(L), indexing="ij")
        dead_mask = (tshare <= dead) if dead > 0 else (cnt == 0)
        lay_rows.append(_frame(label, values, vv2.reshape(-1), layer=np.asarray(layers)[ll2.reshape(-1)].astype(np.int16),
                               tokens=np.repeat(n_tok, L), cv=cv.reshape(-1), entropy_norm=ent.reshape(-1),
                               n_dead=dead_mask.sum(2).reshape(-1), n_always_on=(tshare >= always_on).sum(2).reshape(-1),
                               max_share=np.nanmax(np.where(np.isnan(share), -np.inf, share), 2).reshape(-1),
                               min_share=np.nanmin(np.where(np.isnan(share), np.inf, share), 2).reshape(-1)))
        top = top.join(token_str, on="token_id", how="left")
        le = top["le"].to_numpy()
        tv = top["v"].to_numpy()
        top_rows.append(_frame(label, values, tv, layer=np.asarray(layers)[le // E].astype(np.int16),
                               expert=(le % E).astype(np.int16), rank=top["rank"].to_numpy().astype(np.int32),
                               token_id=top["token_id"].to_numpy().astype(np.int32), token=top["token"].to_list(),
                               count=top["count"].to_numpy().astype(np.int64),
                               share_of_expert=top["count"].to_numpy() / cnt.reshape(-1)[tv * L * E + le],
                               token_rate=top["count"].to_numpy() / top["token_count"].to_numpy()))
        if label is not None:
            # label specialisation: P(value | expert selected) vs P(value)
            tot_e = cnt.sum(0, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                p_ve = cnt / tot_e
                p_v = (n_tok / n_tok.sum())[:, None, None]
                lift = p_ve / p_v
            d = _frame(label, values, vv.reshape(-1), layer=np.asarray(layers)[ll.reshape(-1)].astype(np.int16),
                       expert=ee.reshape(-1).astype(np.int16), count=cnt.reshape(-1),
                       p_value_given_expert=p_ve.reshape(-1), p_value=np.broadcast_to(p_v, cnt.shape).reshape(-1),
                       lift=lift.reshape(-1))
            d = d.filter(pl.col("count") > 0).sort(["layer", "expert", "lift", "value"],
                                                   descending=[False, False, True, False])
            lab_rows.append(d.with_columns(pl.col("lift").cum_count().over("layer", "expert").cast(pl.Int32).alias("rank")))
        # co-activation within a layer, transitions to the next MoE layer (one layer at a time)
        iu, ju = np.triu_indices(K, 1)
        for li in range(L):
            e_l = ex[ok, li, :]
            if coactivation and K > 1:
                a, b = e_l[:, iu].reshape(-1), e_l[:, ju].reshape(-1)
                vrep = np.repeat(c_tok, len(iu))
                co = np.bincount(vrep * E * E + a * E + b, minlength=V * E * E).reshape(V, E, E)
                co = co + co.transpose(0, 2, 1)
                nz = np.nonzero(co)
                c_e = cnt[nz[0], li, nz[1]]
                c_o = cnt[nz[0], li, nz[2]]
                cval = co[nz]
                co_rows.append(_frame(label, values, nz[0], layer=np.full(len(cval), layers[li], np.int16),
                                      expert=nz[1].astype(np.int16), other=nz[2].astype(np.int16), count=cval,
                                      p_other_given_expert=cval / c_e, lift=cval * n_tok[nz[0]] / (c_e * c_o)))
            if transitions and li + 1 < L:
                e_n = ex[ok, li + 1, :]
                a = np.repeat(e_l, K, axis=1).reshape(-1)
                b = np.tile(e_n, (1, K)).reshape(-1)
                vrep = np.repeat(c_tok, K * K)
                tr = np.bincount(vrep * E * E + a * E + b, minlength=V * E * E).reshape(V, E, E)
                nz = np.nonzero(tr)
                tval = tr[nz]
                tr_rows.append(_frame(label, values, nz[0], layer=np.full(len(tval), layers[li], np.int16),
                                      next_layer=np.full(len(tval), layers[li + 1], np.int16),
                                      expert=nz[1].astype(np.int16), next_expert=nz[2].astype(np.int16), count=tval,
                                      p_next_given_expert=tval / cnt[nz[0], li, nz[1]]))
    tables = {
        "experts": _fill_nan(pl.concat(exp_rows)),
        "layers": _fill_nan(pl.concat(lay_rows)),
        "top_tokens": pl.concat(top_rows),
    }
    if coactivation:
        tables["coactivation"] = pl.concat(co_rows) if co_rows else _empty(("layer", "expert", "other", "count"))
    if transitions:
        tables["transitions"] = pl.concat(tr_rows) if tr_rows else _empty(("layer", "next_layer", "expert", "next_expert", "count"))
    if lab_rows:
        tables["top_labels"] = pl.concat(lab_rows)
    meta = {"tokens": T, "layers": layers, "n_experts": E, "top_k": K,
            "labels": [g[0] for g in groups if g[0] is not None], "skipped_labels": skipped}
    return AnalysisResult("stats", tables, "experts", _summary(tables, meta), meta)


