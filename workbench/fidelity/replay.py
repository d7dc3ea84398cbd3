"""Replay: force a run's recorded routes on a model and measure how far its own routing is from them.

For every batch of the run's sequences two teacher-forced forwards run on the same tokens:
- free: the model routes itself (the plain forward; hooks only watch);
- replayed: at every recorded MoE layer the routers' choices are replaced by the recorded experts, with
  the recorded weights when the run has them, else the model's own router scores restricted to the recorded
  experts and weighted by the family's rule (probes.interventions.ForcedRoutes).

Per layer: `agreement` = share of tokens whose own top-k set (in the replayed forward, i.e. on the inputs
the recorded routes upstream produced) equals the recorded set, `overlap` = mean |own & recorded| / K, and
the same two in the free forward (`agreement_free`, `overlap_free`: there a flip carries into later
layers). Per token: KL(p_own || p_replayed) of the next-token distribution, the log-probability of the
actual next token both ways and its change, and how many layers disagree. The text loss both ways.

A run captured with interventions (`--ban` ...) is replayed on the model as given, without them: the
agreement then shows, layer by layer, what the interventions changed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import WorkbenchError, WorkbenchWarning
from .common import (Seq, check_ids, forward, make_batches, model_identity_problem, overlap, same_set, versions,
                     write_result)
from .margins import NEAR_TIE, flip_rate_by_margin

WEIGHTS = ("auto", "recorded", "model")


@dataclass
class ReplayResult:
    layers: pl.DataFrame  # one row per recorded MoE layer
    tokens: pl.DataFrame  # one row per token
    summary: dict
    out: Path | None = None
    margins: pl.DataFrame | None = None  # disagreement rate per margin bin (None for a generic model)

    def __repr__(self) -> str:
        s = self.summary
        return (f"ReplayResult({s['tokens']} tokens, agreement {s['agreement']:.4f}, loss own {s['loss_own']:.4f} "
                f"-> replayed {s['loss_replayed']:.4f})")


def _open(run):
    from ..store import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


def _sequences(run, max_tokens: int | None) -> tuple[list[Seq], int]:
    """The run's sequences (tokens ordered by position); sequences with holes are skipped (counted)."""
    t = run.tokens.select("doc_id", "pos", "token_id").sort("doc_id", "pos").collect()
    if t.height == 0:
        raise WorkbenchError(f"run {run.path} holds no tokens to replay")
    missing = int((t["token_id"] < 0).sum())
    if missing:
        raise WorkbenchError(f"{missing:,} tokens of {run.path} have no token id (the engine did not send the prompt "
                             "ids): import the run again with --tokens so the model can be fed the same text")
    seqs, skipped, budget = [], 0, max_tokens if max_tokens is not None else float("inf")
    for (doc,), g in t.group_by(["doc_id"], maintain_order=True):
        pos = g["pos"].to_numpy()
        if pos[0] != 0 or (len(pos) > 1 and (np.diff(pos) != 1).any()):
            skipped += 1  # a prefix the engine did not send, or rows it left empty: cannot be fed as one text
            continue
        if budget <= 0:
            break
        ids = g["token_id"].to_numpy().astype(np.int64)
        if len(ids) > budget:
            ids = ids[:int(budget)]
        seqs.append(Seq(int(doc), ids))
        budget -= len(ids)
    if not seqs:
        raise WorkbenchError(f"no sequence of {run.path} starts at position 0 without gaps, so none can be replayed")
    return seqs, skipped


