"""Super experts: the paper's rule on hand-built tables, reference mode, and a planted SE in a tiny model."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from workbench.analysis import super_experts as se
from workbench.probes.base import list_array
from workbench.store import SCHEMAS, RunWriter, open_run


def write_run(path, n_layers, moe_layers, n_experts, stats_rows=None, hidden_rows=None, routing=None,
              logits=None, top_k=1, rule="softmax_topk"):
    manifest = {"identity": {"p": str(path)}, "model": {"spec": "synthetic", "path": None, "model_type": "synthetic",
                                                        "n_layers": n_layers, "moe_layers": moe_layers,
                                                        "n_experts": n_experts, "top_k": top_k, "routing_rule": rule},
                "label_columns": []}
    w = RunWriter(path, manifest, overwrite=True)
    tables = {}
    if stats_rows is not None:
        tables["expert_stats"] = pa.Table.from_pylist(stats_rows, schema=SCHEMAS["expert_stats"])
    if hidden_rows is not None:
        tables["hidden"] = pa.Table.from_pylist(hidden_rows, schema=SCHEMAS["hidden"])
    if routing is not None:  # (doc, pos, layer, experts)
        cols = {"doc_id": pa.array([r[0] for r in routing], pa.int64()), "pos": pa.array([r[1] for r in routing], pa.int32()),
                "layer": pa.array([r[2] for r in routing], pa.int16()),
                "experts": list_array(np.array([r[3] for r in routing]), pa.int16()),
                "weights": list_array(np.ones((len(routing), top_k)), pa.float32())}
        if logits is not None:
            cols["logits"] = list_array(np.asarray(logits, np.float32), pa.float32())
        tables["routing"] = pa.table(cols)
    # the manifest's token count is what readers check each part's rows against: count the tokens the rows name
    n_tokens = max(len(set(zip(t.column("doc_id").to_pylist(), t.column("pos").to_pylist()))) for t in tables.values())
    w.write_part(tables, batch_end=1, n_tokens=n_tokens)
    w.finish()
    return open_run(path)


def _row(doc, pos, layer, expert, val, ch=0, slot=0):
    return {"doc_id": doc, "pos": pos, "layer": layer, "slot": slot, "expert": expert, "weight": 0.5,
            "out_maxabs": val, "out_argmax": ch, "out_l2": val}


def _table(values: dict, n_layers=8, E=64, seed=0):
    """a[l, e] table: small random values everywhere, `values` {(l, e): a} planted."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for e in range(E):
            rows.append({"layer": layer, "expert": e, "max_abs": float(values.get((layer, e), rng.uniform(1, 10)))})
    return pl.DataFrame(rows, schema={"layer": pl.Int16, "expert": pl.Int16, "max_abs": pl.Float64})


def test_rule_hand_worked():
    # 8 layers -> candidates are layers 0..5 (round(6)); 384 candidate values; p99.5 sits at
    # index 0.995 * 383 = 381.085 of the sorted values, between 300 and 900: p = 300 + 0.085 * 600 = 351
    t = _table({(1, 3): 5000.0, (2, 5): 900.0, (3, 7): 300.0, (6, 1): 8000.0, (7, 0): 9000.0})
    out, th = se.find_super_experts(t, n_layers=8)
    assert th["candidate_layers"] == 6 and th["candidates"] == 384
    assert th["p_value"] == pytest.approx(351.0)
    assert th["floor_max_over_ratio"] == 500.0
    sup = out.filter(pl.col("is_super_expert"))
    assert list(zip(sup["layer"], sup["expert"], sup["se_rank"])) == [(1, 3, 1), (2, 5, 2)]
    # layers 6 and 7 (last quarter) are never SEs, whatever their size
    assert not out.filter(pl.col("layer") >= 6)["is_super_expert"].any()
    # the floor(max / 10) rule: 450 is above p99.5 but not above 500
    t2 = _table({(1, 3): 5000.0, (2, 5): 450.0, (3, 7): 300.0})
    sup2 = se.find_super_experts(t2, n_layers=8)[0].filter(pl.col("is_super_expert"))
    assert list(zip(sup2["layer"], sup2["expert"])) == [(1, 3)]


