"""Closing the fTRI loop on a tiny model with a planted behaviour expert.

The plant (mixtral, 2 layers, 8 experts, top-2): tokens of a "trigger" alphabet carry a direction d
in their embedding, all other tokens a direction u; both are orthogonal to every router row but
the planted expert's, whose row is c*d - c'*u. So layer 1 routes every trigger token to the planted
expert and (almost) never a control token. The planted expert writes a large positive multiple of
the unembedding row of "Z" (gate == up rows make silu(x) * x >= 0), so P("Z" | prompt) is high
exactly when it fires on the last prompt token. Behaviour score: mean log P("Z" | prompt).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from workbench.analysis import behavior as bh

TRIG, CTRL, Z, PLANTED = "qxjkvw", "aeioulmn", "Z", (1, 5)


def planted_model(path, c=1.5, c2=0.25, gamma=20.0, seed=0):
    from workbench.models.loading import load_model

    mm = load_model(str(path))  # a private copy: the session fixtures' models must stay untouched
    layer, expert = PLANTED
    m, tok = mm.model, mm.tokenizer
    trig = [tok(ch, add_special_tokens=False)["input_ids"][0] for ch in TRIG]
    zid = tok(Z, add_special_tokens=False)["input_ids"][0]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        H = emb.shape[1]
        others = [i for i in range(mm.n_experts) if i != expert]
        rows = torch.cat([mm.layers[0].router.weight, mm.layers[1].router.weight[others]]).T
        q, _ = torch.linalg.qr(rows)
        v = torch.randn(H, 2, generator=g)
        d, u = torch.linalg.qr(v - q @ (q.T @ v))[0].T
        rho = emb.norm(dim=1).mean()
        rest = torch.ones(emb.shape[0], dtype=torch.bool)
        rest[trig] = False
        emb[trig] += 3 * rho * d
        emb[rest] += 3 * rho * u
        mm.layer(layer).router.weight[expert] = c * d - c2 * u
        ex = mm.layer(layer).experts
        inter = ex.down_proj.shape[2]
        w = torch.randn(inter, H, generator=g) * 0.3
        ex.gate_up_proj[expert] = torch.cat([w, w])
        vz = m.lm_head.weight[zid] / m.lm_head.weight[zid].norm()
        ex.down_proj[expert] = gamma * vz[:, None].expand(H, inter) / inter
        m.lm_head.weight[zid] *= 5
    return mm


def strings(n, seed, alphabet):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(alphabet), int(rng.integers(6, 14)))) for _ in range(n)]


@pytest.fixture(scope="module")
def loop(tiny_dir, tmp_path_factory):
    from workbench.capture import capture

    mm = planted_model(tiny_dir("mixtral", layers=2, experts=8, top_k=2, hidden=64))
    recs = ([{"text": t, "class": "target"} for t in strings(40, 3, TRIG)]
            + [{"text": t, "class": "control"} for t in strings(40, 4, CTRL)])
    run = capture(mm, recs, tmp_path_factory.mktemp("loop") / "run", progress=False)
    res = bh.analyze(run, model=mm, intervene=2, continuations=[Z], seeds=4, permutations=200, bootstrap=10,
                     heldout=0.25, top_n=2, progress=False)
    return mm, run, res


def test_planted_expert_tops_the_map(loop):
    _, _, res = loop
    assert bh.top_experts(res.tables["map"], 1) == [PLANTED]
    row = res.tables["map"].filter((pl.col("layer") == PLANTED[0]) & (pl.col("expert") == PLANTED[1]))
    assert row["diff"][0] == pytest.approx(1.0) and row["significant"][0]
    # held-out prompts are not in the maps: 10 per class held out of 40
    assert len(res.meta["heldout_docs"]) == 20
    assert res.tables["class_means"]["n_prompts"].unique().to_list() == [30]


def test_loop_moves_the_score_beyond_random(loop):
    mm, _, res = loop
    s = {(c, a): r for c, a, *r in res.tables["intervention_summary"].select(
        "class", "action", "change_top", "change_random", "change_random_std").iter_rows()}
    for action in ("off_reroute", "off_drop"):
        top, rnd, sd = s[("target", action)]
        assert top < -1.0 and top < rnd - 10 * (sd or 0) - 0.5  # switching the planted expert off kills "Z"
    top, rnd, sd = s[("control", "on_force")]
    assert top > 1.0 and top > rnd + 10 * (sd or 0) + 0.5  # forcing it on makes "Z" likely on controls
    # random experts come from the same layers and never include the top-N
    iv = res.tables["intervention"]
    top_spec = iv.filter(pl.col("experts_from") == "top")["experts"][0]
    assert top_spec.startswith("L1:E5")
    for spec in iv.filter(pl.col("experts_from") == "random")["experts"].unique().to_list():
        items = spec.split(",")
        assert len(items) == 2 and not set(items) & set(top_spec.split(","))
        assert sorted(x.split(":")[0] for x in items) == sorted(x.split(":")[0] for x in top_spec.split(","))


def test_baseline_is_the_independent_score(loop):
    """The loop's baseline equals continuation_logprob on the held-out texts, re-decoded from the run."""
    from workbench import steering as st

    mm, run, res = loop
    docs = res.meta["heldout_docs"]
    toks = run.tokens.filter(pl.col("doc_id").is_in(docs)).sort("doc_id", "pos").collect()
    by_class = {}
    for d, cls in toks.group_by("doc_id", maintain_order=True).agg(pl.col("class").first()).iter_rows():
        text = "".join(toks.filter(pl.col("doc_id") == d)["token"].to_list())
        by_class.setdefault(cls, []).append(text)
    summ = res.tables["intervention_summary"]
    for cls, texts in by_class.items():
        assert all(set(t) <= set(TRIG if cls == "target" else CTRL) for t in texts)
        base = summ.filter(pl.col("class") == cls)["baseline"][0]
        assert base == pytest.approx(st.continuation_logprob(mm, texts, [Z]), abs=1e-6)


