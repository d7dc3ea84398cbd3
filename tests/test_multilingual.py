"""Multilingual routing alignment: JSD by hand, a brute-force recomputation, planted structure."""

from __future__ import annotations

import math
import random

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.analysis import multilingual as ml
from workbench.errors import WorkbenchError
from workbench.store import RunWriter, open_run

LANG_EXPERTS = {"en": (0, 1), "de": (2, 3), "fr": (4, 5), "ja": (6, 7)}
LANG_LAYERS = (0, 1, 4, 5)  # planted language-specific routing; 2, 3 are shared ("middle")


def write_run(path, docs, layers, n_experts, top_k, labels=("lang", "key")):
    """docs: list of (labels dict, [per token: {layer: (experts, weights)} or (text, that dict)]) -> a run."""
    tok = {c: [] for c in ("doc_id", "pos", "token_id", "token", "phase", *labels)}
    rt = {c: [] for c in ("doc_id", "pos", "layer", "experts", "weights")}
    for d, (lab, toks) in enumerate(docs):
        for pos, routes in enumerate(toks):
            text, routes = routes if isinstance(routes, tuple) else (chr(65 + pos % 26), routes)
            tok["doc_id"].append(d)
            tok["pos"].append(pos)
            tok["token_id"].append(ord(text[0]))
            tok["token"].append(text)
            tok["phase"].append("prefill")
            for c in labels:
                tok[c].append(lab[c])
            for layer in layers:
                ex, w = routes[layer]
                rt["doc_id"].append(d)
                rt["pos"].append(pos)
                rt["layer"].append(layer)
                rt["experts"].append(list(ex))
                rt["weights"].append(list(w))
    tokens = pa.table({"doc_id": pa.array(tok["doc_id"], pa.int64()), "pos": pa.array(tok["pos"], pa.int32()),
                       "token_id": pa.array(tok["token_id"], pa.int32()), "token": tok["token"],
                       "phase": tok["phase"], **{c: pa.array([str(v) for v in tok[c]]) for c in labels}})
    routing = pa.table({"doc_id": pa.array(rt["doc_id"], pa.int64()), "pos": pa.array(rt["pos"], pa.int32()),
                        "layer": pa.array(rt["layer"], pa.int16()),
                        "experts": pa.array(rt["experts"], pa.list_(pa.int16())),
                        "weights": pa.array(rt["weights"], pa.list_(pa.float32()))})
    manifest = {"model": {"spec": "synthetic", "path": "", "model_type": "synthetic", "moe_layers": list(layers),
                          "n_experts": n_experts, "top_k": top_k}, "label_columns": list(labels)}
    w = RunWriter(path, manifest)
    w.write_part({"tokens": tokens, "routing": routing}, batch_end=1, n_tokens=tokens.num_rows)
    w.finish()
    return open_run(path)


def planted_docs(n_keys=24, n_tok=16, p_lang=0.8, seed=0, langs=("en", "de", "fr", "ja")):
    rng = random.Random(seed)
    docs = []
    for lang in langs:
        for key in range(n_keys):
            toks = []
            for pos in range(n_tok):
                routes = {}
                for layer in range(6):
                    content = random.Random(hash((key, pos, layer)) & 0xFFFF).sample(range(8), 2)
                    if layer in LANG_LAYERS and rng.random() < p_lang:
                        ex = list(LANG_EXPERTS[lang])
                    else:
                        ex = content
                    a = rng.uniform(0.5, 0.9)
                    routes[layer] = (ex, (a, (1 - a) * rng.uniform(0.5, 2.0)))  # unnormalised on purpose
                toks.append(routes)
            docs.append(({"lang": lang, "key": key}, toks))
    return docs


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("ml") / "run", planted_docs(), range(6), 8, 2)


# ---------------------------------------------------------------- JSD and divergence by hand


def test_jsd_hand_worked():
    # disjoint supports: M = (.5, .5), KL(P||M) = KL(Q||M) = log 2
    assert ml.jsd([1, 0], [0, 1]) == pytest.approx(math.log(2), abs=1e-12)
    # P = (.5, .5), Q = (1, 0): M = (.75, .25)
    # KL(P||M) = .5 log(.5/.75) + .5 log(.5/.25) = 0.1438410362; KL(Q||M) = log(4/3) = 0.2876820725
    assert ml.jsd([0.5, 0.5], [1, 0]) == pytest.approx(0.5 * 0.1438410362 + 0.5 * 0.2876820725, abs=1e-9)
    # normalised: E = 2, H(P) = log 2, H(Q) = 0 -> denominator log 2 - log(2)/2 = 0.3465735903
    assert ml.normalized_divergence([0.5, 0.5], [1, 0]) == pytest.approx(0.2157615543 / 0.3465735903, abs=1e-9)
    # E = 4 with the same two-point distributions padded: JSD unchanged, denominator log 4 - log(2)/2
    assert ml.normalized_divergence([0.5, 0.5, 0, 0], [1, 0, 0, 0]) == pytest.approx(
        0.2157615543 / (math.log(4) - math.log(2) / 2), abs=1e-9)
    # identical concentrated distributions: 0 / max(log E - 0, ..) = 0, no division blow-up
    assert ml.normalized_divergence([1, 0], [1, 0]) == 0.0


