"""Compare two runs: what changed in routing between two models, checkpoints or intervention sets.

Runs over the same tokens (same `doc_id, pos, token_id`) are compared decision by decision; runs over
different data still get load, balance and specialisation side by side. Expert ids are not stable
across checkpoints, so B's experts can first be matched to A's (`match_experts`: by weight similarity
or by co-routing, solved with scipy's linear_sum_assignment) and relabelled before comparing.

Definitions (per MoE layer; "selected" = the experts the model itself chose, from `routing/`):

- changed: the token's selected set in B differs from A's (as sets; order ignored).
- overlap: |S_A & S_B| / max(K_A, K_B), the share of top-k slots both runs agree on.
- JSD: Jensen-Shannon divergence (natural log, so 0..ln 2) between the token's two routing
  distributions. distribution="weights" (default, always available): the routing weights on the
  selected experts, renormalised to sum 1, zero elsewhere - what the model actually mixed.
  distribution="logits": softmax over all E router logits (needs both runs captured with --logits;
  for sigmoid-scored families it is still a softmax, a monotone view of the scores).
- load: share of the layer's selections an expert gets; balance: normalised entropy of the load.
- specialisation of a label value v: JSD(p(e | v), p(e)) over the layer's experts, where p(e | v) is
  the load on v's tokens; lift(e, v) = p(e | v) / p(e).

Everything is computed one layer at a time from lazy polars scans, so memory is one layer of the
aligned tokens, not the whole run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult

LN2 = math.log(2.0)
MATCH_METHODS = ("none", "weights", "routing")


def _open(run):
    from ..store import Run, open_run

    return run if isinstance(run, Run) else open_run(run)


# ---------------------------------------------------------------------------------------------
# Alignment


def alignment(run_a, run_b) -> dict:
    """How the two runs' tokens line up: counts, the shared (doc_id, pos, token_id) keys, and a sentence.

    status: "identical" (the same tokens), "partial" (some tokens shared), "none" (different data:
    only load, balance and specialisation are comparable).
    """
    run_a, run_b = _open(run_a), _open(run_b)
    ta = run_a.tokens.select("doc_id", "pos", "token_id")
    tb = run_b.tokens.select("doc_id", "pos", pl.col("token_id").alias("token_id_b"))
    j = ta.join(tb, on=["doc_id", "pos"], how="inner")
    counts = pl.concat([
        ta.select(pl.len().alias("n")).with_columns(pl.lit("a").alias("k")),
        tb.select(pl.len().alias("n")).with_columns(pl.lit("b").alias("k")),
        j.select(pl.len().alias("n")).with_columns(pl.lit("pos").alias("k")),
        j.filter(pl.col("token_id") == pl.col("token_id_b")).select(pl.len().alias("n"))
         .with_columns(pl.lit("same").alias("k")),
    ]).collect()
    c = dict(zip(counts["k"].to_list(), counts["n"].to_list()))
    n_a, n_b, n_pos, n_same = c["a"], c["b"], c["pos"], c["same"]
    keys = (j.filter(pl.col("token_id") == pl.col("token_id_b")).select("doc_id", "pos").collect()
            if n_same else pl.DataFrame(schema={"doc_id": pl.Int64, "pos": pl.Int32}))
    if n_same == n_a == n_b and n_a > 0:
        status, text = "identical", f"both runs cover the same {n_a:,} tokens: every comparison applies"
    elif n_same > 0:
        status = "partial"
        text = (f"{n_same:,} tokens align (same doc_id, pos and token_id) of {n_a:,} in A and {n_b:,} in B"
                + (f"; {n_pos - n_same:,} positions hold different tokens" if n_pos > n_same else "")
                + ": per-token comparisons use the aligned tokens only, load/balance/specialisation use all")
    else:
        status = "none"
        text = (f"the runs share no tokens ({n_a:,} in A, {n_b:,} in B"
                + (f"; {n_pos:,} shared positions hold different tokens" if n_pos else "")
                + "): only load, balance and specialisation are compared, side by side")
    return {"status": status, "tokens_a": n_a, "tokens_b": n_b, "aligned": n_same,
            "same_position_other_token": n_pos - n_same, "keys": keys, "text": text}


# ---------------------------------------------------------------------------------------------
# Expert matching


def _model(spec_or_mm):
    from ..models.loading import MoEModel, load_model

    if isinstance(spec_or_mm, MoEModel):
        return spec_or_mm
    return load_model(str(spec_or_mm), device="cpu")


def _run_model_spec(run) -> str:
    info = run.model_info
    path = info.get("path")
    return path if path and Path(path).exists() else info["spec"]


def _expert_features(mm, layer: int) -> dict[str, np.ndarray]:
    """Per component, a [E, D] matrix: each expert's router row(s) and its projection weights, flattened.

    Generic over families: every router parameter / buffer and every experts parameter whose first
    dimension is E belongs to one expert (gate_up_proj, down_proj, their biases, correction bias).
    """
    import torch

    lay = mm.layer(layer)
    e = mm.n_experts
    out: dict[str, list] = {"router": [], "gate_up": [], "down": []}
    with torch.no_grad():
        for name, t in list(lay.router.named_parameters()) + list(lay.router.named_buffers()):
            if t.ndim >= 1 and t.shape[0] == e:
                out["router"].append(t.detach().float().reshape(e, -1).cpu().numpy())
        for name, t in lay.experts.named_parameters():
            if t.ndim >= 1 and t.shape[0] == e:
                key = "down" if "down" in name else "gate_up"
                out[key].append(t.detach().float().reshape(e, -1).cpu().numpy())
    return {k: np.concatenate(v, axis=1) for k, v in out.items() if v}


def _cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    nx = np.linalg.norm(x, axis=1, keepdims=True)
    ny = np.linalg.norm(y, axis=1, keepdims=True)
    return (x / np.maximum(nx, 1e-30)) @ (y / np.maximum(ny, 1e-30)).T


def weight_similarity(model_a, model_b, layer: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """S[a, b]: mean over components (router rows, gate/up, down) of the cosine similarity of expert a
    of model A with expert b of model B in `layer`; also each component's matrix."""
    fa, fb = _expert_features(model_a, layer), _expert_features(model_b, layer)
    comps = {}
    for k in fa:
        if k in fb and fa[k].shape[1] == fb[k].shape[1]:
            comps[k] = _cosine(fa[k].astype(np.float64), fb[k].astype(np.float64))
    if not comps:
        raise WorkbenchError(f"layer {layer}: the two models' experts have no weights of the same shape to compare")
    return np.mean(list(comps.values()), axis=0), comps