def _routes_for(run, seqs: list[Seq], layers: list[int], K: int, use_weights: bool):
    """{doc_id: {layer: (pos [n], experts [n, K], weights [n, K] or None)}} for the given sequences."""
    docs = [s.doc_id for s in seqs]
    lens = {s.doc_id: len(s.ids) for s in seqs}
    cols = ["doc_id", "pos", "layer", "experts"] + (["weights"] if use_weights else [])
    df = (run.routing.filter(pl.col("doc_id").is_between(min(docs), max(docs)) & pl.col("doc_id").is_in(docs))
          .select(cols).collect())
    df = df.filter(pl.col("pos") < pl.col("doc_id").replace_strict(lens, default=0, return_dtype=pl.Int64))
    if df.height and (df["experts"].list.len() != K).any():
        raise WorkbenchError(f"the routing of {run.path} holds expert lists of other lengths than the model's top-k "
                             f"of {K}: it was recorded on another model")
    out: dict = {}
    for (doc, layer), g in df.group_by(["doc_id", "layer"]):
        ex = g["experts"].list.to_array(K).to_numpy().astype(np.int64)
        w = g["weights"].list.to_array(K).to_numpy().astype(np.float32) if use_weights else None
        out.setdefault(int(doc), {})[int(layer)] = (g["pos"].to_numpy().astype(np.int64), ex, w)
    return out


def _has_weights(run) -> bool:
    if "weights" not in run.routing.collect_schema().names():
        return False
    w = run.routing.select(pl.col("weights").list.first().is_null().any().alias("n")).collect()["n"][0]
    return not bool(w)


