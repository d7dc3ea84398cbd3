"""fTRI behaviour maps: hand-worked maps, brute-force statistics, planted experts, FDR calibration."""

from __future__ import annotations

import itertools

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import scipy.stats

from workbench.analysis import behavior as bh
from workbench.errors import WorkbenchError
from workbench.store import RunWriter, open_run


def write_run(path, prompts, layers, n_experts, top_k, label="class"):
    """prompts: list of (class, [per token: {layer: experts}]) -> a run on disk (weights uniform)."""
    tok = {c: [] for c in ("doc_id", "pos", label)}
    rt = {c: [] for c in ("doc_id", "pos", "layer", "experts")}
    for d, (cls, toks) in enumerate(prompts):
        for pos, routes in enumerate(toks):
            tok["doc_id"].append(d)
            tok["pos"].append(pos)
            tok[label].append(cls)
            for layer in layers:
                rt["doc_id"].append(d)
                rt["pos"].append(pos)
                rt["layer"].append(layer)
                rt["experts"].append(list(routes[layer]))
    n = len(tok["doc_id"])
    tokens = pa.table({"doc_id": pa.array(tok["doc_id"], pa.int64()), "pos": pa.array(tok["pos"], pa.int32()),
                       "token_id": pa.array([65] * n, pa.int32()), "token": ["A"] * n, "phase": ["prefill"] * n,
                       label: tok[label]})
    m = len(rt["doc_id"])
    routing = pa.table({"doc_id": pa.array(rt["doc_id"], pa.int64()), "pos": pa.array(rt["pos"], pa.int32()),
                        "layer": pa.array(rt["layer"], pa.int16()),
                        "experts": pa.array(rt["experts"], pa.list_(pa.int16())),
                        "weights": pa.array([[1.0 / top_k] * top_k] * m, pa.list_(pa.float32()))})
    manifest = {"model": {"spec": "synthetic", "path": "", "model_type": "synthetic", "moe_layers": list(layers),
                          "n_experts": n_experts, "top_k": top_k}, "label_columns": [label]}
    w = RunWriter(path, manifest)
    w.write_part({"tokens": tokens, "routing": routing}, batch_end=1, n_tokens=n)
    w.finish()
    return open_run(path)


E, LAYERS = 16, (0, 1, 2, 3)
PLANTED = {(1, 5): 0.5, (3, 2): 0.35}  # P(slot 1 = this expert) on target tokens, else the sink
SINK = 15  # slot 1's default expert: it loses what the planted experts gain (a true negative effect)


def planted_prompts(n_per_class=40, seed=0, effect=True):
    rng = np.random.default_rng(seed)
    prompts = []
    for cls in ("target", "control"):
        for _ in range(n_per_class):
            toks = []
            for _ in range(int(rng.integers(8, 30))):
                routes = {}
                for layer in LAYERS:
                    # slot 0: the same distribution in both classes, over experts that nothing is planted on
                    pool = [e for e in range(E) if e != SINK and (layer, e) not in PLANTED]
                    a = int(rng.choice(pool))
                    b = SINK
                    planted_here = [(e, pr) for (lay, e), pr in PLANTED.items() if lay == layer]
                    if effect and cls == "target" and planted_here and rng.random() < planted_here[0][1]:
                        b = planted_here[0][0]
                    routes[layer] = (a, b)
                toks.append(routes)
            prompts.append((cls, toks))
    return prompts


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("bh") / "run", planted_prompts(), LAYERS, E, 2)


# ---------------------------------------------------------------- maps by hand


def test_maps_and_risk_difference_by_hand(tmp_path):
    # E=3, K=1, one layer. target: p0 = [e0, e0, e1] (3 tokens); control: p1 = [e1], p2 = [e2, e1]
    prompts = [("t", [{0: (0,)}, {0: (0,)}, {0: (1,)}]), ("c", [{0: (1,)}]), ("c", [{0: (2,)}, {0: (1,)}])]
    run = write_run(tmp_path / "r", prompts, [0], 3, 1)
    maps = bh.activation_maps(run)
    np.testing.assert_array_equal(maps.counts[:, 0], [[2, 1, 0], [0, 1, 0], [0, 1, 1]])
    d = bh.differential_map(maps, "t").sort("expert")
    # rates: t = (2/3, 1/3, 0); c = mean((0,1,0), (0,.5,.5)) = (0, .75, .25)
    np.testing.assert_allclose(d["diff"].to_numpy(), [2 / 3, 1 / 3 - 0.75, -0.25])
    # pooled tokens: t = (2/3, 1/3, 0); c: 3 tokens -> (0, 2/3, 1/3)
    np.testing.assert_allclose(d["risk_diff"].to_numpy(), [2 / 3, 1 / 3 - 2 / 3, -1 / 3])
    # counts instead of rates: t = (2, 1, 0), c = (0, 1, .5)
    dc = bh.differential_map(maps, "t", normalize=False).sort("expert")
    np.testing.assert_allclose(dc["diff"].to_numpy(), [2, 0, -0.5])
    cm = bh.class_means(maps).filter(pl.col("class") == "c").sort("expert")
    np.testing.assert_allclose(cm["mean"].to_numpy(), [0, 0.75, 0.25])


