"""workbench.analysis.compare: run-vs-run comparison and expert matching.

Truths: hand-worked JSD, the causal structure of a ban (layers before it cannot change; in its
layer exactly the tokens that chose the banned expert change), a per-layer permutation of experts
(matching must recover it exactly, and after relabelling nothing changes), and an independent
numpy recount of loads and lifts from the raw routing table.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import workbench as wb
from workbench.analysis import compare as C
from workbench.cli import main
from workbench.errors import WorkbenchError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Der schnelle braune Fuchs springt über den faulen Hund.", "2 + 2 = 4, and 3 * 7 = 21."]
RECORDS = [{"text": t, "kind": k} for t, k in zip(TEXTS, ["prose", "code", "prose", "maths"])]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    mm = tiny_model("qwen3_moe", layers=3, experts=8, top_k=2)
    root = tmp_path_factory.mktemp("compare")
    a = wb.capture(mm, RECORDS, root / "a", logits=True, progress=False)
    banned = wb.capture(mm, RECORDS, root / "ban", logits=True, interventions={"ban": "L1:E3"}, progress=False)
    perm_dir, perms = C.permute_experts(mm, root / "perm_model", seed=3)
    pm = wb.load_model(str(perm_dir))
    p = wb.capture(pm, RECORDS, root / "perm", logits=True, progress=False)
    half = wb.capture(mm, RECORDS[:2], root / "half", progress=False)
    other = wb.capture(mm, ["Completely different words here.", "And more of them."], root / "other", progress=False)
    return {"mm": mm, "pm": pm, "a": a, "ban": banned, "perm": p, "perms": perms, "half": half, "other": other,
            "root": root}


def test_jsd_weights_hand_worked():
    # A: {0: .75, 1: .25}; B: {1: .5, 2: .5}; M = {0: .375, 1: .375, 2: .25}
    want = 0.5 * (0.75 * math.log(0.75 / 0.375) + 0.25 * math.log(0.25 / 0.375)) \
        + 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.25))
    got = C._jsd_weights(np.array([[0, 1]]), np.array([[0.75, 0.25]]), np.array([[1, 2]]), np.array([[0.5, 0.5]]))
    assert got[0] == pytest.approx(want, abs=1e-12)
    # unnormalised weights are renormalised; identical sets in another order give 0; disjoint sets ln 2
    same = C._jsd_weights(np.array([[3, 5]]), np.array([[2.0, 1.0]]), np.array([[5, 3]]), np.array([[0.5, 1.0]]))
    assert same[0] == pytest.approx(0.0, abs=1e-12)
    apart = C._jsd_weights(np.array([[0, 1]]), np.array([[0.6, 0.4]]), np.array([[2, 3]]), np.array([[0.5, 0.5]]))
    assert apart[0] == pytest.approx(math.log(2), abs=1e-12)
    dense = C._jsd_dense(np.array([[0.75, 0.25, 0.0]]), np.array([[0.0, 0.5, 0.5]]))
    assert dense[0] == pytest.approx(want, abs=1e-12)


def test_alignment_states(setup):
    s = setup
    assert C.alignment(s["a"], s["ban"])["status"] == "identical"
    part = C.alignment(s["a"], s["half"])
    n_half = s["half"].tokens.select(pl.len()).collect().item()
    assert part["status"] == "partial" and part["aligned"] == n_half and "align" in part["text"]
    none = C.alignment(s["a"], s["other"])
    assert none["status"] in ("none", "partial")  # shared positions only count when the token ids agree
    assert none["aligned"] < none["tokens_b"]


def test_ban_changes_only_what_it_can(setup):
    s = setup
    res = C.analyze(s["a"], other=s["ban"])
    lay = {r["layer"]: r for r in res.tables["layers"].iter_rows(named=True)}
    # routing before the banned layer cannot change
    assert lay[0]["changed_share"] == 0 and lay[0]["mean_jsd"] == pytest.approx(0, abs=1e-9)
    # in the banned layer, exactly the tokens that chose E3 in A changed, each keeping K-1 of K experts
    ra = s["a"].routing.filter(pl.col("layer") == 1).sort("doc_id", "pos").collect()
    chose = ra.filter(pl.col("experts").list.contains(3)).select("doc_id", "pos")
    ch = res.tables["changes"].filter(pl.col("layer") == 1)
    assert chose.height > 0
    assert sorted(ch.select("doc_id", "pos").rows()) == sorted(chose.rows())
    assert ch["overlap"].to_list() == pytest.approx([0.5] * ch.height)
    assert lay[1]["changed_share"] == pytest.approx(chose.height / ra.height)
    assert all(3 not in e for e in ch["experts_b"].to_list())
    load = res.tables["load"].filter((pl.col("layer") == 1) & (pl.col("expert") == 3)).row(0, named=True)
    assert load["load_b"] == 0 and load["load_a"] == pytest.approx(chose.height / (ra.height * 2))
    # per label value, the banned layer's changes split by the `kind` label
    lab = res.tables["labels"].filter((pl.col("layer") == 1) & (pl.col("label") == "kind"))
    assert lab["tokens"].sum() == ra.height
    fig = C.figures(res)
    assert {"layer_curves", "load_shift", "balance", "label_jsd"} <= set(fig)


def test_load_and_lift_match_an_independent_recount(setup):
    s = setup
    res = C.analyze(s["a"], other=s["ban"])
    for run, side in ((s["a"], "a"), (s["ban"], "b")):
        rt = run.routing.collect()
        tok = run.tokens.select("doc_id", "pos", "kind").collect()
        j = rt.join(tok, on=["doc_id", "pos"])
        for layer in (1, 2):
            g = j.filter(pl.col("layer") == layer)
            ex = np.concatenate(g["experts"].to_list())
            counts = np.bincount(ex, minlength=8)
            got = res.tables["load"].filter(pl.col("layer") == layer).sort("expert")[f"load_{side}"].to_numpy()
            assert got == pytest.approx(counts / counts.sum())
            code = g.filter(pl.col("kind") == "code")
            cc = np.bincount(np.concatenate(code["experts"].to_list()), minlength=8)
            spec = res.tables["specialisation_experts"].filter(
                (pl.col("layer") == layer) & (pl.col("label") == "kind") & (pl.col("value") == "code")).sort("expert")
            want = (cc / cc.sum()) / (counts / counts.sum())
            got = spec[f"lift_{side}"].to_numpy()
            used = counts > 0
            assert got[used] == pytest.approx(want[used])


def test_permuted_experts_are_matched_back_exactly(setup):
    s = setup
    for by, a, b in (("weights", s["mm"], s["pm"]), ("routing", s["a"], s["perm"])):
        m = C.match_experts(a, b, by=by)
        for layer, perm in s["perms"].items():
            g = m.filter(pl.col("layer") == layer).sort("expert_b")
            # new expert i is old expert perm[i]
            assert g["expert_a"].to_list() == perm, by
        if by == "weights":
            assert m["similarity"].to_numpy() == pytest.approx(1.0)
            assert not m["weak"].any()
    plain = C.analyze(s["a"], other=s["perm"])
    assert plain.tables["layers"]["changed_share"].max() > 0.5
    for match in ("weights", "routing"):
        res = C.analyze(s["a"], other=s["perm"], match=match, distribution="logits")
        lay = res.tables["layers"]
        assert lay["changed_share"].to_list() == [0, 0, 0]
        assert lay["mean_overlap"].to_list() == pytest.approx([1, 1, 1])
        assert lay["mean_jsd"].to_numpy() == pytest.approx(0, abs=1e-6)
        assert res.tables["load"]["shift"].abs().max() == pytest.approx(0, abs=1e-12)
        assert res.tables["changes"].height == 0
        assert "matches" in res.tables and "match_similarity" in C.figures(res)


def test_weak_matches_are_flagged(setup, tiny_dir):
    other = wb.load_model(str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2, seed=7)))
    m = C.match_experts(setup["mm"], other, by="weights")
    assert m["weak"].all()  # independent random experts have no counterpart
    assert (m["similarity"] < 0.5).all()


def test_different_data_side_by_side(setup):
    s = setup
    res = C.analyze(s["half"], other=s["other"])
    al = res.meta["alignment"]
    if al["status"] == "none":
        assert "changes" not in res.tables
        assert res.tables["layers"]["changed_share"].null_count() == res.tables["layers"].height
        assert "side by side" in res.summary
    assert res.tables["layers"]["entropy_a"].null_count() == 0
    assert res.tables["load"]["load_a"].sum() == pytest.approx(3.0)  # one distribution per layer


def test_partial_alignment_uses_shared_tokens(setup):
    s = setup
    res = C.analyze(s["a"], other=s["half"])
    n_half = s["half"].tokens.select(pl.len()).collect().item()
    assert res.tables["layers"]["tokens"].to_list() == [n_half] * 3
    assert res.tables["layers"]["changed_share"].to_list() == [0, 0, 0]  # same model, same tokens
    assert "per-token comparisons use the aligned tokens only" in res.summary


def test_errors(setup):
    s = setup
    with pytest.raises(WorkbenchError):
        C.analyze(s["a"])
    with pytest.raises(WorkbenchError, match="logits"):
        C.analyze(s["a"], other=s["half"], distribution="logits")
    with pytest.raises(WorkbenchError, match="matching"):
        C.analyze(s["a"], other=s["ban"], match="psychic")


def test_cli(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "cmp"
    assert main(["compare", str(s["a"].path), str(s["perm"].path), "--match", "weights", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "experts matched by weights" in text and "0 weak" in text
    assert pl.read_parquet(out / "layers.parquet")["changed_share"].to_list() == [0, 0, 0]
    assert (out / "figures" / "load_shift.html").exists()
    assert main(["compare", str(s["a"].path), str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_dashboard_compare_page(setup):
    import json

    import plotly

    from workbench.app import compare as page
    from workbench.app.main import make_multi_app

    s = setup
    server = make_multi_app([s["a"].path, s["ban"].path, s["perm"].path], warm=())
    ctx = server.workbench_apps["a"].workbench
    text = json.dumps(page.PAGE.layout(ctx), cls=plotly.utils.PlotlyJSONEncoder)
    assert "cmp-other" in text and '"ban"' in text and '"perm"' in text
    runs = page.served_runs(ctx)
    res, figs = page.result_for(ctx.run, runs["ban"], "none")
    body = json.dumps(page.render(res, figs), cls=plotly.utils.PlotlyJSONEncoder)
    assert "Changed routing decisions" in body and "Load shift per expert" in body
    # the figures are the analysis' own, from its tables
    assert set(figs) == set(C.figures(res))
    res2, figs2 = page.result_for(ctx.run, runs["perm"], "weights")
    body2 = json.dumps(page.render(res2, figs2), cls=plotly.utils.PlotlyJSONEncoder)
    assert "Matched experts (0 weak)" in body2
    assert page.result_for(ctx.run, runs["perm"], "weights")[0] is res2  # cached
    # one run served: the page says how to serve two
    single = make_multi_app([s["a"].path], warm=()).workbench_apps["a"].workbench
    assert "nothing to compare" in json.dumps(page.PAGE.layout(single), cls=plotly.utils.PlotlyJSONEncoder)


def test_experts_page_attribution_section(setup):
    from workbench.app.analyses import SECTIONS, _body
    from workbench.app.main import make_app
    from workbench.app.state import Unavailable

    s = setup
    app = make_app(s["a"], model=s["mm"], warm=())
    ctx = app.workbench
    sec = SECTIONS["experts-attribution"]
    body, done = _body(ctx, sec)
    assert done and "estimate attribution" in str(body)
    res = ctx.data.analysis(sec.analysis, variant=sec.variant, options=sec.loop.options(ctx),
                            lock=ctx.service.lock, wait=120)
    assert res is not None and not isinstance(res, Unavailable), res
    assert res.table.height == 3 * 8 and "attribution" in ctx.data.figures(sec.variant)
