"""Id-only analyses on engine imports (null routing weights) give a direct capture's answers.

Each test captures labelled text on a tiny model, rebuilds the routing in vLLM's output format, imports
it, and runs the same analysis on both: counts-based outputs must be equal; outputs that need routing
weights are NaN (or fall back to selection frequency) and the summary says so in one sentence.
"""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import numpy as np
import polars as pl
import pytest

from workbench.analysis import analyze
from workbench.importers import import_routed_experts

WORDS = ["river", "stone", "light", "green", "seven", "table", "quiet", "north", "bread", "glass", "music", "cloud"]
LANGS = ("en", "de", "fr")
E, K = 8, 2


def _records():
    out = []
    for li, lang in enumerate(LANGS):
        for j in range(6):
            words = [WORDS[(j * 5 + li * 3 + t) % len(WORDS)] for t in range(6 + j % 3)]
            out.append({"text": f"{lang} {' '.join(words)}", "lang": lang, "key": f"k{j}",
                        "class": "target" if j % 2 else "control"})
    return out


def _capture(model, out):
    import workbench as wb

    return wb.capture(str(model), _records(), out, progress=False)


def _as_vllm(run):
    """The capture's routing as vLLM returns it: one request per document, the whole text as prompt,
    one generated token (never fed back, so unrouted), routed_experts [n, num_hidden_layers, K] with
    the dense layer 0 left zero; labels come with --tokens."""
    r = run.routing.sort("doc_id", "pos", "layer").collect()
    t = run.tokens.sort("doc_id", "pos").collect()
    outs, toks = [], []
    for d in t["doc_id"].unique().sort().to_list():
        td = t.filter(pl.col("doc_id") == d)
        ids = td["token_id"].to_list()
        arr = np.zeros((len(ids), 4, K), np.int16)
        for pos, layer, ex in r.filter(pl.col("doc_id") == d).select("pos", "layer", "experts").iter_rows():
            arr[pos, layer] = ex
        outs.append(NS(request_id=f"r{d}", prompt_token_ids=ids, num_cached_tokens=0,
                       outputs=[NS(index=0, token_ids=[7], routed_experts=arr)]))
        toks.append({c: td[c][0] for c in ("lang", "key", "class")})
    return outs, toks


@pytest.fixture(scope="module")
def pair(tiny_dir, tmp_path_factory):
    """(capture, import of the same routing) on a tiny deepseek_v2 with a dense layer 0."""
    model = tiny_dir("deepseek_v2", layers=4, experts=E, top_k=K)
    base = tmp_path_factory.mktemp("imported")
    cap = _capture(model, base / "cap")
    outs, toks = _as_vllm(cap)
    imp = import_routed_experts(outs, base / "imp", model=str(model), tokens=toks, progress=False)
    return cap, imp


def _entropy(p):
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def test_multilingual_import_equals_capture_by_selection_frequency(pair):
    cap, imp = pair
    assert imp.moe_layers == cap.moe_layers == [1, 2, 3]
    a = analyze("multilingual", imp, progress=False)
    b = analyze("multilingual", cap, progress=False)
    # counts-based: the language-specific expert table (selection frequencies) is the same
    assert a.tables["experts"].equals(b.tables["experts"])
    # weight-based divergence: on the import it is computed on selection frequency, and says so once
    assert "has no routing weights (imported from vllm)" in a.summary and "selection frequency" in a.summary
    assert "routing weights" not in b.summary and a.meta["importance"] == "frequency"
    # independent recomputation from the capture's expert ids: per document, each selected expert
    # gets 1/K per token; D = JSD / (log E - (H(p) + H(q)) / 2), averaged over the keys en shares
    rt = cap.routing.collect().join(cap.tokens.select("doc_id", "pos", "lang", "key").collect(), on=["doc_id", "pos"])
    prof = {}
    for (lang, key, layer), g in rt.group_by("lang", "key", "layer"):
        ex = np.array(g["experts"].to_list()).reshape(-1)
        prof[(lang, key, layer)] = np.bincount(ex, minlength=E) / (K * g.height)
    div = a.tables["divergence"]
    for lang in ("de", "fr"):
        for layer in (1, 2, 3):
            ds = []
            for j in range(6):
                p, q = prof[(lang, f"k{j}", layer)], prof[("en", f"k{j}", layer)]
                m = (p + q) / 2
                js = _entropy(m) - (_entropy(p) + _entropy(q)) / 2
                ds.append(js / max(math.log(E) - (_entropy(p) + _entropy(q)) / 2, 1e-6))
            got = div.filter((pl.col("lang") == lang) & (pl.col("layer") == layer))["divergence"].item()
            assert got == pytest.approx(float(np.mean(ds)), rel=1e-9, abs=1e-12)


def test_behavior_maps_import_equal_capture(pair):
    cap, imp = pair
    opts = dict(label="class", permutations=200, bootstrap=10, seed=0, progress=False)
    a = analyze("behavior", imp, **opts)
    b = analyze("behavior", cap, **opts)
    assert a.summary == b.summary  # counts only: the same prompts, maps, tests and top experts
    for name in ("map", "class_means", "top"):
        assert a.tables[name].equals(b.tables[name]), name


def test_compare_on_imports_ids_equal_jsd_nan(pair, tiny_dir, tmp_path):
    cap, imp = pair
    other = tiny_dir("deepseek_v2", layers=4, experts=E, top_k=K, seed=1)  # another checkpoint, same tokenizer
    cap2 = _capture(other, tmp_path / "cap2")
    outs, toks = _as_vllm(cap2)
    imp2 = import_routed_experts(outs, tmp_path / "imp2", model=str(other), tokens=toks, progress=False)
    a = analyze("compare", imp, other=imp2, labels="lang")
    b = analyze("compare", cap, other=cap2, labels="lang")
    la, lb = a.tables["layers"], b.tables["layers"]
    ids = ["layer", "tokens", "changed_share", "mean_overlap", "load_tv", "entropy_a", "entropy_b"]
    assert la.select(ids).equals(lb.select(ids))
    assert lb["changed_share"].max() > 0  # the two checkpoints do route differently
    assert la["mean_jsd"].is_nan().all() and lb["mean_jsd"].is_finite().all() and lb["mean_jsd"].max() > 0
    assert a.tables["load"].equals(b.tables["load"])
    assert a.tables["specialisation"].equals(b.tables["specialisation"])
    ca, cb = a.tables["changes"], b.tables["changes"]
    key = ["doc_id", "pos", "layer", "overlap", "experts_a", "experts_b"]
    assert ca.select(key).equals(cb.select(key)) and ca["jsd"].is_nan().all()
    assert "JSD needs routing weights and is NaN" in a.summary
    assert "JSD needs routing weights" not in b.summary
    # against its own capture, an import changes nothing: ids agree everywhere
    same = analyze("compare", cap, other=imp)
    assert (same.tables["layers"]["changed_share"] == 0).all() and (same.tables["load"]["shift"] == 0).all()
