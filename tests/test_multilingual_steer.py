"""The multilingual steering experiment on a tiny model: the right experts, promoted the right way."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from workbench.analysis import multilingual as ml

MIDDLE = [1, 2]
TASK = ["12 + 35 = 47", "7 * 8 = 56", "90 - 45 = 45", "3 * 3 + 1 = 10", "100 / 4 = 25", "6 + 6 + 6 = 18"]
GENERAL = ["The cat sat on the mat.", "Rivers run to the sea.", "She reads a long book.",
           "Trees grow tall in spring.", "We walked home late.", "Bread is baked at dawn."]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    from workbench.capture import capture
    from workbench.data import load_dataset, subset

    mm = tiny_model("mixtral", layers=4, experts=8, top_k=2, hidden=64)
    ds = subset(load_dataset("multilingual"), where={"lang": ["en", "de", "fr"]}, first_keys=3)
    run = capture(mm, ds, tmp_path_factory.mktemp("mls") / "run", progress=False)
    return mm, run, [r["text"] for r in ds.records], ds


def selection_rates(mm, texts, interventions, per_doc=False):
    """Share of tokens selecting each (layer, expert) under the interventions, read by router hooks
    (registered after the intervention hooks, so they see the steered choice). per_doc: the mean over
    texts of each text's share (the paper's relative activation frequency), else pooled over tokens."""
    import contextlib

    import torch

    seen = {}
    hooks = [layer.router.register_forward_hook(lambda mod, a, out, i=layer.index: seen.__setitem__(i, out[2]))
             for layer in mm.layers]
    per = []
    try:
        with mm.steer(**interventions) if interventions else contextlib.nullcontext(), torch.inference_mode():
            for t in texts:
                mm.model(input_ids=torch.tensor([mm.tokenize(t)]), use_cache=False)
                n = len(mm.tokenize(t))
                per.append(({(i, int(e)): int((idx == e).sum()) for i, idx in seen.items()
                             for e in idx.unique()}, n))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    if per_doc:
        for counts, n in per:
            for k, c in counts.items():
                out[k] = out.get(k, 0) + c / n / len(per)
    else:
        total = sum(n for _, n in per)
        for counts, _ in per:
            for k, c in counts.items():
                out[k] = out.get(k, 0) + c / total
    return out


@pytest.mark.slow
def test_steering_conditions_promote_the_chosen_experts(setup, tmp_path):
    mm, run, _, ds = setup
    calls = []

    def score(m, texts, inter):
        calls.append((inter, selection_rates(m, texts, inter)))
        return 1.0 + len(calls)

    res = ml.analyze(run, middle=MIDDLE, steer=True, model=mm, task_data=TASK, general_data=GENERAL, steer_top=3,
                     seeds=1, lam=2.0, score=score, progress=False)
    task = res.meta["task_experts"]
    outside = res.meta["outside_experts"]
    assert len(task) == 3 and all(lay in MIDDLE for lay, _ in task)
    assert len(outside) == 3 and all(lay not in MIDDLE for lay, _ in outside)

    # task experts: the largest positive task-minus-general frequency differences, recomputed here
    ft, fg = selection_rates(mm, TASK, None, per_doc=True), selection_rates(mm, GENERAL, None, per_doc=True)
    delta = {(lay, e): ft.get((lay, e), 0) - fg.get((lay, e), 0) for lay in MIDDLE for e in range(8)}
    best = sorted(delta, key=lambda k: (-delta[k], k))[:3]
    assert sorted(task) == sorted(best) and all(delta[k] > 0 for k in best)
    np.testing.assert_allclose(res.tables["task_experts"]["delta"].to_numpy(), [delta[k] for k in task], atol=1e-9)

    assert sum(inter is None for inter, _ in calls) == 3  # one baseline per language, measured first
    b = None
    for inter, rates in calls:
        if inter is None:
            b = rates
            continue
        if "force" in inter:
            forced = [tuple(int(x) for x in it[1:].split(":E")) for it in inter["force"].split(",")]
            per_layer = {}
            for lay, _ in forced:
                per_layer[lay] = per_layer.get(lay, 0) + 1
            assert max(per_layer.values()) <= mm.top_k
            assert all(rates.get(k, 0) == 1.0 for k in forced)  # hard: selected on every token
        else:
            boosted = [tuple(int(x) for x in k[1:].split(":E")) for k in inter["boost"]]
            assert set(inter["boost"].values()) == {2.0}
            # soft: every promoted expert is selected at least as often as without steering, and more in sum
            assert sum(rates.get(k, 0) for k in boosted) > sum(b.get(k, 0) for k in boosted)
    tab = res.tables["steering"]
    assert tab.height == 3 * 2 * (1 + 1 + 1)  # languages x modes x (task, random seed, outside)
    assert set(tab["condition"]) == {"task", "random", "outside"} and set(tab["mode"]) == {"soft", "hard"}
    assert (tab["change"] == tab["score"] - tab["baseline"]).all()
    random_specs = tab.filter(pl.col("condition") == "random")["experts"].unique().to_list()
    assert all(set(s.split(",")).isdisjoint({f"L{a}:E{b}" for a, b in task}) for s in random_specs)
    figs = ml.figures(res)
    assert "steering" in figs


@pytest.mark.slow
def test_steering_perplexity_baseline_and_eval_texts(setup):
    """Default score: perplexity of each language's documents, re-decoded from the run."""
    from workbench import steering as st

    mm, run, texts, ds = setup
    recs = [dict(r, set="task") for r in ({"text": t, "lang": "en", "key": f"t{i}"} for i, t in enumerate(TASK))]
    recs += [dict(r, set="general") for r in ({"text": t, "lang": "en", "key": f"g{i}"} for i, t in enumerate(GENERAL))]
    recs += [dict(r, set="parallel") for r in ds.records]
    import tempfile

    from workbench.capture import capture

    with tempfile.TemporaryDirectory() as tmp:
        run2 = capture(mm, recs, f"{tmp}/r", progress=False)
        res = ml.analyze(run2, middle=MIDDLE, steer=True, model=mm, steer_top=2, seeds=1, modes=("hard",),
                         progress=False)
    # the task/general sets choose the experts but are not parallel text
    assert res.tables["divergence"]["n_pairs"].max() == 3
    tab = res.tables["steering"]
    for lang in ("en", "de", "fr"):
        own = [r["text"] for r in ds.records if r["lang"] == lang]
        base = tab.filter(pl.col("lang") == lang)["baseline"][0]
        assert base == pytest.approx(st.perplexity(mm, own)["ppl"], rel=1e-6)
        task_row = tab.filter((pl.col("lang") == lang) & (pl.col("condition") == "task"))
        spec = task_row["experts"][0]
        assert task_row["score"][0] == pytest.approx(st.perplexity(mm, own, interventions={"force": spec})["ppl"],
                                                     rel=1e-6)
