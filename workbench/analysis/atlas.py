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
from .common import routing_arrays

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

    with warnings.catch_warnings():
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
    labels = _label_columns(run, labels)
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


def expert_atlas(run, labels=None, top_tokens: int = 200, seed: int = 0, n_neighbors: int = 15,
                 min_dist: float = 0.1, phase: str | None = None, include_unused: bool = False) -> pl.DataFrame:
    """One row per (layer, expert): 2-D position, selections, dominant value of each label (share of
    the expert's selections and lift over the run's base rate) and its most over-represented tokens."""
    index, blocks = expert_profiles(run, labels, top_tokens, phase)
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
    """2-D map of tokens by routing vector (a seeded sample of at most `max_tokens`), with labels."""
    labels = _label_columns(run, labels)
    ra = routing_arrays(run, phase=phase)
    tok = _token_frame(run, ra, labels, phase)
    n = len(ra.doc)
    rows = np.arange(n)
    if n > max_tokens:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_tokens, replace=False))
    from .common import RoutingArrays

    sub = RoutingArrays(ra.doc[rows], ra.pos[rows], ra.layers, ra.experts[rows], ra.weights[rows], ra.n_experts)
    coords, method = embed(token_vectors(sub), seed, n_neighbors, min_dist)
    return tok[rows].select("doc_id", "pos", "token", *labels).with_columns(
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
    tables = {}
    for w in tqdm(what, desc="atlas", unit="map", disable=not progress, dynamic_ncols=True):
        if w == "experts":
            tables["experts"] = expert_atlas(run, labels, top_tokens, seed, n_neighbors, min_dist, phase)
        else:
            tables["tokens"] = token_atlas(run, labels, max_tokens, seed, n_neighbors, min_dist, phase)
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
