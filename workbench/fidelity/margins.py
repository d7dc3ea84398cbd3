"""Router margins: how close each routing decision was to a tie, and which flips they explain.

A decision's margin is the k-th minus the (k+1)-th selection score in the family's score space (logit,
i.e. log-probability, for the softmax routers, the top-k-then-softmax rule and the sparsemixer; sigmoid +
bias for DeepSeek-V3; see probes.interventions.selection_scores). A flip under other numerics needs an
error at least as large as the margin, so flips should sit at small margins.
"""

from __future__ import annotations

import numpy as np
import polars as pl

# Bin edges of the flip-rate-by-margin table (the last bin is open).
EDGES = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
NEAR_TIE = 1e-5  # a margin below this is flagged as a near-tie in summaries


def margin_bins(margin: np.ndarray) -> np.ndarray:
    """Bin index of each margin (0 = below 1e-7 ... last = at least 0.1)."""
    return np.clip(np.searchsorted(np.asarray(EDGES[1:]), margin, side="right"), 0, len(EDGES) - 1)


def flip_rate_by_margin(margin: np.ndarray, flips: dict[str, np.ndarray]) -> pl.DataFrame:
    """One row per margin bin: decisions in it and, per kind of flip (e.g. flipped, first), the count and rate.

    margin: [N] float; flips: {name: [N] bool}."""
    m = np.asarray(margin, np.float64).reshape(-1)
    b = margin_bins(m)
    nb = len(EDGES)
    n = np.bincount(b, minlength=nb)
    cols = {"margin_lo": list(EDGES), "margin_hi": list(EDGES[1:]) + [float("inf")], "decisions": n}
    for name, f in flips.items():
        c = np.bincount(b, weights=np.asarray(f, bool).reshape(-1), minlength=nb).astype(np.int64)
        cols[name] = c
        cols[f"{name}_rate"] = np.where(n > 0, c / np.maximum(n, 1), np.nan)
    return pl.DataFrame(cols).filter(pl.col("decisions") > 0)


def experts_involved(ref: np.ndarray, other: np.ndarray, flipped: np.ndarray, layers: list[int],
                     n_experts: int) -> pl.DataFrame:
    """(layer, expert) pairs most often involved in flips: an expert is involved in a flipped decision when
    it is in one set and not the other (it left or entered the top-k).

    ref, other: [T, L, K] expert ids; flipped: [T, L] bool. Returns layer, expert, left, entered, involved."""
    rows = []
    for j, layer in enumerate(layers):
        t = np.flatnonzero(flipped[:, j])
        if not len(t):
            continue
        a, b = ref[t, j], other[t, j]
        left = ~(a[:, :, None] == b[:, None, :]).any(-1)  # in ref, gone in other
        entered = ~(b[:, :, None] == a[:, None, :]).any(-1)
        cl = np.bincount(a[left].astype(np.int64), minlength=n_experts)
        ce = np.bincount(b[entered].astype(np.int64), minlength=n_experts)
        for e in np.flatnonzero(cl + ce):
            rows.append((layer, int(e), int(cl[e]), int(ce[e]), int(cl[e] + ce[e])))
    schema = {"layer": pl.Int16, "expert": pl.Int16, "left": pl.Int64, "entered": pl.Int64, "involved": pl.Int64}
    return pl.DataFrame(rows, schema=schema, orient="row").sort("involved", "layer", "expert",
                                                                  descending=[True, False, False])


