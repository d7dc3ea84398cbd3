"""Expert atlas: 2-D maps (UMAP, seeded) of experts by what selects them, and of tokens by their routing.

Expert profile of (layer, expert): for each label column, the distribution of label values over the
tokens that select it, and the distribution over the most frequent tokens; blocks are square-rooted
(so euclidean distance is the Hellinger distance between profiles) and concatenated with equal weight.
Token vector: per MoE layer the token's routing weights over E (renormalised over its selected
experts), concatenated. Both tables carry the labels the app colours by.

    from workbench.analysis import atlas
    res = atlas.analyze(run, labels=["lang"])
    res.tables["experts"]   # layer, expert, x, y, n_selections, top_lang, top_lang_share, top_tokens
    res.tables["tokens"]    # doc_id, pos, token, x, y, <labels>
"""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from . import AnalysisResult

MAX_LABEL_VALUES = 50  # label columns with more distinct values (ids, keys) are not colours
SKIP_LABELS = ("key", "src_doc")


def embed(x: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
          metric: str = "euclidean") -> tuple[np.ndarray, str]:
    """2-D coordinates of the rows of x: UMAP seeded (deterministic), or PCA below 10 rows, where
    UMAP's neighbour graph is meaningless. Returns (coords [n, 2], method)."""
    x = np.asarray(x, np.float32)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2)), "none"
    if n < 10:
        xc = x - x.mean(0)
        if not np.any(xc):
            return np.zeros((n, 2)), "pca"
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        out = np.zeros((n, 2))
        k = min(2, len(s))
        out[:, :k] = u[:, :k] * s[:k]
        return out, "pca"
    import umap

    from ..threads import numba_parallel

    with warnings.catch_warnings(), numba_parallel():  # numba must not change torch's thread count
        warnings.simplefilter("ignore")  # n_jobs=1 with random_state; disconnected-vertex notices
        reducer = umap.UMAP(n_components=2, n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=min_dist,
                            metric=metric, random_state=seed, init="spectral" if n > 20 else "random")
        y = reducer.fit_transform(x)
    return np.asarray(y, np.float64), "umap"


def _label_columns(run, labels) -> list[str]:
    have = [c for c in run.tokens.collect_schema().names() if c not in ("doc_id", "pos", "token_id", "token", "phase")]
    if labels is None:
        tok = run.tokens.select(have).collect()
        return [c for c in have if c not in SKIP_LABELS and tok[c].n_unique() <= MAX_LABEL_VALUES]
    labels = [labels] if isinstance(labels, str) else list(labels)
    missing = [c for c in labels if c not in have]
    if missing:
        raise WorkbenchError(f"run {run.path} has no label column {missing[0]!r} (labels: {', '.join(have) or 'none'})")
    return labels


def _sample_keys(run, max_tokens: int, seed: int, phase) -> pl.DataFrame:
    """(doc_id, pos) of the token atlas sample: a seeded draw of `max_tokens` rows of the sorted routed
    tokens (every token when fewer), the same rows a dense reader of the whole run would draw."""
    from .common import routing_keys

    keys = routing_keys(run, phase)
    n = keys.height
    if n > max_tokens:
        keys = keys[np.sort(np.random.default_rng(seed).choice(n, max_tokens, replace=False))]
    return keys