def replay(model, run, out=None, weights: str = "auto", batch_size: int | None = None, max_tokens: int | None = None,
           device: str | None = None, dtype: str | None = None, overwrite: bool = False,
           progress: bool = True) -> ReplayResult:
    """Force the routes recorded in `run` on `model` and compare with the model's own routing.

    model: a MoEModel or a spec (hub id, folder, `demo`); run: a run folder or Run (a capture, or a vLLM /
    SGLang import). weights: "auto" (recorded when the run has them, else the model's), "recorded" or
    "model". batch_size: sequences a forward (default: the run's capture batch size, so a self-replay
    batches as the capture did). out: a folder for layers.parquet, tokens.parquet and replay.json.
    """
    import torch

    from ..models.loading import MoEModel, load_model
    from ..probes.interventions import forced_routes

    if weights not in WEIGHTS:
        raise WorkbenchError(f"unknown weights {weights!r}; choose from {', '.join(WEIGHTS)}")
    if batch_size is not None and batch_size < 1:
        raise WorkbenchError("--batch-size must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise WorkbenchError("--max-tokens must be at least 1")
    run = _open(run)
    if not run.has("routing") or not run.has("tokens"):
        raise WorkbenchError(f"run {run.path} has no per-token routing to replay (it needs tokens/ and routing/)")
    if out is not None and (Path(out) / "replay.json").exists() and not overwrite:
        raise WorkbenchError(f"--out {out} already holds a replay result; pass --overwrite to replace it")
    mm = model if isinstance(model, MoEModel) else load_model(model, device=device, dtype=dtype)
    if getattr(mm, "layerwise", False):
        raise WorkbenchError("replay needs the whole model in memory; load it without --layerwise")
    problem = model_identity_problem(mm, run.model_info, f"run {run.path.name}")
    if problem:
        raise WorkbenchError(problem)
    layers = [int(x) for x in run.moe_layers]
    has_w = _has_weights(run)
    if weights == "recorded" and not has_w:
        raise WorkbenchError(f"run {run.path.name} has no routing weights (engines record expert ids only); "
                             "use --weights model")
    use_w = has_w and weights != "model"
    if not use_w and mm.family.rule == "generic":
        raise WorkbenchError(f"without recorded weights the replay needs the family's routing rule, which is unknown "
                             f"for {mm.family.model_type} (a generic model)")
    K, E = mm.top_k, mm.n_experts
    seqs, skipped = _sequences(run, max_tokens)
    if skipped:
        warnings.warn(f"{skipped} sequences of {run.path.name} do not start at position 0 or have gaps (tokens the "
                      "engine did not route) and were skipped", WorkbenchWarning, stacklevel=2)
    if batch_size is None:
        batch_size = int((run.manifest.get("settings") or {}).get("batch_size") or 8)
    pad = mm.tokenizer.pad_token_id if mm.tokenizer is not None and mm.tokenizer.pad_token_id is not None else 0
    batches = make_batches(seqs, batch_size, pad)

    L = len(layers)
    n = np.zeros(L, np.int64)
    agree, agree_free = np.zeros(L, np.int64), np.zeros(L, np.int64)
    ov, ov_free = np.zeros(L), np.zeros(L)
    tok_parts, identical = [], True
    with_margins = mm.family.rule != "generic"
    mar_parts: list[list] = [[] for _ in layers]  # the router's own margin on the replayed inputs, per decision
    dis_parts: list[list] = [[] for _ in layers]  # and whether it disagreed with the recorded set
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(s.ids) for s in seqs), disable=not progress, unit="tok", desc=f"replay {run.path.name}",
               dynamic_ncols=True)
    per = max(1, 256 // batch_size)  # batches whose recorded routing is read at once (about 256 sequences)
    # Without weight-file hashes on both sides (engine imports), permuted expert ids are found from the
    # routing itself: recorded vs own ids co-occur along a permutation, not the identity.
    cooc = None if _hashes_match(mm, run.model_info) else np.zeros((L, E, E), np.int64)
    with forced_routes(mm, layers, margins=with_margins) as fr, torch.inference_mode():
        for g0 in range(0, len(batches), per):
            if cooc is not None and g0 > 0:
                problem = _permutation_problem(cooc, layers, run.path.name, K)
                if problem:
                    raise WorkbenchError(problem)
                cooc = None  # judged on the first chunk (about 256 sequences)
            chunk = batches[g0:g0 + per]
            rec = _routes_for(run, [s for b in chunk for s in b.seqs], layers, K, use_w)
            for b in chunk:
                routes, have = _batch_routes(b, rec, layers, K, E, run.path.name)
                free = forward(mm, fr, b, None, keep_logits=True)
                rep = forward(mm, fr, b, routes, keep_logits=True)
                identical &= bool(torch.equal(free.logits, rep.logits))
                changed = np.zeros(len(b.rows), np.int16)
                changed_free = np.zeros(len(b.rows), np.int16)
                first = np.full(len(b.rows), -1, np.int16)
                tmin = np.full(len(b.rows), np.inf, np.float32)
                for j, layer in enumerate(layers):
                    m = have[layer]
                    if not m.any():
                        continue
                    r_idx = routes[layer][3]
                    s = same_set(rep.own[layer][m], r_idx)
                    sf = same_set(free.own[layer][m], r_idx)
                    n[j] += int(m.sum())
                    agree[j] += int(s.sum())
                    agree_free[j] += int(sf.sum())
                    ov[j] += float(overlap(r_idx, rep.own[layer][m]).sum())
                    ov_free[j] += float(overlap(r_idx, free.own[layer][m]).sum())
                    where = np.flatnonzero(m)
                    changed[where[~s]] += 1
                    changed_free[where[~sf]] += 1
                    fresh = where[~s][first[where[~s]] < 0]
                    first[fresh] = layer
                    if with_margins:
                        mg = rep.margin[layer][m]
                        mar_parts[j].append(mg)
                        dis_parts[j].append(~s)
                        tmin[where] = np.minimum(tmin[where], mg)
                    if cooc is not None:
                        own = free.own[layer][m]
                        np.add.at(cooc[j], (np.repeat(r_idx, K, axis=1).reshape(-1), np.tile(own, (1, K)).reshape(-1)),
                                  1)
                tok_parts.append(_token_rows(b, free.logits, rep.logits, changed, changed_free, first,
                                             tmin if with_margins else None))
                bar.update(len(b.rows))
    bar.close()
    if cooc is not None:
        problem = _permutation_problem(cooc, layers, run.path.name, K)
        if problem:
            raise WorkbenchError(problem)

    nz = np.maximum(n, 1)
    layers_df = pl.DataFrame({
        "layer": pl.Series(layers, dtype=pl.Int16), "tokens": n,
        "agreement": np.where(n > 0, agree / nz, np.nan), "overlap": np.where(n > 0, ov / nz, np.nan),
        "agreement_free": np.where(n > 0, agree_free / nz, np.nan),
        "overlap_free": np.where(n > 0, ov_free / nz, np.nan),
    })
    margins_df, msum = None, {}
    if with_margins:
        mar = [np.concatenate(x) if x else np.zeros(0, np.float32) for x in mar_parts]
        dis = [np.concatenate(x) if x else np.zeros(0, bool) for x in dis_parts]
        med = lambda v: float(np.median(v)) if v.size else None  # noqa: E731
        layers_df = layers_df.with_columns(
            pl.Series("margin_median_agreeing", [med(m[~d]) for m, d in zip(mar, dis)], dtype=pl.Float64),
            pl.Series("margin_median_disagreeing", [med(m[d]) for m, d in zip(mar, dis)], dtype=pl.Float64))
        am, ad = np.concatenate(mar), np.concatenate(dis)
        margins_df = flip_rate_by_margin(am, {"disagreed": ad})
        msum = {"margin_median_agreeing": med(am[~ad]), "margin_median_disagreeing": med(am[ad]),
                "disagreements_near_tie": float((am[ad] < NEAR_TIE).mean()) if ad.any() else None,
                "near_tie_below": NEAR_TIE}
    tokens_df = pl.concat(tok_parts)
    nll = tokens_df.filter(pl.col("logprob_own").is_not_null())
    loss_own = float(-nll["logprob_own"].mean()) if nll.height else float("nan")
    loss_rep = float(-nll["logprob_replayed"].mean()) if nll.height else float("nan")
    total = int(n.sum())
    summary = {
        "kind": "replay", "run": str(run.path), "model": mm.spec, "model_type": mm.model.config.model_type,
        "source": run.manifest.get("source", "capture"), "weights": "recorded" if use_w else "model",
        "interventions_in_run": run.manifest.get("interventions") or {},
        "tokens": int(tokens_df.height), "sequences": len(seqs), "sequences_skipped": skipped,
        "layers": layers, "decisions": total,
        "agreement": float(agree.sum() / total) if total else float("nan"),
        "agreement_free": float(agree_free.sum() / total) if total else float("nan"),
        "tokens_all_layers_agree": float((tokens_df["layers_changed"] == 0).mean()),
        "first_disagreeing_layer": (int(layers_df.filter(pl.col("agreement") < 1)["layer"][0])
                                    if (layers_df["agreement"] < 1).any() else None),
        "loss_own": loss_own, "loss_replayed": loss_rep, "kl_mean": float(tokens_df["kl"].mean()),
        "kl_max": float(tokens_df["kl"].max()), "logits_bit_identical": identical,
        **msum,
        "batch_size": batch_size, "dtype": str(next(mm.model.parameters()).dtype).replace("torch.", ""),
        "device": str(mm.device), "versions": versions(),
    }
    res = ReplayResult(layers_df, tokens_df, summary, margins=margins_df)
    if out is not None:
        tables = {"layers": layers_df, "tokens": tokens_df, **({"margins": margins_df} if with_margins else {})}
        res.out = write_result(out, "replay", tables, summary, overwrite)
    return res


def _hashes_match(mm, info: dict) -> bool:
    """Both sides know their weight files and the common ones are equal (a difference is refused earlier)."""
    fa, fb = info.get("file_hashes") or {}, mm.file_hashes or {}
    return any(k.endswith(".safetensors") or k.endswith(".bin") for k in set(fa) & set(fb))


def _permutation_problem(cooc: np.ndarray, layers: list[int], name: str, K: int) -> str | None:
    """One sentence when the recorded ids look like the model's own under another numbering: in at least half
    of the layers the best one-to-one relabelling (an assignment on the co-occurrence counts) makes at least
    60% of the routing slots agree, and 30 points more than the ids as numbered.

    cooc[j, a, b] counts tokens whose recorded set holds a and own set holds b (K x K pairs a token), so the
    T*K slots are cooc.sum() / K; agreeing slots as numbered are its trace, after relabelling its assignment."""
    from scipy.optimize import linear_sum_assignment

    seen, bad = 0, []
    for j, layer in enumerate(layers):
        c = cooc[j]
        slots = c.sum() / K
        if slots == 0:
            continue
        seen += 1
        r, col = linear_sum_assignment(-c)
        ident, matched = np.trace(c) / slots, c[r, col].sum() / slots
        if matched >= 0.6 and matched - ident >= 0.3:
            bad.append((layer, ident, matched))
    if seen and len(bad) * 2 >= seen:
        layer, i, m = max(bad, key=lambda x: x[2] - x[1])
        return (f"the expert ids of run {name} look permuted against this model's (layer {layer}: {i:.0%} of "
                f"routing slots agree as numbered, {m:.0%} after relabelling): it was recorded on another "
                f"checkpoint or numbering; match experts first (`workbench compare --match routing`)")
    return None


def _batch_routes(b, rec: dict, layers, K: int, E: int, name: str):
    """Recorded routes of one batch as ForcedRoutes wants them, plus per layer which valid tokens have one.

    routes[layer] = (rows [N] torch long (flat [B*S] index), index [N, K], weights or None, index as numpy)."""
    import torch

    routes, have = {}, {}
    start = 0
    offsets = {}
    for bi, s in enumerate(b.seqs):
        offsets[s.doc_id] = (bi * b.width, start)
        start += len(s.ids)
    for layer in layers:
        rows, vrows, idx, w = [], [], [], []
        for s in b.seqs:
            got = rec.get(s.doc_id, {}).get(layer)
            if got is None:
                continue
            pos, ex, ww = got
            flat0, v0 = offsets[s.doc_id]
            rows.append(flat0 + pos)
            vrows.append(v0 + pos)
            idx.append(ex)
            if ww is not None:
                w.append(ww)
        m = np.zeros(len(b.rows), bool)
        if not rows:
            have[layer] = m
            continue
        rows_a, vrows_a, idx_a = np.concatenate(rows), np.concatenate(vrows), np.concatenate(idx)
        check_ids(idx_a, E, f"the routing of run {name}")
        order = np.argsort(vrows_a, kind="stable")  # valid-token order, so masks and arrays line up
        rows_a, vrows_a, idx_a = rows_a[order], vrows_a[order], idx_a[order]
        w_t = torch.from_numpy(np.concatenate(w)[order]) if w else None
        m[vrows_a] = True
        have[layer] = m
        routes[layer] = (torch.from_numpy(rows_a), torch.from_numpy(idx_a), w_t, idx_a)
    return routes, have


def _token_rows(b, lo_logits, lr_logits, changed, changed_free, first, min_margin=None) -> pl.DataFrame:
    """Per valid token: KL(own || replayed) of the next-token distribution and the actual next token's
    log-probability both ways (null at a sequence's last token, whose next token the run does not hold)."""
    import torch

    lo = torch.log_softmax(lo_logits.float(), dim=-1)
    lr = torch.log_softmax(lr_logits.float(), dim=-1)
    kl = (lo.exp() * (lo - lr)).sum(-1).clamp_min(0).cpu().numpy()
    token_ids = np.concatenate([s.ids for s in b.seqs])
    nxt = np.concatenate([np.append(s.ids[1:], -1) for s in b.seqs])
    has = nxt >= 0
    tgt = torch.from_numpy(np.where(has, nxt, 0)).to(lo.device)
    lpo = lo.gather(1, tgt[:, None])[:, 0].cpu().numpy()
    lpr = lr.gather(1, tgt[:, None])[:, 0].cpu().numpy()
    lpo = np.where(has, lpo, np.nan)
    lpr = np.where(has, lpr, np.nan)
    df = pl.DataFrame({
        "doc_id": b.doc, "pos": b.pos, "token_id": token_ids.astype(np.int32), "kl": kl.astype(np.float64),
        "logprob_own": lpo, "logprob_replayed": lpr, "dlogprob": lpr - lpo,
        "layers_changed": changed, "layers_changed_free": changed_free,
        "first_changed_layer": pl.Series(first, dtype=pl.Int16),
    })
    if min_margin is not None:  # the smallest router margin of the token over the recorded layers
        df = df.with_columns(pl.Series("min_margin", np.where(np.isfinite(min_margin), min_margin, np.nan),
                                       dtype=pl.Float32).fill_nan(None))
    return df.with_columns(pl.col("logprob_own", "logprob_replayed", "dlogprob").fill_nan(None),
                           pl.col("first_changed_layer").replace(-1, None))
