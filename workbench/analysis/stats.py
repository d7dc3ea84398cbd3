"""Routing statistics: load, balance, co-activation, layer-to-layer transitions, vocabulary and label
specialisation, prefill vs decode; every table for all tokens (label = null) and again per value of
each label column (and per phase when a run has decode tokens).

The routing streams in chunks of tokens (`common.iter_routing`); every table is a sum of per-chunk
counts (bincounts; co-activation and transitions as indicator-matrix products), so memory stays at
one chunk plus the result tables, whatever the run's size. Counts are kept per combination of label
values (a "unit") and summed into each label's values at the end, so one walk over the routing
serves every label; top tokens are exact counts (a dense table of the (label values, token) pairs seen,
flushed into sorted int64 keys when it outgrows its budget).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from ..threads import analysis_threads
from . import AnalysisResult

_BASE_COLS = ("doc_id", "pos", "token_id", "token", "phase")


def _groups(run, tok: pl.DataFrame, labels, max_values: int = 64, skipped: list | None = None):
    """[(label column, value names, code per token (-1 = not in a group))]; the first is all tokens.

    By default every label column of the run (plus phase when it varies), except id-like columns
    (src_doc, or more than `max_values` distinct values; named in `skipped`); ask for those explicitly."""
    n = tok.height
    out = [(None, [None], np.zeros(n, np.int64))]
    have = [c for c in tok.columns if c not in _BASE_COLS[:4]]
    if labels is None:
        labels = []
        for c in run.label_columns:
            if c in have:
                nv = tok[c].drop_nulls().n_unique()
                if c == "src_doc" or nv > max_values:  # src_doc: packed-capture record id
                    if skipped is not None:
                        skipped.append((c, "an id: too many values; pass --labels to force"))
                elif nv < 2:
                    if skipped is not None:
                        skipped.append((c, "one value only"))
                else:
                    labels.append(c)
        if tok["phase"].n_unique() > 1:
            labels.append("phase")
    else:
        labels = [labels] if isinstance(labels, str) else list(labels)
        bad = [c for c in labels if c not in have]
        if bad:
            raise WorkbenchError(f"run {run.path} has no label column {bad[0]!r} (labels: {', '.join(have) or 'none'})")
    for c in labels:
        col = tok[c].cast(pl.Utf8)
        values = sorted(v for v in col.unique().to_list() if v is not None)
        idx = {v: i for i, v in enumerate(values)}
        code = col.replace_strict(idx, default=-1, return_dtype=pl.Int64).to_numpy()
        out.append((c, values, code))
    return out


def _frame(label, values, code_col, **cols) -> pl.DataFrame:
    df = pl.DataFrame(cols)
    vals = pl.Series(values, dtype=pl.Utf8).gather(np.asarray(code_col, np.int64))
    return df.with_columns(pl.lit(label, pl.Utf8).alias("label"), vals.alias("value")).select(
        "label", "value", *cols.keys())


def _label_groups(run, labels, max_values: int, skipped: list):
    """[(label column, sorted value names)] from the routed tokens (a lazy scan, not the routing)."""
    first = min(run.moe_layers)
    keys = run.routing.filter(pl.col("layer") == first).select("doc_id", "pos")
    schema = run.tokens.collect_schema()
    have = schema.names()
    out = [(None, [None])]
    # Nested label values (runs written before inputs were checked) cannot be grouped by: left out.
    nested = [c for c in have if schema[c].is_nested()]
    cand = [c for c in have if c not in _BASE_COLS[:4] and c not in nested]
    skipped.extend((c, "nested values, not a label") for c in run.label_columns if c in nested and labels is None)
    tok = run.tokens.join(keys, on=["doc_id", "pos"], how="semi")
    if labels is None:
        chosen = []
        cols = [c for c in run.label_columns if c in cand]
        if cols:
            nv = tok.select(pl.col(c).drop_nulls().n_unique() for c in cols).collect().row(0)
            for c, n in zip(cols, nv):
                if c == "src_doc" or n > max_values:  # src_doc: packed-capture record id
                    skipped.append((c, "an id: too many values; pass --labels to force"))
                elif n < 2:
                    skipped.append((c, "one value only"))
                else:
                    chosen.append(c)
        n_phase = tok.select(pl.col("phase").fill_null("prefill").n_unique()).collect().item()
        if n_phase > 1:
            chosen.append("phase")
    else:
        chosen = [labels] if isinstance(labels, str) else list(labels)
        bad = [c for c in chosen if c in nested]
        if bad:
            raise WorkbenchError(f"label column {bad[0]!r} of run {run.path} holds nested values; split by a column "
                                 f"of plain values ({', '.join(cand) or 'none'})")
        bad = [c for c in chosen if c not in cand]
        if bad:
            raise WorkbenchError(f"run {run.path} has no label column {bad[0]!r} (labels: {', '.join(cand) or 'none'})")
    for c in chosen:
        vals = tok.select(pl.col(c).cast(pl.Utf8).unique()).collect()[c].to_list()
        out.append((c, sorted(v for v in vals if v is not None)))
    return out


def _indicator(ex_l: np.ndarray, E: int, dtype, out: np.ndarray | None = None, check: bool = True) -> np.ndarray:
    """[T, E] multiplicity of each expert in each token's top-k (co-activation / transitions as GEMMs).
    `out`: a buffer to reuse (fresh 0.1 GB arrays per layer cost page faults). check=False: 0/1 cells,
    the caller checks for repeated experts itself (the co-activation GEMM's trace)."""
    T, K = ex_l.shape
    if out is not None and out.shape == (T, E) and out.dtype == dtype:
        x = out
        x.fill(0)
    else:
        x = np.zeros((T, E), dtype)
    # flat positions: ~2x faster than put_along_axis; a count of the nonzero cells finds repeats
    x.reshape(-1)[(np.arange(0, T * E, E)[:, None] + ex_l).reshape(-1)] = 1
    if check and np.count_nonzero(x) != T * K:  # an expert twice in one token's top-k: count the multiplicity
        x = np.bincount((np.arange(T)[:, None] * E + ex_l).reshape(-1), minlength=T * E).reshape(T, E).astype(dtype)
    return x


_UNIT_CELLS = 1 << 25  # co-activation cells (units x layers x E x E) above which labels get a pass each
# top-token cells (layers x experts x (unit, token id) pairs seen) counted in a dense int32 table (0.5 GB)
# before they are flushed into sorted keys: a bincount per layer per chunk instead of per-chunk sorted merges
_DENSE_CELLS = 1 << 27
_RANK_CELLS = 1 << 23  # (expert, label value, token id) cells per layer ranked from a dense table (64 MB)


def _packs(*maxima) -> bool:
    """Non-negative values up to these maxima fit side by side in one int64."""
    return sum(int(m).bit_length() for m in maxima) <= 63


def _by_key(k: np.ndarray, c: np.ndarray):
    """(k, c) pairs ordered by key. Sorts (key, count) packed in one int64 when both are non-negative and
    fit (a value sort, several times faster than an argsort and its gathers), else a stable argsort."""
    if len(k) == 0:
        return k, c
    cmax = int(c.max())
    if c.min() >= 0 and k.min() >= 0 and _packs(k.max(), cmax):
        cb = cmax.bit_length()
        p = np.sort((k << cb) | c)
        return p >> cb, p & ((1 << cb) - 1)
    o = np.argsort(k, kind="stable")
    return k[o], c[o]


def _sorted_sum(keys: np.ndarray, counts: np.ndarray):
    """Sum the counts of equal keys; returns (unique keys ascending, sums)."""
    if len(keys) == 0:
        return keys.astype(np.int64), counts.astype(np.int64)
    k, c = _by_key(keys, counts)
    start = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))
    if len(start) == len(k):
        return k, c
    cs = np.cumsum(c)[np.append(start[1:], len(k)) - 1]  # cheaper than np.add.reduceat
    return k[start], np.diff(cs, prepend=0)