def test_differential_matches_brute_force(planted):
    maps = bh.activation_maps(planted)
    d = bh.differential_map(maps, "target")
    # independent route: python counting over the raw tables
    tok = planted.tokens.collect()
    cls = dict(tok.group_by("doc_id").agg(pl.col("class").first()).iter_rows())
    ntok = dict(tok.group_by("doc_id").agg(pl.len()).iter_rows())
    rate = {}
    for doc, _pos, layer, ex in planted.routing.select("doc_id", "pos", "layer", "experts").collect().iter_rows():
        for e in ex:
            rate[(doc, layer, e)] = rate.get((doc, layer, e), 0) + 1 / ntok[doc]
    docs_t = [x for x in cls if cls[x] == "target"]
    docs_c = [x for x in cls if cls[x] != "target"]
    for layer, e, diff in d.select("layer", "expert", "diff").sample(20, seed=1).iter_rows():
        mt = sum(rate.get((x, layer, e), 0) for x in docs_t) / len(docs_t)
        mc = sum(rate.get((x, layer, e), 0) for x in docs_c) / len(docs_c)
        assert diff == pytest.approx(mt - mc, abs=1e-12)


def test_permutation_p_matches_exact_enumeration(tmp_path):
    # 8 prompts, 4 per class: enumerate all 70 label assignments for the exact p-value
    rng = np.random.default_rng(5)
    prompts = []
    for i in range(8):
        toks = [{0: (int(rng.integers(0, 2 if i < 4 else 4)),)} for _ in range(int(rng.integers(3, 9)))]
        prompts.append(("t" if i < 4 else "c", toks))
    run = write_run(tmp_path / "r", prompts, [0], 4, 1)
    maps = bh.activation_maps(run)
    x = maps.rates[:, 0]
    is_t = maps.label == "t"
    obs = x[is_t].mean(0) - x[~is_t].mean(0)
    extreme = np.zeros(4)
    combos = list(itertools.combinations(range(8), 4))
    for c in combos:
        m = np.zeros(8, bool)
        m[list(c)] = True
        d = x[m].mean(0) - x[~m].mean(0)
        extreme += np.abs(d) >= np.abs(obs) - 1e-12
    exact = extreme / len(combos)
    p = bh.permutation_test(maps, "t", n_perm=20000, seed=0)[0]
    assert np.all(np.abs(p - exact) < 4 * np.sqrt(exact * (1 - exact) / 20000) + 2e-3)
    assert exact.min() < 0.1  # the example has at least one real effect to find
    # one-sided alternatives split the two-sided one
    pg = bh.permutation_test(maps, "t", n_perm=20000, seed=0, alternative="greater")[0]
    assert np.all(pg[obs > 0] <= p[obs > 0] + 1e-3)


def test_fdr_bh_matches_scipy():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20)]).reshape(11, 20)
    np.testing.assert_allclose(bh.fdr_bh(p), scipy.stats.false_discovery_control(p.reshape(-1)).reshape(11, 20))
    # hand-worked: p = (.01, .04, .03, .2), m = 4 -> (.04, .0533, .0533, .2)
    np.testing.assert_allclose(bh.fdr_bh([0.01, 0.04, 0.03, 0.2]), [0.04, 0.16 / 3, 0.16 / 3, 0.2])


# ---------------------------------------------------------------- planted structure


def test_planted_experts_top_the_map_and_are_significant(planted):
    res = bh.analyze(planted, permutations=2000, bootstrap=50, top_n=2)
    m = res.tables["map"]
    assert res.meta["targets"] == ["target"]
    top = bh.top_experts(m, 2)
    assert top == [(1, 5), (3, 2)]  # ordered by effect size 0.5 > 0.35
    sig = {(a, b) for a, b in m.filter(pl.col("significant")).select("layer", "expert").iter_rows()}
    assert set(PLANTED) <= sig
    assert {(layer, SINK) for layer in (1, 3)} <= sig  # the true negative effect is found too
    nulls = sig - set(PLANTED) - {(layer, SINK) for layer in LAYERS}
    assert len(nulls) <= 1  # BH at 5%: false discoveries among ~50 nulls are rare
    stab = dict(((a, b), s) for a, b, s in m.select("layer", "expert", "stability").iter_rows())
    assert stab[(1, 5)] == 1.0 and stab[(3, 2)] > 0.9
    assert max(v for k, v in stab.items() if k not in PLANTED) < 0.1
    assert m["topn_jaccard"][0] > 0.9
    assert res.tables["top"].height == 2


