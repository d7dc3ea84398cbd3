"""Routing statistics against hand-worked numbers and brute-force loops over synthetic runs."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.analysis import stats
from workbench.probes.base import list_array
from workbench.store import RunWriter, open_run


def write_run(path, experts, doc, n_experts, layers=None, weights=None, token_ids=None, labels=None, phase=None):
    """A run folder straight from arrays: experts [T, L, K]; labels {name: per-token values}."""
    experts = np.asarray(experts, np.int16)
    T, L, K = experts.shape
    layers = list(range(L)) if layers is None else list(layers)
    doc = np.asarray(doc, np.int64)
    pos = np.concatenate([np.arange(c) for c in np.unique(doc, return_counts=True)[1]]).astype(np.int32)
    weights = np.full((T, L, K), 1.0 / K, np.float32) if weights is None else np.asarray(weights, np.float32)
    token_ids = np.arange(T) % 7 if token_ids is None else np.asarray(token_ids)
    manifest = {"identity": {"t": str(path)}, "model": {"spec": "synthetic", "path": None, "model_type": "synthetic",
                                                        "n_layers": max(layers) + 1, "moe_layers": layers,
                                                        "n_experts": n_experts, "top_k": K},
                "label_columns": list((labels or {}).keys())}
    w = RunWriter(path, manifest, overwrite=True)
    routing = pa.table({"doc_id": pa.array(np.repeat(doc, L)), "pos": pa.array(np.repeat(pos, L)),
                        "layer": pa.array(np.tile(np.asarray(layers, np.int16), T)),
                        "experts": list_array(experts.reshape(T * L, K), pa.int16()),
                        "weights": list_array(weights.reshape(T * L, K), pa.float32())})
    cols = {"doc_id": pa.array(doc), "pos": pa.array(pos), "token_id": pa.array(token_ids.astype(np.int32)),
            "token": pa.array([f"t{i}" for i in token_ids]),
            "phase": pa.array(list(phase) if phase is not None else ["prefill"] * T)}
    for k, v in (labels or {}).items():
        cols[k] = pa.array(list(v))
    w.write_part({"routing": routing, "tokens": pa.table(cols)}, batch_end=1, n_tokens=T)
    w.finish()
    return open_run(path)


def test_hand_worked(tmp_path):
    # 4 tokens, one MoE layer (decoder layer 2), E=4, top-2
    ex = [[[0, 1]], [[0, 2]], [[0, 1]], [[1, 0]]]
    wt = [[[0.6, 0.4]], [[0.5, 0.5]], [[0.7, 0.3]], [[0.8, 0.2]]]
    run = write_run(tmp_path / "r", ex, [0, 0, 1, 1], 4, layers=[2], weights=wt, token_ids=[5, 6, 5, 5],
                    labels={"lang": ["en", "en", "de", "de"]})
    res = stats.analyze(run, progress=False)
    e = res.tables["experts"].filter(pl.col("label").is_null()).sort("expert")
    assert e["layer"].to_list() == [2] * 4
    assert e["count"].to_list() == [4, 3, 1, 0]
    assert e["share"].to_list() == pytest.approx([0.5, 0.375, 0.125, 0.0])
    assert e["token_share"].to_list() == pytest.approx([1.0, 0.75, 0.25, 0.0])
    # expert 0 weights: 0.6, 0.5, 0.7, 0.2 ; expert 1: 0.4, 0.3, 0.8
    assert e["mean_weight"][0] == pytest.approx(0.5)
    assert e["mean_weight"][1] == pytest.approx(0.5)
    assert e["mean_weight"][3] is None
    assert e["is_dead"].to_list() == [False, False, False, True]
    assert e["is_always_on"].to_list() == [True, False, False, False]
    lay = res.tables["layers"].filter(pl.col("label").is_null()).row(0, named=True)
    counts = np.array([4, 3, 1, 0])
    assert lay["cv"] == pytest.approx(counts.std() / counts.mean())
    p = counts[:3] / 8
    assert lay["entropy_norm"] == pytest.approx(-(p * np.log(p)).sum() / math.log(4))
    assert lay["n_dead"] == 1 and lay["n_always_on"] == 1
    # per label: en tokens 0,1 ; de tokens 2,3
    de = res.tables["experts"].filter(pl.col("value") == "de").sort("expert")
    assert de["count"].to_list() == [2, 2, 0, 0]
    co = res.tables["coactivation"].filter(pl.col("label").is_null())
    pair = co.filter((pl.col("expert") == 0) & (pl.col("other") == 1)).row(0, named=True)
    assert pair["count"] == 3 and pair["p_other_given_expert"] == pytest.approx(0.75)
    assert pair["lift"] == pytest.approx(3 * 4 / (4 * 3))
    top = res.tables["top_tokens"].filter(pl.col("label").is_null() & (pl.col("expert") == 0)).sort("rank")
    assert top["token_id"].to_list() == [5, 6] and top["count"].to_list() == [3, 1]
    assert top["token_rate"].to_list() == pytest.approx([1.0, 1.0]) and top["token"][0] == "t5"
    tl = res.tables["top_labels"].filter((pl.col("expert") == 2))
    assert tl["value"].to_list() == ["en"] and tl["lift"][0] == pytest.approx(2.0)
    assert "transitions" in res.tables and res.tables["transitions"].height == 0  # one layer: no pairs


def _brute(ex, codes):
    T, L, K = ex.shape
    cnt, co, tr = Counter(), Counter(), Counter()
    for t in range(T):
        for v in {None, codes[t]}:
            for li in range(L):
                for e in ex[t, li]:
                    cnt[(v, li, int(e))] += 1
                for a, b in itertools.permutations(ex[t, li].tolist(), 2):
                    co[(v, li, a, b)] += 1
                if li + 1 < L:
                    for a in ex[t, li]:
                        for b in ex[t, li + 1]:
                            tr[(v, li, int(a), int(b))] += 1
    return cnt, co, tr


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), T=st.integers(1, 40), L=st.integers(1, 3), E=st.integers(2, 6))
def test_counts_match_brute_force(tmp_path, seed, T, L, E):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    ex = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)])
    lang = rng.choice(["a", "b", "c"], T)
    doc = np.sort(rng.integers(0, 3, T))
    run = write_run(tmp_path / f"r{seed}_{T}_{L}_{E}", ex, doc, E, layers=[1 + 2 * i for i in range(L)],
                    labels={"lang": lang.tolist()})
    res = stats.analyze(run, progress=False)
    # a label with one value is not split by (nothing to compare), so the brute force drops it too
    cnt, co, tr = _brute(ex, lang.tolist() if len(set(lang)) > 1 else [None] * T)
    layer_of = {1 + 2 * i: i for i in range(L)}
    for r in res.tables["experts"].iter_rows(named=True):
        assert r["count"] == cnt.get((r["value"], layer_of[r["layer"]], r["expert"]), 0)
    got = {(r["value"], layer_of[r["layer"]], r["expert"], r["other"]): r["count"]
           for r in res.tables["coactivation"].iter_rows(named=True)}
    assert got == dict(co)
    got = {(r["value"], layer_of[r["layer"]], r["expert"], r["next_expert"]): r["count"]
           for r in res.tables["transitions"].iter_rows(named=True)}
    assert got == dict(tr)
    # properties: shares sum to 1 per layer and group; transitions out of an expert sum to K x its count
    s = res.tables["experts"].group_by("label", "value", "layer").agg(pl.col("share").sum())
    assert np.allclose(s["share"].to_numpy(), 1.0)
    if L > 1:
        t = res.tables["transitions"].group_by("value", "layer", "expert").agg(pl.col("p_next_given_expert").sum())
        assert np.allclose(t["p_next_given_expert"].to_numpy(), K)


def test_phase_split_and_cli(tmp_path, capsys):
    from workbench.cli import main

    ex = np.array([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]]])
    run = write_run(tmp_path / "r", ex, [0, 0, 0, 0], 4, phase=["prefill", "prefill", "decode", "decode"])
    res = stats.analyze(run, progress=False)
    dec = res.tables["experts"].filter((pl.col("label") == "phase") & (pl.col("value") == "decode")).sort("expert")
    assert dec["count"].to_list() == [0, 0, 2, 2]
    out = tmp_path / "e.csv"
    assert main(["analyze", "stats", str(run.path), "--out", str(out), "--figures", str(tmp_path / "f")]) == 0
    assert pl.read_csv(out).height == res.tables["experts"].height
    assert (tmp_path / "f" / "expert_share.html").exists()
    assert "routing statistics" in capsys.readouterr().out
    assert main(["analyze", "stats", str(run.path), "--labels", "nope"]) == 2


def test_id_like_labels_are_skipped_unless_asked(tmp_path):
    T = 80
    ex = np.zeros((T, 1, 1), np.int16)
    run = write_run(tmp_path / "r", ex, np.zeros(T), 2, labels={"src_doc": list(range(T)), "lang": ["a", "b"] * 40,
                                                                "set": ["x"] * T})
    res = stats.analyze(run, progress=False)
    assert res.meta["labels"] == ["lang"] and [c for c, _ in res.meta["skipped_labels"]] == ["src_doc", "set"]
    assert "src_doc" in res.summary
    res = stats.analyze(run, labels=["src_doc"], progress=False)
    assert res.tables["experts"].filter(pl.col("label") == "src_doc").height == T * 2
