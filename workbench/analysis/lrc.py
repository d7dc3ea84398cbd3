"""Local routing consistency (Liang et al., "Not All Models Suit Expert Offloading", ICLR 2026).

SRP(G, m): how well one fixed expert set per m-token window serves the tokens of that window, for a
group G of (layer, expert) pairs (one expert, one layer, or the whole model with one shared
threshold). SCH: hit rate of an expert cache that evicts by uses in the next m tokens, for every
cache size; LRU, LFU and Belady under the same conventions. Definitions: shared/METHODS.md section 2.

Routing streams from the run's Parquet parts one part at a time (memory stays bounded by a part plus
per-sequence histograms); sequences are the run's documents, or `seq_len`-token pieces of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from ..threads import numba_parallel
from . import AnalysisResult

DEFAULT_M = (4, 16, 64, 256)
POLICIES = ("lru", "lfu", "belady")
_POLICY_CODE = {"sch": 0, "lru": 1, "lfu": 2, "belady": 3}
UNIT_HIST_BYTES = 1 << 30  # per-sequence x layer histograms above this are pooled into groups of sequences
EXPERT_CI_WORK = 5e9  # "auto" bootstraps single experts when sequences x experts x bins x resamples stays below this


# ----------------------------------------------------------------------------------------------------------
# reading: routing as a stream of [T, L, K] sequence blocks


@dataclass
class SequenceChunk:
    experts: np.ndarray  # [T, L, K] int16, rows of sequence s are starts[s]:starts[s+1]
    starts: np.ndarray  # int64
    doc_ids: np.ndarray  # [n_seq] source document of each sequence


def _check_ids(ex: np.ndarray, n_experts: int) -> None:
    if ex.size and (int(ex.min()) < 0 or int(ex.max()) >= n_experts):
        raise WorkbenchError(f"routing holds expert ids outside 0..{n_experts - 1}; cannot measure consistency")


def _split(doc_tok: np.ndarray, seq_len: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sequence start offsets (plus end) and the doc of each sequence, for rows sorted by doc."""
    change = np.flatnonzero(np.diff(doc_tok)) + 1
    bounds = np.concatenate([[0], change, [len(doc_tok)]]).astype(np.int64)
    if seq_len is None:
        return bounds, doc_tok[bounds[:-1]]
    starts = [np.arange(a, b, seq_len) for a, b in zip(bounds[:-1], bounds[1:])]
    s = np.concatenate(starts + [np.array([len(doc_tok)])]).astype(np.int64)
    return s, doc_tok[s[:-1]]


def _read_part(f, k: int, path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(doc, pos, layer, experts [rows, K]) of one routing part, in (doc, pos, layer) order."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(f, columns=["doc_id", "pos", "layer", "experts"])
    col = t.column("experts").combine_chunks()
    lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if len(lens) and (lens.min() != k or lens.max() != k):
        raise WorkbenchError(f"run {path}: routing rows must each hold top_k={k} experts")
    ex = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.int16).reshape(-1, k)
    doc, pos, lay = (t.column(c).to_numpy().astype(np.int64) for c in ("doc_id", "pos", "layer"))
    if not _is_sorted(doc, pos, lay):
        order = np.lexsort((lay, pos, doc))
        doc, pos, lay, ex = doc[order], pos[order], lay[order], ex[order]
    return doc, pos, lay, ex


def iter_sequences(run, seq_len: int | None = None, progress: bool = False, desc: str = "lrc"):
    """Yield SequenceChunk per routing part; a document cut by a part boundary is carried over."""
    from tqdm.auto import tqdm

    layers = sorted(run.moe_layers)
    nl, k = len(layers), run.top_k
    files = run.files("routing")
    if not files:
        raise WorkbenchError(f"run {run.path} has no routing table")
    carry = None
    seen: set = set()
    lay_ref = np.asarray(layers)
    for i, f in enumerate(tqdm(files, desc=desc, unit="part", disable=not progress, dynamic_ncols=True)):
        cur = _read_part(f, k, run.path)
        if carry is not None:
            cur = tuple(np.concatenate([a, b]) for a, b in zip(carry, cur))
            if not _is_sorted(*cur[:3]):
                order = np.lexsort((cur[2], cur[1], cur[0]))
                cur = tuple(a[order] for a in cur)
        doc = cur[0]
        if i < len(files) - 1 and len(doc):
            cut = int(np.searchsorted(doc, doc[-1]))
            carry, cur = tuple(a[cut:] for a in cur), tuple(a[:cut] for a in cur)
        else:
            carry = None
        doc, pos, lay, ex = cur
        if len(doc) == 0:
            continue
        if len(doc) % nl or not (lay.reshape(-1, nl) == lay_ref).all():
            raise WorkbenchError(f"run {run.path}: routing rows are not whole tokens x MoE layers {layers}")
        ex = ex.reshape(-1, nl, k)
        _check_ids(ex, run.n_experts)
        doc_tok = doc[::nl]
        starts, docs = _split(doc_tok, seq_len)
        new = set(np.unique(docs).tolist())
        if new & seen:
            raise WorkbenchError(f"run {run.path}: a document's routing is split over non-adjacent parts")
        seen |= new
        yield SequenceChunk(np.ascontiguousarray(ex), starts, docs)