def test_null_experts_respect_fdr(tmp_path):
    """No effect anywhere: per-test p-values are calibrated and BH discoveries stay rare."""
    any_discovery, small_p, total = 0, 0, 0
    for seed in range(12):
        run = write_run(tmp_path / f"n{seed}", planted_prompts(n_per_class=15, seed=100 + seed, effect=False),
                        LAYERS, E, 2)
        maps = bh.activation_maps(run)
        p = bh.permutation_test(maps, "target", n_perm=500, seed=seed)
        informative = maps.counts.sum(0) > 0  # experts never selected have p = 1 by construction
        small_p += int((p[informative] <= 0.05).sum())
        total += int(informative.sum())
        any_discovery += int((bh.fdr_bh(p[informative]) <= 0.05).any())
    # under the null P(p <= .05) = .05: binomial bounds on ~600 tests; BH at the null is an FWER bound
    assert 0.02 * total <= small_p <= 0.085 * total
    assert any_discovery <= 3  # expected 12 * .05 = 0.6; P(>= 4) ~ 0.002


def test_several_classes_one_vs_rest(tmp_path):
    prompts = planted_prompts(n_per_class=10, seed=1)
    # no class is called "target" and none is a control: every class against the rest
    prompts = [({"target": "code", "control": "prose"}[c] if i % 3 else "maths", t) for i, (c, t) in enumerate(prompts)]
    run = write_run(tmp_path / "r", prompts, LAYERS, E, 2)
    res = bh.analyze(run, permutations=100, bootstrap=10)
    assert sorted(res.meta["targets"]) == ["code", "maths", "prose"]
    assert sorted(res.tables["map"]["class"].unique().to_list()) == ["code", "maths", "prose"]
    assert (res.tables["map"].filter(pl.col("class") == "code").sort("layer", "expert")["diff"].to_numpy()
            == pytest.approx(bh.differential_map(bh.activation_maps(run), "code").sort("layer", "expert")["diff"].to_numpy()))
    figs = bh.figures(res)
    assert {"map_code", "map_prose", "map_maths", "top", "class_means"} <= set(figs)
    # two classes, one a control: the other is the target
    two = write_run(tmp_path / "two", [("control" if c == "control" else "refusal", t)
                                       for c, t in planted_prompts(n_per_class=5, seed=2)], LAYERS, E, 2)
    assert bh.analyze(two, permutations=0, bootstrap=0).meta["targets"] == ["refusal"]
    with pytest.raises(WorkbenchError, match="one target class"):
        bh.analyze(run, intervene=2, permutations=0, bootstrap=0)
    with pytest.raises(WorkbenchError, match="not in the run"):
        bh.analyze(run, target="nope")


def test_heldout_split_is_per_class_and_excluded(planted):
    maps = bh.activation_maps(planted)
    held = bh.heldout_split(maps, 0.25, seed=3)
    for c in maps.classes:
        assert (held & (maps.label == c)).sum() == 10
    again = bh.heldout_split(maps, 0.25, seed=3)
    np.testing.assert_array_equal(held, again)


def test_figures_and_cli(planted, tmp_path, capsys):
    from workbench.cli import main

    res = bh.analyze(planted, permutations=200, bootstrap=20, top_n=3)
    figs = bh.figures(res)
    heat = figs["map"].data[0]
    d = res.tables["map"].sort("layer", "expert")
    np.testing.assert_allclose(np.asarray(heat.z).reshape(-1), d["diff"].to_numpy())
    marks = figs["map"].data[1]
    assert len(marks.x) == int(d["significant"].sum())
    out = tmp_path / "map.parquet"
    rc = main(["analyze", "behavior", str(planted.path), "--out", str(out), "--top-n", "2", "--permutations", "300",
               "--bootstrap", "10", "--figures", str(tmp_path / "f")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "top-2 L1:E5, L3:E2" in text
    assert pl.read_parquet(out).height == len(LAYERS) * E
    assert (tmp_path / "f" / "map.html").exists()
    assert main(["analyze", "behavior", str(planted.path), "--label", "nope"]) == 2
    assert main(["analyze", "behavior", str(planted.path), "--fdr", "2"]) == 2