def _layer_routing(run, layer: int, keys: pl.DataFrame | None, cols=("experts", "weights")) -> pl.DataFrame:
    lf = run.routing.filter(pl.col("layer") == layer).select("doc_id", "pos", *cols)
    if keys is not None:
        lf = lf.join(keys.lazy(), on=["doc_id", "pos"], how="semi")
    return lf.sort("doc_id", "pos").collect()


def routing_similarity(run_a, run_b, layer: int, keys: pl.DataFrame | None = None) -> np.ndarray:
    """S[a, b]: cosine similarity of the activation indicators of expert a (run A) and expert b (run B)
    over the aligned tokens: co-selections / sqrt(selections_a * selections_b)."""
    run_a, run_b = _open(run_a), _open(run_b)
    if keys is None:
        keys = alignment(run_a, run_b)["keys"]
    if keys.height == 0:
        raise WorkbenchError("matching by co-routing needs runs over the same tokens; these share none")
    ra, rb = _layer_routing(run_a, layer, keys, ("experts",)), _layer_routing(run_b, layer, keys, ("experts",))
    e = max(run_a.n_experts, run_b.n_experts)
    ea = ra["experts"].to_list()
    eb = rb["experts"].to_list()
    rows = np.repeat(np.arange(len(ea)), [len(x) for x in ea])
    ia = np.zeros((len(ea), e), np.float64)
    ia[rows, np.concatenate(ea).astype(np.int64)] = 1.0
    rows_b = np.repeat(np.arange(len(eb)), [len(x) for x in eb])
    ib = np.zeros((len(eb), e), np.float64)
    ib[rows_b, np.concatenate(eb).astype(np.int64)] = 1.0
    co = ia.T @ ib
    na, nb = ia.sum(0), ib.sum(0)
    return co / np.sqrt(np.maximum(np.outer(na, nb), 1e-30))


def _assign(s: np.ndarray, layer: int, weak: float, method: str) -> pl.DataFrame:
    from scipy.optimize import linear_sum_assignment

    ra, cb = linear_sum_assignment(-s)
    sim = s[ra, cb]
    # best alternative for expert a: the next most similar b it was not matched to
    alt = s.copy()
    alt[ra, cb] = -np.inf
    second = alt.max(1)[ra] if s.shape[1] > 1 else np.full(len(ra), np.nan)
    return pl.DataFrame({
        "layer": pl.Series([layer] * len(ra), dtype=pl.Int16), "expert_a": pl.Series(ra, dtype=pl.Int16),
        "expert_b": pl.Series(cb, dtype=pl.Int16), "similarity": sim.astype(np.float64),
        "second_best": second.astype(np.float64), "margin": (sim - second).astype(np.float64),
        "weak": sim < weak, "method": [method] * len(ra)})


def match_experts(a, b, by: str = "weights", layers=None, weak: float = 0.5, keys=None) -> pl.DataFrame:
    """Match B's experts to A's, per MoE layer, by maximum total similarity (linear_sum_assignment).

    by="weights": a and b are models (MoEModel, spec, or runs, whose model is loaded); similarity is
    `weight_similarity` (1.0 for an exact copy). by="routing": a and b are runs over the same tokens;
    similarity is `routing_similarity`. Returns layer, expert_a, expert_b, similarity, second_best
    (A's best alternative), margin, weak (similarity < `weak`: no convincing counterpart).
    """
    from ..store import Run

    if by not in ("weights", "routing"):
        raise WorkbenchError(f"unknown matching {by!r}; choose weights or routing")
    if by == "routing":
        ra, rb = _open(a), _open(b)
        if ra.n_experts != rb.n_experts:
            raise WorkbenchError(f"cannot match experts: {ra.n_experts} vs {rb.n_experts} experts per layer")
        lays = sorted(set(ra.moe_layers) & set(rb.moe_layers)) if layers is None else list(layers)
        keys = alignment(ra, rb)["keys"] if keys is None else keys
        return pl.concat([_assign(routing_similarity(ra, rb, lay, keys), lay, weak, "routing") for lay in lays])
    ma = _model(_run_model_spec(a) if isinstance(a, Run) else a)
    mb = _model(_run_model_spec(b) if isinstance(b, Run) else b)
    if ma.n_experts != mb.n_experts:
        raise WorkbenchError(f"cannot match experts: {ma.n_experts} vs {mb.n_experts} experts per layer")
    lays = sorted(set(ma.moe_layers) & set(mb.moe_layers)) if layers is None else list(layers)
    if not lays:
        raise WorkbenchError("the two models share no MoE layer")
    return pl.concat([_assign(weight_similarity(ma, mb, lay)[0], lay, weak, "weights") for lay in lays])


