"""fTRI behaviour maps (Dahlke et al., "Mixture of Tunable Experts"; METHODS.md section 4).

Contrast which experts light up on prompts of a target class (e.g. requests a model refuses)
against the other classes, test every (layer, expert) for significance, and close the loop: switch
the top-N experts off (ban = re-route to the next expert; drop = zero the slot, no replacement) or
force them on, and measure a behaviour score on held-out prompts against N random experts from the
same layers.

    from workbench.analysis import behavior as bh
    maps = bh.activation_maps(run, label="class")        # per prompt [L, E] selection counts
    diff = bh.differential_map(maps, target="refusal")   # layer, expert, diff, risk_diff, ...
    res = bh.analyze(run, target="refusal", top_n=10)    # + permutation test, FDR, bootstrap
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult
from .common import doc_labels, doc_token_ids, per_doc_counts

# Openings of refusals, the built-in behaviour score's continuation set (mean log-probability).
REFUSAL_OPENINGS = ("I'm sorry, but I can't", "I cannot help with that", "I can't assist with that",
                    "Sorry, I can't help with", "I'm not able to help with", "As an AI, I cannot")


@dataclass
class Maps:
    """Per prompt p: counts[p, l, e] = number of the prompt's tokens that select expert e in MoE layer
    layers[l]; n_tokens[p]; label[p] the prompt's class."""

    doc_id: np.ndarray
    label: np.ndarray  # str
    layers: list[int]
    counts: np.ndarray  # [P, L, E] float64
    n_tokens: np.ndarray  # [P]
    n_experts: int

    @property
    def rates(self) -> np.ndarray:
        return self.counts / self.n_tokens[:, None, None]

    def values(self, normalize: bool = True) -> np.ndarray:
        return self.rates if normalize else self.counts

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.label.tolist()))

    def select(self, mask) -> "Maps":
        m = np.asarray(mask, bool)
        return Maps(self.doc_id[m], self.label[m], self.layers, self.counts[m], self.n_tokens[m], self.n_experts)


def activation_maps(run, label: str = "class", phase: str | None = "prefill") -> Maps:
    """Per-prompt layer x expert selection counts, with the prompt's class from the `label` column."""
    doc, ntok, counts, _, layers = per_doc_counts(run, phase=phase, desc="behavior: maps")
    lab = pl.DataFrame({"doc_id": doc}).join(doc_labels(run, [label], phase=phase), on="doc_id", how="left",
                                             maintain_order="left")
    labels = lab[label].cast(pl.Utf8).to_numpy().astype(object)
    keep = lab[label].is_not_null().to_numpy()
    m = Maps(doc, labels, list(layers), counts, ntok.astype(np.float64), run.n_experts)
    return m.select(keep)


def _split(maps: Maps, target: str):
    if target not in maps.classes:
        raise WorkbenchError(f"class {target!r} is not in the run (classes: {', '.join(maps.classes)})")
    is_t = maps.label == target
    if is_t.all():
        raise WorkbenchError(f"every prompt is of class {target!r}: a contrast needs other prompts too")
    return is_t


def class_means(maps: Maps, normalize: bool = True) -> pl.DataFrame:
    """Mean map per class (rate of selection per token by default, raw counts with normalize=False)."""
    v = maps.values(normalize)
    rows = []
    for c in maps.classes:
        m = maps.label == c
        rows.append(_frame(maps, {"class": c, "mean": v[m].mean(0), "n_prompts": int(m.sum())}))
    return pl.concat(rows)


def _frame(maps: Maps, cols: dict) -> pl.DataFrame:
    L, E = len(maps.layers), maps.n_experts
    out = {"layer": np.repeat(np.asarray(maps.layers), E).astype(np.int16),
           "expert": np.tile(np.arange(E), L).astype(np.int16)}
    for k, v in cols.items():
        out[k] = np.asarray(v).reshape(-1) if isinstance(v, np.ndarray) else [v] * (L * E)
    return pl.DataFrame(out)


