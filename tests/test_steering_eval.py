"""workbench.steering: compare, perplexity, continuation log-probability, random controls, the CLI.

Truths: token-by-token recomputation with unbatched forwards, plain `generate` calls, and weight
surgery (an expert whose down_proj is zeroed in a copy of the model) for the intervention path.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.steering import compare, continuation_logprob, continuation_logprobs, perplexity, \
    random_experts_like, render

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "x",
         "Der schnelle braune Fuchs springt über den faulen Hund."]


def _nll_one(model, ids):
    """Mean next-token NLL of one unpadded sequence, via log_softmax and explicit indexing."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    return [-float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def _zeroed_copy(mm, layer, expert):
    from workbench.models.loading import find_moe_layers

    model = copy.deepcopy(mm.model)
    _, _, layers = find_moe_layers(model, mm.family)
    with torch.no_grad():
        next(x for x in layers if x.index == layer).experts.down_proj[expert].zero_()
    return model


# ------------------------------------------------------------------------------------------------
# perplexity


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_perplexity_matches_unbatched_recomputation(tiny_model, family):
    mm = tiny_model(family)
    res = perplexity(mm, TEXTS, batch_size=3, progress=False)
    per_doc = {}
    for i, t in enumerate(TEXTS):
        ids = mm.tokenize(t)
        if len(ids) >= 2:
            per_doc[i] = _nll_one(mm.model, ids)
    assert [p["doc_id"] for p in res["per_text"]] == sorted(per_doc)  # "x" has one token: nothing to predict
    allnll = [x for v in per_doc.values() for x in v]
    assert res["tokens"] == len(allnll)
    assert res["ppl"] == pytest.approx(math.exp(np.mean(allnll)), rel=1e-5)
    assert res["ppl_seq_mean"] == pytest.approx(math.exp(np.mean([np.mean(v) for v in per_doc.values()])), rel=1e-5)
    for p in res["per_text"]:
        assert p["tokens"] == len(per_doc[p["doc_id"]])
        assert p["nll"] == pytest.approx(np.mean(per_doc[p["doc_id"]]), rel=1e-5)


def test_perplexity_packed_chunks(tiny_model):
    mm = tiny_model("olmoe")
    eos = mm.tokenizer.eos_token_id
    stream = [x for t in TEXTS for x in mm.tokenize(t) + [eos]]
    chunks = [stream[i:i + 16] for i in range(0, len(stream), 16)]
    want = [x for c in chunks if len(c) >= 2 for x in _nll_one(mm.model, c)]
    res = perplexity(mm, TEXTS, seq_len=16, batch_size=4, progress=False)
    assert res["sequences"] == sum(len(c) >= 2 for c in chunks)
    assert res["tokens"] == len(want)
    assert res["nll"] == pytest.approx(np.mean(want), rel=1e-5)


def test_perplexity_under_zero_equals_weight_surgery(tiny_model):
    mm = tiny_model("mixtral")
    res = perplexity(mm, TEXTS, interventions={"zero": "L2:E3"}, progress=False)
    surgery = copy.copy(mm)
    surgery.model = _zeroed_copy(mm, 2, 3)
    want = perplexity(surgery, TEXTS, progress=False)
    base = perplexity(mm, TEXTS, progress=False)
    assert res["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert res["nll"] != base["nll"]
    assert res["interventions"] == {"zero": ["L2:E3"]}


def test_perplexity_errors(tiny_model):
    mm = tiny_model("mixtral")
    with pytest.raises(WorkbenchError, match="nothing to predict"):
        perplexity(mm, ["x", ""], progress=False)
    with pytest.raises(WorkbenchError, match="unknown intervention 'mute'"):
        perplexity(mm, TEXTS, interventions={"mute": "L1:E1"}, progress=False)


# ------------------------------------------------------------------------------------------------
# continuation log-probability


def test_continuation_logprobs_match_token_by_token(tiny_model):
    mm = tiny_model("qwen3_moe")
    prompts, conts = ["Hello there,", "Question: why?"], [" I cannot", " Sure", "!"]
    df = continuation_logprobs(mm, prompts, conts, batch_size=4)
    assert df.height == 6
    for r in df.iter_rows(named=True):
        pid, cid = mm.tokenize(prompts[r["prompt"]]), mm.tokenize(conts[r["continuation"]])
        nll = _nll_one(mm.model, pid + cid)
        assert r["logprob"] == pytest.approx(-sum(nll[len(pid) - 1:]), rel=1e-5)
        assert r["tokens"] == len(cid)
    score = continuation_logprob(mm, prompts, conts)
    per_prompt = [np.logaddexp.reduce(df.filter(pl.col("prompt") == i)["logprob"].to_numpy()) for i in range(2)]
    assert score == pytest.approx(np.mean(per_prompt), rel=1e-9)


def test_continuation_sets_per_prompt_and_interventions(tiny_model):
    mm = tiny_model("granitemoe")
    df = continuation_logprobs(mm, ["a", "b"], [[" x"], [" y", " z"]])
    assert df.select("prompt", "continuation").rows() == [(0, 0), (1, 0), (1, 1)]
    with pytest.raises(WorkbenchError, match="2 continuation sets for 3 prompts"):
        continuation_logprobs(mm, ["a", "b", "c"], [[" x"], [" y"]])
    base = continuation_logprob(mm, ["The cat"], [" sat"])
    forced = continuation_logprob(mm, ["The cat"], [" sat"], interventions={"force": "L1:E5,L2:E5"})
    assert base != forced
    with mm.steer(force="L1:E5,L2:E5"):
        assert continuation_logprob(mm, ["The cat"], [" sat"]) == forced


# ------------------------------------------------------------------------------------------------
# random controls


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([1, 2, 3]), st.integers(-1, 7)), min_size=1, max_size=10),
       st.integers(0, 10_000))