@pytest.mark.parametrize("n_layers,cand", [(6, 4), (10, 8), (2, 2), (4, 3)])
def test_candidate_layers_use_python_round(n_layers, cand):
    assert se.find_super_experts(_table({}, n_layers=n_layers, E=4), n_layers)[1]["candidate_layers"] == cand
    assert cand == round(0.75 * n_layers)


def test_true_max_vs_first_row_and_shared(tmp_path):
    rows = [
        _row(0, 0, 1, 2, 5.0, ch=7), _row(0, 3, 1, 2, 400.0, ch=11),  # true max at a later row of doc 0
        _row(1, 1, 1, 2, 50.0, ch=9), _row(1, 4, 1, 2, 1.0),  # first row of doc 1 is its biggest
        _row(0, 2, 1, -1, 30.0, ch=4, slot=-1), _row(1, 5, 1, -1, 70.0, ch=5, slot=-1),  # shared expert
        _row(0, 1, 0, 0, 2.0), _row(1, 0, 0, 0, float("nan")),
    ]
    run = write_run(tmp_path / "r", 4, [0, 1], 4, stats_rows=rows)
    true = se.expert_max(run, "true").sort("layer", "expert")
    r = true.filter((pl.col("layer") == 1) & (pl.col("expert") == 2)).row(0, named=True)
    assert (r["max_abs"], r["channel"], r["doc_id"], r["pos"], r["selections"]) == (400.0, 11, 0, 3, 4)
    first = se.expert_max(run, "first_row")
    r = first.filter((pl.col("layer") == 1) & (pl.col("expert") == 2)).row(0, named=True)
    assert (r["max_abs"], r["channel"], r["doc_id"], r["pos"]) == (50.0, 9, 1, 1)
    sh = first.filter(pl.col("expert") == -1).row(0, named=True)
    assert (sh["max_abs"], sh["channel"], sh["pos"]) == (70.0, 5, 5)  # shared: true max in both modes
    assert first.filter(pl.col("layer") == 0)["max_abs"].to_list() == [2.0]  # NaN rows ignored


def test_massive_and_sink_scores(tmp_path):
    hidden = [{"doc_id": d, "pos": p, "layer": layer, "maxabs": float(v), "argmax": c}
              for d, p, layer, v, c in [(0, 0, 0, 3, 1), (0, 1, 0, 1, 2), (0, 2, 0, 2, 3),
                                         (0, 0, 1, 900, 40), (0, 1, 1, 3, 2), (0, 2, 1, 5, 1)]]
    z = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    routing = [(0, 0, 1, [0]), (0, 1, 1, [1]), (0, 2, 1, [2]), (1, 0, 1, [0])]
    run = write_run(tmp_path / "r", 2, [1], 3, stats_rows=[_row(0, 0, 1, 0, 1.0)], hidden_rows=hidden,
                    routing=routing, logits=z)
    m = se.massive_activations(run)
    r = m.filter(pl.col("layer") == 1).row(0, named=True)
    assert (r["max_abs"], r["channel"], r["pos"]) == (900.0, 40, 0)
    assert r["median_token_max"] == 5.0 and r["ratio_to_median"] == 180.0
    s = se.sink_router_scores(run).sort("expert")
    assert s["sink_select_rate"].to_list() == [1.0, 0.0, 0.0]
    assert s["other_select_rate"].to_list() == [0.0, 0.5, 0.5]
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert s["score_sink"].to_list() == pytest.approx(soft[[0, 3]].mean(0).tolist())
    assert s["score_other"].to_list() == pytest.approx(soft[[1, 2]].mean(0).tolist())
    res = se.analyze(run, progress=False)
    assert {"experts", "super_experts", "thresholds", "massive", "sink_scores"} <= set(res.tables)
    # without logits the summary says what is missing
    run2 = write_run(tmp_path / "r2", 2, [1], 3, stats_rows=[_row(0, 0, 1, 0, 1.0)], routing=routing)
    assert "--logits" in se.analyze(run2, progress=False).summary


