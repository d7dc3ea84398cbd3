"""Multilingual routing alignment (Bandarkar et al., ICLR 2026; METHODS.md section 3).

On parallel text (a `key` label aligns translations, a `lang` label names the language) it measures,
per MoE layer, how far each language's expert importance is from the reference language's
(entropy-normalised Jensen-Shannon divergence), where languages converge (the "middle layers",
found from the curve), which experts are language-specific, and, with `steer=True`, whether
promoting English task experts in the middle layers changes other languages' perplexity, against the
paper's controls (random experts; the same selection rule outside the middle layers).

    from workbench.analysis import multilingual as ml
    res = ml.analyze(run, reference="en", tau=0.3)
    res.tables["divergence"]          # layer, lang, divergence, jsd, entropy, ...
    ml.figures(res)["divergence"].show()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult
from .common import doc_labels, per_doc_counts

# --------------------------------------------------------------------------------------------------
# Distributions


def entropy(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy (natural log) along `axis`, with 0 log 0 = 0."""
    p = np.asarray(p, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -t.sum(axis=axis)


def jsd(p, q, axis: int = -1) -> np.ndarray:
    """Jensen-Shannon divergence with natural log and M = (P + Q) / 2; in [0, log 2]."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    m = (p + q) / 2
    # JSD = H(M) - (H(P) + H(Q)) / 2: exact, and free of 0/0 where P or Q has zeros.
    return np.maximum(entropy(m, axis) - (entropy(p, axis) + entropy(q, axis)) / 2, 0.0)


def normalized_divergence(p, q, n_experts: int | None = None, axis: int = -1) -> np.ndarray:
    """D = JSD(p, q) / max(log E - (H(p) + H(q)) / 2, 1e-6): the paper's entropy-normalised JSD."""
    p = np.asarray(p, np.float64)
    e = p.shape[axis] if n_experts is None else n_experts
    denom = np.maximum(math.log(e) - (entropy(p, axis) + entropy(q, axis)) / 2, 1e-6)
    return jsd(p, q, axis) / denom


# --------------------------------------------------------------------------------------------------
# Per-sequence routing profiles


@dataclass
class Profiles:
    """Per document and MoE layer: expert importance q[E] and selection frequency f[E].

    importance: mean over the document's tokens of the routing weights of the selected experts,
    renormalised to sum 1 per token (the model's own scoring: softmax, or sigmoid for DeepSeek-V3).
    frequency: share of the document's tokens that select each expert (sums to K per layer).
    """

    doc_id: np.ndarray  # [D]
    lang: np.ndarray  # [D] str
    key: np.ndarray  # [D] str (keys are compared as text)
    extra: dict  # other per-doc label arrays (e.g. "set")
    layers: list[int]
    n_tokens: np.ndarray  # [D]
    importance: np.ndarray  # [D, L, E] float64
    frequency: np.ndarray  # [D, L, E] float64
    n_experts: int

    def select(self, mask) -> "Profiles":
        m = np.asarray(mask, bool)
        return Profiles(self.doc_id[m], self.lang[m], self.key[m], {k: v[m] for k, v in self.extra.items()},
                        self.layers, self.n_tokens[m], self.importance[m], self.frequency[m], self.n_experts)

    @property
    def languages(self) -> list[str]:
        return sorted(set(self.lang.tolist()))

    def by_key(self, lang: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sorted keys of `lang` and the mean importance / frequency per key ([nk, L, E])."""
        m = self.lang == lang
        keys, inv = np.unique(self.key[m], return_inverse=True)
        cnt = np.bincount(inv, minlength=len(keys)).astype(np.float64)[:, None, None]
        imp = np.zeros((len(keys),) + self.importance.shape[1:])
        frq = np.zeros_like(imp)
        np.add.at(imp, inv, self.importance[m])
        np.add.at(frq, inv, self.frequency[m])
        return keys, imp / cnt, frq / cnt


def routing_profiles(ra) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RoutingArrays -> (doc ids [D], tokens per doc [D], importance [D,L,E], frequency [D,L,E])."""
    bounds = ra.doc_bounds
    ntok = np.diff(bounds)
    d = len(ntok)
    t, nl, k = ra.experts.shape
    e = ra.n_experts
    di = np.repeat(np.arange(d), ntok)
    w = ra.weights.astype(np.float64)
    s = w.sum(-1, keepdims=True)
    w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / k)
    ex = ra.experts.astype(np.int64)
    ok = (ex >= 0) & (ex < e)
    idx = (di[:, None, None] * nl + np.arange(nl)[None, :, None]) * e + ex
    imp = np.bincount(idx[ok], weights=w[ok], minlength=d * nl * e).reshape(d, nl, e)
    frq = np.bincount(idx[ok], minlength=d * nl * e).reshape(d, nl, e).astype(np.float64)
    denom = ntok[:, None, None].astype(np.float64)
    return ra.doc[bounds[:-1]], ntok, imp / denom, frq / denom


def profiles(run, lang_column: str = "lang", key_column: str = "key", extra_columns=(),
             phase: str | None = None, progress: bool = False) -> Profiles:
    """Load a run's routing into per-document profiles with their language and key labels (streamed
    in chunks of `workbench.analysis.common.chunk_tokens()` tokens; memory: the profiles)."""
    extra_columns = [c for c in extra_columns if c and c not in (lang_column, key_column)]
    have = set(run.tokens.collect_schema().names())
    extra_columns = [c for c in extra_columns if c in have]
    labels = doc_labels(run, [lang_column, key_column] + extra_columns, phase=phase)
    doc, ntok, cnt, imp, layers = per_doc_counts(run, phase=phase, importance=True, progress=progress,
                                                  desc="multilingual: profiles")
    denom = ntok[:, None, None].astype(np.float64)
    imp, frq = imp / denom, cnt / denom
    lab = pl.DataFrame({"doc_id": doc}).join(labels, on="doc_id", how="left", maintain_order="left")
    if lab[lang_column].null_count() == lab.height:
        raise WorkbenchError(f"run {run.path} has no {lang_column!r} labels on its routed tokens")
    keep = lab[lang_column].is_not_null().to_numpy() & lab[key_column].is_not_null().to_numpy()
    lang = lab[lang_column].cast(pl.Utf8).to_numpy().astype(object)
    key = lab[key_column].cast(pl.Utf8).to_numpy().astype(object)
    extra = {c: lab[c].cast(pl.Utf8).to_numpy().astype(object) for c in extra_columns}
    p = Profiles(doc, lang, key, extra, list(layers), ntok, imp, frq, run.n_experts)
    return p.select(keep)


# --------------------------------------------------------------------------------------------------
# Divergence


def _pair(p: Profiles, a: str, b: str):
    ka, ia, fa = p.by_key(a)
    kb, ib, fb = p.by_key(b)
    common, xa, xb = np.intersect1d(ka, kb, return_indices=True)
    return common, ia[xa], ib[xb], fa[xa], fb[xb]


def divergence(p: Profiles, reference: str = "en") -> pl.DataFrame:
    """Per MoE layer and language: mean over aligned pairs of D (normalised JSD) and raw JSD from the
    reference, and the mean routing entropy H(q) of the language's sequences.

    Sequences are aligned by key; several sequences of one (lang, key) are averaged first.
    The reference language has its own rows (divergence 0) so its entropy is reported too.
    """
    if reference not in p.languages:
        raise WorkbenchError(f"reference language {reference!r} is not in the run (languages: {', '.join(p.languages)})")
    logE = math.log(p.n_experts)
    rows = []
    for lang in p.languages:
        keys, qa, qr, _, _ = _pair(p, lang, reference)
        n = len(keys)
        if n == 0:
            continue
        js = jsd(qa, qr)  # [n, L]
        d = normalized_divergence(qa, qr, p.n_experts)
        h = entropy(p.importance[p.lang == lang])  # [docs, L]
        for li, layer in enumerate(p.layers):
            rows.append({"layer": layer, "lang": lang, "divergence": float(d[:, li].mean()),
                         "divergence_sem": float(d[:, li].std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
                         "jsd": float(js[:, li].mean()), "entropy": float(h[:, li].mean()),
                         "entropy_norm": float(h[:, li].mean() / logE) if logE > 0 else 0.0, "n_pairs": n})
    if not any(r["lang"] != reference for r in rows):
        raise WorkbenchError(f"no sequence shares a key with a {reference!r} sequence; check the key labels")
    return pl.DataFrame(rows).with_columns(pl.col("layer").cast(pl.Int16), pl.col("n_pairs").cast(pl.Int64))


def pairwise_divergence(p: Profiles, layers=None) -> pl.DataFrame:
    """Language x language mean normalised divergence (and raw JSD) over shared keys, per layer."""
    langs = p.languages
    layer_idx = [p.layers.index(int(lay)) for lay in (layers if layers is not None else p.layers)]
    by_key = {lang: p.by_key(lang) for lang in langs}
    rows = []
    for i, a in enumerate(langs):
        for b in langs[i:]:
            ka, qa, _ = by_key[a]
            kb, qb, _ = by_key[b]
            common, xa, xb = np.intersect1d(ka, kb, return_indices=True)
            if len(common) == 0:
                continue
            pa_, pb_ = qa[xa][:, layer_idx], qb[xb][:, layer_idx]
            d = normalized_divergence(pa_, pb_, p.n_experts).mean(0)
            js = jsd(pa_, pb_).mean(0)
            for j, li in enumerate(layer_idx):
                for x, y in ((a, b), (b, a)) if a != b else ((a, b),):
                    rows.append({"layer": p.layers[li], "lang_a": x, "lang_b": y, "divergence": float(d[j]),
                                 "jsd": float(js[j]), "n_pairs": len(common)})
    schema = {"layer": pl.Int16, "lang_a": pl.Utf8, "lang_b": pl.Utf8, "divergence": pl.Float64, "jsd": pl.Float64,
              "n_pairs": pl.Int64}
    return pl.DataFrame(rows, schema=schema).sort("layer", "lang_a", "lang_b")


def middle_layers(layers, curve, threshold: float = 0.5) -> tuple[list[int], dict]:
    """The layers where languages converge, read off the mean divergence curve.

    Cut the curve at min + threshold * (max - min) and return the contiguous run of layers at or
    under the cut that contains the minimum. `u_shape` says whether that run is interior (both
    ends of the network diverge more), which is the paper's finding; when it is not, the "middle"
    is only the most aligned stretch and the caller should say so.
    """
    layers = [int(x) for x in layers]
    c = np.asarray(curve, np.float64)
    if len(c) == 0:
        return [], {"cut": float("nan"), "u_shape": False}
    lo, hi = float(np.nanmin(c)), float(np.nanmax(c))
    cut = lo + threshold * (hi - lo)
    i = int(np.nanargmin(c))
    below = c <= cut + 1e-12
    a = b = i
    while a > 0 and below[a - 1]:
        a -= 1
    while b < len(c) - 1 and below[b + 1]:
        b += 1
    u = a > 0 and b < len(c) - 1 and hi > lo
    return layers[a:b + 1], {"cut": cut, "u_shape": bool(u), "min_layer": layers[i]}


def expert_frequencies(p: Profiles, reference: str = "en", tau: float = 0.3) -> pl.DataFrame:
    """Per (layer, expert, language): relative activation frequency, its difference from the
    reference (delta), and whether the expert is language-specific (delta > tau).

    Frequencies average over the language's sequences that share a key with the reference, so
    both sides see the same content. `shared` marks experts that every language (the reference
    included) selects on at least a tau share of tokens while none is specific to any language.
    """
    langs = [x for x in p.languages if x != reference]
    kr, _, fr = p.by_key(reference)
    rows = []
    freq_all = {}
    for lang in langs:
        kl, _, fl = p.by_key(lang)
        common, xl, xr = np.intersect1d(kl, kr, return_indices=True)
        if len(common) == 0:
            continue
        freq_all[lang] = (fl[xl].mean(0), fr[xr].mean(0), len(common))
    if not freq_all:
        raise WorkbenchError(f"no sequence shares a key with a {reference!r} sequence; check the key labels")
    ref_mean = fr.mean(0)
    stack = np.stack([v[0] for v in freq_all.values()])  # [nl, L, E]
    delta_all = stack - np.stack([v[1] for v in freq_all.values()])
    shared = (stack >= tau).all(0) & (ref_mean >= tau) & ~(delta_all > tau).any(0)
    L, E = len(p.layers), p.n_experts
    lay = np.repeat(np.asarray(p.layers), E)
    exp = np.tile(np.arange(E), L)
    for lang, (fl, frr, n) in freq_all.items():
        rows.append(pl.DataFrame({"layer": lay.astype(np.int16), "expert": exp.astype(np.int16),
                                  "lang": [lang] * (L * E), "freq": fl.reshape(-1), "freq_ref": frr.reshape(-1),
                                  "delta": (fl - frr).reshape(-1), "specific": (fl - frr).reshape(-1) > tau,
                                  "shared": shared.reshape(-1), "n_pairs": np.full(L * E, n, np.int64)}))
    return pl.concat(rows)


# --------------------------------------------------------------------------------------------------
# analyze


def analyze(run, reference: str = "en", lang_column: str = "lang", key_column: str = "key", tau: float = 0.3,
            middle_threshold: float = 0.5, middle: list[int] | None = None, matrix_layers=None,
            phase: str | None = None, steer: bool = False, **steer_options) -> AnalysisResult:
    """Divergence from the reference per layer and language, pairwise matrices, language-specific
    experts, detected middle layers; with `steer=True` also the steering experiment
    (see `steering_experiment` for its options)."""
    set_column = steer_options.get("set_column", "set")
    p = profiles(run, lang_column, key_column, extra_columns=[set_column] if steer else (), phase=phase)
    if len(p.languages) < 2:
        raise WorkbenchError(f"multilingual needs at least two languages in {lang_column!r}; found {p.languages}")
    full = p
    if steer and set_column in p.extra:
        # Task/general sets are for choosing task experts, not parallel text.
        sets = p.extra[set_column]
        p = p.select(~np.isin(sets, [steer_options.get("task_set", "task"), steer_options.get("general_set", "general")]))
    div = divergence(p, reference)
    others = div.filter(pl.col("lang") != reference)
    curve = others.group_by("layer").agg(pl.col("divergence").mean()).sort("layer")
    detected, info = middle_layers(curve["layer"].to_list(), curve["divergence"].to_numpy(), middle_threshold)
    mid = sorted(int(x) for x in middle) if middle else detected
    bad = [x for x in mid if x not in p.layers]
    if bad:
        raise WorkbenchError(f"middle layer {bad[0]} is not a MoE layer of this run ({p.layers})")
    layers_curve = curve.with_columns(pl.col("layer").is_in(mid).alias("middle"),
                                      pl.col("layer").is_in(detected).alias("middle_detected"))
    mlayers = _matrix_layers(matrix_layers, p.layers, mid)
    pair = pairwise_divergence(p, mlayers)
    freq = expert_frequencies(p, reference, tau)
    counts = (freq.group_by("layer", "lang").agg(pl.col("specific").sum().alias("n_specific"),
                                                pl.col("delta").max().alias("max_delta"))
              .sort("layer", "lang"))
    tables = {"divergence": div, "layers": layers_curve, "pairwise": pair, "experts": freq, "specific_counts": counts}
    n_pairs = others.group_by("lang").agg(pl.col("n_pairs").first()).sort("lang")
    lines = [f"multilingual routing: {len(p.languages)} languages, reference {reference!r}, "
             f"{len(p.layers)} MoE layers, {p.n_experts} experts",
             "aligned pairs: " + ", ".join(f"{a}={b}" for a, b in n_pairs.iter_rows()),
             "mean divergence per layer: " + " ".join(f"L{lay}={v:.3f}" for lay, v in curve.iter_rows()),
             (f"middle layers ({'given' if middle else 'detected'}): {_ranges(mid)}" if middle or info["u_shape"]
              else f"middle layers: none (no U shape: divergence is lowest at the {_end(mid, p.layers)} layers, "
                   f"{_ranges(mid)}, which stand in for them; --middle-layers chooses others)"),
             f"language-specific experts (delta > {tau}): "
             + ", ".join(f"{lang}={n}" for lang, n in freq.group_by("lang").agg(pl.col("specific").sum())
                         .sort("lang").iter_rows())]
    from .common import weights_note

    note = weights_note(run)
    if note:  # importance falls back to uniform 1/K on the selected experts (see per_doc_counts)
        lines.append(f"{note}: divergence, entropy and pairwise use selection frequency instead of "
                     "routing-weight importance")
    meta = {"reference": reference, "tau": tau, "middle_layers": mid, "middle_detected": detected,
            "u_shape": info["u_shape"], "cut": info["cut"], "matrix_layers": mlayers, "layers": p.layers,
            "n_experts": p.n_experts, "importance": "frequency" if note else "weights"}
    if steer:
        st = steering_experiment(run, full, middle=mid, reference=reference, lang_column=lang_column, **steer_options)
        tables.update(st.tables)
        lines.extend(st.summary.splitlines())
        meta.update(st.meta)
    return AnalysisResult("multilingual", tables, "divergence", "\n".join(lines), meta)


def _matrix_layers(spec, layers, mid) -> list[int]:
    if spec in (None, "auto"):
        pick = [layers[0], mid[len(mid) // 2] if mid else layers[len(layers) // 2], layers[-1]]
        return sorted(set(pick))
    if spec == "all":
        return list(layers)
    out = sorted({int(x) for x in spec})
    bad = [x for x in out if x not in layers]
    if bad:
        raise WorkbenchError(f"--matrix-layers: layer {bad[0]} is not a MoE layer of this run ({layers})")
    return out


def _end(mid, layers) -> str:
    """Which end of the network a non-interior run of layers sits at."""
    if mid and layers and mid[0] == layers[0]:
        return "first"
    return "last" if mid and layers and mid[-1] == layers[-1] else "flat"


def _ranges(xs) -> str:
    xs = sorted(xs)
    if not xs:
        return "none"
    parts, start, prev = [], xs[0], xs[0]
    for x in xs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        parts.append(f"L{start}" if start == prev else f"L{start}-L{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Steering experiment


def _spec(experts) -> str:
    return ",".join(f"L{int(lay)}:E{int(e)}" for lay, e in experts)


def _steering_helpers():
    try:
        from .. import steering
    except ImportError:
        raise WorkbenchError("the steering experiment needs workbench.steering, which this install lacks") from None
    return steering


def task_experts(p: Profiles, layers, reference: str = "en", task_set: str = "task", general_set: str = "general",
                 set_column: str = "set", tau: float = 0.3, top: int | None = None) -> pl.DataFrame:
    """Experts whose selection frequency on reference-language task text exceeds that on
    reference-language general text by more than tau (or the `top` largest positive deltas),
    restricted to `layers`. Columns: layer, expert, freq_task, freq_general, delta."""
    if set_column not in p.extra:
        raise WorkbenchError(f"the run has no {set_column!r} label to tell task text from general text; pass "
                             f"--task-data and --general-data, or label {reference!r} records {set_column}={task_set} "
                             f"and {set_column}={general_set}")
    sets, ref = p.extra[set_column], p.lang == reference
    mt, mg = ref & (sets == task_set), ref & (sets == general_set)
    if not mt.any() or not mg.any():
        raise WorkbenchError(f"the run needs {reference!r} sequences with {set_column}={task_set!r} and "
                             f"{set_column}={general_set!r} to choose task experts")
    ft, fg = p.frequency[mt].mean(0), p.frequency[mg].mean(0)
    li = [p.layers.index(int(x)) for x in layers]
    E = p.n_experts
    df = pl.DataFrame({"layer": np.repeat(np.asarray(p.layers)[li], E).astype(np.int16),
                       "expert": np.tile(np.arange(E), len(li)).astype(np.int16),
                       "freq_task": ft[li].reshape(-1), "freq_general": fg[li].reshape(-1)})
    df = df.with_columns((pl.col("freq_task") - pl.col("freq_general")).alias("delta")).sort(
        ["delta", "layer", "expert"], descending=[True, False, False])
    if top is not None:
        return df.filter(pl.col("delta") > 0).head(int(top))
    return df.filter(pl.col("delta") > tau)


def steering_experiment(run, p: Profiles | None = None, model=None, middle=None, reference: str = "en",
                        lang_column: str = "lang", task_set: str = "task", general_set: str = "general",
                        set_column: str = "set", task_data=None, general_data=None, steer_tau: float = 0.1,
                        steer_top: int | None = None, modes=("soft", "hard"), lam: float = 0.5, seeds: int = 3,
                        eval_data=None, max_eval_docs: int = 32, score=None, progress: bool = True) -> AnalysisResult:
    """Promote middle-layer task experts on every language and measure the change of a score.

    Task experts: reference-language task text vs general text, from the run's `set` label or from
    `task_data` / `general_data` (captured here with the same model). Conditions per mode:
    `task` (those experts), `random` (as many random experts from the same layers, one row per
    seed), `outside` (the same selection rule applied to the layers outside the middle, as many
    experts). Modes: soft (boost lambda * std of the logits) and hard (force). Score: perplexity
    of each language's evaluation texts (lower is better), or `score(mm, texts, interventions)`.
    """
    from ..models.loading import MoEModel, load_model

    st = _steering_helpers()
    if middle is None:
        raise WorkbenchError("the steering experiment needs the middle layers (run analyze first or pass middle=)")
    mm = model if isinstance(model, MoEModel) else load_model(model or run.model_info.get("path") or run.model_info["spec"])
    if task_data is not None or general_data is not None:
        if task_data is None or general_data is None:
            raise WorkbenchError("give both --task-data and --general-data (or neither, to use the run's set label)")
        sp = _capture_sets(mm, task_data, general_data, reference, lang_column, set_column, task_set, general_set)
    else:
        sp = p if p is not None else profiles(run, lang_column, "key", extra_columns=[set_column])
    outside = [x for x in sp.layers if x not in middle]
    chosen = task_experts(sp, middle, reference, task_set, general_set, set_column, steer_tau, steer_top)
    if chosen.height == 0:
        raise WorkbenchError(f"no middle-layer expert is more frequent on task text than on general text by "
                             f"more than {steer_tau}; lower --steer-tau or pass --steer-top N")
    experts = list(zip(chosen["layer"].to_list(), chosen["expert"].to_list()))
    out_sel = task_experts(sp, outside, reference, task_set, general_set, set_column, 0.0, len(experts)) \
        if outside else chosen.head(0)
    out_experts = list(zip(out_sel["layer"].to_list(), out_sel["expert"].to_list()))

    texts = _eval_texts(run, mm, eval_data, lang_column, set_column, (task_set, general_set), max_eval_docs)
    conditions = [("task", 0, experts)]
    conditions += [("random", s, [tuple(x) for x in st.random_experts_like(mm, experts, seed=s)]) for s in range(seeds)]
    if out_experts:
        conditions.append(("outside", 0, out_experts))
    measure = score or (lambda m, t, inter: st.perplexity(m, t, interventions=inter)["ppl"])
    rows = []
    total = len(texts) * (1 + len(modes) * len(conditions))
    bar = _bar(total, progress, "steering")
    for lang, tx in texts.items():
        base = float(measure(mm, tx, None))
        bar.update(1)
        for mode in modes:
            for cond, seed, exps in conditions:
                if mode == "hard":
                    exps = _cap_per_layer(exps, mm.top_k)
                inter = _interventions(mode, exps, lam)
                val = float(measure(mm, tx, inter))
                bar.update(1)
                rows.append({"mode": mode, "condition": cond, "seed": seed, "lang": lang, "n_experts": len(exps),
                             "experts": _spec(exps), "baseline": base, "score": val, "change": val - base,
                             "rel_change": (val - base) / base if base else float("nan")})
    bar.close()
    tab = pl.DataFrame(rows)
    summ = (tab.group_by("mode", "condition", "lang")
            .agg(pl.col("change").mean().alias("change"), pl.col("change").std().alias("change_std"),
                 pl.col("rel_change").mean().alias("rel_change"), pl.len().alias("n_seeds"))
            .sort("mode", "condition", "lang"))
    what = "user score" if score else "perplexity"
    lines = [f"steering: {len(experts)} task experts in middle layers {_ranges(middle)}: {_spec(experts)}",
             f"  control outside the middle: {_spec(out_experts) or 'none (no layers outside the middle)'}"]
    for mode in modes:
        for cond in ("task", "random", "outside"):
            s = summ.filter((pl.col("mode") == mode) & (pl.col("condition") == cond))
            if s.height:
                lines.append(f"  {mode:4s} {cond:7s} mean {what} change: "
                             + " ".join(f"{lang}={c:+.3f}" for lang, c in zip(s["lang"], s["change"])))
    tables = {"steering": tab, "steering_summary": summ, "task_experts": chosen}
    meta = {"task_experts": experts, "outside_experts": out_experts, "score": what, "lambda": lam}
    return AnalysisResult("multilingual-steering", tables, "steering_summary", "\n".join(lines), meta)


def _cap_per_layer(experts, k: int):
    """A token has k slots, so at most k experts per layer can be forced: keep the first k listed
    (task experts are listed by decreasing frequency difference)."""
    kept, per = [], {}
    for lay, e in experts:
        if per.get(lay, 0) < k:
            kept.append((lay, e))
            per[lay] = per.get(lay, 0) + 1
    return kept


def _interventions(mode: str, experts, lam: float) -> dict:
    if mode == "soft":
        return {"boost": {f"L{int(lay)}:E{int(e)}": float(lam) for lay, e in experts}}
    if mode == "hard":
        return {"force": _spec(experts)}
    raise WorkbenchError(f"unknown steering mode {mode!r}; use soft or hard")


def _capture_sets(mm, task_data, general_data, reference, lang_column, set_column, task_set, general_set) -> Profiles:
    """Route the task and general text through the model (routing only, a temporary run)."""
    import tempfile

    from ..capture import capture
    from ..data import load_dataset

    recs = []
    for data, name in ((task_data, task_set), (general_data, general_set)):
        for r in load_dataset(data).records:
            recs.append({"text": r["text"], lang_column: reference, set_column: name, "key": str(len(recs))})
    with tempfile.TemporaryDirectory() as tmp:
        r = capture(mm, recs, f"{tmp}/sets", progress=False)
        return profiles(r, lang_column, "key", extra_columns=[set_column])


def _eval_texts(run, mm, eval_data, lang_column, set_column, skip_sets, max_docs) -> dict[str, list[str]]:
    """Evaluation texts per language: `eval_data` records, else the run's own documents."""
    out: dict[str, list[str]] = {}
    if eval_data is not None:
        from ..data import load_dataset

        for r in load_dataset(eval_data).records:
            if lang_column not in r:
                raise WorkbenchError(f"--eval-data records need a {lang_column!r} field")
            out.setdefault(str(r[lang_column]), []).append(r["text"])
    else:
        from .common import doc_token_ids

        cols = [lang_column] + ([set_column] if set_column in run.tokens.collect_schema().names() else [])
        lab = doc_labels(run, cols)
        if set_column in lab.columns:
            lab = lab.filter(~pl.col(set_column).cast(pl.Utf8).is_in(list(skip_sets)).fill_null(False))
        lab = lab.filter(pl.col(lang_column).is_not_null())
        picked = {}
        for d, lang in lab.select("doc_id", lang_column).iter_rows():
            lst = picked.setdefault(str(lang), [])
            if len(lst) < max_docs:
                lst.append(d)
        ids = doc_token_ids(run, [d for v in picked.values() for d in v])
        for lang, docs in picked.items():
            out[lang] = [mm.tokenizer.decode(ids[d].tolist()) for d in docs if d in ids]
    return {k: v[:max_docs] for k, v in sorted(out.items()) if v}


def _bar(total, progress, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------------
# Figures


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    t = result.tables
    ref = result.meta.get("reference", "en")
    figs = {}
    div = t["divergence"].filter(pl.col("lang") != ref).sort("layer")
    mid = t["layers"].filter(pl.col("middle"))["layer"].to_list()
    f = go.Figure()
    if mid:
        f.add_vrect(x0=min(mid) - 0.5, x1=max(mid) + 0.5, fillcolor="lightgrey", opacity=0.35, line_width=0,
                    annotation_text="middle", annotation_position="top left")
    for lang in sorted(div["lang"].unique().to_list()):
        d = div.filter(pl.col("lang") == lang)
        f.add_trace(go.Scatter(x=d["layer"].to_list(), y=d["divergence"].to_list(), mode="lines+markers", name=lang,
                               error_y={"type": "data", "array": d["divergence_sem"].to_list(), "visible": True,
                                        "thickness": 1}))
    curve = t["layers"]
    f.add_trace(go.Scatter(x=curve["layer"].to_list(), y=curve["divergence"].to_list(), mode="lines", name="mean",
                           line={"color": "black", "width": 3, "dash": "dash"}))
    f.update_layout(title=f"Routing divergence from {ref} per layer (entropy-normalised JSD)",
                    xaxis_title="layer", yaxis_title=f"D(lang, {ref})", template="plotly_white")
    figs["divergence"] = f

    ent = t["divergence"].sort("layer")
    f = go.Figure()
    for lang in sorted(ent["lang"].unique().to_list()):
        d = ent.filter(pl.col("lang") == lang)
        f.add_trace(go.Scatter(x=d["layer"].to_list(), y=d["entropy_norm"].to_list(), mode="lines+markers", name=lang))
    f.update_layout(title="Routing entropy H(q) / log E per layer", xaxis_title="layer", yaxis_title="normalised entropy",
                    template="plotly_white")
    figs["entropy"] = f

    pw = t["pairwise"]
    for layer in sorted(pw["layer"].unique().to_list()):
        d = pw.filter(pl.col("layer") == layer)
        langs = sorted(set(d["lang_a"].to_list()))
        idx = {x: i for i, x in enumerate(langs)}
        z = np.full((len(langs), len(langs)), np.nan)
        for a, b, v in d.select("lang_a", "lang_b", "divergence").iter_rows():
            z[idx[a], idx[b]] = v
        f = go.Figure(go.Heatmap(z=z, x=langs, y=langs, colorscale="Viridis", colorbar={"title": "D"},
                                 hovertemplate="%{y} vs %{x}: D=%{z:.3f}<extra></extra>"))
        f.update_layout(title=f"Pairwise routing divergence, layer {layer}", template="plotly_white",
                        yaxis={"autorange": "reversed"})
        figs[f"pairwise_L{layer}"] = f

    ex = t["experts"]
    langs = sorted(ex["lang"].unique().to_list())
    layers = sorted(ex["layer"].unique().to_list())
    E = int(ex["expert"].max()) + 1
    f = go.Figure()
    for i, lang in enumerate(langs):
        d = ex.filter(pl.col("lang") == lang).sort("layer", "expert")
        z = d["delta"].to_numpy().reshape(len(layers), E)
        f.add_trace(go.Heatmap(z=z, x=list(range(E)), y=layers, visible=i == 0, colorscale="RdBu", reversescale=True,
                               zmid=0, colorbar={"title": "delta"}, name=lang,
                               hovertemplate=f"{lang}: L%{{y}} E%{{x}} delta=%{{z:.3f}}<extra></extra>"))
    buttons = [{"label": lang, "method": "update",
                "args": [{"visible": [j == i for j in range(len(langs))]},
                         {"title": f"Expert frequency difference {lang} - {ref}"}]} for i, lang in enumerate(langs)]
    f.update_layout(title=f"Expert frequency difference {langs[0]} - {ref}" if langs else "Expert frequency difference",
                    xaxis_title="expert", yaxis_title="layer", template="plotly_white",
                    updatemenus=[{"buttons": buttons, "x": 1.0, "y": 1.15, "xanchor": "right"}] if len(langs) > 1 else [])
    figs["expert_delta"] = f

    if "steering_summary" in t:
        s = t["steering_summary"]
        f = go.Figure()
        for mode in sorted(s["mode"].unique().to_list()):
            for cond in ("task", "random", "outside"):
                d = s.filter((pl.col("mode") == mode) & (pl.col("condition") == cond)).sort("lang")
                if d.height:
                    f.add_trace(go.Bar(x=d["lang"].to_list(), y=d["change"].to_list(), name=f"{mode} / {cond}",
                                       error_y={"type": "data", "array": d["change_std"].fill_null(0).to_list()}))
        f.update_layout(barmode="group", title="Score change per language when steering middle-layer task experts",
                        xaxis_title="language", yaxis_title=f"{result.meta.get('score', 'score')} change",
                        template="plotly_white")
        figs["steering"] = f
    return figs


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    p.add_argument("--reference", default="en", help="reference language code (default: en)")
    from ..options import at_least, between, column, layer_list, text_of

    p.add_argument("--lang-column", type=column, default="lang", help="label naming the language (default: lang)")
    p.add_argument("--key-column", type=column, default="key", help="label that aligns translations (default: key)")
    p.add_argument("--tau", type=between(0, 1), default=0.3, help="language-specific if delta frequency > tau (default 0.3)")
    p.add_argument("--middle-threshold", type=between(0, 1), default=0.5,
                   help="middle layers: curve at or under min + t * (max - min) (default 0.5)")
    p.add_argument("--middle-layers", type=text_of(layer_list), help="override detection, e.g. 4-9 or 4,5,6")
    p.add_argument("--matrix-layers", type=text_of(layer_list, also=("auto", "all")), default="auto",
                   help="pairwise matrices at: auto (first, middle, last), all, or 3,7")
    p.add_argument("--phase", choices=["prefill", "decode"], help="only prompt (prefill) or generated (decode) tokens")
    g = p.add_argument_group("steering experiment")
    g.add_argument("--steer", action="store_true", help="promote middle-layer task experts and measure perplexity")
    g.add_argument("--model", help="model for --steer (default: the run's model)")
    g.add_argument("--task-data", help="reference-language task text (else the run's set=task sequences)")
    g.add_argument("--general-data", help="reference-language general text (else set=general)")
    g.add_argument("--set-column", type=column, default="set", help="label naming task/general text (default: set)")
    g.add_argument("--steer-tau", type=between(-1, 1), default=0.1, help="task expert if task - general frequency > this")
    g.add_argument("--steer-top", type=at_least(1), help="instead: the N largest positive differences")
    g.add_argument("--mode", choices=["soft", "hard", "both"], default="both",
                   help="soft: boost by --lam; hard: force the experts; both (default)")
    g.add_argument("--lam", type=between(-100, 100), default=0.5, help="soft promotion: lambda * std(logits) (default 0.5)")
    g.add_argument("--seeds", type=at_least(1), default=3, help="random-expert control seeds (default 3)")
    g.add_argument("--eval-data", help="evaluation texts with a lang field (else the run's documents)")
    g.add_argument("--max-eval-docs", type=at_least(1), default=32, help="documents per language to evaluate (default 32)")


def _layer_list(spec: str | None):
    if not spec:
        return None
    out = []
    try:
        for part in spec.split(","):
            part = part.strip().lstrip("L")
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b.lstrip("L")) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise WorkbenchError(f"cannot read layer list {spec!r}; write e.g. 4-9 or 4,5,6") from None
    return out


def options_from_args(a) -> dict:
    if a.tau < 0 or a.tau > 1:
        raise WorkbenchError("--tau must be between 0 and 1")
    mat = a.matrix_layers if a.matrix_layers in ("auto", "all") else _layer_list(a.matrix_layers)
    opts = dict(reference=a.reference, lang_column=a.lang_column, key_column=a.key_column, tau=a.tau,
                middle_threshold=a.middle_threshold, middle=_layer_list(a.middle_layers), matrix_layers=mat,
                phase=a.phase, steer=a.steer)
    if a.steer:
        opts.update(model=a.model, task_data=a.task_data, general_data=a.general_data, set_column=a.set_column,
                    steer_tau=a.steer_tau, steer_top=a.steer_top, lam=a.lam, seeds=a.seeds,
                    modes=("soft", "hard") if a.mode == "both" else (a.mode,), eval_data=a.eval_data,
                    max_eval_docs=a.max_eval_docs)
    return opts