def test_random_experts_like_properties(tiny_model, experts, seed):
    mm = tiny_model("deepseek_v2")  # MoE layers 1-3, 8 routed experts and a shared one
    uniq = list(dict.fromkeys(experts))
    per_layer = Counter(layer for layer, _ in uniq)
    if any(n > 8 - sum(1 for lyr, e in uniq if lyr == layer and e >= 0) for layer, n in per_layer.items()):
        with pytest.raises(WorkbenchError, match="cannot draw"):
            random_experts_like(mm, experts, seed=seed)
        return
    out = random_experts_like(mm, experts, seed=seed)
    assert Counter(layer for layer, _ in out) == per_layer
    assert not set(out) & set(uniq)
    assert all(0 <= e < 8 for _, e in out) and len(set(out)) == len(out)
    assert out == random_experts_like(mm, format_spec_(uniq), seed=seed)  # same seed, same draw


def format_spec_(xs):
    return ",".join(f"L{a}:E{b}" for a, b in xs)


def test_random_experts_like_is_uniform_and_seeded(tiny_model):
    mm = tiny_model("mixtral")
    draws = Counter()
    for seed in range(400):
        draws.update(e for _, e in random_experts_like(mm, "L1:E0", seed=seed))
    assert set(draws) == set(range(1, 8))
    assert max(draws.values()) - min(draws.values()) < 0.3 * 400 / 7 * 2
    assert len({tuple(random_experts_like(mm, "L1:E0,L3:E2", n_per_layer=3, seed=s)) for s in range(10)}) > 1
    assert len(random_experts_like(mm, "L1:E0,L3:E2", n_per_layer=3)) == 6


# ------------------------------------------------------------------------------------------------
# compare


def _greedy(mm, prompt, n):
    ids = torch.tensor([mm.tokenize(prompt)])
    with torch.no_grad():
        out = mm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                pad_token_id=mm.tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "phimoe"])
def test_compare_against_plain_generation(tiny_model, family):
    mm = tiny_model(family)
    layer = mm.moe_layers[0]
    prompt = "The quick brown fox"
    base_route = {}

    def keep(module, args, out):
        base_route.setdefault("idx", out[2].clone())

    h = mm.layer(layer).router.register_forward_hook(keep)
    try:
        with torch.no_grad():
            mm.model(input_ids=torch.tensor([mm.tokenize(prompt)]))
    finally:
        h.remove()
    e = int(base_route["idx"][:, 0].mode().values)
    res = compare(mm, prompt, {"ban": f"L{layer}:E{e}"}, max_new_tokens=6)
    assert res.baseline_ids == _greedy(mm, prompt, 6)
    with mm.steer(ban=[(layer, e)]):
        assert res.steered_ids == _greedy(mm, prompt, 6)
    assert len(res.kl) == len(res.baseline_ids) and all(k >= 0 for k in res.kl)
    # KL at step 0 from two prompt-only forwards
    pid = torch.tensor([mm.tokenize(prompt)])
    with torch.no_grad():
        lb = torch.log_softmax(mm.model(input_ids=pid).logits[0, -1].double(), -1)
        with mm.steer(ban=[(layer, e)]):
            ls = torch.log_softmax(mm.model(input_ids=pid).logits[0, -1].double(), -1)
    assert res.kl[0] == pytest.approx(float((lb.exp() * (lb - ls)).sum()), rel=1e-3, abs=1e-7)
    ch = res.routing_changes
    assert ch.filter(pl.col("layer") < layer).height == 0
    first = ch.filter(pl.col("layer") == layer)
    hit_pos = (base_route["idx"] == e).any(-1).nonzero().flatten().tolist()
    assert first.filter(pl.col("part") == "prompt")["pos"].to_list() == hit_pos
    assert all(e in b and e not in s for b, s in zip(first["baseline_experts"].to_list(),
                                                      first["steered_experts"].to_list()))
    text = render(res, model="tiny")
    assert "baseline:" in text and "steered:" in text and "routing:" in text
    json.dumps(res.to_json())