# ---------------------------------------------------------------------------------------------------------
# a planted super expert in a tiny model


@pytest.fixture(scope="module")
def planted(tiny_dir, tmp_path_factory):
    from workbench import capture, load_model

    path = tiny_dir("mixtral", layers=4, experts=8, top_k=2)
    mm = load_model(str(path))
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "def add(a, b):\n    return a + b\n" * 3,
             "Der schnelle braune Fuchs springt über den faulen Hund.", "2 + 2 = 4, and 3 * 7 = 21. " * 2]
    out = tmp_path_factory.mktemp("se")
    base = capture(mm, texts, out / "base", probes=["routing"], progress=False)
    counts = base.routing.filter(pl.col("layer") == 1).explode("experts").group_by("experts").len().sort("len").collect()
    e = int(counts["experts"][-1])  # the busiest expert of layer 1
    with torch.no_grad():
        mm.layer(1).experts.down_proj[e] *= 300.0
    run = capture(mm, texts, out / "planted", probes=["routing", "experts", "hidden"], progress=False)
    return mm, run, e, texts, path


def test_planted_super_expert_is_found_alone(planted):
    mm, run, e, _, _ = planted
    res = se.analyze(run, progress=False)
    sup = res.tables["super_experts"]
    assert list(zip(sup["layer"], sup["expert"])) == [(1, e)]
    top = res.tables["experts"].row(0, named=True)
    assert (top["layer"], top["expert"], top["se_rank"]) == (1, e, 1)
    # the residual stream after layer 1 carries the outlier (massive activation)
    m = res.tables["massive"].sort("layer")
    assert m.filter(pl.col("layer") == 1)["max_abs"][0] > 20 * m.filter(pl.col("layer") == 0)["max_abs"][0]
    assert "L1:E" in res.summary


def test_prune_perplexity_and_sink_decay_against_direct_computation(planted):
    from transformers import AutoModelForCausalLM

    from workbench import wrap_model

    mm, _, e, texts, path = planted
    text = [texts[0]]
    prune, decay = se.prune_evaluation(mm, [(1, e)], text, n_random=1, seed=0)
    assert prune["condition"].to_list() == ["baseline", "super_experts", "random_0"]
    # an independent model copy with eager attention, the same planted weights
    m2 = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", experts_implementation="eager")
    mm2 = wrap_model(m2, mm.tokenizer, spec=str(path), path=str(path))
    with torch.no_grad():
        mm2.layer(1).experts.down_proj[e] *= 300.0
    ids = torch.tensor([mm.tokenize(text[0])])

    def direct(zero):
        from contextlib import nullcontext

        with torch.no_grad(), (mm2.steer(zero=zero) if zero else nullcontext()):
            out = mm2.model(input_ids=ids, labels=ids, output_attentions=True)
        sink = np.array([[a[0, h, :, 0].mean().item() for h in range(a.shape[1])] for a in out.attentions])
        return math.exp(out.loss.item()), sink

    ppl0, s0 = direct(None)
    ppl1, s1 = direct([(1, e)])
    rand = prune.filter(pl.col("condition") == "random_0")["experts"][0]
    ppl2, s2 = direct(rand)
    assert prune["ppl"].to_list() == pytest.approx([ppl0, ppl1, ppl2], rel=1e-4)
    d = decay.filter(pl.col("layer").is_null())
    assert d.filter(pl.col("condition") == "super_experts")["d_sink"][0] == pytest.approx(1 - (s1 / s0).mean(), abs=1e-4)
    assert d.filter(pl.col("condition") == "random_0")["d_sink"][0] == pytest.approx(1 - (s2 / s0).mean(), abs=1e-4)
    per = decay.filter((pl.col("condition") == "super_experts") & pl.col("layer").is_not_null()).sort("layer")
    assert per["d_sink"].to_list() == pytest.approx((1 - (s1 / s0).mean(1)).tolist(), abs=1e-4)
    # layers before the pruned one cannot change
    assert per.filter(pl.col("layer") <= 1)["d_sink"].to_list() == pytest.approx([0.0, 0.0], abs=1e-6)