def _diff(values: np.ndarray, is_t: np.ndarray) -> np.ndarray:
    return values[is_t].mean(0) - values[~is_t].mean(0)


def differential_map(maps: Maps, target: str, normalize: bool = True) -> pl.DataFrame:
    """D = mean(target) - mean(others) per (layer, expert), plus the risk difference of selection:
    P(a target token selects e) - P(another token selects e), tokens pooled over prompts."""
    is_t = _split(maps, target)
    v = maps.values(normalize)
    pt = maps.counts[is_t].sum(0) / maps.n_tokens[is_t].sum()
    po = maps.counts[~is_t].sum(0) / maps.n_tokens[~is_t].sum()
    return _frame(maps, {"class": target, "mean_target": v[is_t].mean(0), "mean_other": v[~is_t].mean(0),
                         "diff": _diff(v, is_t), "p_target": pt, "p_other": po, "risk_diff": pt - po})


def permutation_test(maps: Maps, target: str, n_perm: int = 1000, seed: int = 0, normalize: bool = True,
                     alternative: str = "two-sided") -> np.ndarray:
    """p-value per (layer, expert) [L, E] of the class-mean difference, by permuting prompt labels.

    p = (1 + #{permutations at least as extreme}) / (1 + n_perm), never 0. With fixed group sizes the
    difference of means is monotone in the target group's sum, so each permutation is one row of a
    matrix product.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise WorkbenchError(f"alternative must be two-sided, greater or less, not {alternative!r}")
    is_t = _split(maps, target)
    x = maps.values(normalize).reshape(len(is_t), -1)
    nt, no = int(is_t.sum()), int((~is_t).sum())
    tot = x.sum(0)
    obs = x[is_t].sum(0) / nt - (tot - x[is_t].sum(0)) / no
    rng = np.random.default_rng(seed)
    hits = np.zeros(x.shape[1])
    scale = np.abs(x).max() if x.size else 1.0
    tol = 1e-9 * max(scale, 1.0)  # equal statistics must count as "as extreme" despite rounding
    chunk = max(1, int(1e7 // (x.shape[1] + len(is_t))))  # bounds the [chunk, P] and [chunk, L*E] buffers
    xf = x.astype(np.float64)
    done = 0
    while done < n_perm:
        b = min(chunk, n_perm - done)
        s = np.zeros((b, len(is_t)))
        order = np.argsort(rng.random((b, len(is_t))), axis=1)[:, :nt]
        np.put_along_axis(s, order, 1.0, axis=1)
        st = s @ xf
        d = st / nt - (tot - st) / no
        if alternative == "two-sided":
            hits += (np.abs(d) >= np.abs(obs) - tol).sum(0)
        elif alternative == "greater":
            hits += (d >= obs - tol).sum(0)
        else:
            hits += (d <= obs + tol).sum(0)
        done += b
    return ((1 + hits) / (1 + n_perm)).reshape(len(maps.layers), maps.n_experts)


def fdr_bh(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same shape as p."""
    p = np.asarray(p, np.float64)
    flat = p.reshape(-1)
    m = flat.size
    if m == 0:
        return p.copy()
    order = np.argsort(flat)
    ranked = flat[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out.reshape(p.shape)


def _top(diff: np.ndarray, n: int) -> np.ndarray:
    """Flat indices of the n largest entries (ties -> lower layer, then lower expert)."""
    flat = diff.reshape(-1)
    order = np.lexsort((np.arange(flat.size), -flat))
    return order[:n]


def bootstrap_stability(maps: Maps, target: str, top_n: int = 10, n_boot: int = 100, seed: int = 0,
                        normalize: bool = True) -> tuple[np.ndarray, float]:
    """How reproducible the top-N is: split each class's prompts at random into two halves, take the
    top-N of each half's differential map. Returns (share of the 2 * n_boot half-maps whose top-N
    holds each (layer, expert) [L, E], mean Jaccard overlap between the two halves' top-N)."""
    is_t = _split(maps, target)
    v = maps.values(normalize)
    L, E = v.shape[1:]
    rng = np.random.default_rng(seed)
    hits = np.zeros(L * E)
    jac = []
    ti, oi = np.flatnonzero(is_t), np.flatnonzero(~is_t)
    if min(len(ti), len(oi)) < 2:
        return np.full((L, E), np.nan), float("nan")
    ht, ho = len(ti) // 2, len(oi) // 2
    for _ in range(n_boot):
        a_t, a_o = rng.permutation(ti), rng.permutation(oi)
        halves = []
        for t_idx, o_idx in ((a_t[:ht], a_o[:ho]), (a_t[ht:], a_o[ho:])):
            top = _top(v[t_idx].mean(0) - v[o_idx].mean(0), top_n)
            hits[top] += 1
            halves.append(set(top.tolist()))
        jac.append(len(halves[0] & halves[1]) / max(len(halves[0] | halves[1]), 1))
    return (hits / (2 * n_boot)).reshape(L, E), float(np.mean(jac))


def contrast(maps: Maps, target: str, normalize: bool = True, permutations: int = 1000, fdr: float = 0.05,
             top_n: int = 10, bootstrap: int = 100, seed: int = 0, alternative: str = "two-sided") -> pl.DataFrame:
    """The full per-(layer, expert) table for one target class: differential map, risk difference,
    permutation p, BH q, significance at `fdr`, bootstrap stability, rank by D (1 = most target-linked)."""
    df = differential_map(maps, target, normalize)
    cols = {}
    if permutations:
        p = permutation_test(maps, target, permutations, seed, normalize, alternative)
        q = fdr_bh(p)
        cols.update(p_value=p.reshape(-1), q_value=q.reshape(-1), significant=(q <= fdr).reshape(-1))
    if bootstrap:
        stab, jac = bootstrap_stability(maps, target, top_n, bootstrap, seed + 1, normalize)
        cols["stability"] = stab.reshape(-1)
    if cols:
        df = df.with_columns(pl.Series(k, v) for k, v in cols.items())
    order = _top(df["diff"].to_numpy(), df.height)
    rank = np.empty(df.height, np.int64)
    rank[order] = np.arange(1, df.height + 1)
    df = df.with_columns(pl.Series("rank", rank))
    if bootstrap:
        df = df.with_columns(pl.lit(jac).alias("topn_jaccard"))
    return df


def top_experts(table: pl.DataFrame, n: int = 10, target: str | None = None) -> list[tuple[int, int]]:
    """[(layer, expert)] of the n top-ranked rows of a `contrast` table (for one class)."""
    t = table if target is None else table.filter(pl.col("class") == target)
    if t["class"].n_unique() > 1:
        raise WorkbenchError("the table holds several classes; name the target class")
    t = t.sort("rank").head(n)
    return list(zip(t["layer"].cast(pl.Int64).to_list(), t["expert"].cast(pl.Int64).to_list()))


# --------------------------------------------------------------------------------------------------
# analyze


def _default_targets(classes: list[str], target) -> list[str]:
    if target is not None:
        return [str(target)]
    if "target" in classes:
        return ["target"]
    if len(classes) == 2:
        controls = [c for c in classes if c.lower() in ("control", "benign", "harmless", "other", "negative")]
        if len(controls) == 1:
            return [c for c in classes if c != controls[0]]
    return list(classes)  # one against the rest, for every class


def heldout_split(maps: Maps, fraction: float, seed: int = 0) -> np.ndarray:
    """Boolean mask of held-out prompts: `fraction` of each class (at least one, leaving one)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(maps.label), bool)
    for c in maps.classes:
        idx = np.flatnonzero(maps.label == c)
        n = int(round(fraction * len(idx)))
        n = min(max(n, 1), len(idx) - 1) if len(idx) > 1 else 0
        held[rng.permutation(idx)[:n]] = True
    return held


def analyze(run, label: str = "class", target: str | None = None, normalize: bool = True, permutations: int = 1000,
            fdr: float = 0.05, top_n: int = 10, bootstrap: int = 100, seed: int = 0, phase: str | None = "prefill",
            alternative: str = "two-sided", intervene: int = 0, heldout: float = 0.3, model=None, score=None,
            continuations=None, seeds: int = 3, heldout_data=None, max_heldout: int = 32,
            progress: bool = True, rank_by: str = "frequency") -> AnalysisResult:
    """Behaviour maps of a run whose prompts carry a class label.

    target: the class to contrast against the others (default: a class named "target", or the
    non-control class of two; otherwise every class against the rest). With `intervene=N` the top-N
    of the target are switched off / forced on in `model` (default: the run's) and the behaviour
    score measured on held-out prompts: `heldout` of each class is kept out of the maps unless
    `heldout_data` (records with text and the label) is given. Score: "continuations" (mean
    log-probability of `continuations`, default refusal openings), "text" (of the prompts themselves),
    or `score(mm, prompts, interventions) -> float`. rank_by: which experts the loop switches,
    "frequency" (the map's top-N) or "attribution" (the N whose estimated removal raises the target
    prompts' NLL most relative to the others', `workbench.attribution.behaviour_top`).
    """
    _check_score(score)
    if rank_by not in ("frequency", "attribution"):
        raise WorkbenchError(f"unknown --rank-by {rank_by!r}; choose frequency or attribution")
    maps = activation_maps(run, label, phase)
    if len(maps.classes) < 2:
        raise WorkbenchError(f"behaviour maps need at least two classes in {label!r}; found {maps.classes}")
    if top_n < 1:
        raise WorkbenchError("--top-n must be at least 1")
    targets = _default_targets(maps.classes, target)
    held = np.zeros(len(maps.label), bool)
    if intervene:
        if len(targets) != 1:
            raise WorkbenchError(f"--intervene needs one target class; pass --target (classes: {', '.join(maps.classes)})")
        if heldout_data is None:
            if not 0 < heldout < 1:
                raise WorkbenchError("--heldout must be a fraction between 0 and 1")
            held = heldout_split(maps, heldout, seed)
    fit = maps.select(~held)
    tables = {}
    contrasts = [contrast(fit, t, normalize, permutations, fdr, top_n, bootstrap, seed, alternative) for t in targets]
    diff = pl.concat(contrasts)
    means = class_means(fit, normalize)
    top = diff.filter(pl.col("rank") <= top_n).sort("class", "rank")
    tables.update(map=diff, class_means=means, top=top)
    lines = [f"behaviour maps: {len(fit.label)} prompts ({', '.join(f'{c}={int((fit.label == c).sum())}' for c in fit.classes)}), "
             f"{len(fit.layers)} MoE layers x {fit.n_experts} experts, "
             f"{'rate per token' if normalize else 'token counts'}"
             + (f"; {int(held.sum())} prompts held out" if held.any() else "")]
    for t in targets:
        d = diff.filter(pl.col("class") == t)
        s = f"{t} vs rest: top-{top_n} " + ", ".join(f"L{a}:E{b}" for a, b in top_experts(d, top_n))
        if permutations:
            s += f"; {int(d['significant'].sum())} of {d.height} (layer, expert) significant at FDR {fdr}"
        if bootstrap:
            s += f"; top-{top_n} half-split Jaccard {d['topn_jaccard'][0]:.2f}"
        lines.append(s)
    meta = {"targets": targets, "top_n": top_n, "fdr": fdr, "normalize": normalize, "label": label,
            "heldout_docs": maps.doc_id[held].tolist()}
    if intervene:
        mm = _model(run, model)
        if rank_by == "attribution":
            from ..attribution import behaviour_top

            experts = behaviour_top(run, mm, fit.doc_id[fit.label == targets[0]], fit.doc_id[fit.label != targets[0]],
                                    intervene)
        else:
            experts = top_experts(diff, intervene)
        prompts = _heldout_prompts(run, mm, maps, held, label, heldout_data, max_heldout)
        loop = close_loop(mm, experts, prompts, score=score, continuations=continuations, seeds=seeds,
                          progress=progress)
        tables.update(loop.tables)
        lines.extend(loop.summary.splitlines())
        meta.update(loop.meta, ranked_by=rank_by)
    return AnalysisResult("behavior", tables, "map", "\n".join(lines), meta)


# --------------------------------------------------------------------------------------------------
# Closing the loop


SCORES = {"continuations": "mean log-prob of continuations", "text": "mean log-prob per token of the prompts"}
ACTIONS = {"off_reroute": "ban", "off_drop": "zero", "on_force": "force"}
ACTION_TEXT = {"off_reroute": "off (ban: re-routed to the next expert)",
               "off_drop": "off (drop: slot zeroed, no replacement)", "on_force": "on (forced)"}


def _model(run, model):
    from ..models.loading import MoEModel, load_model

    if isinstance(model, MoEModel):
        return model
    return load_model(model or run.model_info.get("path") or run.model_info["spec"])


def _heldout_prompts(run, mm, maps: Maps, held, label, heldout_data, max_n) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    if heldout_data is not None:
        from ..data import load_dataset

        for r in load_dataset(heldout_data).records:
            if label not in r:
                raise WorkbenchError(f"--heldout-data records need a {label!r} field")
            out.setdefault(str(r[label]), []).append(r["text"])
    else:
        docs = maps.doc_id[held]
        ids = doc_token_ids(run, docs)
        for d, c in zip(docs.tolist(), maps.label[held].tolist()):
            if d in ids:
                out.setdefault(c, []).append(mm.tokenizer.decode(ids[d].tolist()))
    return {k: v[:max_n] for k, v in sorted(out.items()) if v}


def _cap_force(mm, experts):
    """Force accepts at most K experts per layer (each token has K slots): keep the best-ranked."""
    kept, per = [], {}
    for lay, e in experts:
        if per.get(lay, 0) < mm.top_k:
            kept.append((lay, e))
            per[lay] = per.get(lay, 0) + 1
    return kept


def _cap_ban(mm, experts):
    kept, per = [], {}
    for lay, e in experts:
        if per.get(lay, 0) < mm.n_experts - mm.top_k:
            kept.append((lay, e))
            per[lay] = per.get(lay, 0) + 1
    return kept


def close_loop(mm, experts, prompts: dict[str, list[str]], score=None, continuations=None, seeds: int = 3,
               actions=tuple(ACTIONS), progress: bool = True) -> AnalysisResult:
    """Switch `experts` off (ban / drop) and on (force) and measure the behaviour score on each class's
    prompts, against as many random experts from the same layers for `seeds` seeds.

    score(mm, prompts, interventions) -> float, or a name: "continuations" (default: mean
    log-probability of `continuations`, default refusal openings, after each prompt) or "text" (mean
    log-probability per token of the prompts themselves: how well the model still models that class).
    """
    from .. import steering as st
    from ..probes.interventions import format_spec

    experts = [(int(a), int(b)) for a, b in experts]
    if not prompts:
        raise WorkbenchError("no held-out prompts to measure the behaviour on")
    score = _check_score(score)
    conts = list(continuations) if continuations else list(REFUSAL_OPENINGS)
    if score == "text":
        measure = lambda m, p, inter: -st.perplexity(m, p, interventions=inter, progress=False)["nll"]  # noqa: E731
    elif score == "continuations":
        measure = lambda m, p, inter: st.continuation_logprob(m, p, conts, interventions=inter)  # noqa: E731
    else:
        measure = score
    sets = [("top", 0, experts)] + [("random", s, [tuple(map(int, x)) for x in st.random_experts_like(mm, experts, seed=s)])
                                    for s in range(seeds)]
    rows = []
    from tqdm.auto import tqdm

    from .common import progress_update

    total = len(prompts) * (1 + len(actions) * len(sets))
    bar = tqdm(total=total, disable=not progress, desc="intervene", leave=False)
    done = 0
    progress_update("interventions scored", 0, total, 0)  # the dashboard's progress bar (counted steps)
    for cls, ps in prompts.items():
        base = float(measure(mm, ps, None))
        bar.update(1)
        done += 1
        progress_update("interventions scored", done, total, done)
        for action in actions:
            kind = ACTIONS[action]
            for which, seed, exps in sets:
                use = _cap_force(mm, exps) if kind == "force" else _cap_ban(mm, exps) if kind == "ban" else exps
                val = float(measure(mm, ps, {kind: format_spec(use)}))
                bar.update(1)
                done += 1
                progress_update("interventions scored", done, total, done)
                rows.append({"class": cls, "action": action, "experts_from": which, "seed": seed,
                             "experts": format_spec(use), "n_experts": len(use), "n_prompts": len(ps),
                             "baseline": base, "score": val, "change": val - base})
    bar.close()
    tab = pl.DataFrame(rows)
    summ = _loop_summary(tab)
    what = SCORES[score] if isinstance(score, str) else "user score"
    lines = [f"intervention on the top-{len(experts)} ({format_spec(experts)}), score = {what}, "
             f"random control over {seeds} seeds:"]
    for cls, action, top, rmean, rstd, beyond in summ.select("class", "action", "change_top", "change_random",
                                                             "change_random_std", "beyond_random").iter_rows():
        spread = f"+- {rstd:.4f}" if rstd is not None and rstd == rstd else "(one seed: no spread)"
        lines.append(f"  {cls:>10s} {ACTION_TEXT[action]:42s} top {top:+.4f}  random {rmean:+.4f} {spread}  "
                     f"beyond random {beyond:+.4f}")
    meta = {"intervene_experts": experts, "score": what,
            "continuations": conts if score == "continuations" else None}
    return AnalysisResult("behavior-loop", {"intervention": tab, "intervention_summary": summ},
                          "intervention_summary", "\n".join(lines), meta)


def _check_score(score):
    """The score's name ("continuations" when None) or the user's callable; an unknown name is refused."""
    score = "continuations" if score is None else score
    if isinstance(score, str) and score not in SCORES:
        raise WorkbenchError(f"unknown behaviour score {score!r}; choose from {', '.join(SCORES)} or pass a function")
    return score


def _loop_summary(tab: pl.DataFrame) -> pl.DataFrame:
    top = tab.filter(pl.col("experts_from") == "top").select("class", "action", "baseline",
                                                            pl.col("score").alias("score_top"),
                                                            pl.col("change").alias("change_top"))
    rnd = (tab.filter(pl.col("experts_from") == "random").group_by("class", "action")
           .agg(pl.col("change").mean().alias("change_random"), pl.col("change").std().alias("change_random_std"),
                pl.len().alias("n_seeds")))
    return (top.join(rnd, on=["class", "action"], how="left")
            .with_columns((pl.col("change_top") - pl.col("change_random")).alias("beyond_random"))
            .sort("class", "action"))


# --------------------------------------------------------------------------------------------------
# Figures


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    t = result.tables
    figs = {}
    diff = t["map"]
    for cls in diff["class"].unique(maintain_order=True).to_list():
        d = diff.filter(pl.col("class") == cls).sort("layer", "expert")
        layers = d["layer"].unique(maintain_order=True).to_list()
        E = d.height // len(layers)
        z = d["diff"].to_numpy().reshape(len(layers), E)
        hover = [f"L{a} E{b}<br>D={x:+.4f}<br>risk diff={r:+.4f}" + (f"<br>q={q:.3g}" if "q_value" in d.columns else "")
                 for a, b, x, r, q in zip(d["layer"], d["expert"], d["diff"], d["risk_diff"],
                                          d["q_value"] if "q_value" in d.columns else [0] * d.height)]
        f = go.Figure(go.Heatmap(z=z, x=list(range(E)), y=[str(x) for x in layers], colorscale="RdBu",
                                 reversescale=True, zmid=0, colorbar={"title": "D"},
                                 text=np.asarray(hover, dtype=object).reshape(len(layers), E),
                                 hovertemplate="%{text}<extra></extra>"))
        if "significant" in d.columns:
            s = d.filter(pl.col("significant"))
            f.add_trace(go.Scatter(x=s["expert"].to_list(), y=[str(x) for x in s["layer"].to_list()], mode="markers",
                                   marker={"symbol": "x-thin", "size": 7, "line": {"width": 1.5, "color": "black"}},
                                   name=f"significant (FDR {result.meta.get('fdr', 0.05)})", hoverinfo="skip"))
        tp = d.filter(pl.col("rank") <= result.meta.get("top_n", 10))
        f.add_trace(go.Scatter(x=tp["expert"].to_list(), y=[str(x) for x in tp["layer"].to_list()], mode="markers",
                               marker={"symbol": "circle-open", "size": 14, "line": {"width": 2, "color": "gold"}},
                               name=f"top-{result.meta.get('top_n', 10)}", hoverinfo="skip"))
        f.update_layout(title=f"fTRI map: {cls} minus other classes (selection rate per token)",
                        xaxis_title="expert", yaxis_title="layer", template="plotly_white",
                        legend={"orientation": "h", "y": -0.15})
        figs[f"map_{cls}" if len(diff["class"].unique()) > 1 else "map"] = f

    top = t["top"]
    cols = [c for c in ("class", "rank", "layer", "expert", "diff", "risk_diff", "mean_target", "mean_other", "q_value",
                        "stability") if c in top.columns]
    fmt = {c: ".4f" for c in ("diff", "risk_diff", "mean_target", "mean_other", "stability")}
    fmt["q_value"] = ".3g"
    values = [[format(v, fmt[c]) if c in fmt and v is not None else v for v in top[c].to_list()] for c in cols]
    figs["top"] = go.Figure(go.Table(header={"values": cols}, cells={"values": values}))
    figs["top"].update_layout(title="Top experts by differential selection")

    means = t["class_means"]
    classes = means["class"].unique(maintain_order=True).to_list()
    f = go.Figure()
    for i, c in enumerate(classes):
        d = means.filter(pl.col("class") == c).sort("layer", "expert")
        layers = d["layer"].unique(maintain_order=True).to_list()
        f.add_trace(go.Heatmap(z=d["mean"].to_numpy().reshape(len(layers), -1), y=[str(x) for x in layers],
                               colorscale="Inferno", visible=i == 0, name=c, colorbar={"title": "rate"}))
    f.update_layout(title=f"Class mean map: {classes[0]}", xaxis_title="expert", yaxis_title="layer",
                    template="plotly_white",
                    updatemenus=[{"buttons": [{"label": c, "method": "update",
                                               "args": [{"visible": [j == i for j in range(len(classes))]},
                                                        {"title": f"Class mean map: {c}"}]}
                                              for i, c in enumerate(classes)], "x": 1.0, "y": 1.15,
                                  "xanchor": "right"}])
    figs["class_means"] = f

    if "intervention_summary" in t:
        s = t["intervention_summary"]
        f = go.Figure()
        for which, col, err in (("top-N", "change_top", None), ("random", "change_random", "change_random_std")):
            f.add_trace(go.Bar(x=[f"{c}<br>{a}" for c, a in zip(s["class"], s["action"])], y=s[col].to_list(),
                               name=which,
                               error_y={"type": "data", "array": s[err].fill_null(0).to_list()} if err else None))
        f.update_layout(barmode="group", title=f"Behaviour score change ({result.meta.get('score', 'score')})",
                        yaxis_title="change vs baseline", template="plotly_white")
        figs["intervention"] = f
    return figs


# --------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p) -> None:
    from ..options import at_least, between, column, seed

    p.add_argument("--label", type=column, default="class", help="label column naming each prompt's class (default: class)")
    p.add_argument("--target", help="class to contrast with the rest (default: 'target', or the non-control class)")
    p.add_argument("--counts", action="store_true", help="maps of token counts instead of rates per token")
    p.add_argument("--top-n", type=at_least(1), default=10, help="experts in the top list (default 10)")
    p.add_argument("--permutations", type=at_least(0, note=" (0 skips the test)"), default=1000,
                   help="permutation test resamples (0 = skip)")
    p.add_argument("--fdr", type=between(0, 1, lo_open=True, hi_open=True), default=0.05,
                   help="Benjamini-Hochberg level (default 0.05)")
    p.add_argument("--alternative", choices=["two-sided", "greater", "less"], default="two-sided",
                   help="permutation test direction: target class uses an expert more (greater), less, or either")
    p.add_argument("--bootstrap", type=at_least(0, note=" (0 skips it)"), default=100,
                   help="half-split resamples for top-N stability (0 = skip)")
    p.add_argument("--seed", type=seed, default=0, help="seed of permutations, bootstrap and controls (default 0)")
    p.add_argument("--phase", choices=["prefill", "decode", "all"], default="prefill",
                   help="tokens the maps count: prompt (prefill, default), generated (decode) or all")
    g = p.add_argument_group("closing the loop")
    g.add_argument("--intervene", type=at_least(0), default=0, metavar="N", help="switch the top-N off / on and measure")
    g.add_argument("--model", help="model for --intervene (default: the run's)")
    g.add_argument("--heldout", type=between(0, 1, lo_open=True, hi_open=True), default=0.3,
                   help="share of each class held out of the maps (default 0.3)")
    g.add_argument("--heldout-data", help="held-out prompts (text + label field) instead of a split of the run")
    g.add_argument("--max-heldout", type=at_least(1), default=32, help="prompts per class to score (default 32)")
    g.add_argument("--continuations", help="score continuations: a .txt file (one a line) or 'a|b|c' "
                                           "(default: refusal openings)")
    g.add_argument("--score", choices=sorted(SCORES), default="continuations",
                   help="what --intervene measures: log-prob of --continuations after each prompt (default), "
                        "or of the prompt text itself")
    g.add_argument("--seeds", type=at_least(1), default=3, help="random-expert control seeds (default 3)")
    g.add_argument("--rank-by", choices=["frequency", "attribution"], default="frequency",
                   help="experts --intervene switches: the map's top-N (default) or the N with the largest "
                        "estimated causal effect on the target prompts' NLL vs the others' (workbench attribute)")


def options_from_args(a) -> dict:
    if not 0 < a.fdr < 1:
        raise WorkbenchError("--fdr must be between 0 and 1")
    if a.permutations < 0 or a.bootstrap < 0:
        raise WorkbenchError("--permutations and --bootstrap must be 0 or more")
    conts = None
    if a.continuations:
        from pathlib import Path

        pth = Path(a.continuations)
        if pth.suffix == ".txt":
            if not pth.exists():
                raise WorkbenchError(f"--continuations file {pth} does not exist")
            conts = [x for x in pth.read_text(encoding="utf-8").splitlines() if x.strip()]
        else:
            conts = [x for x in a.continuations.split("|") if x]
    return dict(label=a.label, target=a.target, normalize=not a.counts, permutations=a.permutations, fdr=a.fdr,
                top_n=a.top_n, bootstrap=a.bootstrap, seed=a.seed, phase=None if a.phase == "all" else a.phase,
                alternative=a.alternative, intervene=a.intervene, heldout=a.heldout, model=a.model,
                heldout_data=a.heldout_data, max_heldout=a.max_heldout, continuations=conts, seeds=a.seeds,
                score=a.score, rank_by=getattr(a, "rank_by", "frequency"))