def test_user_score_callable(loop):
    mm, run, _ = loop
    calls = []

    def score(m, prompts, interventions):
        calls.append(interventions)
        return float(len(prompts)) if interventions is None else 0.0

    res = bh.analyze(run, model=mm, intervene=1, score=score, seeds=2, permutations=0, bootstrap=0, heldout=0.25,
                     progress=False)
    summ = res.tables["intervention_summary"]
    assert set(summ["change_top"].to_list()) == {-10.0}  # 10 held-out prompts per class
    assert calls.count(None) == 2
    assert {"ban": "L1:E5"} in calls and {"zero": "L1:E5"} in calls and {"force": "L1:E5"} in calls
    assert len(calls) == 2 * (1 + 3 * 3)


def test_text_score_is_the_prompts_own_log_likelihood(loop):
    """score="text": the baseline is minus the mean token NLL of the held-out prompts (perplexity by
    another route), and an unknown score name is a one-sentence error."""
    from workbench import steering as st
    from workbench.errors import WorkbenchError

    mm, run, _ = loop
    res = bh.analyze(run, model=mm, intervene=1, score="text", seeds=1, permutations=0, bootstrap=0, heldout=0.25,
                     progress=False)
    assert res.meta["score"] == "mean log-prob per token of the prompts" and res.meta["continuations"] is None
    prompts = bh._heldout_prompts(run, mm, bh.activation_maps(run), np.isin(bh.activation_maps(run).doc_id,
                                  res.meta["heldout_docs"]), "class", None, 32)
    summ = res.tables["intervention_summary"]
    for cls, texts in prompts.items():
        base = summ.filter(pl.col("class") == cls)["baseline"][0]
        assert base == pytest.approx(-st.perplexity(mm, texts, progress=False)["nll"], abs=1e-6)
        assert base < 0
    with pytest.raises(WorkbenchError, match="unknown behaviour score"):
        bh.analyze(run, model=mm, intervene=1, score="bleu", seeds=1, permutations=0, bootstrap=0, progress=False)