def plant_near_ties(mm, texts, per_layer: int = 4, gap: float = 5e-7, seed: int = 0,
                    layers=None) -> list[tuple[int, int, int]]:
    """Edit router rows of `mm` in place so that chosen tokens of `texts` sit within 1e-6 of a tie, and no
    other decision closer than 1e-4 (or its old margin): the truth margins and stability are checked against.

    Per MoE layer (in order: each edit changes later layers' inputs), for up to `per_layer` random tokens:
    expert a = the token's k-th choice, b = an expert it did not choose; b's router row becomes a's plus a
    random direction r with r . h = gap on that token's router input h (b's bias becomes a's), so on that
    token the two logits differ by `gap` and sit at the k-th / (k+1)-th place. An edit is kept only if, in
    float64 on every token's router input, the earlier plants stay at their boundary and no other decision
    comes within 1e-4. Needs a rule that ranks experts in logit order and routers with a weight [E, H].
    Texts run one at a time. layers: the MoE layers to plant in (default all; a tie in layer l that rounding
    flips changes the inputs of later layers, so plants in one layer are the cleanest truth). Returns the
    planted decisions (text index, position, layer): within `gap` of a tie in exact arithmetic; a float32
    forward computes their margins with rounding errors of about 1e-6 (the logits' own precision).
    """
    import torch

    from ..models.hooks import register

    if mm.family.rule not in ("softmax_topk", "softmax_topk_renorm", "topk_softmax") and not (
            mm.family.rule == "deepseek_v2" and getattr(mm.model.config, "topk_method", "greedy") == "greedy"):
        raise ValueError(f"plant_near_ties needs a rule that ranks experts in logit order; {mm.family.rule} does not")
    rng = np.random.default_rng(seed)
    tok = mm.tokenizer
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in ([texts] if isinstance(texts, str) else texts)]
    keys = [(d, p) for d, ids in enumerate(enc) for p in range(len(ids))]
    k = mm.top_k
    planted: list[tuple[int, int, int]] = []

    def margins64(Z):
        s = -np.sort(-Z, axis=1)[:, :k + 1]
        return s[:, k - 1] - s[:, k]

    for lay in mm.layers:
        if layers is not None and lay.index not in layers:
            continue
        w = getattr(lay.router, "weight", None)
        if not isinstance(w, torch.Tensor) or w.ndim != 2 or w.shape[0] != mm.n_experts:
            raise ValueError(f"plant_near_ties needs a router with a weight [E, H]; layer {lay.index} has "
                             f"{type(lay.router).__name__}")
        seen: list = []

        def pre(module, args, kwargs):
            seen.append(args[0].reshape(-1, args[0].shape[-1]).double().cpu().numpy())

        h1 = register(mm, f"L{lay.index}.router.in", pre)
        try:
            with torch.inference_mode():
                for ids in enc:
                    mm.model(input_ids=torch.tensor([ids], device=mm.device), use_cache=False)
        finally:
            h1.remove()
        H = np.concatenate(seen)
        bias = getattr(lay.router, "bias", None)
        b64 = bias.detach().double().cpu().numpy() if isinstance(bias, torch.Tensor) else np.zeros(w.shape[0])
        W = w.detach().double().cpu().numpy()
        Z = H @ W.T + b64
        floor = np.minimum(margins64(Z), 1e-4)  # no other decision may come closer to a tie than this
        here: dict[int, tuple[int, int]] = {}  # token row -> (a, b)
        used: set[int] = set()
        for t in rng.permutation(len(keys)):
            if len(here) >= per_layer:
                break
            order = np.argsort(-Z[t])
            a = int(order[k - 1])
            if a in used:
                continue
            h = H[t]
            for b in rng.permutation([int(e) for e in order[k:] if int(e) not in used]):
                r = rng.standard_normal(W.shape[1])
                r = r / np.linalg.norm(r) * np.linalg.norm(W[a]) * 0.5
                r = r - ((r @ h) - gap) * h / (h @ h)  # on this token: r . h = gap
                row = (W[a] + r).astype(np.float32).astype(np.float64)  # the row as the model will hold it
                Z2 = Z.copy()
                Z2[:, b] = H @ row + b64[a]
                m2 = margins64(Z2)
                plants = {**here, int(t): (a, int(b))}
                rows = np.fromiter(plants, np.int64)
                others = np.ones(len(keys), bool)
                others[rows] = False
                ok = (m2[rows] < 1e-6).all() and (m2[others] >= floor[others]).all()
                for tt, (aa, bb) in plants.items():  # each plant's pair is the k-th and (k+1)-th
                    ok = ok and set(np.argsort(-Z2[tt])[k - 1:k + 1].tolist()) == {aa, bb}
                if ok:
                    with torch.no_grad():
                        w[b] = torch.as_tensor(row, dtype=w.dtype, device=w.device)
                        if isinstance(bias, torch.Tensor):
                            bias[b] = bias[a]
                    W[b], b64[b], Z = row, b64[a], Z2
                    here[int(t)] = (a, int(b))
                    used |= {a, int(b)}
                    break
        planted += [(keys[t][0], keys[t][1], lay.index) for t in here]
    return sorted(planted)