def permute_experts(model, out, seed: int = 0) -> tuple[Path, dict[int, list[int]]]:
    """Write a copy of `model` whose experts are shuffled per MoE layer (router rows and expert weights
    alike): the same function under different expert ids, the test case for matching.

    Returns (folder, {layer: perm}) where new expert i is old expert perm[i].
    """
    import torch

    mm = _model(model)
    out = Path(out)
    rng = np.random.default_rng(seed)
    perms = {}
    with torch.no_grad():
        for lay in mm.layers:
            perm = rng.permutation(mm.n_experts)
            while mm.n_experts > 1 and (perm == np.arange(mm.n_experts)).all():
                perm = rng.permutation(mm.n_experts)
            idx = torch.as_tensor(perm)
            for mod in (lay.router, lay.experts):
                for _, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                    if t.ndim >= 1 and t.shape[0] == mm.n_experts:
                        t.copy_(t[idx.to(t.device)].clone())
            perms[lay.index] = perm.tolist()
    out.mkdir(parents=True, exist_ok=True)
    mm.model.save_pretrained(out)
    mm.tokenizer.save_pretrained(out)
    # the loaded model was edited in place: put it back
    with torch.no_grad():
        for lay in mm.layers:
            inv = torch.as_tensor(np.argsort(perms[lay.index]))
            for mod in (lay.router, lay.experts):
                for _, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                    if t.ndim >= 1 and t.shape[0] == mm.n_experts:
                        t.copy_(t[inv.to(t.device)].clone())
    return out, perms


def _mapping(matches: pl.DataFrame | None) -> dict[int, np.ndarray]:
    """{layer: array m with m[expert_b] = expert_a}."""
    if matches is None:
        return {}
    out = {}
    for (lay,), g in matches.group_by("layer"):
        m = np.arange(int(g["expert_b"].max()) + 1, dtype=np.int64)
        m[g["expert_b"].to_numpy().astype(np.int64)] = g["expert_a"].to_numpy().astype(np.int64)
        out[int(lay)] = m
    return out


# ---------------------------------------------------------------------------------------------
# Per-token comparison


def _lists(col: pl.Series, k: int, dtype) -> np.ndarray:
    if len(col) == 0:
        return np.zeros((0, k), dtype)
    return col.list.to_array(k).to_numpy().astype(dtype)


def _jsd_weights(ea, wa, eb, wb) -> np.ndarray:
    """JSD of the sparse distributions weights-on-selected (renormalised), without a dense [T, E]."""
    p = wa.astype(np.float64)
    q = wb.astype(np.float64)
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-30)
    q = q / np.maximum(q.sum(1, keepdims=True), 1e-30)
    eq = ea[:, :, None] == eb[:, None, :]  # [T, Ka, Kb]
    q_at_a = (eq * q[:, None, :]).sum(2)  # B's mass on A's experts
    p_at_b = (eq * p[:, :, None]).sum(1)  # A's mass on B's experts
    with np.errstate(divide="ignore", invalid="ignore"):
        ta = np.where(p > 0, p * np.log(p / ((p + q_at_a) / 2)), 0.0).sum(1)
        tb = np.where(q > 0, q * np.log(q / ((q + p_at_b) / 2)), 0.0).sum(1)
    return np.clip(0.5 * (ta + tb), 0.0, LN2)


