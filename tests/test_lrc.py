"""Local routing consistency: hand-worked SRP/SCH, brute-force references, streaming equivalence."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.analysis import lrc
from workbench.errors import WorkbenchError
from workbench.probes.base import list_array
from workbench.store import RunWriter, open_run


def brute_srp(seqs, m, group):
    """Every window, every (layer, expert) of the group, exact fractions; ties to the lowest alpha."""
    fs = []
    for s in seqs:
        for p in range(len(s) - m + 1):
            for layer, e in group:
                fs.append(sum(int(e in s[t, layer]) for t in range(p, p + m)))
    F = sum(fs)
    if F == 0:
        return None, None, None
    best, best_a, best_c = None, None, None
    for a in range(m + 1):
        S = sum(f for f in fs if f >= a)
        C = sum(1 for f in fs if f >= a)
        v = Fraction(2 * S, m * C + F)
        if best is None or v > best:
            best, best_a, best_c = v, a, C
    return float(best), best_a, m * best_c / F


def brute_cache(req, C, policy, m):
    """One cache size, token by token, straight from the definitions."""
    T, R = req.shape
    flat = [int(x) for x in req.reshape(-1)]
    cache, seen, last, freq = [], set(), {}, {}
    hits, ts = 0, 0
    for t in range(T):
        row = [int(x) for x in req[t]]
        nseen = len(seen)
        for x in row:
            if x in cache:
                hits += 1
            elif x not in seen:
                hits += nseen < C
                nseen += 1
        for r, x in enumerate(row):
            ts += 1
            last[x] = ts
            freq[x] = freq.get(x, 0) + 1
            seen.add(x)

            def key(y):
                if policy == "sch":
                    fut = sum(int(v) == y for u in range(t, min(t + m, T)) for v in req[u])
                    return (fut - row[:r + 1].count(y), last[y])
                if policy == "lru":
                    return (0, last[y])
                if policy == "lfu":
                    return (freq[y], last[y])
                nxt = next((i for i in range(t * R + r + 1, T * R) if flat[i] == y), 1 << 30)
                return (-nxt, last[y])

            if x not in cache:
                cache.append(x)
                if len(cache) > C:
                    cache.remove(min((y for y in cache if y != x), key=key))
    return hits / (T * R)


def random_seqs(rng, n, T, L, E, K, sticky=0.7):
    seqs = []
    for _ in range(n):
        t_len = int(rng.integers(1, T + 1))
        s = np.empty((t_len, L, K), np.int16)
        for li in range(L):
            prev = rng.choice(E, K, replace=False)
            for t in range(t_len):
                cur = prev if rng.random() < sticky else rng.choice(E, K, replace=False)
                s[t, li] = rng.permutation(cur)
                prev = cur
        seqs.append(s)
    return seqs


def write_run(path, seqs, E, layers=None, part_rows=None):
    """Synthetic run; part_rows cuts the token stream into parts (docs may straddle them)."""
    L, K = seqs[0].shape[1], seqs[0].shape[2]
    layers = list(range(L)) if layers is None else layers
    ex = np.concatenate(seqs)
    doc = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)]).astype(np.int64)
    pos = np.concatenate([np.arange(len(s)) for s in seqs]).astype(np.int32)
    T = len(ex)
    manifest = {"identity": {"p": str(path)}, "model": {"spec": "synthetic", "path": None, "model_type": "synthetic",
                                                        "n_layers": max(layers) + 1, "moe_layers": layers,
                                                        "n_experts": E, "top_k": K}, "label_columns": []}
    w = RunWriter(path, manifest, overwrite=True)
    step = part_rows or T
    for a in range(0, T, step):
        b = min(T, a + step)
        n = b - a
        routing = pa.table({"doc_id": pa.array(np.repeat(doc[a:b], L)), "pos": pa.array(np.repeat(pos[a:b], L)),
                            "layer": pa.array(np.tile(np.asarray(layers, np.int16), n)),
                            "experts": list_array(ex[a:b].reshape(n * L, K), pa.int16()),
                            "weights": list_array(np.ones((n * L, K), np.float32), pa.float32())})
        w.write_part({"routing": routing}, batch_end=b, n_tokens=n)
    w.finish()
    return open_run(path)


def test_srp_hand_worked():
    # one layer, E=2, top-1, tokens choose 0,0,1,0; m=2 -> windows [0,0], [0,1], [1,0]
    # f(e0) = 2,1,1 ; f(e1) = 0,1,1 ; F = 6
    # pooled: a=0: 12/18, a=1: 2*6/(2*5+6) = 0.75, a=2: 4/8 -> 0.75 at alpha 1, rho = 2*5/6
    # e0: a=0 and a=1 tie at 8/10 -> alpha 0, rho 2*3/4 ; e1: a=1: 4/6 -> rho 2*2/2
    df = lrc.srp([np.array([[0], [0], [1], [0]])], m=2, n_experts=2, n_boot=0)
    ex = df.filter(pl.col("level") == "expert").sort("expert")
    assert ex["srp"].to_list() == pytest.approx([0.8, 2 / 3])
    assert ex["alpha"].to_list() == [0, 1]
    assert ex["rho"].to_list() == pytest.approx([1.5, 2.0])
    for level in ("layer", "model"):
        r = df.filter(pl.col("level") == level).row(0, named=True)
        assert r["srp"] == pytest.approx(0.75) and r["alpha"] == 1 and r["rho"] == pytest.approx(5 / 3)
        assert r["activations"] == 6 and r["windows"] == 3
    assert df.filter(pl.col("level") == "model")["layer"][0] is None


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 100_000), m=st.integers(1, 6), L=st.integers(1, 3), E=st.integers(2, 6))
def test_srp_matches_brute_force(seed, m, L, E):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    seqs = random_seqs(rng, int(rng.integers(1, 5)), 14, L, E, K)
    df = lrc.srp(seqs, m=[m], n_experts=E, n_boot=0)
    groups = {("model", None, None): [(li, e) for li in range(L) for e in range(E)]}
    for li in range(L):
        groups[("layer", li, None)] = [(li, e) for e in range(E)]
        for e in range(E):
            groups[("expert", li, e)] = [(li, e)]
    for r in df.iter_rows(named=True):
        want = brute_srp(seqs, m, groups[(r["level"], r["layer"], r["expert"])])
        if want[0] is None:
            assert r["srp"] is None and r["alpha"] is None
        else:
            assert r["srp"] == pytest.approx(want[0], rel=1e-12)
            assert r["alpha"] == want[1]
            assert r["rho"] == pytest.approx(want[2], rel=1e-12)


def test_model_srp_pools_layers_with_one_threshold():
    # layer 0 is perfectly consistent, layer 1 flips every token: per-layer optima use different alphas,
    # the model level must use one alpha for both (and so differ from any mix of per-layer optima)
    T = 12
    s = np.zeros((T, 2, 1), np.int16)
    s[:, 1, 0] = np.arange(T) % 2
    df = lrc.srp([s], m=4, n_experts=2, n_boot=0)
    model = df.filter(pl.col("level") == "model").row(0, named=True)
    want = brute_srp([s], 4, [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert model["srp"] == pytest.approx(want[0]) and model["alpha"] == want[1]
    lay = df.filter(pl.col("level") == "layer").sort("layer")
    assert lay["alpha"].to_list() != [model["alpha"]] * 2


def test_bootstrap_collapses_on_identical_sequences():
    rng = np.random.default_rng(1)
    s = random_seqs(rng, 1, 20, 2, 5, 2)[0]
    df = lrc.srp([s] * 6, m=[4], n_experts=5, n_boot=200, expert_ci=True)
    d = df.drop_nulls("srp")
    assert np.allclose(d["srp_low"].to_numpy(), d["srp"].to_numpy())
    assert np.allclose(d["srp_high"].to_numpy(), d["srp"].to_numpy())


def test_bootstrap_interval_is_basic_bootstrap():
    # recompute the model-level basic bootstrap by hand from per-sequence histograms
    rng = np.random.default_rng(5)
    seqs = random_seqs(rng, 8, 30, 2, 6, 2, sticky=0.5)
    df = lrc.srp(seqs, m=[4], n_experts=6, n_boot=300, seed=3)
    r = df.filter(pl.col("level") == "model").row(0, named=True)
    boot_rng = np.random.default_rng(3)
    per = []
    for s in seqs:
        h = np.zeros(5)
        for p in range(len(s) - 3):
            for li in range(2):
                for e in range(6):
                    h[sum(int(e in s[t, li]) for t in range(p, p + 4))] += 1
        per.append(h)
    per = np.array(per)
    vals = []
    for w in lrc._boot_weights(len(seqs), 300, boot_rng):
        vals.append(lrc.srp_from_hist(w @ per, 4)[0])
    vals = np.concatenate(vals)
    assert r["srp_low"] == pytest.approx(2 * r["srp"] - np.quantile(vals, 0.975))
    assert r["srp_high"] == pytest.approx(2 * r["srp"] - np.quantile(vals, 0.025))
    assert r["srp_low"] < r["srp"] < r["srp_high"]


def test_cache_hand_worked():
    req = np.array([[0], [1], [0], [2], [0]])
    # C=1: only the cold-start hit; C=2: the new expert 2 misses and evicts 1 (no use ahead); C=3: all hit
    for policy in ("sch", "lru", "lfu", "belady"):
        assert lrc.simulate_cache(req, 3, policy, m=2).tolist() == pytest.approx([0.2, 0.8, 1.0])
    # SCH looks ahead, LRU does not: 0 1 2 0 1 ... with C=2 LRU always evicts the one needed next
    req = np.array([[0], [1], [2], [0], [1], [2], [0], [1]])
    assert lrc.simulate_cache(req, 3, "lru")[1] == pytest.approx(2 / 8)
    # SCH(m=2): t2 evicts 1 (no use in 2..3) keeps 0 -> t3 hit; t4 miss evicts 0 (0 used at 6, outside 4..5), ...
    assert lrc.simulate_cache(req, 3, "sch", m=2)[1] == pytest.approx(brute_cache(req, 2, "sch", 2))
    assert lrc.simulate_cache(req, 3, "sch", m=2)[1] > 2 / 8


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), policy=st.sampled_from(["sch", "lru", "lfu", "belady"]), m=st.integers(1, 6))
def test_fast_cache_equals_brute_force_per_cache_size(seed, policy, m):
    rng = np.random.default_rng(seed)
    n_ids = int(rng.integers(2, 9))
    R = int(rng.integers(1, min(4, n_ids) + 1))
    T = int(rng.integers(1, 20))
    req = np.array([rng.choice(n_ids, R, replace=False) for _ in range(T)])
    fast = lrc.simulate_cache(req, n_ids, policy, m)
    for C in range(1, n_ids + 1):
        assert fast[C - 1] == pytest.approx(brute_cache(req, C, policy, m)), (C, req.tolist())


def test_sch_tables_match_brute_force_layer_and_model(tmp_path):
    rng = np.random.default_rng(7)
    E, L, K = 4, 2, 2
    seqs = random_seqs(rng, 5, 12, L, E, K)
    run = write_run(tmp_path / "r", seqs, E, layers=[1, 3])
    res = lrc.analyze(run, m=[2, 3], sch_stride=2, n_boot=0, progress=False)
    sch, pol = res.tables["sch"], res.tables["cache_policies"]
    sampled = seqs[::2]
    for m in (2, 3):
        for layer_idx, layer in enumerate([1, 3]):
            for C in range(1, E + 1):
                want = np.mean([brute_cache(s[:, layer_idx, :], C, "sch", m) for s in sampled])
                got = sch.filter((pl.col("layer") == layer) & (pl.col("m") == m) & (pl.col("cache_size") == C))
                assert got["sch"][0] == pytest.approx(want) and got["rho"][0] == pytest.approx(C / K)
        for C in (1, 3, 5, 8):
            reqs = [(s.astype(int) + np.array([0, E])[None, :, None]).reshape(len(s), L * K) for s in sampled]
            want = np.mean([brute_cache(r, C, "sch", m) for r in reqs])
            got = sch.filter(pl.col("layer").is_null() & (pl.col("m") == m) & (pl.col("cache_size") == C))
            assert got["sch"][0] == pytest.approx(want) and got["rho"][0] == pytest.approx(C / (K * L))
    reqs = [(s.astype(int) + np.array([0, E])[None, :, None]).reshape(len(s), L * K) for s in sampled]
    for policy in ("lru", "lfu", "belady"):
        want = np.mean([brute_cache(r, 4, policy, 0) for r in reqs])
        got = pol.filter(pl.col("layer").is_null() & (pl.col("policy") == policy) & (pl.col("cache_size") == 4))
        assert got["hit_rate"][0] == pytest.approx(want)
    assert res.meta["sch_sequences"] == 3


def test_streaming_over_parts_equals_in_memory(tmp_path):
    rng = np.random.default_rng(11)
    seqs = random_seqs(rng, 7, 25, 3, 5, 2)
    run = write_run(tmp_path / "r", seqs, 5, layers=[0, 2, 5], part_rows=17)  # docs straddle parts
    assert len(run.files("routing")) > 3
    a = lrc.srp(run, m=[3, 8], n_boot=0)
    b = lrc.srp(seqs, m=[3, 8], n_experts=5, n_boot=0)
    assert a.drop("layer").equals(b.drop("layer"))
    assert sorted(a.drop_nulls("layer")["layer"].unique().to_list()) == [0, 2, 5]
    # seq_len cuts documents into sequences
    c = lrc.srp(run, m=[3], seq_len=6, n_boot=0)
    cut = [s[i:i + 6] for s in seqs for i in range(0, len(s), 6)]
    d = lrc.srp(cut, m=[3], n_experts=5, n_boot=0)
    assert c.drop("layer").equals(d.drop("layer"))


def test_cli_and_figures(tmp_path, capsys):
    from workbench.cli import main

    rng = np.random.default_rng(3)
    run = write_run(tmp_path / "r", random_seqs(rng, 6, 30, 2, 6, 2), 6)
    out = tmp_path / "srp.parquet"
    assert main(["analyze", "lrc", str(run.path), "--m", "2,8", "--n-boot", "50", "--sch-stride", "2",
                 "--out", str(out), "--figures", str(tmp_path / "figs")]) == 0
    df = pl.read_parquet(out)
    assert set(df["m"].to_list()) == {2, 8} and {"srp", "rho", "layer", "expert"} <= set(df.columns)
    text = capsys.readouterr().out
    assert "model SRP" in text and "model SCH" in text
    assert (tmp_path / "figs" / "srp_vs_m.html").exists() and (tmp_path / "figs" / "sch_vs_rho.html").exists()
    assert main(["analyze", "lrc", str(run.path), "--m", "0"]) == 2
    with pytest.raises(WorkbenchError):
        lrc.sch(run, policies=["fifo"])


def test_bootstrap_units_group_sequences_when_memory_is_short(monkeypatch, tmp_path):
    rng = np.random.default_rng(9)
    seqs = random_seqs(rng, 12, 20, 2, 4, 2)
    run = write_run(tmp_path / "r", seqs, 4)
    full = lrc.analyze(run, m=[3], n_boot=100, with_sch=False, progress=False)
    monkeypatch.setattr(lrc, "UNIT_HIST_BYTES", 2 * 8 * 4 * 3)  # room for ~2 sequences' histograms
    grouped = lrc.analyze(run, m=[3], n_boot=100, with_sch=False, progress=False)
    assert grouped.meta["bootstrap_unit_sequences"] > 1 and full.meta["bootstrap_unit_sequences"] == 1
    assert grouped.tables["srp"]["srp"].equals(full.tables["srp"]["srp"])
    model = grouped.tables["srp"].filter(pl.col("level") == "model").row(0, named=True)
    assert model["srp_low"] <= model["srp"] + 1e-9 and np.isfinite(model["srp_high"])
    assert "groups of" in grouped.summary


def test_summary_says_why_a_window_has_no_srp_and_what_to_pass(tmp_path):
    """Documents of 50 tokens hold no window of 64 (or 256): the summary names the longest and the flags."""
    from workbench.app.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "short", n_tokens=1000, n_layers=2, n_experts=8, seq_len=50)
    res = lrc.analyze(run, m=(4, 64), n_boot=0, with_sch=False, progress=False)
    line64 = next(x for x in res.summary.splitlines() if "m=64" in x)
    line4 = next(x for x in res.summary.splitlines() if "m=4 " in x)
    assert "n/a" in line64 and "longest has 50 tokens" in line64 and "--m" in line64 and "--seq-len" in line64
    assert "n/a" not in line4