mass = st.one_of(st.just(0.0), st.floats(1e-6, 1))  # exact zeros, but no subnormals (the KL reference overflows)
dist = st.lists(mass, min_size=2, max_size=9).filter(lambda v: sum(v) > 1e-3)


@settings(max_examples=200, deadline=None)
@given(dist, st.data())
def test_jsd_properties(a, data):
    b = data.draw(st.lists(mass, min_size=len(a), max_size=len(a)).filter(
        lambda v: sum(v) > 1e-3))
    p, q = np.asarray(a) / sum(a), np.asarray(b) / sum(b)
    j = ml.jsd(p, q)
    assert 0 <= j <= math.log(2) + 1e-12
    assert j == pytest.approx(ml.jsd(q, p), abs=1e-12)
    assert ml.jsd(p, p) == pytest.approx(0, abs=1e-12)
    # definition by KL divergences (independent of the entropy identity the module uses)
    m = (p + q) / 2
    kl = lambda x, y: sum(xi * math.log(xi / yi) for xi, yi in zip(x, y) if xi > 0)  # noqa: E731
    assert j == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), abs=1e-10)


def test_middle_layers_from_curve():
    mid, info = ml.middle_layers([0, 1, 2, 3, 4, 5], [0.9, 0.8, 0.2, 0.1, 0.3, 0.85])
    assert mid == [2, 3, 4] and info["u_shape"] and info["cut"] == pytest.approx(0.5)
    # layer indices are not positions: DeepSeek-style first dense layer
    mid, _ = ml.middle_layers([1, 2, 3, 4], [0.9, 0.1, 0.12, 0.9])
    assert mid == [2, 3]
    # monotone: the low stretch sits at an end, not a U
    mid, info = ml.middle_layers([0, 1, 2, 3], [0.1, 0.2, 0.7, 0.9])
    assert mid == [0, 1] and not info["u_shape"]
    # two separate low stretches: the one holding the minimum
    mid, _ = ml.middle_layers(range(7), [1, 0.1, 1, 1, 0.05, 0.2, 1])
    assert mid == [4, 5]


# ---------------------------------------------------------------- brute force on a run


