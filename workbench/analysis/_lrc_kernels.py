"""Numba kernels for local routing consistency (SRP window histograms, priority-stack cache simulation).

Both kernels work on one sequence's routing as an int array [T, R] of ids (per layer: R = K expert ids;
model level: R = K*L ids offset by layer), so the caller can stream sequences from Parquet.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

POLICY_SCH, POLICY_LRU, POLICY_LFU, POLICY_BELADY = 0, 1, 2, 3
_NEVER = np.int64(1 << 30)  # "no next use" for Belady; request indices stay far below this


@njit(cache=True, nogil=True)
def _layer_windows(ex, starts, units, l, n_experts, ms, moff, hist_g, hist_nl, hist_ng, per_expert):
    """Window-count histograms of every expert of MoE layer `l` over all sequences of a chunk.

    f(e, p) = uses of e in tokens p..p+m-1 only changes where a use enters (p = u - m + 1) or leaves
    (p = u + 1) the window, so each expert costs O(its uses) per m instead of O(T): merge the two
    sorted event lists and add each constant run to the histogram at once.
    """
    nseq = starts.shape[0] - 1
    k = ex.shape[2]
    vdim = hist_g.shape[1]
    cnt = np.zeros(n_experts + 1, np.int64)
    uses = np.empty(ex.shape[0] * k + 1, np.int64)
    fill = np.zeros(n_experts, np.int64)
    loc = np.zeros(vdim, np.int64)  # this sequence and layer, summed over experts
    for s in range(nseq):
        a, b = starts[s], starts[s + 1]
        T = b - a
        cnt[:] = 0
        for t in range(a, b):
            for j in range(k):
                cnt[ex[t, l, j] + 1] += 1
        for e in range(n_experts):
            cnt[e + 1] += cnt[e]
        fill[:] = 0
        for t in range(a, b):  # counting sort by expert keeps each expert's uses in time order
            for j in range(k):
                e = ex[t, l, j]
                uses[cnt[e] + fill[e]] = t - a
                fill[e] += 1
        loc[:] = 0
        for mi in range(ms.shape[0]):
            m = ms[mi]
            W = T - m + 1
            if W <= 0:
                continue
            base = moff[mi]
            for e in range(n_experts):
                g = l * n_experts + e
                lo, hi = cnt[e], cnt[e + 1]
                hg = hist_g[g]
                if lo == hi:
                    hg[base] += W
                    loc[base] += W
                    if per_expert:
                        hist_ng[units[s], g, base] += W
                    continue
                i_in, i_out = lo, lo
                f = 0
                p = 0
                while True:
                    q_in = W
                    if i_in < hi:
                        q_in = uses[i_in] - m + 1
                        if q_in < 0:
                            q_in = 0
                    q_out = W
                    if i_out < hi:
                        q_out = uses[i_out] + 1
                    nxt = q_in if q_in < q_out else q_out
                    if nxt > W:
                        nxt = W
                    run = nxt - p
                    if run > 0:
                        hg[base + f] += run
                        loc[base + f] += run
                        if per_expert:
                            hist_ng[units[s], g, base + f] += run
                        p = nxt
                    if p >= W:
                        break
                    if q_in == nxt:
                        f += 1
                        i_in += 1
                    else:
                        f -= 1
                        i_out += 1
        hist_nl[units[s], l, :] += loc


@njit(cache=True, parallel=True)
def srp_accumulate(ex, starts, units, n_experts, ms, moff, hist_g, hist_nl, hist_ng, per_expert):
    """Add a chunk of sequences (ex [Tc, L, K], rows of sequence s = starts[s]:starts[s+1]).

    hist_g [L*E, sum(m+1)]: all sequences; hist_nl [U, L, sum(m+1)]: per bootstrap unit (sequence,
    or group of consecutive sequences on huge runs; units[s] for sequence s) and layer;
    hist_ng [U, L*E, sum(m+1)]: per unit and expert, filled only when per_expert.
    Layers run in parallel: each layer owns its rows of every accumulator, so there are no races.
    """
    for l in prange(ex.shape[1]):
        _layer_windows(ex, starts, units, l, n_experts, ms, moff, hist_g, hist_nl, hist_ng, per_expert)


@njit(cache=True, nogil=True)
def stack_sim(req, n_ids, policy, m, out):
    """All cache sizes at once: `out[r]` += requests found at stack depth r at the start of their token.

    A cache of size C hits a request iff its depth < C, so hits(C) = cumsum(out)[C-1]. The priority
    stack is Mattson's: every policy here evicts the lowest (primary key, last use) among the other
    cached ids, a total order that does not depend on C, so one stack serves every C.
    Cold start: an id never seen before is charged to depth = number of distinct ids seen so far.
    primary key: SCH = uses in tokens i..i+m-1 not yet processed; LRU = 0; LFU = uses so far;
    Belady = -(index of next request). Keys are kept in stack order (skey) so the bubble reads memory
    sequentially; a key that changes while its id sits in the stack is updated in place.
    """
    T, R = req.shape
    stack = np.empty(n_ids, np.int64)
    skey = np.empty(n_ids, np.int64)
    pos = np.full(n_ids, -1, np.int64)
    prim = np.zeros(n_ids, np.int64)
    last = np.zeros(n_ids, np.int64)
    nxt_req = np.empty(1, np.int64)
    if policy == POLICY_SCH:
        for t in range(min(m, T)):
            for r in range(R):
                prim[req[t, r]] += 1
    elif policy == POLICY_BELADY:
        nxt_req = np.empty(T * R, np.int64)
        seen = np.full(n_ids, _NEVER, np.int64)
        for j in range(T * R - 1, -1, -1):
            x = req[j // R, j % R]
            nxt_req[j] = seen[x]
            seen[x] = j
    size = 0
    ts = 0
    for t in range(T):
        uni = size
        for r in range(R):
            p = pos[req[t, r]]
            if p < 0:
                out[uni] += 1
                uni += 1
            else:
                out[p] += 1
        for r in range(R):
            x = req[t, r]
            ts += 1
            last[x] = ts
            if policy == POLICY_SCH:
                prim[x] -= 1
            elif policy == POLICY_LFU:
                prim[x] += 1
            elif policy == POLICY_BELADY:
                prim[x] = -nxt_req[t * R + r]
            kx = (prim[x] << 32) | ts
            d = pos[x]
            if d < 0:
                d = size
                size += 1
            if d > 0:
                carried = stack[0]
                kc = skey[0]
                for i in range(1, d):  # branch-free: the lower key moves down (the size-i cache evicts it)
                    ks = skey[i]
                    s = stack[i]
                    sw = kc >= ks
                    keep = carried if sw else s
                    stack[i] = keep
                    skey[i] = kc if sw else ks
                    pos[keep] = i
                    carried = s if sw else carried
                    kc = ks if sw else kc
                stack[d] = carried
                skey[d] = kc
                pos[carried] = d
            stack[0] = x
            skey[0] = kx
            pos[x] = 0
        if policy == POLICY_SCH and t + m < T:
            for r in range(R):
                y = req[t + m, r]
                prim[y] += 1
                if pos[y] >= 0:
                    skey[pos[y]] = (prim[y] << 32) | last[y]


@njit(cache=True, parallel=True)
def stack_sim_many(reqs, req_start, req_end, widths, n_ids, policy, m, out, out_off):
    """`stack_sim` for many tasks in parallel: task i reads reqs[req_start[i]:req_end[i]] as [-1, widths[i]]
    and adds its depth histogram to out[out_off[i]:out_off[i] + n_ids[i] + 1] (tasks never share rows)."""
    for i in prange(req_start.shape[0]):
        r = reqs[req_start[i]:req_end[i]].reshape(-1, widths[i])
        stack_sim(r, n_ids[i], policy[i], m[i], out[out_off[i]:out_off[i] + n_ids[i] + 1])


@njit(cache=True, parallel=True)
def srp_best(h, m):
    """SRP only (no alpha/rho) for many histograms h [N, m+1]: one backward pass per row, for bootstraps."""
    n = h.shape[0]
    out = np.empty(n, np.float64)
    for i in prange(n):
        F = 0.0
        for v in range(m + 1):
            F += v * h[i, v]
        if F <= 0:
            out[i] = np.nan
            continue
        S = 0.0
        C = 0.0
        best = 0.0
        for v in range(m, -1, -1):
            S += v * h[i, v]
            C += h[i, v]
            val = 2.0 * S / (m * C + F)
            if val > best:
                best = val
        out[i] = best
    return out
