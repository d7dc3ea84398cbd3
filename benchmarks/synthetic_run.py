"""Synthetic research-size runs in the exact run-store format, fast enough for 1e9 routed slots.

    python benchmarks/synthetic_run.py OUT --slots 1e8 [--experts 64 --top-k 8 --layers 16] [--expert-stats]

Structure planted so every analysis has something real to find (all vectorised numpy, written part
by part through `workbench.store.RunWriter`, so manifests, checksums and crash safety are the store's):
- per-layer Zipf expert popularity (exponent `zipf`, a different expert order in every layer);
- language-dependent experts: in the first and last quarter of the layers each language reorders the
  popularity (multilingual divergence is U-shaped); a `domain` label boosts a few experts everywhere;
- token-to-token persistence: with probability `persistence` a token reuses the previous token's
  expert set in that layer (so local routing consistency is well above chance);
- optional expert_stats with planted super experts (huge down_proj max on one channel).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

LANGS = ["en", "de", "fr", "ru", "zh"]
DOMAINS = ["code", "prose", "math", "chat"]


def _list(values: np.ndarray, arrow_type) -> pa.Array:
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32)),
                                    pa.array(values.reshape(-1), type=arrow_type))


def _distinct_draws(cdf: np.ndarray, n: int, k: int, rng) -> np.ndarray:
    """[n, k] expert ids drawn from `cdf` without repetition within a row (rejection of duplicates)."""
    e = len(cdf)
    out = np.searchsorted(cdf, rng.random((n, k)), side="right").clip(0, e - 1).astype(np.int16)
    for _ in range(200):
        s = np.sort(out, axis=1)
        bad_rows = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(1))
        if len(bad_rows) == 0:
            return out
        rows = out[bad_rows]
        # redraw every slot that repeats an earlier slot of its row
        dup = np.zeros(rows.shape, bool)
        for j in range(1, k):
            dup[:, j] = (rows[:, :j] == rows[:, j:j + 1]).any(1)
        rows[dup] = np.searchsorted(cdf, rng.random(int(dup.sum())), side="right").clip(0, e - 1)
        out[bad_rows] = rows
    # pathological cdf (k close to the experts with mass): fall back to a uniform distinct fill
    s = np.sort(out, axis=1)
    for r in np.flatnonzero((s[:, 1:] == s[:, :-1]).any(1)):
        out[r] = rng.choice(e, k, replace=False)
    return out


def write_synthetic_run(path, slots: float | None = None, n_tokens: int | None = None, n_layers: int = 16,
                        n_experts: int = 64, top_k: int = 8, seq_len: int = 512, part_tokens: int = 262_144,
                        zipf: float = 1.0, persistence: float = 0.6, expert_stats: bool = False,
                        super_experts=((1, 5), (2, 11)), vocab: int = 2000, seed: int = 0, overwrite: bool = True,
                        progress: bool = False):
    """Write a run with `slots` routed slots (tokens x MoE layers x top_k) or `n_tokens` tokens; returns Run.

    Labels per document: lang (5 values), domain (4), key (the same text in every language: doc // 5).
    """
    from tqdm.auto import tqdm

    from workbench.store import RunWriter, open_run

    if n_tokens is None:
        if slots is None:
            raise ValueError("give slots or n_tokens")
        n_tokens = int(round(float(slots) / (n_layers * top_k)))
    n_tokens = max(1, int(n_tokens))
    if top_k > n_experts:
        raise ValueError("top_k must not exceed n_experts")
    rng = np.random.default_rng(seed)
    layers = list(range(n_layers))
    base = 1.0 / np.arange(1, n_experts + 1) ** zipf
    perm = np.stack([rng.permutation(n_experts) for _ in layers])  # popularity order per layer
    q = max(1, n_layers // 4)
    lang_perm = {}
    for li in layers:
        for a in range(len(LANGS)):
            p = perm[li].copy()
            if li < q or li >= n_layers - q:  # language-specific layers: each language its own order
                p = np.roll(p, 3 * a)
            lang_perm[a, li] = p
    dom_boost = np.ones((len(DOMAINS), n_experts))
    for d in range(len(DOMAINS)):
        dom_boost[d, rng.choice(n_experts, 2, replace=False)] = 6.0
    cdfs = {}
    for (a, li), p in lang_perm.items():
        for d in range(len(DOMAINS)):
            prob = np.empty(n_experts)
            prob[p] = base
            prob = prob * dom_boost[d]
            cdfs[a, d, li] = np.cumsum(prob / prob.sum())
    # fresh expert sets are drawn from a pool of distinct sets per (language, domain, layer): exact
    # rejection sampling once, then one integer a draw (what makes 1e9 slots take minutes)
    pools = {g: _distinct_draws(c, 4096, top_k, rng) for g, c in cdfs.items()}
    words = pa.array([f"w{i}" for i in range(vocab)], pa.string())
    tok_p = 1.0 / np.arange(1, vocab + 1)
    tok_cdf = np.cumsum(tok_p / tok_p.sum())
    manifest = {
        "identity": {"synthetic": seed, "n_tokens": n_tokens, "layers": n_layers, "experts": n_experts,
                     "top_k": top_k, "expert_stats": expert_stats},
        "model": {"spec": "synthetic", "path": "", "model_type": "synthetic", "family": "synthetic",
                  "routing_rule": "softmax_topk", "norm_topk_prob": True, "n_layers": n_layers,
                  "moe_layers": layers, "n_experts": n_experts, "top_k": top_k, "shared_experts": 0,
                  "hidden_size": 64, "vocab_size": vocab, "revision": None, "file_hashes": {}},
        "dataset": {"name": "synthetic", "source": "benchmarks/synthetic_run.py"},
        "label_columns": ["lang", "domain", "key"],
        "probes": {"routing": {}, **({"expert_stats": {}} if expert_stats else {})},
        "settings": {"seq_len": seq_len, "synthetic": True}, "interventions": {}, "dtype": "float32",
        "device": "cpu", "versions": {},
    }
    w = RunWriter(path, manifest, overwrite=overwrite)
    n_docs = -(-n_tokens // seq_len)
    docs_per_part = max(1, part_tokens // seq_len)
    slot_w = np.exp(-0.35 * np.arange(top_k))
    bar = tqdm(total=n_tokens, disable=not progress, unit="tok", unit_scale=True, desc="synthetic run")
    for d0 in range(0, n_docs, docs_per_part):
        docs = np.arange(d0, min(n_docs, d0 + docs_per_part), dtype=np.int64)
        lens = np.minimum(seq_len, n_tokens - docs * seq_len)
        t = int(lens.sum())
        doc = np.repeat(docs, lens)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        pos = (np.arange(t) - np.repeat(starts, lens)).astype(np.int32)
        lang = (doc % len(LANGS)).astype(np.int64)
        dom = ((doc // len(LANGS)) % len(DOMAINS)).astype(np.int64)
        experts = np.empty((t, n_layers, top_k), np.int16)
        for li in layers:
            change = (rng.random(t) >= persistence) | (pos == 0)
            fresh = np.flatnonzero(change)
            drawn = np.empty((len(fresh), top_k), np.int16)
            grp = lang[fresh] * len(DOMAINS) + dom[fresh]
            for g in np.unique(grp):
                m = grp == g
                drawn[m] = pools[g // len(DOMAINS), g % len(DOMAINS), li][rng.integers(0, 4096, int(m.sum()))]
            src = np.maximum.accumulate(np.where(change, np.arange(t), 0))  # last change at or before t
            full = np.empty((t, top_k), np.int16)
            full[fresh] = drawn
            experts[:, li] = full[src]
        noise = rng.gamma(8.0, 1 / 8.0, (t, n_layers, 1)).astype(np.float32)
        wts = slot_w[None, None, :] ** noise  # descending per token: the model's own order
        wts = (wts / wts.sum(-1, keepdims=True)).astype(np.float32)
        token_id = np.searchsorted(tok_cdf, rng.random(t), side="right").clip(0, vocab - 1).astype(np.int32)
        tables = {
            "tokens": pa.table({
                "doc_id": pa.array(doc, pa.int64()), "pos": pa.array(pos, pa.int32()),
                "token_id": pa.array(token_id, pa.int32()), "token": words.take(pa.array(token_id)),
                "phase": pa.array(["prefill"], pa.string()).take(pa.array(np.zeros(t, np.int32))),
                "lang": pa.array(LANGS, pa.string()).take(pa.array(lang)),
                "domain": pa.array(DOMAINS, pa.string()).take(pa.array(dom)),
                "key": pa.array(doc // len(LANGS), pa.int64()),
            }),
            "routing": pa.table({
                "doc_id": pa.array(np.repeat(doc, n_layers), pa.int64()),
                "pos": pa.array(np.repeat(pos, n_layers), pa.int32()),
                "layer": pa.array(np.tile(np.asarray(layers, np.int16), t), pa.int16()),
                "experts": _list(experts.reshape(-1, top_k), pa.int16()),
                "weights": _list(wts.reshape(-1, top_k), pa.float32()),
            }),
        }
        if expert_stats:
            n = t * n_layers * top_k
            ex = experts.reshape(-1)
            maxabs = rng.gamma(2.0, 0.5, n).astype(np.float32)
            argmax = rng.integers(0, 64, n).astype(np.int32)
            lay = np.tile(np.repeat(np.arange(n_layers, dtype=np.int16), top_k), t)
            for sl, se in super_experts or ():
                hit = (lay == sl) & (ex == se)
                maxabs[hit] *= 50.0
                argmax[hit] = 7
            tables["expert_stats"] = pa.table({
                "doc_id": pa.array(np.repeat(doc, n_layers * top_k), pa.int64()),
                "pos": pa.array(np.repeat(pos, n_layers * top_k), pa.int32()),
                "layer": pa.array(lay, pa.int16()),
                "slot": pa.array(np.tile(np.arange(top_k, dtype=np.int16), t * n_layers), pa.int16()),
                "expert": pa.array(ex, pa.int16()), "weight": pa.array(wts.reshape(-1), pa.float32()),
                "out_maxabs": pa.array(maxabs, pa.float32()), "out_argmax": pa.array(argmax, pa.int32()),
                "out_l2": pa.array(maxabs * 3.0, pa.float32()),
            })
        w.write_part(tables, batch_end=int(docs[-1]) + 1, n_tokens=t)
        bar.update(t)
    bar.close()
    w.finish()
    return open_run(Path(path))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--slots", type=float, default=1e7, help="routed slots (tokens x layers x top-k)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--part-tokens", type=int, default=262_144)
    ap.add_argument("--expert-stats", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    run = write_synthetic_run(a.out, slots=a.slots, n_layers=a.layers, n_experts=a.experts, top_k=a.top_k,
                              seq_len=a.seq_len, part_tokens=a.part_tokens, expert_stats=a.expert_stats,
                              seed=a.seed, progress=True)
    print(f"{run!r} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