def brute_force_divergence(run, reference="en"):
    """Independent route: python dicts over the raw tables, JSD by KL, D per aligned pair."""
    tokens = run.tokens.collect()
    lab = {d: (lang, key) for d, lang, key in tokens.select("doc_id", "lang", "key").unique().iter_rows()}
    e = run.n_experts
    q = {}
    ntok = {}
    for d, _pos, layer, ex, w in run.routing.collect().iter_rows():
        s = sum(w)
        vec = q.setdefault((d, layer), [0.0] * e)
        for x, wi in zip(ex, w):
            vec[x] += wi / s
        ntok[(d, layer)] = ntok.get((d, layer), 0) + 1
    q = {k: [v / ntok[k] for v in vec] for k, vec in q.items()}

    def H(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

    by = {(lang, key, layer): q[(d, layer)] for (d, layer) in q for lang, key in [lab[d]]}
    out = {}
    for (lang, key, layer), p in by.items():
        r = by.get((reference, key, layer))
        if r is None or lang == reference:
            continue
        m = [(a + b) / 2 for a, b in zip(p, r)]
        j = 0.5 * kl(p, m) + 0.5 * kl(r, m)
        dd = j / max(math.log(e) - (H(p) + H(r)) / 2, 1e-6)
        out.setdefault((layer, lang), []).append((dd, j))
    return {k: (np.mean([a for a, _ in v]), np.mean([b for _, b in v])) for k, v in out.items()}


def test_divergence_matches_brute_force(tmp_path):
    # random routing with a missing translation and unaligned weights
    docs = planted_docs(n_keys=5, n_tok=7, p_lang=0.5, seed=3, langs=("en", "de", "fr"))
    docs = [d for d in docs if not (d[0]["lang"] == "fr" and d[0]["key"] == 2)]
    run = write_run(tmp_path / "r", docs, range(6), 8, 2)
    res = ml.analyze(run)
    ref = brute_force_divergence(run)
    div = res.tables["divergence"].filter(pl.col("lang") != "en")
    assert div.height == len(ref) == 12
    for layer, lang, d, j in div.select("layer", "lang", "divergence", "jsd").iter_rows():
        assert d == pytest.approx(ref[(layer, lang)][0], abs=1e-9)
        assert j == pytest.approx(ref[(layer, lang)][1], abs=1e-9)
    assert set(div.filter(pl.col("lang") == "fr")["n_pairs"].to_list()) == {4}
    # pairwise matrix agrees with the per-language table on the reference row
    pw = res.tables["pairwise"]
    for layer in res.meta["matrix_layers"]:
        for lang in ("de", "fr"):
            v = pw.filter((pl.col("layer") == layer) & (pl.col("lang_a") == "en") & (pl.col("lang_b") == lang))
            assert v["divergence"][0] == pytest.approx(ref[(layer, lang)][0], abs=1e-9)


def test_importance_renormalises_per_token(tmp_path):
    # one doc, two tokens, E=4, K=2: q = mean of per-token normalised weights
    toks = [{0: ((0, 1), (3.0, 1.0))}, {0: ((1, 2), (0.5, 0.5))}]
    run = write_run(tmp_path / "r", [({"lang": "en", "key": 0}, toks)], [0], 4, 2)
    p = ml.profiles(run)
    # token 1: (.75, .25) on experts (0, 1); token 2: (.5, .5) on (1, 2); mean over the two tokens
    np.testing.assert_allclose(p.importance[0, 0], [0.375, (0.25 + 0.5) / 2, 0.25, 0.0])
    np.testing.assert_allclose(p.frequency[0, 0], [0.5, 1.0, 0.5, 0.0])


# ---------------------------------------------------------------- planted structure


def test_planted_language_layers_recovered(planted):
    res = ml.analyze(planted, tau=0.3)
    curve = dict(res.tables["layers"].select("layer", "divergence").iter_rows())
    assert min(curve[x] for x in LANG_LAYERS) > 5 * max(curve[2], curve[3])
    assert res.meta["middle_layers"] == [2, 3] and res.meta["u_shape"]
    ex = res.tables["experts"]
    spec = ex.filter(pl.col("specific"))
    found = {(lay, lang, e) for lay, lang, e in spec.select("layer", "lang", "expert").iter_rows()}
    planted_set = {(lay, lang, e) for lay in LANG_LAYERS for lang in ("de", "fr", "ja") for e in LANG_EXPERTS[lang]}
    assert found == planted_set
    # counts per layer show them: 2 per non-reference language in language layers, none in the middle
    counts = {(lay, lang): n for lay, lang, n, _ in res.tables["specific_counts"].iter_rows()}
    assert all(counts[(lay, lang)] == (2 if lay in LANG_LAYERS else 0) for lay, lang in counts)
    # pairwise matrix: converged in the middle, apart elsewhere, zero on the diagonal
    pw = ml.pairwise_divergence(ml.profiles(planted), [0, 2])
    off = pw.filter(pl.col("lang_a") != pl.col("lang_b"))
    assert off.filter(pl.col("layer") == 0)["divergence"].min() > 5 * off.filter(pl.col("layer") == 2)["divergence"].max()
    assert pw.filter(pl.col("lang_a") == pl.col("lang_b"))["divergence"].abs().max() < 1e-12
    # symmetric
    m = {(a, b, lay): v for lay, a, b, v in pw.select("layer", "lang_a", "lang_b", "divergence").iter_rows()}
    assert all(m[(a, b, lay)] == pytest.approx(m[(b, a, lay)]) for a, b, lay in m)


def test_planted_shared_experts_and_reference_choice(planted):
    # reference de: en's experts 0,1 become specific to en
    res = ml.analyze(planted, reference="de", tau=0.3)
    spec = res.tables["experts"].filter(pl.col("specific") & (pl.col("lang") == "en"))
    assert set(zip(spec["layer"].to_list(), spec["expert"].to_list())) == {(lay, e) for lay in LANG_LAYERS for e in (0, 1)}
    # with a tau that the noise passes, experts are shared nowhere in language layers
    shared = res.tables["experts"].filter(pl.col("shared"))
    assert not set(shared["layer"].to_list()) & set(LANG_LAYERS)


def test_given_middle_layers_and_errors(planted):
    res = ml.analyze(planted, middle=[1, 2], matrix_layers="all")
    assert res.meta["middle_layers"] == [1, 2] and res.meta["middle_detected"] == [2, 3]
    assert sorted(res.tables["pairwise"]["layer"].unique().to_list()) == list(range(6))
    with pytest.raises(WorkbenchError, match="reference language"):
        ml.analyze(planted, reference="xx")
    with pytest.raises(WorkbenchError, match="label column"):
        ml.analyze(planted, lang_column="language")
    with pytest.raises(WorkbenchError, match="not a MoE layer"):
        ml.analyze(planted, middle=[9])


def test_figures_built_from_tables(planted):
    res = ml.analyze(planted)
    figs = ml.figures(res)
    assert {"divergence", "entropy", "expert_delta"} <= set(figs)
    assert {k for k in figs if k.startswith("pairwise_L")} == {f"pairwise_L{x}" for x in res.meta["matrix_layers"]}
    lines = {t.name: t for t in figs["divergence"].data}
    assert set(lines) == {"de", "fr", "ja", "mean"}
    d = res.tables["divergence"].filter(pl.col("lang") == "de").sort("layer")
    assert list(lines["de"].y) == d["divergence"].to_list()


def test_cli(planted, tmp_path, capsys):
    from workbench.cli import main

    out = tmp_path / "div.csv"
    rc = main(["analyze", "multilingual", str(planted.path), "--out", str(out), "--figures", str(tmp_path / "figs"),
               "--tau", "0.3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "middle layers (detected): L2-L3" in text
    assert pl.read_csv(out).height == 6 * 4
    assert (tmp_path / "figs" / "divergence.html").exists()
    rc = main(["analyze", "multilingual", str(planted.path), "--reference", "xx"])
    assert rc == 2