def _is_sorted(d: np.ndarray, p: np.ndarray, l_: np.ndarray) -> bool:
    """Rows already in (doc_id, pos, layer) order, as captures write them."""
    if len(d) < 2:
        return True
    dd, dp, dl = np.diff(d), np.diff(p), np.diff(l_)
    return bool(np.all((dd > 0) | ((dd == 0) & ((dp > 0) | ((dp == 0) & (dl > 0))))))


def _array_chunks(sequences, n_layers: int | None = None):
    """Python input: a list of [T, L, K] (or [T, K] for one layer) arrays, one per sequence."""
    seqs = [np.asarray(s) for s in sequences]
    if not seqs:
        raise WorkbenchError("no sequences given")
    seqs = [s[:, None, :] if s.ndim == 2 else s for s in seqs]
    ex = np.ascontiguousarray(np.concatenate(seqs).astype(np.int16))
    starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    yield SequenceChunk(ex, starts, np.arange(len(seqs)))


def _count_sequences(run, seq_len: int | None) -> int:
    nl = len(run.moe_layers)
    per_doc = run.routing.group_by("doc_id").agg(pl.len().alias("n")).collect()["n"].to_numpy().astype(np.int64) // nl
    if seq_len is None:
        return int(len(per_doc))
    return int(np.sum(-(-per_doc // seq_len)))


# ----------------------------------------------------------------------------------------------------------
# SRP


def srp_from_hist(h: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SRP, best alpha and rho from window-count histograms h[..., v] (v = 0..m, windows with f = v).

    S_a = sum_{v>=a} v h[v], C_a = sum_{v>=a} h[v], F = S_0; SRP = max_a 2 S_a / (m C_a + F),
    ties to the lowest alpha; rho = m C_a* / F. NaN where the group was never selected.
    """
    h = np.asarray(h, np.float64)
    v = np.arange(m + 1, dtype=np.float64)
    S = np.flip(np.cumsum(np.flip(h * v, -1), -1), -1)
    C = np.flip(np.cumsum(np.flip(h, -1), -1), -1)
    F = S[..., :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = 2.0 * S / (m * C + F)
    val = np.where(F > 0, val, np.nan)
    best = np.nanmax(np.where(np.isnan(val), -np.inf, val), axis=-1)
    ok = np.isfinite(best)
    alpha = np.argmax(val >= (best * (1 - 1e-12))[..., None], axis=-1)
    c_best = np.take_along_axis(C, alpha[..., None], -1)[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = m * c_best / F[..., 0]
    best = np.where(ok, best, np.nan)
    return best, np.where(ok, alpha, -1), np.where(ok, rho, np.nan)


def _best(h: np.ndarray, m: int) -> np.ndarray:
    """srp_from_hist(h, m)[0], fast (numba, one pass per histogram) for bootstrap resamples."""
    from ._lrc_kernels import srp_best

    flat = np.ascontiguousarray(h, np.float64).reshape(-1, m + 1)
    return srp_best(flat, m).reshape(h.shape[:-1])


def _boot_weights(n: int, n_boot: int, rng: np.random.Generator, block: int = 200):
    """Multinomial resample counts, `block` resamples at a time (basic bootstrap over sequences)."""
    for b0 in range(0, n_boot, block):
        b = min(block, n_boot - b0)
        idx = rng.integers(0, n, size=(b, n))
        w = np.zeros((b, n), np.float64)
        np.add.at(w, (np.repeat(np.arange(b), n), idx.reshape(-1)), 1.0)
        yield w


def _basic_ci(point: np.ndarray, boot: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(2*x - q_hi, 2*x - q_lo) of the resampled values along axis 0 (NaN resamples ignored)."""
    import warnings

    a = (1 - level) / 2
    boot = np.asarray(boot, np.float64)
    nan_cols = np.isnan(boot).any(axis=0)
    qlo = np.empty(boot.shape[1:])
    qhi = np.empty(boot.shape[1:])
    ok = ~nan_cols
    if ok.any():
        q = np.quantile(boot[:, ok], [a, 1 - a], axis=0)
        qlo[ok], qhi[ok] = q[0], q[1]
    if nan_cols.any():  # only experts some resample never selects: slow path on those columns alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanquantile(boot[:, nan_cols], [a, 1 - a], axis=0)
        qlo[nan_cols], qhi[nan_cols] = q[0], q[1]
    return 2 * point - qhi, 2 * point - qlo


@dataclass
class _Accum:
    """Everything one streaming pass collects: SRP histograms and the sequences SCH will simulate."""

    n_layers: int
    n_experts: int
    top_k: int
    ms: np.ndarray
    n_seq: int
    per_expert: bool
    sch_stride: int
    moff: np.ndarray = field(init=False)
    hist_g: np.ndarray = field(init=False)
    hist_nl: np.ndarray = field(init=False)
    hist_ng: np.ndarray = field(init=False)
    group: int = 1  # sequences per bootstrap unit (> 1 only when per-sequence histograms would not fit)
    seq_done: int = 0
    seq_len_tokens: list = field(default_factory=list)
    sch_seqs: list = field(default_factory=list)

    def __post_init__(self):
        self.moff = np.concatenate([[0], np.cumsum(self.ms + 1)]).astype(np.int64)
        vdim = int(self.moff[-1])
        g = self.n_layers * self.n_experts
        self.hist_g = np.zeros((g, vdim), np.int64)
        self.group = max(1, -(-self.n_seq * self.n_layers * vdim * 8 // UNIT_HIST_BYTES))
        if self.group > 1:
            self.per_expert = False
        self.n_units = -(-self.n_seq // self.group)
        self.hist_nl = np.zeros((self.n_units, self.n_layers, vdim), np.int64)
        self.hist_ng = np.zeros((self.n_units, g, vdim) if self.per_expert else (1, 1, 1), np.int32)

    def add(self, chunk: SequenceChunk, srp: bool = True) -> None:
        from ._lrc_kernels import srp_accumulate

        n = len(chunk.starts) - 1
        if self.seq_done + n > self.n_seq:
            raise WorkbenchError("more sequences than counted: the routing table changed while reading")
        if srp and self.ms.size:
            units = (self.seq_done + np.arange(n, dtype=np.int64)) // self.group
            srp_accumulate(chunk.experts, chunk.starts, units, self.n_experts, self.ms, self.moff,
                           self.hist_g, self.hist_nl, self.hist_ng, self.per_expert)
        lens = np.diff(chunk.starts)
        self.seq_len_tokens.extend(lens.tolist())
        if self.sch_stride:
            for s in range(n):
                if (self.seq_done + s) % self.sch_stride == 0 and lens[s] > 0:
                    self.sch_seqs.append(chunk.experts[chunk.starts[s]:chunk.starts[s + 1]].copy())
        self.seq_done += n


def _srp_tables(acc: _Accum, layers: list[int], n_boot: int, seed: int, level: float = 0.95) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    n = -(-acc.seq_done // acc.group)  # bootstrap units
    L, E = acc.n_layers, acc.n_experts
    frames = []
    for mi, m in enumerate(acc.ms.tolist()):
        sl = slice(int(acc.moff[mi]), int(acc.moff[mi + 1]))
        hg = acc.hist_g[:, sl]  # [G, m+1]
        hl_seq = acc.hist_nl[:n, :, sl]  # [N, L, m+1]
        e_srp, e_alpha, e_rho = srp_from_hist(hg, m)
        l_hist = hg.reshape(L, E, m + 1).sum(1)
        l_srp, l_alpha, l_rho = srp_from_hist(l_hist, m)
        m_hist = l_hist.sum(0)
        m_srp, m_alpha, m_rho = srp_from_hist(m_hist, m)
        boots_l, boots_m, boots_e = [], [], []
        if n_boot and n > 0:
            flat_l = hl_seq.reshape(n, L * (m + 1)).astype(np.float64)
            flat_e = acc.hist_ng[:n, :, sl].reshape(n, L * E * (m + 1)) if acc.per_expert else None
            for w in _boot_weights(n, n_boot, rng):
                hb = (w @ flat_l).reshape(-1, L, m + 1)
                boots_l.append(_best(hb, m))
                boots_m.append(_best(hb.sum(1), m))
                if flat_e is not None:
                    parts = []
                    step = max(1, int(4e7 // max(1, w.shape[0] * (m + 1) * E)))  # bound the [b, E*(m+1)] block
                    for l0 in range(0, L, step):
                        cols = slice(l0 * E * (m + 1), min(L, l0 + step) * E * (m + 1))
                        hb_e = (w @ flat_e[:, cols].astype(np.float64)).reshape(w.shape[0], -1, m + 1)
                        parts.append(_best(hb_e, m))
                    boots_e.append(np.concatenate(parts, axis=1))
        if boots_m:
            m_lo, m_hi = _basic_ci(m_srp, np.concatenate(boots_m), level)
            l_lo, l_hi = _basic_ci(l_srp, np.concatenate(boots_l), level)
        else:
            m_lo = m_hi = np.nan
            l_lo = l_hi = np.full(L, np.nan)
        if boots_e:
            e_lo, e_hi = _basic_ci(e_srp, np.concatenate(boots_e), level)
        else:
            e_lo = e_hi = np.full(L * E, np.nan)
        windows = int(sum(max(0, t - m + 1) for t in acc.seq_len_tokens))
        act_e = (hg * np.arange(m + 1)).sum(1)
        frames.append(pl.DataFrame({
            "level": ["expert"] * (L * E) + ["layer"] * L + ["model"],
            "layer": np.concatenate([np.repeat(layers, E), layers, [-1]]).astype(np.int64),
            "expert": np.concatenate([np.tile(np.arange(E), L), np.full(L + 1, -1)]).astype(np.int64),
            "m": np.full(L * E + L + 1, m, np.int64),
            "srp": np.concatenate([e_srp, l_srp, [m_srp]]),
            "srp_low": np.concatenate([e_lo, l_lo, [m_lo]]),
            "srp_high": np.concatenate([e_hi, l_hi, [m_hi]]),
            "alpha": np.concatenate([e_alpha, l_alpha, [m_alpha]]).astype(np.int64),
            "rho": np.concatenate([e_rho, l_rho, [m_rho]]),
            "activations": np.concatenate([act_e, act_e.reshape(L, E).sum(1), [act_e.sum()]]).astype(np.int64),
            "windows": np.full(L * E + L + 1, windows, np.int64),
        }))
    if not frames:
        return _empty_srp()
    df = pl.concat(frames)
    return df.with_columns(
        pl.when(pl.col("level") == "model").then(None).otherwise(pl.col("layer")).cast(pl.Int16).alias("layer"),
        pl.when(pl.col("level") != "expert").then(None).otherwise(pl.col("expert")).cast(pl.Int16).alias("expert"),
        pl.when(pl.col("alpha") < 0).then(None).otherwise(pl.col("alpha")).cast(pl.Int32).alias("alpha"),
        pl.col("m").cast(pl.Int32),
    ).with_columns(pl.col(c).fill_nan(None) for c in ("srp", "srp_low", "srp_high", "rho"))


def _empty_srp() -> pl.DataFrame:
    return pl.DataFrame(schema={"level": pl.Utf8, "layer": pl.Int16, "expert": pl.Int16, "m": pl.Int32,
                                "srp": pl.Float64, "srp_low": pl.Float64, "srp_high": pl.Float64,
                                "alpha": pl.Int32, "rho": pl.Float64, "activations": pl.Int64,
                                "windows": pl.Int64})


# ----------------------------------------------------------------------------------------------------------
# SCH and classic cache policies


def simulate_cache(requests: np.ndarray, n_ids: int, policy: str = "sch", m: int = 16) -> np.ndarray:
    """Hit rate of one sequence for every cache size 1..n_ids (index C-1), for `policy`.

    requests [T, R]: ids each token asks for, in the model's score order. Conventions of METHODS.md:
    hits are decided at the start of a token; cold start counts a new id as a hit while fewer than
    C distinct ids have been seen.
    """
    from ._lrc_kernels import stack_sim

    if policy not in _POLICY_CODE:
        raise WorkbenchError(f"unknown cache policy {policy!r}; choose from sch, {', '.join(POLICIES)}")
    req = np.ascontiguousarray(np.asarray(requests, np.int64))
    if req.ndim != 2:
        raise WorkbenchError("requests must be a [tokens, requests per token] array")
    out = np.zeros(n_ids + 1, np.int64)
    stack_sim(req, n_ids, _POLICY_CODE[policy], int(m), out)
    return np.cumsum(out)[:n_ids] / max(1, req.size)


def _sch_tables(acc: _Accum, layers: list[int], ms, policies, n_boot: int, seed: int, level: float = 0.95,
                progress: bool = False):
    from tqdm.auto import tqdm

    from ._lrc_kernels import stack_sim_many

    seqs = acc.sch_seqs
    L, E, K = acc.n_layers, acc.n_experts, acc.top_k
    if not seqs:
        return _empty_sch(), _empty_policies()
    # one request array per (sequence, scope); scope 0..L-1 = one layer, L = whole model (ids offset by layer)
    blocks, widths, nids = [], [], []
    offset = (np.arange(L, dtype=np.int32) * E)[None, :, None]
    for ex in seqs:
        e32 = ex.astype(np.int32)
        for l in range(L):
            blocks.append(np.ascontiguousarray(e32[:, l, :]).reshape(-1))
            widths.append(K)
            nids.append(E)
        blocks.append((e32 + offset).reshape(-1))
        widths.append(K * L)
        nids.append(L * E)
    reqs = np.concatenate(blocks).astype(np.int64)
    ends = np.cumsum([len(b) for b in blocks]).astype(np.int64)
    starts = ends - np.array([len(b) for b in blocks], np.int64)
    widths, nids = np.asarray(widths, np.int64), np.asarray(nids, np.int64)
    out_off = np.concatenate([[0], np.cumsum(nids + 1)]).astype(np.int64)
    configs = [("sch", m) for m in ms] + [(p, 0) for p in policies]
    rng = np.random.default_rng(seed + 1)
    ns = len(seqs)
    boot_w = list(_boot_weights(ns, n_boot, rng)) if n_boot else []
    perm = np.random.default_rng(0).permutation(len(blocks))  # mixes heavy model-level tasks across threads
    sch_rows, pol_rows = [], []
    for policy, m in tqdm(configs, desc="lrc: cache", disable=not progress, dynamic_ncols=True):
        out = np.zeros(int(out_off[-1]), np.int64)
        code = np.full(len(blocks), _POLICY_CODE[policy], np.int64)
        mm = np.full(len(blocks), max(1, m), np.int64)
        stack_sim_many(reqs, starts[perm], ends[perm], widths[perm], nids[perm], code, mm, out, out_off[perm])
        sizes_of = [E] * L + [L * E]
        col0 = np.concatenate([[0], np.cumsum(sizes_of)])
        rates = np.empty((ns, int(col0[-1])))
        for s in range(ns):
            for scope in range(L + 1):
                b = s * (L + 1) + scope
                n_ids = sizes_of[scope]
                per_tok = K if scope < L else K * L
                rates[s, col0[scope]:col0[scope + 1]] = np.cumsum(out[out_off[b]:out_off[b] + n_ids]) / (len(seqs[s]) * per_tok)
        point_all = rates.mean(0)
        if boot_w:
            lo_all, hi_all = _basic_ci(point_all, np.concatenate([(w @ rates) / ns for w in boot_w]), level)
        else:
            lo_all = hi_all = np.full(point_all.shape, np.nan)
        for scope in range(L + 1):
            n_ids = sizes_of[scope]
            cs = slice(int(col0[scope]), int(col0[scope + 1]))
            point, lo, hi = point_all[cs], lo_all[cs], hi_all[cs]
            req_per_tok = K if scope < L else K * L
            sizes = np.arange(1, n_ids + 1)
            row = {"layer": [layers[scope] if scope < L else None] * n_ids, "cache_size": sizes,
                   "rho": sizes / req_per_tok, "hit": point, "low": lo, "high": hi}
            if policy == "sch":
                sch_rows.append(pl.DataFrame({"layer": row["layer"], "m": [m] * n_ids, "cache_size": sizes,
                                              "rho": row["rho"], "sch": point, "sch_low": lo, "sch_high": hi,
                                              "sequences": [ns] * n_ids},
                                             schema_overrides={"layer": pl.Int16}))
            else:
                pol_rows.append(pl.DataFrame({"layer": row["layer"], "policy": [policy] * n_ids, "cache_size": sizes,
                                              "rho": row["rho"], "hit_rate": point, "hit_low": lo, "hit_high": hi,
                                              "sequences": [ns] * n_ids},
                                             schema_overrides={"layer": pl.Int16}))
    sch = pl.concat(sch_rows).with_columns(pl.col("m").cast(pl.Int32), pl.col("cache_size").cast(pl.Int32)) \
        if sch_rows else _empty_sch()
    pol = pl.concat(pol_rows).with_columns(pl.col("cache_size").cast(pl.Int32)) if pol_rows else _empty_policies()
    return sch, pol


def _empty_sch() -> pl.DataFrame:
    return pl.DataFrame(schema={"layer": pl.Int16, "m": pl.Int32, "cache_size": pl.Int32, "rho": pl.Float64,
                                "sch": pl.Float64, "sch_low": pl.Float64, "sch_high": pl.Float64,
                                "sequences": pl.Int64})


def _empty_policies() -> pl.DataFrame:
    return pl.DataFrame(schema={"layer": pl.Int16, "policy": pl.Utf8, "cache_size": pl.Int32, "rho": pl.Float64,
                                "hit_rate": pl.Float64, "hit_low": pl.Float64, "hit_high": pl.Float64,
                                "sequences": pl.Int64})


# ----------------------------------------------------------------------------------------------------------
# public API


def _normalise_m(m) -> np.ndarray:
    if m is None:
        m = DEFAULT_M
    if isinstance(m, (int, np.integer)):
        m = [m]
    if isinstance(m, str):
        m = [s for s in m.replace(" ", "").split(",") if s]
    try:
        ms = sorted({int(x) for x in m})
    except ValueError:
        raise WorkbenchError(f"--m takes whole numbers, got {m!r}") from None
    if any(x < 1 for x in ms):
        raise WorkbenchError("window lengths m must be at least 1")
    return np.asarray(ms, np.int64)


def _pass(source, *, m, sch_m, seq_len, sch_stride, expert_ci, srp: bool, sch: bool, progress: bool,
          n_experts=None, n_boot: int = 1000):
    from ..store import Run

    ms = _normalise_m(m)
    if seq_len is not None and seq_len < 1:
        raise WorkbenchError("--seq-len must be at least 1")
    if sch_stride is not None and sch_stride < 1:
        raise WorkbenchError("--sch-stride must be at least 1")
    if isinstance(source, Run):
        layers = sorted(source.moe_layers)
        E, K = source.n_experts, source.top_k
        n_seq = _count_sequences(source, seq_len)
        chunks = iter_sequences(source, seq_len, progress=progress, desc="lrc: windows")
    else:
        seqs = [np.asarray(s) for s in source]
        if n_experts is None:
            raise WorkbenchError("pass n_experts when giving routing arrays")
        first = seqs[0] if seqs else np.zeros((0, 1, 1))
        L_ = 1 if first.ndim == 2 else first.shape[1]
        layers = list(range(L_))
        E, K = int(n_experts), int(first.shape[-1])
        if seq_len is not None:
            seqs = [s[i:i + seq_len] for s in seqs for i in range(0, len(s), seq_len)]
        n_seq = len(seqs)
        chunks = _array_chunks(seqs)
    L = len(layers)
    cells = n_seq * L * E * int((ms + 1).sum())
    per_expert = expert_ci is True or (expert_ci == "auto" and srp and cells * max(1, n_boot) <= EXPERT_CI_WORK)
    if per_expert and cells * 4 > 8e9:
        raise WorkbenchError(f"per-expert intervals need {cells * 4 / 1e9:.0f} GB of histograms; use fewer sequences or m")
    acc = _Accum(L, E, K, ms if srp else np.zeros(0, np.int64), n_seq, per_expert and srp,
                 (sch_stride or 16) if sch else 0)
    for chunk in chunks:
        if chunk.experts.size:
            _check_ids(chunk.experts, E)
        acc.add(chunk, srp=srp)
    return acc, layers


@numba_parallel()  # the kernels run on the workbench's thread count, torch's is left as it was
def srp(source, m=DEFAULT_M, seq_len: int | None = None, n_boot: int = 1000, seed: int = 0,
        expert_ci="auto", n_experts: int | None = None, progress: bool = False) -> pl.DataFrame:
    """SRP per expert, per layer and for the model (one shared alpha over all MoE layers), per m.

    source: a Run, or a list of per-sequence expert arrays [T, L, K] (then pass n_experts).
    Columns: level, layer (null on model rows), expert (null on layer/model rows), m, srp, srp_low,
    srp_high (basic bootstrap 95% over sequences), alpha, rho, activations, windows.
    expert_ci: "auto" bootstraps experts too when the per-sequence histograms are small enough.
    """
    acc, layers = _pass(source, m=m, sch_m=None, seq_len=seq_len, sch_stride=None, expert_ci=expert_ci,
                        srp=True, sch=False, progress=progress, n_experts=n_experts, n_boot=n_boot)
    return _srp_tables(acc, layers, n_boot, seed)


@numba_parallel()
def sch(source, m=DEFAULT_M, stride: int = 16, seq_len: int | None = None, policies=POLICIES, n_boot: int = 1000,
        seed: int = 0, n_experts: int | None = None, progress: bool = False) -> tuple[pl.DataFrame, pl.DataFrame]:
    """SCH for every cache size per layer and for the model (one cache across layers), every
    `stride`-th sequence; returns (sch table, LRU/LFU/Belady table)."""
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise WorkbenchError(f"unknown cache policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
    acc, layers = _pass(source, m=m, sch_m=m, seq_len=seq_len, sch_stride=stride, expert_ci=False,
                        srp=False, sch=True, progress=progress, n_experts=n_experts)
    return _sch_tables(acc, layers, _normalise_m(m).tolist(), list(policies), n_boot, seed, progress=progress)


@numba_parallel()
def analyze(run, m=DEFAULT_M, seq_len: int | None = None, sch_stride: int = 16, n_boot: int = 1000, seed: int = 0,
            expert_ci="auto", policies=POLICIES, with_sch: bool = True, progress: bool = True) -> AnalysisResult:
    """SRP (main table) and SCH + cache policies in one streaming pass over the run's routing."""
    policies = list(policies or [])
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise WorkbenchError(f"unknown cache policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
    ms = _normalise_m(m)
    acc, layers = _pass(run, m=ms, sch_m=ms, seq_len=seq_len, sch_stride=sch_stride, expert_ci=expert_ci,
                        srp=True, sch=with_sch, progress=progress, n_boot=n_boot)
    srp_df = _srp_tables(acc, layers, n_boot, seed)
    tables = {"srp": srp_df}
    if with_sch:
        sch_df, pol_df = _sch_tables(acc, layers, ms.tolist(), policies, n_boot, seed, progress=progress)
        tables["sch"] = sch_df
        tables["cache_policies"] = pol_df
    meta = {"m": ms.tolist(), "sequences": acc.seq_done, "sch_sequences": len(acc.sch_seqs),
            "bootstrap_unit_sequences": acc.group,
            "expert_ci": bool(acc.per_expert), "n_boot": n_boot, "seq_len": seq_len, "top_k": acc.top_k,
            "n_layers": acc.n_layers, "longest_sequence": max(acc.seq_len_tokens, default=0)}
    return AnalysisResult("lrc", tables, "srp", _summary(tables, meta), meta)


def _na_reason(row: dict, meta: dict) -> str:
    """Why SRP at window m is missing, and what to pass instead (a window longer than every sequence)."""
    m = row["m"]
    if row.get("windows"):
        return "n/a (too few windows to fit the estimate)"
    longest = meta.get("longest_sequence")
    have = f"the longest has {longest} tokens" if longest else "the sequences are shorter"
    return (f"n/a: no sequence is {m} tokens long ({have}); pass smaller windows (--m 4,8,16) or capture "
            f"longer sequences (workbench capture ... --seq-len {max(512, 2 * m)} packs documents together)")


def _summary(tables: dict, meta: dict) -> str:
    lines = [f"local routing consistency over {meta['sequences']} sequences"
             + (f" (caches simulated on {meta['sch_sequences']} of them)" if "sch" in tables else "")]
    s = tables["srp"].filter(pl.col("level") == "model").sort("m")
    for r in s.iter_rows(named=True):
        ci = "" if r["srp_low"] is None else f"  95% CI [{100 * r['srp_low']:.2f}, {100 * r['srp_high']:.2f}]"
        val = _na_reason(r, meta) if r["srp"] is None else f"{100 * r['srp']:.2f}"
        rho = "" if r["rho"] is None else f"  rho={r['rho']:.2f}"
        lines.append(f"  model SRP  m={r['m']:<4d} {val}{ci}{rho}")
    if "sch" in tables and tables["sch"].height:
        k, nl = meta["top_k"], meta["n_layers"]
        for rho in (1, 2, 3):
            c = rho * k * nl
            row = tables["sch"].filter(pl.col("layer").is_null() & (pl.col("cache_size") == c))
            if row.height:
                vals = ", ".join(f"m={r['m']}: {100 * r['sch']:.1f}" for r in row.sort("m").iter_rows(named=True))
                pol = tables["cache_policies"].filter(pl.col("layer").is_null() & (pl.col("cache_size") == c))
                pv = ", ".join(f"{r['policy']}: {100 * r['hit_rate']:.1f}" for r in pol.iter_rows(named=True))
                lines.append(f"  model SCH  rho={rho} (cache {c})  {vals}" + (f"  | {pv}" if pv else ""))
    if meta.get("bootstrap_unit_sequences", 1) > 1:
        lines.append(f"  (bootstrap resamples groups of {meta['bootstrap_unit_sequences']} consecutive sequences "
                     "to bound memory)")
    if not meta.get("expert_ci"):
        lines.append("  (per-expert bootstrap intervals skipped: too many sequences x experts; pass --expert-ci)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# figures and CLI


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    figs = {}
    srp_df = result.tables["srp"]
    model = srp_df.filter(pl.col("level") == "model").sort("m")
    fig = go.Figure()
    if model.height:
        lo = (model["srp"] - model["srp_low"]).fill_null(0).to_list()
        hi = (model["srp_high"] - model["srp"]).fill_null(0).to_list()
        fig.add_trace(go.Scatter(x=model["m"].to_list(), y=model["srp"].to_list(), mode="lines+markers",
                                 name="model", line=dict(width=3),
                                 error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo)))
    lay = srp_df.filter(pl.col("level") == "layer").sort("layer", "m")
    for (layer,), g in lay.group_by("layer", maintain_order=True):
        fig.add_trace(go.Scatter(x=g["m"].to_list(), y=g["srp"].to_list(), mode="lines", name=f"layer {layer}",
                                 opacity=0.5, line=dict(width=1)))
    fig.update_layout(title="Segment routing best performance (SRP) vs segment length m",
                      xaxis=dict(title="m (tokens)", type="log", tickvals=model["m"].to_list() if model.height else None),
                      yaxis=dict(title="SRP"), template="plotly_white")
    figs["srp_vs_m"] = fig
    if lay.height:
        piv = lay.pivot(on="m", index="layer", values="srp").sort("layer")
        ms = [c for c in piv.columns if c != "layer"]
        figs["srp_layers"] = go.Figure(go.Heatmap(z=piv.select(ms).to_numpy(), x=[f"m={c}" for c in ms],
                                                  y=piv["layer"].to_list(), colorscale="Viridis",
                                                  colorbar=dict(title="SRP")))
        figs["srp_layers"].update_layout(title="SRP per layer", yaxis_title="layer", template="plotly_white")
    ex = srp_df.filter(pl.col("level") == "expert")
    if ex.height:
        fig = go.Figure()
        for (m,), g in ex.sort("m").group_by("m", maintain_order=True):
            fig.add_trace(go.Box(x=g["layer"].to_list(), y=g["srp"].to_list(), name=f"m={m}", boxpoints=False))
        fig.update_layout(title="Per-expert SRP by layer", boxmode="group", xaxis_title="layer", yaxis_title="SRP",
                          template="plotly_white")
        figs["srp_experts"] = fig
    if "sch" in result.tables and result.tables["sch"].height:
        sch_df = result.tables["sch"].filter(pl.col("layer").is_null()).sort("m", "cache_size")
        fig = go.Figure()
        for (m,), g in sch_df.group_by("m", maintain_order=True):
            fig.add_trace(go.Scatter(x=g["rho"].to_list(), y=g["sch"].to_list(), mode="lines", name=f"SCH m={m}"))
        pol = result.tables["cache_policies"].filter(pl.col("layer").is_null()).sort("policy", "cache_size")
        for (p,), g in pol.group_by("policy", maintain_order=True):
            fig.add_trace(go.Scatter(x=g["rho"].to_list(), y=g["hit_rate"].to_list(), mode="lines",
                                     name=p.upper() if p != "belady" else "Belady", line=dict(dash="dash")))
        fig.update_layout(title="Model-level cache hit rate vs cache size (rho = cache size / active experts)",
                          xaxis_title="rho", yaxis_title="hit rate", template="plotly_white")
        figs["sch_vs_rho"] = fig
        lay_sch = result.tables["sch"].filter(pl.col("layer").is_not_null())
        if lay_sch.height:
            m_mid = sorted(lay_sch["m"].unique().to_list())[min(1, lay_sch["m"].n_unique() - 1)]
            g = lay_sch.filter(pl.col("m") == m_mid)
            piv = g.pivot(on="cache_size", index="layer", values="sch").sort("layer")
            cs = [c for c in piv.columns if c != "layer"]
            fig = go.Figure(go.Heatmap(z=piv.select(cs).to_numpy(), x=[int(c) for c in cs], y=piv["layer"].to_list(),
                                       colorscale="Viridis", colorbar=dict(title="SCH")))
            fig.update_layout(title=f"SCH per layer (m={m_mid})", xaxis_title="cache size (experts)",
                              yaxis_title="layer", template="plotly_white")
            figs["sch_layers"] = fig
    return figs


def add_arguments(parser) -> None:
    from ..options import at_least, int_list, seed, seq_len

    parser.add_argument("--m", type=int_list, default=",".join(map(str, DEFAULT_M)),
                        help="window lengths in tokens, comma list (default 4,16,64,256)")
    parser.add_argument("--seq-len", type=seq_len, help="cut documents into sequences of this many tokens (paper: 512)")
    parser.add_argument("--sch-stride", type=at_least(1), default=16, help="simulate caches on every N-th sequence (default 16)")
    parser.add_argument("--n-boot", type=at_least(0, note=" (0: no intervals)"), default=1000,
                        help="bootstrap resamples over sequences (0: no intervals)")
    parser.add_argument("--seed", type=seed, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--expert-ci", action="store_true", help="bootstrap intervals for every expert even on large runs")
    parser.add_argument("--no-sch", action="store_true", help="SRP only")
    parser.add_argument("--policies", default=",".join(POLICIES), help="baseline cache policies (lru,lfu,belady; '' for none)")


def options_from_args(args) -> dict:
    return {"m": args.m, "seq_len": args.seq_len, "sch_stride": args.sch_stride, "n_boot": args.n_boot,
            "seed": args.seed, "expert_ci": True if args.expert_ci else "auto", "with_sch": not args.no_sch,
            "policies": [p for p in args.policies.split(",") if p.strip()]}
