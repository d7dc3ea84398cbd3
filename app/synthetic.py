"""A synthetic run with planted structure, written straight through the run store.

Used by the render benchmark (1M tokens x 16 MoE layers), the app tests, and anyone who wants to look
at the dashboard without a model. Structure planted so every page has something to show: languages
prefer different experts in early and late layers, a behaviour class prefers a few experts, routing
is locally consistent within a document, and one expert produces a huge down_proj outlier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..manifest import Manifest
from ..probes.base import list_array
from ..store import RunWriter, open_run

LANGS = ["en", "de", "fr", "ru", "zh"]
CLASSES = ["target", "control"]
_WORDS = ["the", " model", " routes", " every", " token", " to", " a", " few", " experts", ",", ".", " and",
          " def", " return", "(", ")", " 2", " +", " =", " der", " le", " и", "的", " Fuchs", " chien",
          " cache", " layer", " weight", "\n", " x", " y", " because"]


def write_synthetic_run(path, n_tokens: int = 20_000, n_layers: int = 4, n_experts: int = 16, top_k: int = 2,
                        seq_len: int = 256, first_dense: int = 0, probes=("routing", "experts", "hidden", "attention"),
                        part_tokens: int = 65_536, super_expert: tuple[int, int] | None = (1, 3), seed: int = 0,
                        labels: bool = True, overwrite: bool = True, progress: bool = False):
    """Write a run of `n_tokens` tokens in documents of `seq_len` tokens; returns the opened Run.

    Decoder layers are `first_dense + n_layers`; the first `first_dense` are dense (not in routing).
    Every document has labels lang, key (aligned across languages), set and class (none if not `labels`).
    """
    rng = np.random.default_rng(seed)
    moe_layers = list(range(first_dense, first_dense + n_layers))
    n_docs = -(-n_tokens // seq_len)
    # Per-layer expert preferences: language-specific in the first and last quarter, shared in between.
    lang_bias = rng.normal(0, 1.0, (len(LANGS), n_layers, n_experts)).astype(np.float32)
    middle = np.ones(n_layers, np.float32)
    q = max(1, n_layers // 4)
    middle[q:n_layers - q] = 0.15
    lang_bias *= middle[None, :, None]
    class_bias = np.zeros((len(CLASSES), n_layers, n_experts), np.float32)
    class_bias[0, :, : max(1, n_experts // 8)] = 1.5  # the "behaviour" experts of the target class
    base = rng.normal(0, 0.5, (n_layers, n_experts)).astype(np.float32)
    heads = np.arange(4, dtype=np.int16)
    manifest = Manifest.new(
        identity={"synthetic": seed, "n_tokens": n_tokens},
        model={"spec": "synthetic", "path": "", "model_type": "synthetic", "family": "synthetic",
               "routing_rule": "softmax_topk", "norm_topk_prob": True, "n_layers": first_dense + n_layers,
               "moe_layers": moe_layers, "n_experts": n_experts, "top_k": top_k, "shared_experts": 0,
               "hidden_size": 64, "vocab_size": len(_WORDS), "revision": None, "file_hashes": {}},
        dataset={"name": "synthetic", "source": "workbench.app.synthetic", "records": n_docs},
        label_columns=["lang", "key", "set", "class"] if labels else [],
        probes={p: {} for p in probes}, settings={"seq_len": seq_len, "synthetic": True},
        interventions={}, dtype="float32", device="cpu", versions={}).to_json()
    w = RunWriter(path, manifest, overwrite=overwrite)
    docs_per_part = max(1, part_tokens // seq_len)
    from tqdm.auto import tqdm

    bar = tqdm(total=n_tokens, disable=not progress, unit="tok", desc="synthetic run")
    done = 0
    for d0 in range(0, n_docs, docs_per_part):
        docs = np.arange(d0, min(n_docs, d0 + docs_per_part))
        lens = np.array([min(seq_len, n_tokens - d * seq_len) for d in docs])
        t = int(lens.sum())
        doc = np.repeat(docs.astype(np.int64), lens)
        pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lens])
        lang = docs % len(LANGS)
        cls = (docs // len(LANGS)) % len(CLASSES)
        tok_lang, tok_cls = np.repeat(lang, lens), np.repeat(cls, lens)
        token_id = rng.integers(0, len(_WORDS), t).astype(np.int32)
        tokens = pa.table({
            "doc_id": pa.array(doc, pa.int64()), "pos": pa.array(pos, pa.int32()),
            "token_id": pa.array(token_id, pa.int32()),
            "token": pa.array(np.asarray(_WORDS, dtype=object)[token_id], pa.string()),
            "phase": pa.array(np.full(t, "prefill", dtype=object), pa.string()),
            "lang": pa.array(np.asarray(LANGS, dtype=object)[tok_lang], pa.string()),
            "key": pa.array((doc // len(LANGS)).astype(np.int64), pa.int64()),
            "set": pa.array(np.full(t, "synthetic", dtype=object), pa.string()),
            "class": pa.array(np.asarray(CLASSES, dtype=object)[tok_cls], pa.string()),
        })
        tables = {"tokens": tokens if labels else tokens.select(["doc_id", "pos", "token_id", "token", "phase"])}
        experts = np.empty((t, n_layers, top_k), np.int16)
        weights = np.empty((t, n_layers, top_k), np.float32)
        # Slowly drifting per-document preference: what makes routing locally consistent.
        seg = pos // 32
        for li in range(n_layers):
            drift = rng.normal(0, 1.2, (len(docs), int(seq_len // 32) + 1, n_experts)).astype(np.float32)
            doc_idx = np.repeat(np.arange(len(docs)), lens)
            score = (base[li] + lang_bias[tok_lang, li] + class_bias[tok_cls, li] + drift[doc_idx, seg]
                     + rng.gumbel(0, 0.7, (t, n_experts)).astype(np.float32))
            top = np.argpartition(-score, top_k - 1, axis=1)[:, :top_k]
            s = np.take_along_axis(score, top, 1)
            order = np.argsort(-s, axis=1)
            top, s = np.take_along_axis(top, order, 1), np.take_along_axis(s, order, 1)
            e = np.exp(s - s[:, :1])
            experts[:, li] = top
            weights[:, li] = e / e.sum(1, keepdims=True)
        nl = n_layers
        if "routing" in probes:
            tables["routing"] = pa.table({
                "doc_id": pa.array(np.repeat(doc, nl), pa.int64()), "pos": pa.array(np.repeat(pos, nl), pa.int32()),
                "layer": pa.array(np.tile(np.asarray(moe_layers, np.int16), t), pa.int16()),
                "experts": list_array(experts.reshape(t * nl, top_k), pa.int16()),
                "weights": list_array(weights.reshape(t * nl, top_k), pa.float32()),
            })
        if "experts" in probes:
            n = t * nl * top_k
            ex = experts.reshape(-1)
            maxabs = rng.gamma(2.0, 0.5, n).astype(np.float32)
            argmax = rng.integers(0, 64, n).astype(np.int32)
            if super_expert is not None:
                sl, se = super_expert
                li = moe_layers.index(sl) if sl in moe_layers else 0
                lay = np.tile(np.repeat(np.arange(nl), top_k), t)
                hit = (lay == li) & (ex == se)
                maxabs[hit] *= 40.0
                argmax[hit] = 7
            tables["expert_stats"] = pa.table({
                "doc_id": pa.array(np.repeat(doc, nl * top_k), pa.int64()),
                "pos": pa.array(np.repeat(pos, nl * top_k), pa.int32()),
                "layer": pa.array(np.tile(np.repeat(np.asarray(moe_layers, np.int16), top_k), t), pa.int16()),
                "slot": pa.array(np.tile(np.arange(top_k, dtype=np.int16), t * nl), pa.int16()),
                "expert": pa.array(ex, pa.int16()), "weight": pa.array(weights.reshape(-1), pa.float32()),
                "out_maxabs": pa.array(maxabs, pa.float32()), "out_argmax": pa.array(argmax, pa.int32()),
                "out_l2": pa.array(maxabs * 3.0, pa.float32()),
            })
        if "hidden" in probes:
            all_layers = np.arange(first_dense + n_layers, dtype=np.int16)
            na = len(all_layers)
            hmax = rng.gamma(2.0, 1.0, t * na).astype(np.float32)
            if super_expert is not None:
                hmax.reshape(t, na)[:, super_expert[0]:] *= 30.0  # massive activations after the SE's layer
            tables["hidden"] = pa.table({
                "doc_id": pa.array(np.repeat(doc, na), pa.int64()), "pos": pa.array(np.repeat(pos, na), pa.int32()),
                "layer": pa.array(np.tile(all_layers, t), pa.int16()), "maxabs": pa.array(hmax, pa.float32()),
                "argmax": pa.array(np.full(t * na, 7, np.int32), pa.int32()),
            })
        if "attention" in probes:
            all_layers = np.arange(first_dense + n_layers, dtype=np.int16)
            g = np.array(np.meshgrid(docs, all_layers, heads, indexing="ij")).reshape(3, -1)
            tables["attention"] = pa.table({
                "doc_id": pa.array(g[0].astype(np.int64), pa.int64()), "layer": pa.array(g[1].astype(np.int16)),
                "head": pa.array(g[2].astype(np.int16)),
                "sink_share": pa.array(rng.uniform(0.2, 0.9, g.shape[1]).astype(np.float32)),
            })
        w.write_part(tables, batch_end=int(docs[-1]) + 1, n_tokens=t)
        done += t
        bar.update(t)
    bar.close()
    w.finish()
    return open_run(Path(path))