def _jsd_dense(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(p > 0, p * np.log(p / m), 0.0).sum(-1)
        b = np.where(q > 0, q * np.log(q / m), 0.0).sum(-1)
    return np.clip(0.5 * (a + b), 0.0, LN2)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _token_layer(run_a, run_b, layer, keys, mapping, distribution, chunk=200_000):
    """One layer's per-token comparison frame: doc_id, pos, changed, overlap, jsd, experts_a, experts_b."""
    cols = ("experts", "weights", "logits") if distribution == "logits" else ("experts", "weights")
    ra = _layer_routing(run_a, layer, keys, cols)
    rb = _layer_routing(run_b, layer, keys, cols).rename({c: f"{c}_b" for c in cols})
    j = ra.join(rb, on=["doc_id", "pos"], how="inner")
    ka, kb = run_a.top_k, run_b.top_k
    m = mapping.get(layer)
    parts = []
    for s in range(0, max(j.height, 1), chunk):
        c = j.slice(s, chunk)
        ea, wa = _lists(c["experts"], ka, np.int64), _lists(c["weights"], ka, np.float64)
        eb, wb = _lists(c["experts_b"], kb, np.int64), _lists(c["weights_b"], kb, np.float64)
        if m is not None:
            eb = m[eb]
        inter = (ea[:, :, None] == eb[:, None, :]).any(2).sum(1)
        kmax = max(ka, kb)
        if distribution == "logits":
            za = _lists(c["logits"], run_a.n_experts, np.float64)
            zb = _lists(c["logits_b"], run_b.n_experts, np.float64)
            if m is not None:  # B's logit columns in A's expert order
                zb2 = np.empty_like(zb)
                zb2[:, m] = zb
                zb = zb2
            jsd = _jsd_dense(_softmax(za), _softmax(zb))
        else:
            jsd = _jsd_weights(ea, wa, eb, wb)
            # null weights (an engine import) read as NaN: no distribution, so no JSD (not a silent 0)
            jsd[np.isnan(wa).any(1) | np.isnan(wb).any(1)] = np.nan
        parts.append(pl.DataFrame({
            "doc_id": c["doc_id"], "pos": c["pos"], "layer": pl.Series([layer] * c.height, dtype=pl.Int16),
            "changed": (inter < kmax) | (ka != kb), "overlap": inter / kmax, "jsd": jsd,
            "experts_a": c["experts"], "experts_b": pl.Series(eb.tolist(), dtype=pl.List(pl.Int16)),
        }))
    return pl.concat(parts) if parts else None


# ---------------------------------------------------------------------------------------------
# Load, balance, specialisation (each run on its own: valid for any two datasets)


def _relabel(lf: pl.LazyFrame, mapping: dict[int, np.ndarray]) -> pl.LazyFrame:
    if not mapping:
        return lf
    m = pl.DataFrame({"layer": pl.Series([lay for lay, v in mapping.items() for _ in v], dtype=pl.Int16),
                      "expert": pl.Series([e for v in mapping.values() for e in range(len(v))], dtype=pl.Int16),
                      "_to": pl.Series([int(x) for v in mapping.values() for x in v], dtype=pl.Int16)})
    return (lf.join(m.lazy(), on=["layer", "expert"], how="left")
            .with_columns(pl.coalesce("_to", "expert").alias("expert")).drop("_to"))


def _selections(run, layers, mapping=None, labels=()) -> pl.LazyFrame:
    lf = run.routing.filter(pl.col("layer").is_in(list(layers))).select("doc_id", "pos", "layer", "experts")
    if labels:
        lf = lf.join(run.tokens.select("doc_id", "pos", *[pl.col(c).cast(pl.Utf8) for c in labels]),
                     on=["doc_id", "pos"], how="left")
    lf = lf.explode("experts").rename({"experts": "expert"})
    return _relabel(lf, mapping or {})


def _load(run, layers, mapping=None) -> pl.DataFrame:
    return (_selections(run, layers, mapping).group_by("layer", "expert").agg(pl.len().alias("count"))
            .with_columns((pl.col("count") / pl.col("count").sum().over("layer")).alias("load")).collect())


def _balance(load: pl.DataFrame, n_experts: int) -> pl.DataFrame:
    return (load.group_by("layer").agg(
        (-(pl.col("load") * pl.col("load").log()).sum() / math.log(n_experts)).alias("entropy_norm"),
        (pl.col("load").max() * n_experts).alias("max_over_mean"),
        pl.len().alias("experts_used")).sort("layer"))


def _label_columns(run_a, run_b, labels, max_values=50) -> list[str]:
    shared = [c for c in run_a.label_columns if c in run_b.label_columns]
    if labels is not None:
        labels = [labels] if isinstance(labels, str) else list(labels)
        bad = [c for c in labels if c not in shared]
        if bad:
            raise WorkbenchError(f"label {bad[0]!r} is not a label of both runs (shared: {', '.join(shared) or 'none'})")
        return labels
    out = []
    for c in shared:
        if c == "src_doc":
            continue
        n = run_a.tokens.select(pl.col(c).n_unique()).collect().item()
        if 2 <= n <= max_values:
            out.append(c)
    return out


def _specialisation(run, layers, label, mapping=None) -> pl.DataFrame:
    """Per (layer, value, expert): count and p(e | value); the caller adds p(e) and lift."""
    lf = _selections(run, layers, mapping, (label,)).filter(pl.col(label).is_not_null())
    return (lf.group_by("layer", label, "expert").agg(pl.len().alias("count"))
            .with_columns((pl.col("count") / pl.col("count").sum().over("layer", label)).alias("p"))
            .rename({label: "value"}).collect())


def _spec_tables(run_a, run_b, layers, labels, mapping, load):
    rows, summary = [], []
    pe = load.select("layer", "expert", pl.col("load_a").alias("pe_a"), pl.col("load_b").alias("pe_b"))
    for c in labels:
        sa = _specialisation(run_a, layers, c).rename({"count": "count_a", "p": "p_a"})
        sb = _specialisation(run_b, layers, c, mapping).rename({"count": "count_b", "p": "p_b"})
        values = pl.concat([sa.select("value"), sb.select("value")]).unique()
        grid = pe.select("layer", "expert").join(values, how="cross")  # every expert, used or not
        t = (grid.join(sa, on=["layer", "value", "expert"], how="left")
             .join(sb, on=["layer", "value", "expert"], how="left")
             .join(pe, on=["layer", "expert"], how="left")
             .with_columns(pl.col("p_a", "p_b", "count_a", "count_b").fill_null(0))
             .with_columns((pl.col("p_a") / pl.col("pe_a")).alias("lift_a"),
                           (pl.col("p_b") / pl.col("pe_b")).alias("lift_b"))
             .with_columns((pl.col("lift_b") - pl.col("lift_a")).alias("lift_shift"),
                           pl.lit(c).alias("label")))
        rows.append(t.select("layer", "label", "value", "expert", "count_a", "count_b", "p_a", "p_b", "lift_a",
                             "lift_b", "lift_shift"))

        def jsd_of(df, p, q):
            m = (pl.col(p) + pl.col(q)) / 2
            term = lambda x: pl.when(pl.col(x) > 0).then(pl.col(x) * (pl.col(x) / m).log()).otherwise(0.0)  # noqa: E731
            return df.group_by("layer", "value").agg((0.5 * (term(p).sum() + term(q).sum())).alias("spec"))

        fa = jsd_of(t.with_columns(pl.col("pe_a").fill_null(0)), "p_a", "pe_a").rename({"spec": "spec_a"})
        fb = jsd_of(t.with_columns(pl.col("pe_b").fill_null(0)), "p_b", "pe_b").rename({"spec": "spec_b"})
        summary.append(fa.join(fb, on=["layer", "value"], how="full", coalesce=True)
                       .with_columns((pl.col("spec_b") - pl.col("spec_a")).alias("spec_shift"), pl.lit(c).alias("label"))
                       .select("layer", "label", "value", "spec_a", "spec_b", "spec_shift"))
    if not rows:
        return None, None
    return (pl.concat(rows).sort("layer", "label", "value", "expert"),
            pl.concat(summary).sort("layer", "label", "value"))


# ---------------------------------------------------------------------------------------------
# The analysis


def analyze(run, other=None, match="none", matches: pl.DataFrame | None = None, distribution: str = "weights",
            labels=None, model_a=None, model_b=None, weak: float = 0.5, max_changes: int = 200_000,
            progress: bool = False) -> AnalysisResult:
    """Compare run A (`run`) with run B (`other`). See the module docstring for every definition.

    match: "none" (same expert ids), "weights" (match B's experts to A's by weight similarity; the
    models come from the runs' manifests unless `model_a`/`model_b` are given) or "routing" (by
    co-routing on the aligned tokens); or pass `matches` (a `match_experts` table). B's experts are
    relabelled to A's ids before anything is compared.

    Tables: layers (per layer: tokens, changed_share, mean_overlap, mean_jsd, balance of A and B),
    load (per layer x expert: load_a, load_b, shift), labels (per layer x label value, aligned tokens),
    specialisation / specialisation_experts (per label value), changes (one row per changed decision,
    at most `max_changes`), tokens (per aligned token: layers changed, mean JSD), matches.
    """
    if other is None:
        raise WorkbenchError("compare needs two runs: analyze(run_a, other=run_b) or workbench compare RUN_A RUN_B")
    if distribution not in ("weights", "logits"):
        raise WorkbenchError(f"unknown distribution {distribution!r}; choose weights or logits")
    if matches is None and match not in MATCH_METHODS:
        raise WorkbenchError(f"unknown matching {match!r}; choose from {', '.join(MATCH_METHODS)}")
    run_a, run_b = _open(run), _open(other)
    layers = sorted(set(run_a.moe_layers) & set(run_b.moe_layers))
    if not layers:
        raise WorkbenchError("the two runs share no MoE layer; nothing to compare")
    same_e = run_a.n_experts == run_b.n_experts
    al = alignment(run_a, run_b)
    keys = al["keys"] if al["status"] != "none" else None
    if distribution == "logits" and keys is not None:
        for r in (run_a, run_b):
            if "logits" not in r.routing.collect_schema().names():
                raise WorkbenchError(f"run {r.path} has no router logits; capture with --logits or use "
                                     "distribution='weights'")
    if matches is None and match != "none":
        if not same_e:
            raise WorkbenchError(f"cannot match experts: {run_a.n_experts} vs {run_b.n_experts} experts per layer")
        if match == "routing":
            if keys is None:
                raise WorkbenchError("matching by co-routing needs runs over the same tokens; "
                                     "these share none (use match='weights')")
            matches = match_experts(run_a, run_b, by="routing", layers=layers, weak=weak, keys=keys)
        else:
            matches = match_experts(model_a if model_a is not None else run_a,
                                    model_b if model_b is not None else run_b, by="weights", layers=layers, weak=weak)
    mapping = _mapping(matches)
    tables: dict[str, pl.DataFrame] = {}

    # load and balance: each run on its own data
    la = _load(run_a, layers).rename({"count": "count_a", "load": "load_a"})
    lb = _load(run_b, layers, mapping).rename({"count": "count_b", "load": "load_b"})
    load = (la.join(lb, on=["layer", "expert"], how="full", coalesce=True)
            .with_columns(pl.col("count_a", "count_b", "load_a", "load_b").fill_null(0))
            .with_columns((pl.col("load_b") - pl.col("load_a")).alias("shift"))
            .sort("layer", "expert"))
    if same_e:  # every (layer, expert), unused ones included
        full = pl.DataFrame({"layer": pl.Series([lay for lay in layers for _ in range(run_a.n_experts)], dtype=pl.Int16),
                             "expert": pl.Series(list(range(run_a.n_experts)) * len(layers), dtype=pl.Int16)})
        load = full.join(load, on=["layer", "expert"], how="left").with_columns(
            pl.col("count_a", "count_b", "load_a", "load_b", "shift").fill_null(0))
    tables["load"] = load
    ba = _balance(la.rename({"load_a": "load"}), run_a.n_experts).rename(
        {"entropy_norm": "entropy_a", "max_over_mean": "max_over_mean_a", "experts_used": "used_a"})
    bb = _balance(lb.rename({"load_b": "load"}), run_b.n_experts).rename(
        {"entropy_norm": "entropy_b", "max_over_mean": "max_over_mean_b", "experts_used": "used_b"})
    lay_tab = (ba.join(bb, on="layer", how="full", coalesce=True)
               .join(load.group_by("layer").agg((0.5 * pl.col("shift").abs().sum()).alias("load_tv")), on="layer",
                     how="left"))

    # per token, one layer at a time
    lab_cols = _label_columns(run_a, run_b, labels)
    per_layer, label_rows, changes, token_parts = [], [], [], []
    n_changes = 0
    if keys is not None:
        tok_labels = None
        if lab_cols:
            tok_labels = (run_a.tokens.select("doc_id", "pos", *[pl.col(c).cast(pl.Utf8) for c in lab_cols])
                          .join(keys.lazy(), on=["doc_id", "pos"], how="semi").collect())
        from tqdm.auto import tqdm

        for lay in tqdm(layers, desc="compare", disable=not progress, leave=False):
            t = _token_layer(run_a, run_b, lay, keys, mapping, distribution)
            if t is None or t.height == 0:
                continue
            per_layer.append(t.group_by("layer").agg(pl.len().alias("tokens"),
                                                     pl.col("changed").mean().alias("changed_share"),
                                                     pl.col("overlap").mean().alias("mean_overlap"),
                                                     pl.col("jsd").mean().alias("mean_jsd")))
            token_parts.append(t.select("doc_id", "pos", "changed", "jsd"))
            if tok_labels is not None:
                tl = t.join(tok_labels, on=["doc_id", "pos"], how="left")
                for c in lab_cols:
                    label_rows.append(tl.filter(pl.col(c).is_not_null()).group_by("layer", c).agg(
                        pl.len().alias("tokens"), pl.col("changed").mean().alias("changed_share"),
                        pl.col("overlap").mean().alias("mean_overlap"), pl.col("jsd").mean().alias("mean_jsd"))
                        .rename({c: "value"}).with_columns(pl.lit(c).alias("label")))
            ch = t.filter(pl.col("changed"))
            if n_changes < max_changes and ch.height:
                ch = ch.head(max_changes - n_changes)
                n_changes += ch.height
                changes.append(ch.drop("changed"))
    if per_layer:
        lay_tab = lay_tab.join(pl.concat(per_layer), on="layer", how="left")
    else:
        lay_tab = lay_tab.with_columns(pl.lit(None, pl.UInt32).alias("tokens"),
                                       *[pl.lit(None, pl.Float64).alias(c) for c in
                                         ("changed_share", "mean_overlap", "mean_jsd")])
    tables["layers"] = lay_tab.select("layer", "tokens", "changed_share", "mean_overlap", "mean_jsd", "load_tv",
                                      "entropy_a", "entropy_b", "max_over_mean_a", "max_over_mean_b", "used_a",
                                      "used_b").sort("layer")
    if label_rows:
        tables["labels"] = pl.concat(label_rows).select("layer", "label", "value", "tokens", "changed_share",
                                                        "mean_overlap", "mean_jsd").sort("label", "value", "layer")
    spec, spec_summary = _spec_tables(run_a, run_b, layers, lab_cols, mapping, load) if lab_cols else (None, None)
    if spec is not None:
        tables["specialisation"] = spec_summary
        tables["specialisation_experts"] = spec
    if keys is not None:
        tok_text = run_a.tokens.select("doc_id", "pos", "token").join(keys.lazy(), on=["doc_id", "pos"], how="semi")
        ch_schema = {"doc_id": pl.Int64, "pos": pl.Int32, "layer": pl.Int16, "token": pl.Utf8, "overlap": pl.Float64,
                     "jsd": pl.Float64, "experts_a": pl.List(pl.Int16), "experts_b": pl.List(pl.Int16)}
        if changes:
            ch = (pl.concat(changes).join(tok_text.collect(), on=["doc_id", "pos"], how="left")
                  .select(list(ch_schema)).sort("doc_id", "pos", "layer"))
        else:
            ch = pl.DataFrame(schema=ch_schema)
        tables["changes"] = ch
        if token_parts:
            tables["tokens"] = (pl.concat(token_parts).group_by("doc_id", "pos")
                                .agg(pl.col("changed").sum().cast(pl.Int32).alias("layers_changed"),
                                     pl.col("jsd").mean().alias("mean_jsd"))
                                .join(tok_text.collect(), on=["doc_id", "pos"], how="left").sort("doc_id", "pos")
                                .select("doc_id", "pos", "token", "layers_changed", "mean_jsd"))
    if matches is not None:
        tables["matches"] = matches
    summary = _summary(run_a, run_b, al, tables, matches, distribution, n_changes >= max_changes)
    from .common import weights_note

    notes = [n for n in (weights_note(run_a), weights_note(run_b)) if n]
    if notes and keys is not None and distribution == "weights":
        summary += (f"\n{'; '.join(notes)}: JSD needs routing weights and is NaN; changed share, overlap, "
                    "load and specialisation use expert ids only")
    meta = {"alignment": {k: v for k, v in al.items() if k != "keys"}, "run_a": str(run_a.path),
            "run_b": str(run_b.path), "distribution": distribution, "labels": lab_cols,
            "match": "given" if matches is not None and match == "none" else match, "n_experts": run_a.n_experts,
            "changes_truncated": n_changes >= max_changes}
    return AnalysisResult("compare", tables, "layers", summary, meta)


def _summary(run_a, run_b, al, tables, matches, distribution, truncated) -> str:
    lines = [f"A: {run_a.path} ({run_a.model_info.get('spec')})", f"B: {run_b.path} ({run_b.model_info.get('spec')})",
             f"tokens: {al['text']}"]
    if matches is not None:
        n_weak = int(matches["weak"].sum())
        moved = int((matches["expert_a"] != matches["expert_b"]).sum())
        lines.append(f"experts matched by {matches['method'][0]}: {moved} of {matches.height} relabelled, "
                     f"mean similarity {matches['similarity'].mean():.3f}, {n_weak} weak"
                     + (" (" + ", ".join(f"L{r['layer']}:E{r['expert_a']}~E{r['expert_b']} {r['similarity']:.2f}"
                                         for r in matches.filter(pl.col("weak")).head(5).iter_rows(named=True)) + ")"
                        if n_weak else ""))
    lay = tables["layers"]
    if lay["changed_share"].null_count() < lay.height:
        lines.append(f"per layer (aligned tokens; JSD of routing {distribution}, nats, max ln 2 = {LN2:.3f}):")
        for r in lay.iter_rows(named=True):
            if r["changed_share"] is None:
                continue
            lines.append(f"  L{r['layer']}: {100 * r['changed_share']:5.1f}% of tokens changed their experts, "
                         f"top-k overlap {r['mean_overlap']:.3f}, JSD {r['mean_jsd']:.4f}, load TV {r['load_tv']:.3f}, "
                         f"balance {r['entropy_a']:.3f} -> {r['entropy_b']:.3f}")
    else:
        lines.append("per layer (each run on its own tokens): load total variation and balance (entropy / log E):")
        for r in lay.iter_rows(named=True):
            lines.append(f"  L{r['layer']}: load TV {r['load_tv']:.3f}, balance {r['entropy_a']:.3f} vs {r['entropy_b']:.3f}")
    if "labels" in tables:
        agg = (tables["labels"].group_by("label", "value")
               .agg((pl.col("changed_share") * pl.col("tokens")).sum() / pl.col("tokens").sum(),
                    (pl.col("mean_jsd") * pl.col("tokens")).sum() / pl.col("tokens").sum(),
                    (pl.col("tokens").sum() / pl.col("layer").n_unique()).alias("n"))
               .sort("label", "value"))
        lines.append("per label value (all layers): " + "; ".join(
            f"{r['label']}={r['value']} {100 * r['changed_share']:.1f}% changed, JSD {r['mean_jsd']:.4f}"
            for r in agg.head(12).iter_rows(named=True)))
    load = tables["load"]
    moved = load.filter(pl.col("shift").abs() > 1e-9)
    if moved.height == 0:
        lines.append("no expert's load shifted")
    else:
        top = moved.sort(pl.col("shift").abs(), descending=True).head(3)
        lines.append("largest load shifts: " + ", ".join(
            f"L{r['layer']}:E{r['expert']} {100 * r['load_a']:.1f}% -> {100 * r['load_b']:.1f}%"
            for r in top.iter_rows(named=True)))
    if "specialisation" in tables:
        s = tables["specialisation"].filter(pl.col("spec_shift").is_not_null())
        if s.height:
            r = s.sort(pl.col("spec_shift").abs(), descending=True).row(0, named=True)
            lines.append(f"largest specialisation shift: {r['label']}={r['value']} in L{r['layer']} "
                         f"{r['spec_a']:.3f} -> {r['spec_b']:.3f} (JSD of its load from the layer's)")
    if truncated:
        lines.append("(the changes table is truncated; raise max_changes for all)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures (only from the tables)


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    figs = {}
    t = result.tables
    lay = t["layers"].sort("layer")
    x = lay["layer"].to_list()
    fig = go.Figure()
    if lay["changed_share"].null_count() < lay.height:
        fig.add_trace(go.Scatter(x=x, y=lay["changed_share"].to_list(), name="share of tokens changed", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=x, y=lay["mean_overlap"].to_list(), name="mean top-k overlap", mode="lines+markers"))
        fig.add_trace(go.Scatter(x=x, y=lay["mean_jsd"].to_list(), name="mean JSD (nats)", mode="lines+markers",
                                 yaxis="y2"))
    fig.add_trace(go.Scatter(x=x, y=lay["load_tv"].to_list(), name="load total variation", mode="lines+markers",
                             line={"dash": "dot"}))
    fig.update_layout(title="What changed per layer (B vs A)", xaxis_title="layer", yaxis={"title": "share", "range": [0, 1.05]},
                      yaxis2={"title": "JSD", "overlaying": "y", "side": "right", "rangemode": "tozero"},
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    figs["layer_curves"] = fig
    fig = go.Figure([go.Scatter(x=x, y=lay["entropy_a"].to_list(), name="A", mode="lines+markers"),
                     go.Scatter(x=x, y=lay["entropy_b"].to_list(), name="B", mode="lines+markers")])
    fig.update_layout(title="Load balance per layer (entropy / log E)", xaxis_title="layer", yaxis_range=[0, 1.05],
                      template="plotly_white")
    figs["balance"] = fig
    load = t["load"]
    if load.height:
        piv = load.pivot(on="expert", index="layer", values="shift", sort_columns=True).sort("layer")
        cols = sorted([c for c in piv.columns if c != "layer"], key=int)
        z = piv.select(cols).to_numpy()
        lim = float(np.nanmax(np.abs(z))) if z.size else 1.0
        figs["load_shift"] = go.Figure(go.Heatmap(z=z, x=cols, y=piv["layer"].to_list(), colorscale="RdBu_r", zmid=0,
                                                  zmin=-lim, zmax=lim, colorbar={"title": "B - A"}))
        figs["load_shift"].update_layout(title="Load shift per expert (share of the layer's selections, B - A)",
                                         xaxis_title="expert", yaxis_title="layer", xaxis_type="category",
                                         template="plotly_white")
    if "labels" in t:
        lab = t["labels"]
        fig = go.Figure()
        for (label, value), g in lab.sort("layer").group_by("label", "value", maintain_order=True):
            fig.add_trace(go.Scatter(x=g["layer"].to_list(), y=g["mean_jsd"].to_list(), name=f"{label}={value}",
                                     mode="lines+markers"))
        fig.update_layout(title="Routing JSD per layer and label value", xaxis_title="layer", yaxis_title="mean JSD",
                          template="plotly_white")
        figs["label_jsd"] = fig
    if "matches" in t:
        m = t["matches"]
        piv = m.pivot(on="expert_a", index="layer", values="similarity", sort_columns=True).sort("layer")
        cols = sorted([c for c in piv.columns if c != "layer"], key=int)
        figs["match_similarity"] = go.Figure(go.Heatmap(z=piv.select(cols).to_numpy(), x=cols,
                                                        y=piv["layer"].to_list(), colorscale="Viridis", zmin=0, zmax=1,
                                                        colorbar={"title": "similarity"}))
        figs["match_similarity"].update_layout(title=f"Matched experts: similarity of A's expert to its B match "
                                                     f"({m['method'][0]})", xaxis_title="expert (A)",
                                               yaxis_title="layer", xaxis_type="category", template="plotly_white")
    if "tokens" in t and t["tokens"].height:
        tok = t["tokens"]
        first = tok["doc_id"][0]
        d = tok.filter(pl.col("doc_id") == first).sort("pos")
        fig = go.Figure(go.Bar(x=d["pos"].to_list(), y=d["layers_changed"].to_list(),
                               hovertext=[repr(s) for s in d["token"].to_list()]))
        fig.update_layout(title=f"Layers whose decision changed, per token (document {first})", xaxis_title="position",
                          yaxis_title="layers changed", template="plotly_white")
        figs["token_changes"] = fig
    return figs


# ---------------------------------------------------------------------------------------------
# The demo's comparison


def demo_comparison(mm, run, data, out: str | Path, n: int = 8, label: str = "class", target: str = "target"):
    """Capture `data` again with the top-`n` experts of `run`'s behaviour map (target vs the rest) banned,
    and compare: the demo's "what does banning the code experts change" step.

    Returns (banned run, comparison result, the banned experts). A completed capture is reused.
    """
    from ..capture import capture
    from ..probes.interventions import format_spec
    from . import behavior

    maps = behavior.activation_maps(run, label)
    if target not in maps.classes:
        raise WorkbenchError(f"run {run.path} has no {label}={target} prompts to find the experts to ban")
    diff = behavior.contrast(maps, target, permutations=0, bootstrap=0, top_n=n)
    experts = behavior.top_experts(diff, n)
    spec = format_spec(experts)
    settings = run.manifest.get("settings", {})
    banned = capture(mm, data, out, resume=True, interventions={"ban": spec}, progress=False,
                     batch_size=settings.get("batch_size", 8), seq_len=settings.get("seq_len"),
                     max_tokens=settings.get("max_tokens"))
    return banned, analyze(run, other=banned, labels=[label]), experts


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    p.add_argument("--other", required=True, metavar="RUN_B", help="the run to compare with")
    p.add_argument("--match", choices=MATCH_METHODS, default="none",
                   help="match B's experts to A's first: by weights (checkpoints) or routing (same tokens)")
    p.add_argument("--distribution", choices=["weights", "logits"], default="weights",
                   help="routing distribution for the JSD: renormalised top-k weights, or softmax of logits")
    from ..options import at_least, between, columns, text_of

    p.add_argument("--labels", type=text_of(columns),
                   help="comma list of label columns (default: the shared ones with <= 50 values)")
    p.add_argument("--weak", type=between(0, 1), default=0.5, help="matches below this similarity are flagged weak")
    p.add_argument("--max-changes", type=at_least(1), default=200_000, help="rows kept in the changes table")


def options_from_args(a) -> dict:
    return dict(other=a.other, match=a.match, distribution=a.distribution, weak=a.weak, max_changes=a.max_changes,
                labels=[c.strip() for c in a.labels.split(",") if c.strip()] if a.labels else None)


def compare_command(run_a: str, run_b: str, out: str | None = None, **options) -> None:
    """`workbench compare RUN_A RUN_B [--out DIR]`: summary to stdout, every table and figure to DIR.
    options: analyze()'s (match, distribution, labels, weak, max_changes)."""
    from . import write_figures, write_table
    from ..store import open_run

    res = analyze(open_run(run_a), other=open_run(run_b), progress=True, **options)
    print(res.summary)
    if out:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise WorkbenchError(f"--out {out} exists and is not a folder")
        for name, df in res.tables.items():
            write_table(df, out / f"{name}.parquet")
        paths = write_figures(figures(res), out / "figures")
        print(f"wrote {len(res.tables)} tables and {len(paths)} figures to {out}")