def _segment_rank(seg: np.ndarray, count: np.ndarray, tie: np.ndarray, tie_span: int):
    """Rows ordered by (seg, count descending, tie ascending): (seg, count, tie) in that order and each
    row's rank in its segment. (seg, tie) pairs are unique, so the order is exact; the three are sorted as
    one packed int64 value when they fit in 63 bits (no argsort, no gathers), else by a lexsort."""
    n = len(seg)
    if n == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, z
    cmax = int(count.max())
    if _packs(tie_span, cmax, seg.max()):
        tb, cb = int(tie_span).bit_length(), cmax.bit_length()
        p = np.sort((seg << (cb + tb)) | ((cmax - count) << tb) | tie)
        s, c, t = p >> (cb + tb), cmax - ((p >> tb) & ((1 << cb) - 1)), p & ((1 << tb) - 1)
    else:
        o = np.lexsort((tie, -count, seg))
        s, c, t = seg[o], count[o], tie[o]
    first = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    rank = np.arange(n) - np.repeat(first, np.diff(np.append(first, n)))
    return s, c, t, rank


class KeyCounts:
    """Exact sparse counter of int64 keys (segment * span + token): sorted arrays merged per chunk.
    Above `cap` distinct keys it keeps each segment's `keep` largest (a heavy-hitter sketch)."""

    def __init__(self, cap=None, keep=None, span=1, split=None):
        self._k = np.zeros(0, np.int64)
        self._c = np.zeros(0, np.int64)
        self._pend: list = []  # sorted chunks not merged yet: merged once they outweigh the total
        self.cap, self.keep, self.span = cap, keep, span
        # ascending key boundaries no segment straddles (layers): merges and pruning go block by block,
        # so their temporaries are a block's, not the whole counter's
        self.split = None if split is None else np.asarray(split, np.int64)
        self.pruned = False

    @property
    def k(self):
        self._merge()
        return self._k

    @property
    def c(self):
        self._merge()
        return self._c

    def add(self, keys, counts, unique_sorted: bool = False):
        if unique_sorted and not self._pend and len(self._k) == 0:  # nothing to merge with
            self._k, self._c = keys, counts
            if self.cap is not None and len(keys) > self.cap:
                self._prune()
            return
        self._pend.append((keys, counts))
        n = sum(len(p[0]) for p in self._pend)
        if n >= len(self._k) or (self.cap is not None and n + len(self._k) > 2 * self.cap):
            self._merge()

    def _merge(self):
        if not self._pend:
            return
        parts = [(self._k, self._c)] + self._pend
        self._pend, self._k, self._c = [], None, None  # freed once the blocks are built
        if self.split is None:
            blocks = [_sorted_sum(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))]
        else:
            cuts = [np.searchsorted(p[0], self.split) for p in parts]
            blocks = []
            for j in range(len(self.split) - 1):
                blocks.append(_sorted_sum(np.concatenate([p[0][i[j]:i[j + 1]] for p, i in zip(parts, cuts)]),
                                          np.concatenate([p[1][i[j]:i[j + 1]] for p, i in zip(parts, cuts)])))
        del parts
        self._k = np.concatenate([b[0] for b in blocks]) if len(blocks) > 1 else blocks[0][0]
        self._c = np.concatenate([b[1] for b in blocks]) if len(blocks) > 1 else blocks[0][1]
        if self.cap is not None and len(self._k) > self.cap:
            self._prune()

    def _prune(self):
        """Keep each segment's `keep` heaviest keys, block by block."""
        k, c, blocks = self._k, self._c, []
        cuts = [0, len(k)] if self.split is None else np.searchsorted(k, self.split)
        for a, b in zip(cuts[:-1], cuts[1:]):
            s, cc, t, rank = _segment_rank(k[a:b] // self.span, c[a:b], k[a:b] % self.span, self.span)
            kept = rank < self.keep
            blocks.append(_by_key(s[kept] * self.span + t[kept], cc[kept]))
        self._k = np.concatenate([b[0] for b in blocks])
        self._c = np.concatenate([b[1] for b in blocks])
        self.pruned = True


class _Pass:
    """Per-unit partial sums for one set of label columns; a unit is one combination of their values
    (null included), so every label's per-value table is a sum over units, computed at the end.

    With a `pool` (worker threads), a chunk's weight sums, co-activation / transition GEMMs and top-token
    counts (each per half of the layers) run there as jobs (numpy and BLAS release the GIL) while the
    caller's thread decodes the next chunk. The jobs add into disjoint arrays, in chunk order (a chunk's
    jobs end before the next chunk's start), so every sum, float ones included, is a single thread's."""

    def __init__(self, members, radix, L, E, NT, coactivation, transitions, cap, keep, pool=None):
        self.members, self.radix = members, radix
        self.stride = np.cumprod([1] + radix[:-1]).astype(np.int64) if radix else np.zeros(0, np.int64)
        U = int(np.prod(radix)) if radix else 1
        self.U, self.L, self.E, self.NT = U, L, E, NT
        self.n_tok = np.zeros(U, np.int64)
        self.cnt = np.zeros((U, L, E), np.int64)
        self.wsum = np.zeros((U, L, E), np.float64)
        self.co = np.zeros((U, L, E, E), np.int64) if coactivation else None
        self.tr = np.zeros((U, max(L - 1, 0), E, E), np.int64) if transitions else None
        # top tokens: key ((layer * E + expert) * U + u) * NT + token_id + 1
        self.tt = KeyCounts(cap, keep, NT, split=np.arange(L + 1, dtype=np.int64) * (E * U * NT))
        self.tf = KeyCounts()  # key u * NT + token_id + 1: tokens per (unit, token id)
        # ... counted first in a dense table [layer, column, expert], a column per (u, token id + 1) pair
        # seen since the last flush into tt: one bincount per layer per chunk, no per-chunk sorted merges
        self._gkey = np.zeros(0, np.int64)  # the pair key u * NT + token_id + 1 of each column
        self._gsort, self._gcol = self._gkey, self._gkey  # the keys ascending, and their columns
        self._acc = None  # [L, capacity, E] int32
        self._acc_slots = 0  # selections counted since the flush: flushed before an int32 cell could overflow
        self.pool, self._jobs = pool, []

    def _columns(self, gk: np.ndarray, slots: int):
        """Table column of each (sorted, unique) pair key of a chunk, appending new ones; None when the
        chunk's own pairs exceed the table (it is then counted sparsely). Flushes a full table first."""
        LE = self.L * self.E
        if len(gk) * LE > _DENSE_CELLS:
            return None
        G = len(self._gkey)
        pos = np.minimum(np.searchsorted(self._gsort, gk), max(G - 1, 0))
        found = self._gsort[pos] == gk if G else np.zeros(len(gk), bool)
        n_new = len(gk) - int(found.sum())
        if G and ((G + n_new) * LE > _DENSE_CELLS or self._acc_slots + slots >= 1 << 31):
            self.flush()
            return self._columns(gk, slots)
        col = np.empty(len(gk), np.int64)
        col[found] = self._gcol[pos[found]]
        col[~found] = G + np.arange(n_new)
        if n_new:
            self._gkey = np.concatenate([self._gkey, gk[~found]])
            self._gcol = np.argsort(self._gkey, kind="stable")
            self._gsort = self._gkey[self._gcol]
            need = len(self._gkey)
            if self._acc is None or self._acc.shape[1] < need:  # grow by doubling, within the budget
                cap = min(max(2 * need, 1024), max(need, _DENSE_CELLS // LE))
                acc = np.zeros((self.L, cap, self.E), np.int32)
                if self._acc is not None:
                    acc[:, :G] = self._acc[:, :G]
                self._acc = acc
        self._acc_slots += slots
        return col

    def flush(self):
        """Dense table -> sorted (layer, expert, unit, token) keys in tt, and the per-unit counts."""
        G = len(self._gkey)
        if G == 0:
            return
        U, NT, E = self.U, self.NT, self.E
        gs, o = self._gsort, self._gcol
        unit = gs // NT
        ustart = np.flatnonzero(np.concatenate([[True], unit[1:] != unit[:-1]]))
        keys, cts = [], []
        for li in range(self.L):
            blk = np.ascontiguousarray(self._acc[li][o].T)  # E x G, columns by key: nonzero cells ascend
            self.cnt[unit[ustart], li, :] += np.add.reduceat(blk, ustart, axis=1, dtype=np.int64).T
            nz = np.flatnonzero(blk)
            keys.append((li * E + nz // G) * (U * NT) + gs[nz % G])
            cts.append(blk.reshape(-1)[nz].astype(np.int64))
            self._acc[li, :G] = 0
        self.tt.add(np.concatenate(keys), np.concatenate(cts), unique_sorted=True)
        self._gkey = self._gsort = self._gcol = np.zeros(0, np.int64)
        self._acc_slots = 0

    def add(self, codes, tok1, ex, w):
        T, L, K = ex.shape
        E, NT = self.E, self.NT
        u = np.zeros(T, np.int64)
        for m, s in zip(self.members, self.stride):
            u += codes[m] * s
        # tokens sorted by (unit, token id): rows grouped by unit for the GEMMs, and each table row's counts
        # in one run (a cache-friendly bincount)
        key = u * NT + tok1
        order = np.argsort(key, kind="stable")
        sk = key[order]
        start = np.flatnonzero(np.concatenate([[True], sk[1:] != sk[:-1]]))
        gk, gcnt = sk[start], np.diff(np.append(start, T))
        inv_s = np.repeat(np.arange(len(gk)), gcnt)  # pair index of each sorted token
        exs = ex[order]
        self.wait()  # the previous chunk's jobs: they add into the same arrays
        self.n_tok += np.bincount(u, minlength=self.U)
        self.tf.add(gk, gcnt.astype(np.int64))
        col = self._columns(gk, T * K)
        half = (L + 1) // 2  # jobs per half of the layers: [0, half) and [half, L)
        halves = [(l0, l1) for l0, l1 in ((0, half), (half, L)) if l1 > l0]
        jobs = [(self._wsum, (u, ex, w))]
        if self.co is not None or self.tr is not None:
            bounds = np.searchsorted(gk // NT, np.arange(self.U + 1))
            bounds = np.append(start, T)[bounds]
            segs = [(j, bounds[j], bounds[j + 1]) for j in range(self.U) if bounds[j + 1] > bounds[j]]
            jobs += [(self._gemms, (exs, segs, l0, l1)) for l0, l1 in halves]
        if col is None:
            self._add_sparse(gk, inv_s, exs)
        else:
            cE = (col[inv_s] * E)[:, None]
            jobs += [(self._count, (cE, exs, len(self._gkey), l0, l1)) for l0, l1 in halves]
        if self.pool is None:
            for f, args in jobs:
                f(*args)
        else:
            self._jobs = [self.pool.submit(f, *args) for f, args in jobs]

    def _count(self, cE, exs, G, l0, l1):
        """Column x expert counts of layers [l0, l1), added to the dense table (its first G columns)."""
        idx = np.empty(exs.shape[::2], np.int64)
        for li in range(l0, l1):
            np.add(cE, exs[:, li, :], out=idx)
            a = self._acc[li, :G].reshape(-1)
            np.add(a, np.bincount(idx.reshape(-1), minlength=G * self.E), out=a, casting="unsafe")

    def _wsum(self, u, ex, w):
        # a weighted bincount over (unit, layer, expert) per block of 4 layers, into preallocated int64 /
        # float64 buffers (per-layer slices of the token-major chunk copy slowly; broadcast temporaries
        # cost more than the bincount). Every cell still adds its weights in (token, slot) order from zero,
        # so the sums are bit for bit those of a bincount per layer
        T, L, K = ex.shape
        U, E = self.U, self.E
        nb = min(L, 4)
        idx, wb = np.empty((T, nb, K), np.int64), np.empty((T, nb, K), np.float64)
        uLE = (u * (L * E))[:, None, None]
        for l0 in range(0, L, nb):
            l1 = min(L, l0 + nb)
            i, x = idx[:, :l1 - l0], wb[:, :l1 - l0]
            np.add(uLE + (np.arange(l0, l1) * E)[None, :, None], ex[:, l0:l1, :], out=i)
            np.copyto(x, w[:, l0:l1, :])
            part = np.bincount(i.reshape(-1), weights=x.reshape(-1), minlength=U * L * E)
            self.wsum += part.reshape(U, L, E)

    def _add_sparse(self, gk, inv, ex):
        """A chunk with more (unit, token) pairs than the dense table holds: sorted keys straight to tt."""
        T, L, K = ex.shape
        E, NT, U = self.E, self.NT, self.U
        G = len(gk)
        keys, cts = [], []
        for li in range(L):  # expert x (unit, token) counts per layer: bincount, then the nonzero cells
            b = np.bincount((ex[:, li, :].astype(np.int64) * G + inv[:, None]).reshape(-1), minlength=E * G)
            nz = np.flatnonzero(b)
            keys.append((li * E + nz // G) * (U * NT) + gk[nz % G])
            cts.append(b[nz].astype(np.int64))
        keys, cts = np.concatenate(keys), np.concatenate(cts)
        self.cnt += np.bincount(keys // NT, weights=cts, minlength=L * E * U).reshape(L, E, U).transpose(2, 0, 1) \
            .round().astype(np.int64)
        self.tt.add(keys, cts)

    def _gemms(self, exs, segs, l0, l1):
        """Co-activation of layers [l0, l1) and the transitions into them: indicator GEMMs over the tokens
        of each unit (`exs`: rows sorted by unit). Diagonal and repeat check from the GEMM's own trace."""
        E = self.E
        T = len(exs)
        dtype = np.float32 if T < (1 << 24) else np.float64  # integer sums stay exact in the GEMM
        prev = spare = None
        for li in range(max(l0 - 1, 0), l1):
            ex_l = exs[:, li, :]
            x = _indicator(ex_l, E, dtype, spare, check=self.co is None or li < l0)
            if self.co is not None and li >= l0:
                gs = [(xs.T @ xs) for xs in (x[a:b] for _, a, b in segs)]
                ones = sum(float(np.trace(g, dtype=np.float64)) for g in gs)  # of a 0/1 indicator: its ones
                if ones != T * exs.shape[2]:
                    x = _indicator(ex_l, E, dtype, check=True)  # an expert twice in a token's top-k
                    gs = [(xs.T @ xs) for xs in (x[a:b] for _, a, b in segs)]
                    for g, (_, a, b) in zip(gs, segs):
                        g[np.diag_indices(E)] -= x[a:b].sum(0)
                else:
                    for g in gs:
                        g[np.diag_indices(E)] = 0  # m^2 - m = 0 for m in {0, 1}
                for g, (j, _, _) in zip(gs, segs):
                    self.co[j, li] += g.astype(np.int64)
            if self.tr is not None and prev is not None and li >= l0:
                for j, a, b in segs:
                    self.tr[j, li - 1] += (prev[a:b].T @ x[a:b]).astype(np.int64)
            spare, prev = prev, x

    def wait(self):
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()  # re-raises a worker's error here

    def finish(self):
        self.wait()
        self.flush()

    def value_map(self, member):
        """Value index of each unit for label `member` (-1: null); None label: every unit is value 0."""
        units = np.arange(self.U)
        if member is None:
            return np.zeros(self.U, np.int64)
        i = self.members.index(member)
        v = (units // self.stride[i]) % self.radix[i]
        return np.where(v == self.radix[i] - 1, -1, v)

    def collapse(self, member, V, top_n):
        """Per-value tables of one label (or all tokens): counts summed over units, top tokens ranked."""
        vm = self.value_map(member)
        ok = vm >= 0
        out = {}
        for name in ("n_tok", "cnt", "wsum", "co", "tr"):
            a = getattr(self, name)
            if a is None:
                out[name] = None
                continue
            r = np.zeros((V,) + a.shape[1:], a.dtype)
            np.add.at(r, vm[ok], a[ok])
            out[name] = r
        LE, NT, U = self.L * self.E, self.NT, self.U
        k, c = self.tt.k, self.tt.c
        # keys ascend by (layer, expert, unit, token): rank one layer's slice at a time (bounded memory)
        bounds = np.searchsorted(k, np.arange(self.L + 1, dtype=np.int64) * (self.E * U * NT))
        parts = []
        E = self.E
        for li, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg, tok1 = k[a:b] // NT, k[a:b] % NT
            v = vm[seg % U]
            keep = v >= 0
            if E * V * NT <= _RANK_CELLS:
                # (expert, value) x token counts as a dense table: the top_n-th largest count of each row
                # bounds the candidates, and only those are sorted (the same rows and ranks as sorting all)
                row = (seg[keep] // U - li * E) * V + v[keep]
                d = np.bincount(row * NT + tok1[keep], weights=c[a:b][keep], minlength=E * V * NT)
                d = d.astype(np.int64).reshape(E * V, NT)
                cand = d > 0
                if NT > top_n:
                    cand &= d >= np.partition(d, NT - top_n, axis=1)[:, NT - top_n:NT - top_n + 1]
                r, t = np.nonzero(cand)
                s, c3, t, rank = _segment_rank(r, d[r, t], t, NT)
                s = s + li * E * V  # (layer, expert) * V + value, as below
            else:
                k2, c2 = _sorted_sum(((seg[keep] // U) * V + v[keep]) * NT + tok1[keep], c[a:b][keep])
                s, c3, t, rank = _segment_rank(k2 // NT, c2, k2 % NT, NT)
            top = rank < top_n
            s, c3, t, rank = s[top], c3[top], t[top], rank[top]
            parts.append((s // V, s % V, t, c3, rank))
        le, v, tok1, cnt, rank = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int64)
                                  for i in range(5))
        f = np.lexsort((rank, v * LE + le))  # rows by (value, layer, expert, rank)
        le, v, tok1, cnt, rank = le[f], v[f], tok1[f], cnt[f], rank[f]
        fk, fc = self.tf.k, self.tf.c
        fv = vm[fk // NT]
        fkeep = fv >= 0
        fk2, fc2 = _sorted_sum(fv[fkeep] * NT + fk[fkeep] % NT, fc[fkeep])
        tc = fc2[np.searchsorted(fk2, v * NT + tok1)]
        out["top"] = dict(v=v, le=le, token_id=tok1 - 1, count=cnt, rank=rank + 1, token_count=tc)
        out["pruned"] = self.tt.pruned
        return out


def analyze(run, labels=None, top_n: int = 10, always_on: float = 0.99, dead: float = 0.0,
            coactivation: bool = True, transitions: bool = True, max_label_values: int = 64,
            progress: bool = True, chunk_tokens: int | None = None, max_token_pairs: int = 20_000_000,
            threads: int | None = None) -> AnalysisResult:
    """Tables: experts (main), layers, coactivation, transitions, top_tokens, top_labels.

    experts: count (selections), share (of the layer's selections), token_share (of tokens),
    mean_weight, top_token_share (selections from its top_n tokens), is_dead (token_share <= dead),
    is_always_on (token_share >= always_on). layers: cv (std/mean of counts over experts),
    entropy_norm (entropy of the share / log E), n_dead, n_always_on.

    Streams the routing in chunks of `chunk_tokens` tokens (see common.chunk_tokens) and adds up
    counts, so memory stays at one chunk plus the tables. Exact, except: weight sums add per chunk
    (float rounding), and when more than `max_token_pairs` distinct (group, layer, expert, token)
    triples are seen, top tokens become a heavy-hitter sketch (meta["top_tokens_exact"] is False).

    threads: 2 or more decode the next chunk and run the co-activation / transition GEMMs in worker
    threads while this one counts (same results); default: WORKBENCH_THREADS, else the cores free
    (workbench.threads.default_threads).
    """
    skipped: list = []
    groups = _label_groups(run, labels, max_label_values, skipped)
    layers = sorted(run.moe_layers)
    L, K, E = len(layers), run.top_k, run.n_experts
    V_all = [len(vals) for _, vals in groups[1:]]
    radix = [v + 1 for v in V_all]  # + a null slot
    NT = token_id_span(run)
    with_co = coactivation and K > 1
    n_units = int(np.prod(radix)) if radix else 1
    if n_units * L * E * E <= _UNIT_CELLS or len(radix) <= 1:
        passes = [list(range(len(radix)))]  # one pass: every label's tables are sums over value combinations
    else:
        passes = [[i] for i in range(len(radix))]  # too many combinations: a pass per label
    keep = max(1000, 100 * top_n)
    n_threads = analysis_threads(threads)
    pool = None
    if n_threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(2, thread_name_prefix="stats")
    try:
        return _analyze(run, groups, skipped, layers, L, K, E, radix, V_all, NT, with_co, passes, keep, top_n,
                        always_on, dead, coactivation, transitions, max_token_pairs, chunk_tokens, progress,
                        n_threads, pool)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _analyze(run, groups, skipped, layers, L, K, E, radix, V_all, NT, with_co, passes, keep, top_n, always_on,
             dead, coactivation, transitions, max_token_pairs, chunk_tokens, progress, n_threads, pool):
    accs = [_Pass(m, [radix[i] for i in m], L, E, NT, with_co, transitions, max_token_pairs, keep, pool)
            for m in passes]
    if max(a.U for a in accs) * NT * L * E >= 1 << 61:
        raise WorkbenchError(f"run {run.path}: too many label values x token ids x experts to count top tokens")
    need = ["token_id", "token", "phase"] + [g[0] for g in groups if g[0] not in (None, "phase")]
    tok_ids, tok_strs = [np.zeros(0, np.int64)], []
    T = 0
    for ch in _iter(run, need, chunk_tokens, progress, prefetch=n_threads > 1):
        ra, tok = ch.ra, ch.tokens
        if ra.experts.min() < 0 or ra.experts.max() >= E:
            raise WorkbenchError(f"run {run.path}: routing holds expert ids outside 0..{E - 1}")
        Tc = len(ra.doc)
        T += Tc
        tok = tok.with_columns(pl.col("phase").fill_null("prefill"), pl.col("token_id").fill_null(-1))
        token_id = tok["token_id"].to_numpy().astype(np.int64)
        # token strings: the first seen for each id not seen before
        seen = np.concatenate(tok_ids)
        ids, first = np.unique(token_id, return_index=True)
        new = ~np.isin(ids, seen)
        if new.any():
            tok_ids.append(ids[new])
            tok_strs.append(tok["token"].gather(first[new]))
        codes = []
        for (lab, vals), V in zip(groups[1:], V_all):
            c = tok[lab].cast(pl.Utf8).replace_strict({v: i for i, v in enumerate(vals)}, default=V,
                                                      return_dtype=pl.Int64).to_numpy()
            codes.append(c)
        ex = ra.experts  # int16: index arithmetic is done per layer in int64 (a chunk-wide int64 copy is 0.27 GB)
        for acc in accs:
            acc.add(codes, token_id + 1, ex, ra.weights)
    for acc in accs:
        acc.finish()
    if T == 0:
        raise WorkbenchError(f"run {run.path} has no routing rows")
    token_str = pl.DataFrame({"token_id": np.concatenate(tok_ids),
                              "token": pl.concat(tok_strs) if tok_strs else pl.Series([], dtype=pl.Utf8)})
    exp_rows, lay_rows, co_rows, tr_rows, top_rows, lab_rows = [], [], [], [], [], []
    for gi, (label, values) in enumerate(groups):
        V = len(values)
        acc = accs[0] if label is None else next(a for a in accs if gi - 1 in a.members)
        r = acc.collapse(None if label is None else gi - 1, V, top_n)
        n_tok, cnt, wsum, co_all, tr_all = r["n_tok"], r["cnt"], r["wsum"], r["co"], r["tr"]
        t = r["top"]
        top = pl.DataFrame({"v": t["v"], "le": t["le"], "token_id": t["token_id"], "count": t["count"],
                            "rank": t["rank"], "token_count": t["token_count"]})
        ts = np.bincount(t["v"] * L * E + t["le"], weights=t["count"], minlength=V * L * E).reshape(V, L, E)
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
        # co-activation within a layer, transitions to the next MoE layer
        for li in range(L):
            if co_all is not None:
                co = co_all[:, li]
                nz = np.nonzero(co)
                c_e = cnt[nz[0], li, nz[1]]
                c_o = cnt[nz[0], li, nz[2]]
                cval = co[nz]
                co_rows.append(_frame(label, values, nz[0], layer=np.full(len(cval), layers[li], np.int16),
                                      expert=nz[1].astype(np.int16), other=nz[2].astype(np.int16), count=cval,
                                      p_other_given_expert=cval / c_e, lift=cval * n_tok[nz[0]] / (c_e * c_o)))
            if tr_all is not None and li + 1 < L:
                tr = tr_all[:, li]
                nz = np.nonzero(tr)
                tval = tr[nz]
                tr_rows.append(_frame(label, values, nz[0], layer=np.full(len(tval), layers[li], np.int16),
                                      next_layer=np.full(len(tval), layers[li + 1], np.int16),
                                      expert=nz[1].astype(np.int16), next_expert=nz[2].astype(np.int16), count=tval,
                                      p_next_given_expert=tval / cnt[nz[0], li, nz[1]]))
    pruned = any(a.tt.pruned for a in accs)  # after collapse: the last merge may prune
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
            "labels": [g[0] for g in groups if g[0] is not None], "skipped_labels": skipped,
            "top_tokens_exact": not pruned}
    return AnalysisResult("stats", tables, "experts", _summary(tables, meta), meta)

def token_id_span(run) -> int:
    """Radix for token ids in the top-token keys: max id + 2 (id + 1 is stored; -1, a missing id, is 0)."""
    m = run.tokens.select(pl.col("token_id").max()).collect().item()
    return int(m if m is not None and m >= 0 else 0) + 2


def _iter(run, need, chunk, progress, prefetch=False):
    from .common import iter_routing, prefetched

    it = lambda: iter_routing(run, token_columns=need, chunk_tokens_=chunk, progress=progress, desc="stats")  # noqa: E731
    return prefetched(it) if prefetch else it()


def _fill_nan(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.col(c).fill_nan(None) for c, t in df.schema.items() if t == pl.Float64)


def _empty(cols) -> pl.DataFrame:
    return pl.DataFrame(schema={"label": pl.Utf8, "value": pl.Utf8, **{c: pl.Int64 for c in cols}})


def _summary(tables, meta) -> str:
    lay = tables["layers"].filter(pl.col("label").is_null()).sort("layer")
    ex = tables["experts"].filter(pl.col("label").is_null())
    lines = [f"routing statistics: {meta['tokens']} tokens, {len(meta['layers'])} MoE layers, "
             f"{meta['n_experts']} experts, top-{meta['top_k']}"
             + (f"; per label: {', '.join(meta['labels'])}" if meta["labels"] else "")]
    lines.append(f"  load imbalance: CV mean {lay['cv'].mean():.3f} (max {lay['cv'].max():.3f} in layer "
                 f"{lay.sort('cv', descending=True)['layer'][0]}), normalised entropy mean {lay['entropy_norm'].mean():.3f}")
    lines.append(f"  dead experts: {int(ex['is_dead'].sum())}, always-on: {int(ex['is_always_on'].sum())}")
    busiest = ex.sort("share", descending=True, nulls_last=True).head(3)
    lines.append("  busiest: " + ", ".join(f"L{r['layer']}:E{r['expert']} ({100 * r['share']:.1f}% of its layer)"
                                           for r in busiest.iter_rows(named=True)))
    if "top_labels" in tables:
        tl = tables["top_labels"].filter((pl.col("rank") == 1) & (pl.col("count") >= 20) & (pl.col("lift") > 1)) \
            .sort("lift", descending=True).head(3)
        if tl.height:
            lines.append("  most label-specific: " + ", ".join(
                f"L{r['layer']}:E{r['expert']} {r['label']}={r['value']} (x{r['lift']:.1f})" for r in tl.iter_rows(named=True)))
    for c, why in meta["skipped_labels"]:
        lines.append(f"  not split by {c} ({why})")
    return "\n".join(lines)


def figures(result: AnalysisResult) -> dict:
    import plotly.graph_objects as go

    figs = {}
    ex = result.tables["experts"].filter(pl.col("label").is_null())
    piv = ex.pivot(on="expert", index="layer", values="share", sort_columns=True).sort("layer")
    cols = sorted([c for c in piv.columns if c != "layer"], key=int)
    figs["expert_share"] = go.Figure(go.Heatmap(z=piv.select(cols).to_numpy(), x=cols, y=piv["layer"].to_list(),
                                                colorscale="Viridis", colorbar=dict(title="share")))
    figs["expert_share"].update_layout(title="Selection share per expert (of its layer's selections)",
                                       xaxis_title="expert", yaxis_title="layer", xaxis_type="category",
                                       template="plotly_white")
    lay = result.tables["layers"].filter(pl.col("label").is_null()).sort("layer")
    fig = go.Figure([go.Scatter(x=lay["layer"].to_list(), y=lay["cv"].to_list(), name="coefficient of variation"),
                     go.Scatter(x=lay["layer"].to_list(), y=lay["entropy_norm"].to_list(), name="normalised entropy",
                                yaxis="y2")])
    fig.update_layout(title="Load balance per layer", xaxis_title="layer", yaxis=dict(title="CV"),
                      yaxis2=dict(title="entropy / log E", overlaying="y", side="right", range=[0, 1.05]),
                      template="plotly_white")
    figs["load_balance"] = fig
    for name, tab, a, b, val, title in (
            ("coactivation", "coactivation", "expert", "other", "p_other_given_expert", "Co-activation P(other | expert)"),
            ("transitions", "transitions", "expert", "next_expert", "p_next_given_expert",
             "Transitions P(expert in next layer | expert)")):
        if tab not in result.tables:
            continue
        t = result.tables[tab].filter(pl.col("label").is_null())
        if t.height == 0:
            continue
        n_e = int(result.meta.get("n_experts") or (max(t[a].max(), t[b].max()) + 1))
        fig = go.Figure()
        layer_list = sorted(t["layer"].unique().to_list())
        for i, layer in enumerate(layer_list):
            g = t.filter(pl.col("layer") == layer)
            z = np.zeros((n_e, n_e))
            z[g[a].to_numpy(), g[b].to_numpy()] = g[val].to_numpy()
            fig.add_trace(go.Heatmap(z=z, colorscale="Viridis", visible=i == len(layer_list) // 2, name=f"layer {layer}"))
        buttons = [dict(label=f"layer {layer}", method="update",
                        args=[{"visible": [j == i for j in range(len(layer_list))]}]) for i, layer in enumerate(layer_list)]
        fig.update_layout(title=title, xaxis_title=b, yaxis_title=a, template="plotly_white",
                          updatemenus=[dict(buttons=buttons, active=len(layer_list) // 2, x=1.0, y=1.15)])
        figs[name] = fig
    if "top_labels" in result.tables:
        tl = result.tables["top_labels"]
        for label in tl["label"].unique(maintain_order=True).to_list():
            g = tl.filter(pl.col("label") == label)
            fig = go.Figure()
            layer_list = sorted(g["layer"].unique().to_list())
            for i, layer in enumerate(layer_list):
                h = g.filter(pl.col("layer") == layer).pivot(on="expert", index="value", values="lift",
                                                             sort_columns=True).sort("value")
                cs = sorted([c for c in h.columns if c != "value"], key=int)
                fig.add_trace(go.Heatmap(z=h.select(cs).to_numpy(), x=cs, y=h["value"].to_list(), colorscale="RdBu",
                                         zmid=1.0, visible=i == len(layer_list) // 2, name=f"layer {layer}"))
            buttons = [dict(label=f"layer {layer}", method="update",
                            args=[{"visible": [j == i for j in range(len(layer_list))]}]) for i, layer in enumerate(layer_list)]
            fig.update_layout(title=f"Label specialisation: lift of P({label} | expert) over P({label})",
                              xaxis_title="expert", xaxis_type="category", template="plotly_white",
                              updatemenus=[dict(buttons=buttons, active=len(layer_list) // 2, x=1.0, y=1.15)])
            figs[f"label_{label}"] = fig
    return figs


def add_arguments(parser) -> None:
    from ..options import at_least, between, columns, text_of

    parser.add_argument("--labels", type=text_of(columns),
                        help="label columns to split by (comma list; default: all, plus phase)")
    parser.add_argument("--top-n", type=at_least(1), default=10, help="top tokens per expert (default 10)")
    parser.add_argument("--always-on", type=between(0, 1, lo_open=True), default=0.99,
                        help="token share at which an expert is always-on (default 0.99)")
    parser.add_argument("--dead", type=between(0, 1, hi_open=True), default=0.0,
                        help="token share at or below which an expert is dead (default 0)")
    parser.add_argument("--no-coactivation", action="store_true", help="skip the co-activation tables")
    parser.add_argument("--no-transitions", action="store_true", help="skip the layer-to-layer transition tables")


def options_from_args(args) -> dict:
    labels = None if not args.labels else [s.strip() for s in args.labels.split(",") if s.strip()]
    return {"labels": labels, "top_n": args.top_n, "always_on": args.always_on, "dead": args.dead,
            "coactivation": not args.no_coactivation, "transitions": not args.no_transitions}