def test_cli_with_prune(planted, tmp_path, capsys):
    from workbench.cli import main

    _, run, e, texts, _ = planted
    data = tmp_path / "t.txt"
    data.write_text("\n".join(texts))
    out = tmp_path / "se.csv"
    rc = main(["analyze", "super-experts", str(run.path), "--prune", "--prune-data", str(data), "--n-random", "1",
               "--prune-max-tokens", "200", "--out", str(out), "--figures", str(tmp_path / "figs")])
    assert rc == 0
    df = pl.read_csv(out)
    assert df["is_super_expert"].sum() == 1 and df.row(0, named=True)["expert"] == e
    text = capsys.readouterr().out
    assert "ppl baseline" in text and "D_sink super_experts" in text
    for name in ("expert_max_heatmap", "massive_activations", "prune_ppl", "sink_decay"):
        assert (tmp_path / "figs" / f"{name}.html").exists()
    assert main(["analyze", "super-experts", str(run.path), "--mode", "first_row"]) == 0


def test_mode_alias_and_loaded_model_for_prune(planted, tmp_path):
    mm, run, e, texts, _ = planted
    a = se.analyze(run, mode="first", progress=False)
    b = se.analyze(run, mode="first_row", progress=False)
    assert a.tables["experts"].equals(b.tables["experts"]) and a.meta["thresholds"]["mode"] == "first_row"
    data = tmp_path / "t.txt"
    data.write_text("\n".join(texts))
    res = se.analyze(run, prune=True, model=mm, prune_data=str(data), n_random=1, prune_max_tokens=100, progress=False)
    p = res.tables["prune"]
    assert p["condition"].to_list() == ["baseline", "super_experts", "random_0"]
    assert p.filter(pl.col("condition") == "super_experts")["experts"][0] == f"L1:E{e}"
    assert p["ppl_ratio"][0] == 1.0


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n_layers=st.integers(1, 10), E=st.integers(1, 40), seed=st.integers(0, 10_000), spikes=st.integers(0, 5))
def test_rule_properties(n_layers, E, seed, spikes):
    rng = np.random.default_rng(seed)
    vals = rng.lognormal(1.0, 1.0, (n_layers, E))
    for _ in range(spikes):
        vals[rng.integers(n_layers), rng.integers(E)] *= rng.uniform(5, 500)
    t = pl.DataFrame({"layer": np.repeat(np.arange(n_layers), E), "expert": np.tile(np.arange(E), n_layers),
                      "max_abs": vals.reshape(-1)}, schema={"layer": pl.Int16, "expert": pl.Int16, "max_abs": pl.Float64})
    ncand = round(0.75 * n_layers)
    if ncand == 0:
        with pytest.raises(se.WorkbenchError):
            se.find_super_experts(t, n_layers)
        return
    out, th = se.find_super_experts(t, n_layers)
    A = vals[:ncand].reshape(-1)
    p, fl = np.percentile(A, 99.5), math.floor(A.max() / 10)
    want = {(layer, e) for layer in range(ncand) for e in range(E) if vals[layer, e] > p and vals[layer, e] > fl}
    got = set(zip(out.filter(pl.col("is_super_expert"))["layer"].to_list(),
                  out.filter(pl.col("is_super_expert"))["expert"].to_list()))
    assert got == want
    # ranks follow the values; the set is closed upwards among candidates
    sup = out.filter(pl.col("is_super_expert"))
    assert sup["se_rank"].to_list() == list(range(1, sup.height + 1))
    assert sup["max_abs"].is_sorted(descending=True)
    if got:
        lowest = min(vals[layer, e] for layer, e in got)
        assert all(vals[layer, e] < lowest or (layer, e) in got for layer in range(ncand) for e in range(E))
    # the last quarter of layers never matters
    vals2 = vals.copy()
    vals2[ncand:] *= 1000
    t2 = t.with_columns(pl.Series("max_abs", vals2.reshape(-1)))
    got2 = set(zip(*[se.find_super_experts(t2, n_layers)[0].filter(pl.col("is_super_expert"))[c].to_list()
                     for c in ("layer", "expert")]))
    assert got2 == got