def _scan(run, labels, top_tokens: int = 200, phase=None, sample: pl.DataFrame | None = None,
          profiles: bool = True, progress: bool = False):
    """One streaming pass over the routing (common.iter_routing chunks): the expert profiles (exact
    counts added per chunk; per-(layer, expert, token) counts kept sparse, so memory follows the
    vocabulary, not the run) and the rows of the token sample `sample` (doc_id, pos).

    Returns (index, blocks, sample RoutingArrays or None, sample token frame or None)."""
    from .common import RoutingArrays, iter_routing
    from .stats import KeyCounts, token_id_span

    layers = sorted(run.moe_layers)
    nl, E = len(layers), run.n_experts
    LE = nl * E
    NT = token_id_span(run)
    n_sel = np.zeros(LE, np.int64)
    lab_vals = {c: {} for c in labels}  # value -> column, in order of first sight
    lab_cnt = {c: np.zeros((LE, 0), np.int64) for c in labels}
    pair, freq = KeyCounts(), KeyCounts()  # (layer-expert, token id + 1) selections; token id + 1 counts
    names: dict = {}
    picked = []
    for ch in iter_routing(run, phase=phase, token_columns=["token_id", "token", *labels], progress=progress,
                           desc="atlas"):
        ra, tok = ch.ra, ch.tokens
        if sample is not None:
            idx = (pl.DataFrame({"doc_id": ra.doc, "pos": ra.pos}).with_row_index("i")
                   .join(sample, on=["doc_id", "pos"], how="semi")["i"].to_numpy())
            if len(idx):
                picked.append((ra.doc[idx], ra.pos[idx], ra.experts[idx], ra.weights[idx], tok[idx]))
        if not profiles:
            continue
        ex = ra.experts.astype(np.int64)
        ok = (ex >= 0) & (ex < E)
        le = np.arange(nl)[None, :, None] * E + ex
        n_sel += np.bincount(le[ok], minlength=LE)
        for col in labels:
            sv = tok[col].cast(pl.Utf8).fill_null("<none>")
            lut = lab_vals[col]
            for v in sv.unique(maintain_order=True).to_list():
                lut.setdefault(v, len(lut))
            nv = len(lut)
            if lab_cnt[col].shape[1] < nv:
                lab_cnt[col] = np.pad(lab_cnt[col], ((0, 0), (0, nv - lab_cnt[col].shape[1])))
            code = sv.replace_strict(lut, return_dtype=pl.Int64).to_numpy()
            lab_cnt[col] += np.bincount((le * nv + code[:, None, None])[ok], minlength=LE * nv).reshape(LE, nv)
        ids = tok["token_id"].fill_null(-1).to_numpy().astype(np.int64)
        gk, inv, gc = np.unique(ids + 1, return_inverse=True, return_counts=True)
        freq.add(gk, gc.astype(np.int64))
        G = len(gk)
        keys, cts = [], []
        for li in range(nl):  # per layer: E x G cells at most, keys come out ascending
            m = ok[:, li, :]
            b = np.bincount((ex[:, li, :] * G + inv[:, None])[m], minlength=E * G)
            nz = np.flatnonzero(b)
            keys.append((li * E + nz // G) * NT + gk[nz % G])
            cts.append(b[nz].astype(np.int64))
        pair.add(np.concatenate(keys), np.concatenate(cts))
        tid = tok["token_id"].to_numpy()
        present = tok["token_id"].is_not_null().to_numpy()
        if present.any():  # the last string seen for each id, as dict(zip(ids, tokens)) over the run
            ridx = np.flatnonzero(present)[::-1]
            u, first = np.unique(tid[ridx], return_index=True)
            strs = tok["token"].gather(ridx[first]).to_list()
            names.update(zip(u.tolist(), strs))
    blocks = {}
    if profiles:
        for col in labels:
            values = sorted(lab_vals[col])
            cols = [lab_vals[col][v] for v in values]
            blocks[col] = (values, lab_cnt[col][:, cols] if cols else np.zeros((LE, 0), np.int64))
        order = np.argsort(-freq.c, kind="stable")[:top_tokens]  # freq.k ascending: ties to the smaller id
        keep1 = freq.k[order]
        values = [names.get(int(u) - 1, str(int(u) - 1)) for u in keep1] + ["<other>"]
        counts = np.zeros((LE, len(keep1) + 1), np.int64)
        srt = np.argsort(keep1)
        j = np.searchsorted(keep1[srt], pair.k % NT)
        j = np.minimum(j, max(len(keep1) - 1, 0))
        hit = (keep1[srt][j] == pair.k % NT) if len(keep1) else np.zeros(len(pair.k), bool)
        np.add.at(counts, (pair.k[hit] // NT, srt[j[hit]]), pair.c[hit])
        counts[:, -1] = n_sel - counts[:, :-1].sum(1)
        blocks["token"] = (values, counts)
    index = pl.DataFrame({"layer": np.repeat(np.asarray(layers), E).astype(np.int16),
                          "expert": np.tile(np.arange(E), nl).astype(np.int16), "n_selections": n_sel})
    sra = stok = None
    if sample is not None:
        if picked:
            doc = np.concatenate([p[0] for p in picked])
            o = np.lexsort((np.concatenate([p[1] for p in picked]), doc))
            sra = RoutingArrays(doc[o], np.concatenate([p[1] for p in picked])[o], layers,
                                np.concatenate([p[2] for p in picked])[o], np.concatenate([p[3] for p in picked])[o], E)
            stok = pl.concat([p[4] for p in picked])[o]
        else:
            sra = RoutingArrays(np.zeros(0, np.int64), np.zeros(0, np.int32), layers, np.zeros((0, nl, run.top_k), np.int16),
                                np.zeros((0, nl, run.top_k), np.float32), E)
            stok = pl.DataFrame(schema={"doc_id": pl.Int64, "pos": pl.Int32, "token_id": pl.Int32, "token": pl.Utf8})
    return index, blocks, sra, stok


def expert_profiles(run, labels=None, top_tokens: int = 200, phase: str | None = None, progress: bool = False):
    """Per (layer, expert): selection counts per label value and per frequent token.

    Returns (index frame [layer, expert, n_selections], {block name: (values, counts [L*E, n_values])}).
    Block "token" holds the `top_tokens` most frequent tokens plus "<other>". Streams the run (_scan).
    """
    labels = _label_columns(run, labels)
    index, blocks, _, _ = _scan(run, labels, top_tokens, phase, progress=progress)
    return index, blocks


def expert_atlas(run, labels=None, top_tokens: int = 200, seed: int = 0, n_neighbors: int = 15,
                 min_dist: float = 0.1, phase: str | None = None, include_unused: bool = False) -> pl.DataFrame:
    """One row per (layer, expert): 2-D position, selections, dominant value of each label (share of
    the expert's selections and lift over the run's base rate) and its most over-represented tokens."""
    index, blocks = expert_profiles(run, labels, top_tokens, phase)
    return _expert_atlas(index, blocks, seed, n_neighbors, min_dist, include_unused)


def _expert_atlas(index, blocks, seed, n_neighbors, min_dist, include_unused=False) -> pl.DataFrame:
    feats = []
    for values, counts in blocks.values():
        tot = counts.sum(1, keepdims=True)
        feats.append(np.sqrt(counts / np.maximum(tot, 1)))
    x = np.concatenate(feats, 1)
    used = index["n_selections"].to_numpy() > 0
    rows = np.flatnonzero(used | include_unused)
    coords, method = embed(x[rows], seed, n_neighbors, min_dist)
    out = index[rows].with_columns(pl.Series("x", coords[:, 0]), pl.Series("y", coords[:, 1]),
                                   pl.lit(method).alias("method"))
    cols = []
    for col, (values, counts) in blocks.items():
        c = counts[rows].astype(np.float64)
        share = c / np.maximum(c.sum(1, keepdims=True), 1)
        base = counts.sum(0) / max(counts.sum(), 1)
        if col == "token":
            # lift over the base rate, among tokens seen at least 3 times by this expert
            lift = np.where((c >= 3) & (base > 0), share / np.where(base > 0, base, 1), 0.0)
            lift[:, -1] = 0  # "<other>" is not a token
            top = np.argsort(-lift, axis=1, kind="stable")[:, :5]
            cols.append(pl.Series("top_tokens", [" ".join(repr(values[j]) for j in r if lift[i, j] > 1)
                                                 for i, r in enumerate(top)]))
        else:
            j = share.argmax(1)
            cols += [pl.Series(f"top_{col}", [values[i] for i in j]),
                     pl.Series(f"top_{col}_share", share[np.arange(len(j)), j]),
                     pl.Series(f"top_{col}_lift", share[np.arange(len(j)), j] / np.maximum(base[j], 1e-12))]
    return out.with_columns(cols)


def token_vectors(ra) -> np.ndarray:
    """[T, L*E] routing vector per token: renormalised weights of its selected experts per layer."""
    t, nl, k = ra.experts.shape
    E = ra.n_experts
    w = ra.weights.astype(np.float64)
    s = w.sum(-1, keepdims=True)
    w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / k)
    ex = ra.experts.astype(np.int64)
    ok = (ex >= 0) & (ex < E)
    v = np.zeros((t, nl * E))
    rows = np.broadcast_to(np.arange(t)[:, None, None], ex.shape)
    colidx = np.arange(nl)[None, :, None] * E + ex
    np.add.at(v, (rows[ok], colidx[ok]), w[ok])
    return v


def token_atlas(run, labels=None, max_tokens: int = 5000, seed: int = 0, n_neighbors: int = 15,
                min_dist: float = 0.1, phase: str | None = None) -> pl.DataFrame:
    """2-D map of tokens by routing vector (a seeded sample of at most `max_tokens`), with labels.
    The sample's rows are picked while streaming the run; only they are held."""
    labels = _label_columns(run, labels)
    _, _, sub, tok = _scan(run, labels, phase=phase, sample=_sample_keys(run, max_tokens, seed, phase), profiles=False)
    return _token_atlas(sub, tok, labels, seed, n_neighbors, min_dist)


def _token_atlas(sub, tok, labels, seed, n_neighbors, min_dist) -> pl.DataFrame:
    coords, method = embed(token_vectors(sub), seed, n_neighbors, min_dist)
    return tok.select("doc_id", "pos", "token", *labels).with_columns(
        pl.Series("x", coords[:, 0]), pl.Series("y", coords[:, 1]), pl.lit(method).alias("method"))


def analyze(run, labels=None, what=("experts", "tokens"), top_tokens: int = 200, max_tokens: int = 5000,
            seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1, phase: str | None = None,
            progress: bool = True) -> AnalysisResult:
    """Expert atlas and token atlas (either or both, `what`); a progress bar per map (UMAP takes minutes)."""
    from tqdm.auto import tqdm

    what = [what] if isinstance(what, str) else list(what)
    bad = [w for w in what if w not in ("experts", "tokens")]
    if bad or not what:
        raise WorkbenchError(f"atlas --what takes experts and/or tokens, not {', '.join(bad) or 'nothing'}")
    labels = _label_columns(run, labels)
    if phase is not None and run.tokens.filter(pl.col("phase") == phase).head(1).collect().height == 0:
        raise WorkbenchError(f"run {run.path} has no {phase} tokens, so --phase {phase} leaves nothing to map")
    tables = {}
    # one pass over the run for both maps: the profiles and the token sample
    sample = _sample_keys(run, max_tokens, seed, phase) if "tokens" in what else None
    index, blocks, sub, tok = _scan(run, labels, top_tokens, phase, sample=sample, profiles="experts" in what,
                                    progress=progress)
    for w in tqdm(what, desc="atlas", unit="map", disable=not progress, dynamic_ncols=True):
        if w == "experts":
            tables["experts"] = _expert_atlas(index, blocks, seed, n_neighbors, min_dist)
        else:
            tables["tokens"] = _token_atlas(sub, tok, labels, seed, n_neighbors, min_dist)
    lines = ["expert atlas" + (f" coloured by {', '.join(labels)}" if labels else "")]
    for name, t in tables.items():
        lines.append(f"  {name}: {t.height} points ({t['method'][0] if t.height else '-'}, seed {seed})")
    return AnalysisResult("atlas", tables, what[0], "\n".join(lines),
                          {"labels": labels, "seed": seed, "n_neighbors": n_neighbors, "min_dist": min_dist})


def figures(result: AnalysisResult) -> dict:
    import plotly.express as px

    figs = {}
    labels = result.meta.get("labels", [])
    if "experts" in result.tables:
        t = result.tables["experts"].with_columns(pl.col("layer").cast(pl.Utf8).alias("layer_str"))
        color = f"top_{labels[0]}" if labels else "layer_str"
        hover = ["layer", "expert", "n_selections"] + [c for c in t.columns if c.startswith("top_")]
        f = px.scatter(t.to_pandas(), x="x", y="y", color=color, hover_data=hover,
                       title="Expert atlas: experts placed by what selects them")
        f.update_traces(marker={"size": 8})
        f.update_layout(template="plotly_white", xaxis={"showticklabels": False, "title": ""},
                        yaxis={"showticklabels": False, "title": ""})
        figs["experts"] = f
    if "tokens" in result.tables:
        t = result.tables["tokens"]
        color = labels[0] if labels else None
        f = px.scatter(t.to_pandas(), x="x", y="y", color=color, hover_data=["doc_id", "pos", "token"],
                       title="Token atlas: tokens placed by their routing")
        f.update_traces(marker={"size": 4, "opacity": 0.7})
        f.update_layout(template="plotly_white", xaxis={"showticklabels": False, "title": ""},
                        yaxis={"showticklabels": False, "title": ""})
        figs["tokens"] = f
    return figs


def add_arguments(p) -> None:
    from ..options import at_least, between, columns, seed, text_of

    p.add_argument("--labels", type=text_of(columns),
                   help="comma list of label columns to profile and colour by (default: all low-cardinality)")
    p.add_argument("--what", default="experts,tokens", help="experts, tokens or both (default)")
    p.add_argument("--top-tokens", type=at_least(1), default=200, help="frequent tokens in the expert profiles (default 200)")
    p.add_argument("--max-tokens", type=at_least(1), default=5000, help="token atlas sample size (default 5000)")
    p.add_argument("--n-neighbors", type=at_least(2), default=15, help="UMAP neighbours (default 15)")
    p.add_argument("--min-dist", type=between(0, 1), default=0.1, help="UMAP minimum distance, 0 to 1 (default 0.1)")
    p.add_argument("--seed", type=seed, default=0, help="UMAP seed (default 0)")
    p.add_argument("--phase", choices=["prefill", "decode"], help="only prompt (prefill) or generated (decode) tokens")


def options_from_args(a) -> dict:
    if a.max_tokens < 1 or a.top_tokens < 1 or a.n_neighbors < 2:
        raise WorkbenchError("--max-tokens and --top-tokens must be positive and --n-neighbors at least 2")
    return dict(labels=[s.strip() for s in a.labels.split(",") if s.strip()] if a.labels else None,
                what=[s.strip() for s in a.what.split(",") if s.strip()], top_tokens=a.top_tokens,
                max_tokens=a.max_tokens, seed=a.seed, n_neighbors=a.n_neighbors, min_dist=a.min_dist, phase=a.phase)