def test_compare_noop_scale_is_identical(tiny_model):
    mm = tiny_model("olmoe")
    res = compare(mm, "abc", {"scale": {"L1:E1": 1.0}}, max_new_tokens=4)
    assert res.baseline_ids == res.steered_ids and res.first_divergence is None
    assert res.kl == [0.0] * 4 and res.routing_changes.height == 0


def test_compare_sampling_is_seeded(tiny_model):
    mm = tiny_model("qwen3_moe")
    a = compare(mm, "Hello", {"zero": "L1:E0"}, max_new_tokens=8, sample=True, seed=3, temperature=1.5)
    b = compare(mm, "Hello", {"zero": "L1:E0"}, max_new_tokens=8, sample=True, seed=3, temperature=1.5)
    assert a.baseline_ids == b.baseline_ids and a.steered_ids == b.steered_ids
    c = compare(mm, "Hello", {"zero": "L1:E0"}, max_new_tokens=8, sample=True, seed=4, temperature=1.5)
    greedy = compare(mm, "Hello", {"zero": "L1:E0"}, max_new_tokens=8)
    assert c.baseline_ids != a.baseline_ids or a.baseline_ids != greedy.baseline_ids


def test_compare_errors(tiny_model):
    mm = tiny_model("mixtral")
    with pytest.raises(WorkbenchError, match="the prompt is empty"):
        compare(mm, "", {"ban": "L1:E1"})
    with pytest.raises(WorkbenchError, match="layer 7 in --force does not exist"):
        compare(mm, "a", {"force": "L7:E1"})


# ------------------------------------------------------------------------------------------------
# CLI


def test_cli_steer_text_and_json(tiny_dir, capsys):
    d = str(tiny_dir("mixtral"))
    assert main(["steer", d, "--prompt", "The cat", "--ban", "L1:E0,L2:E1", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "interventions: ban L1:E0,L2:E1" in out and "KL(base||steered)" in out and "routing:" in out
    assert main(["steer", d, "--prompt", "The cat", "--boost", "L1:E0=2", "--max-new-tokens", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["interventions"] == {"boost": {"L1:E0": 2.0}} and len(res["kl"]) == 3


@pytest.mark.parametrize("args,msg", [
    (["--ban", "L1:E99"], "expert 99 in --ban is out of range"),
    (["--zero", "L1-E2"], "--zero: malformed expert 'L1-E2'"),  # refused by the parser, before the model loads
    ([], "give at least one intervention"),
])
def test_cli_steer_errors(tiny_dir, capsys, args, msg):
    assert main(["steer", str(tiny_dir("mixtral")), "--prompt", "x", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_cli_capture_records_interventions(tiny_dir, tmp_path, capsys):
    from workbench import open_run

    data = tmp_path / "d.txt"
    data.write_text("hello world\nthe cat sat\n")
    rc = main(["capture", str(tiny_dir("qwen2_moe")), "--data", str(data), "--out", str(tmp_path / "run"),
               "--ban", "L1:E2", "--zero", "L2:E-1", "--scale", "L3:E0=0.5", "--no-progress"])
    assert rc == 0
    run = open_run(tmp_path / "run")
    assert run.manifest["interventions"] == {"ban": ["L1:E2"], "zero": ["L2:E-1"], "scale": {"L3:E0": 0.5}}
    routing = run.routing.collect().filter(pl.col("layer") == 1)
    assert not routing["experts"].list.contains(2).any()


def test_seeded_generation_leaves_the_callers_random_stream_alone(tiny_model, tmp_path):
    """Sampling with a seed (steering, generation capture) and building a tiny model used to reset the
    global torch RNG: a notebook's next torch.rand after them was always the same."""
    import workbench as wb
    from workbench.models.tiny import make_tiny

    mm = tiny_model("qwen3_moe")
    torch.manual_seed(1234)
    want = torch.rand(4)
    calls = [lambda: compare(mm, "Hello", {"zero": "L1:E0"}, max_new_tokens=4, sample=True, seed=3),
             lambda: wb.capture_generate(mm, ["Hi there"], tmp_path / "g", max_new_tokens=3, do_sample=True,
                                         progress=False, overwrite=True),
             lambda: make_tiny("mixtral", tmp_path / "t", seed=5)]
    for call in calls:
        torch.manual_seed(1234)
        call()
        assert torch.equal(torch.rand(4), want)
