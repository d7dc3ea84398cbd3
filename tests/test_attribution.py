"""workbench.attribution: first-order estimate and exact zeroing of each expert's effect on the loss.

Truths: central finite differences of the loss in an expert's weight scale (float64 model: the
estimate is exactly -dL/ds at s = 1), weight surgery (the expert's down_proj zeroed in a copy of
the model) scored with plain unpadded forwards, and linearity of the contrast objective.
"""

from __future__ import annotations

import copy

import numpy as np
import polars as pl
import pytest
import torch

from workbench import attribution as A
from workbench.cli import main
from workbench.errors import WorkbenchError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Der schnelle braune Fuchs springt über den faulen Hund.", "2 + 2 = 4, and 3 * 7 = 21."]


@pytest.fixture(scope="module")
def mm64(tiny_model):
    """A float64 copy of a tiny model (the cached fixture model stays untouched)."""
    from workbench.models.loading import wrap_model

    base = tiny_model("qwen3_moe", layers=3, experts=8, top_k=2)
    return wrap_model(copy.deepcopy(base.model).double(), base.tokenizer, spec="tiny64", path=base.path)


def _plain_nll(model, tok, texts):
    """Mean next-token NLL over all predicted tokens, one unpadded sequence at a time."""
    tot, n = 0.0, 0
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        tot += -sum(float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1))
        n += len(ids) - 1
    return tot / n


def test_estimate_is_the_derivative_in_the_weight_scale(mm64):
    batches = A.make_batches(mm64, TEXTS, seq_len=None, max_tokens=None, batch_size=3)  # padded batches
    eff, slots, base = A.estimate(mm64, batches)
    assert base == pytest.approx(_plain_nll(mm64.model, mm64.tokenizer, TEXTS), rel=1e-9)
    h = 1e-3
    checked = 0
    for layer in mm64.moe_layers:
        row = mm64.moe_layers.index(layer)
        for e in np.argsort(-slots[row])[:3]:
            spec = f"L{layer}:E{e}"
            up = A.objective(mm64, batches, {"scale": {spec: 1 + h}})
            dn = A.objective(mm64, batches, {"scale": {spec: 1 - h}})
            fd = -(up - dn) / (2 * h)
            assert eff[row, e] == pytest.approx(fd, rel=0.02, abs=1e-7), spec
            checked += 1
    assert checked == 9
    # slots = tokens routed to the expert (real tokens only), K per token per layer
    n_tok = sum(len(mm64.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert (slots.sum(1) == n_tok * mm64.top_k).all()


def test_exact_equals_weight_surgery(mm64):
    from workbench.models.loading import find_moe_layers

    batches = A.make_batches(mm64, TEXTS, seq_len=None, max_tokens=None, batch_size=2)
    base = _plain_nll(mm64.model, mm64.tokenizer, TEXTS)
    picks = [(1, 0), (2, 5), (0, 7)]
    ex = A.exact(mm64, batches, picks)
    ex_full = A.exact(mm64, batches, picks, replay=False)
    assert ex["exact"].to_numpy() == pytest.approx(ex_full["exact"].to_numpy(), rel=1e-9, abs=1e-12)
    for (layer, e), got in zip(picks, ex["exact"].to_list()):
        model = copy.deepcopy(mm64.model)
        _, _, layers = find_moe_layers(model, mm64.family)
        with torch.no_grad():
            next(x for x in layers if x.index == layer).experts.down_proj[e].zero_()
        want = _plain_nll(model, mm64.tokenizer, TEXTS) - base
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12), (layer, e)


def test_estimate_ranks_like_exact_zeroing(mm64):
    res = A.attribute(mm64, TEXTS, exact_experts="all", seq_len=None, max_tokens=None, progress=False)
    t = res.table
    assert t.height == 3 * 8 and t["exact"].null_count() == 0
    assert res.meta["spearman"] > 0.8
    # unreached experts: no slot, no effect either way
    dead = t.filter(pl.col("slots") == 0)
    assert (dead["estimate"] == 0).all() and (dead["exact"] == 0).all()
    assert t.sort("rank_estimate")["estimate"].is_sorted(descending=True)
    assert "Spearman" in res.summary
    assert {"attribution", "estimate_vs_exact"} <= set(A.figures(res))


def test_contrast_is_data_minus_control(mm64):
    data, control = TEXTS[:2], TEXTS[2:]
    e_d, _, b_d = A.estimate(mm64, A.make_batches(mm64, data, seq_len=None, max_tokens=None))
    e_c, _, b_c = A.estimate(mm64, A.make_batches(mm64, control, seq_len=None, max_tokens=None))
    e_x, _, b_x = A.estimate(mm64, A.make_batches(mm64, data, control, seq_len=None, max_tokens=None))
    assert b_x == pytest.approx(b_d - b_c, rel=1e-9)
    assert e_x == pytest.approx(e_d - e_c, rel=1e-7, abs=1e-12)
    top = A.rank_for_behaviour(mm64, data, control, n=4)
    flat = sorted(((e_d - e_c)[mm64.moe_layers.index(a), b], (a, b)) for a, b in top)
    assert len(top) == 4 and all(v > 0 for v, _ in flat)


def test_analysis_on_a_run_needs_the_model(mm64, tiny_model, tmp_path):
    import workbench as wb

    mm = tiny_model("qwen3_moe", layers=3, experts=8, top_k=2)
    run = wb.capture(mm, [{"text": t, "kind": k} for t, k in zip(TEXTS, "abab")], tmp_path / "r", progress=False)
    with pytest.raises(WorkbenchError, match="model"):
        A.analyze(run)
    res = A.analyze(run, model=mm, control_label="kind=b")
    assert res.meta["control_tokens"] > 0 and res.table.height == 24


def test_cli(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2))
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "attr.parquet"
    assert main(["attribute", model, "--data", str(txt), "--exact", "3", "--max-tokens", "64", "--out", str(out)]) == 0
    assert "Spearman" in capsys.readouterr().out
    t = pl.read_parquet(out)
    assert t.height == 24 and t["exact"].drop_nulls().len() == 3
    assert main(["attribute", model, "--data", str(tmp_path / "missing.txt")]) == 2


def test_behaviour_loop_can_rank_by_attribution(tiny_model, tmp_path):
    import workbench as wb
    from workbench.analysis import behavior as bh
    from workbench.analysis.common import doc_token_ids

    mm = tiny_model("qwen3_moe", layers=3, experts=8, top_k=2)
    recs = [{"text": t * 2, "class": c} for t, c in zip(TEXTS * 3, ["target", "control"] * 6)]
    run = wb.capture(mm, recs, tmp_path / "b", progress=False)
    res = bh.analyze(run, intervene=2, rank_by="attribution", model=mm, permutations=0, bootstrap=0, seeds=1,
                     score="text", progress=False, heldout=0.34)
    held = set(res.meta["heldout_docs"])
    lab = run.tokens.group_by("doc_id").agg(pl.col("class").first()).sort("doc_id").collect()
    fit = lab.filter(~pl.col("doc_id").is_in(list(held)))
    ids = doc_token_ids(run)
    tgt = [ids[d] for d in fit.filter(pl.col("class") == "target")["doc_id"].to_list()]
    ctl = [ids[d] for d in fit.filter(pl.col("class") == "control")["doc_id"].to_list()]
    want = A.rank_for_behaviour(mm, tgt, ctl, n=2, max_tokens=4096)
    assert [tuple(x) for x in res.meta["intervene_experts"]] == want
    assert res.meta["ranked_by"] == "attribution"
    with pytest.raises(WorkbenchError, match="rank-by"):
        bh.analyze(run, rank_by="vibes")
