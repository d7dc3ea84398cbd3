"""[compress]: saliency criteria (hand-worked), expert choice, pruned / merged checkpoints against
independent references (the base model with a run-time ban, or a router re-implemented by hand), and
`workbench evaluate`."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from workbench.compress import merge as merge_mod
from workbench.compress import prune as prune_mod
from workbench.compress import saliency
from workbench.errors import WorkbenchError

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Der schnelle braune Fuchs springt über den faulen Hund und läuft dann weit weg.",
    "2 + 2 = 4, and 3 * 7 = 21; 12 / 4 = 3 and 9 - 5 = 4.",
]
SIZES = dict(layers=2, experts=8, top_k=2, hidden=32)


class _Run:
    """The slice of a Run the saliency functions read: hand-written tables."""

    def __init__(self, routing=None, expert_stats=None, layers=(0, 1), n_experts=4):
        self._t = {"routing": routing, "expert_stats": expert_stats}
        self.moe_layers, self.n_experts, self.path = list(layers), n_experts, "<hand>"

    def has(self, name):
        return self._t.get(name) is not None

    @property
    def routing(self):
        return self._t["routing"].lazy()

    @property
    def expert_stats(self):
        return self._t["expert_stats"].lazy()


def _score(df, layer, expert):
    return df.filter((pl.col("layer") == layer) & (pl.col("expert") == expert))["score"][0]


# ---------------------------------------------------------------------------------------------
# saliency, hand-worked


def test_frequency_counts_routed_slots():
    routing = pl.DataFrame({"layer": [0, 0, 0, 1], "experts": [[0, 1], [1, 2], [1, 0], [3, 2]]},
                           schema={"layer": pl.Int16, "experts": pl.List(pl.Int16)})
    f = saliency.frequency(_Run(routing=routing))
    assert f.height == 8  # every expert of every layer
    assert [_score(f, 0, e) for e in range(4)] == [2.0, 3.0, 1.0, 0.0]
    assert [_score(f, 1, e) for e in range(4)] == [0.0, 0.0, 1.0, 1.0]


def test_reap_is_the_mean_over_routed_tokens_of_gate_times_output_norm():
    # expert 0 of layer 0: slots (w 0.5, |f| 2) and (w 0.25, |f| 4): (1 + 1) / 2 = 1
    # expert 1: one slot (w 0.75, |f| 4): 3. Expert 2: never routed: 0. Shared expert (-1): ignored.
    # layer 1 expert 3: (0.1 * 10 + 0.3 * 1 + 0.2 * 5) / 3 = 2.3 / 3
    es = pl.DataFrame({"layer": [0, 0, 0, 0, 1, 1, 1],
                       "expert": [0, 0, 1, -1, 3, 3, 3],
                       "weight": [0.5, 0.25, 0.75, 1.0, 0.1, 0.3, 0.2],
                       "out_l2": [2.0, 4.0, 4.0, 100.0, 10.0, 1.0, 5.0]},
                      schema={"layer": pl.Int16, "expert": pl.Int16, "weight": pl.Float32, "out_l2": pl.Float32})
    r = saliency.reap(_Run(expert_stats=es))
    assert _score(r, 0, 0) == pytest.approx(1.0)
    assert _score(r, 0, 1) == pytest.approx(3.0)
    assert _score(r, 0, 2) == 0.0 and _score(r, 1, 0) == 0.0
    assert _score(r, 1, 3) == pytest.approx(2.3 / 3, rel=1e-6)
    assert -1 not in r["expert"].to_list()


def test_reap_needs_expert_stats():
    with pytest.raises(WorkbenchError, match="expert_stats"):
        saliency.reap(_Run())


def test_reap_from_the_model_equals_reap_from_expert_stats(runs, tmp_path):
    """Without expert_stats, REAP runs the experts on their routed tokens; the same numbers as the fused
    kernel's out_l2 and weight columns give."""
    from workbench.capture import capture
    from workbench.models.loading import load_model

    path, run = runs("qwen3_moe")
    mm = load_model(str(path))
    bare = capture(mm, TEXTS, tmp_path / "bare", probes=["routing"], progress=False)
    with pytest.raises(WorkbenchError, match="expert_stats"):
        saliency.scores(bare, "reap")
    got = saliency.scores(bare, "reap", model=mm, max_tokens=None)
    want = saliency.reap(run)
    assert (want["score"] > 0).sum() > 8  # most experts were reached
    assert np.allclose(got["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-4, atol=1e-7)


def test_random_scores_are_seeded():
    run = _Run(n_experts=8)
    a, b, c = saliency.random_scores(run, 3), saliency.random_scores(run, 3), saliency.random_scores(run, 4)
    assert a.equals(b) and not a.equals(c)
    assert a["score"].to_list() == np.random.default_rng(3).random(16).tolist()  # layer-major, expert order


def test_attribution_exact_is_the_loss_change_of_zeroing(tiny_dir, tmp_path):
    """The attribution criterion with exact=True equals |NLL(expert zeroed) - NLL(base)| (signed=True: the
    signed change), computed here with a plain forward per text under steer(zero=...) (float64, so batching
    and padding cannot blur it)."""
    from workbench.capture import capture
    from workbench.models.loading import load_model

    mm = load_model(str(tiny_dir("qwen3_moe", **SIZES)), dtype=torch.float64)
    run = capture(mm, TEXTS[:2], tmp_path / "run", probes=["routing"], progress=False)
    s = saliency.scores(run, "attribution", model=mm, exact=True, max_tokens=256)
    signed = saliency.scores(run, "attribution", model=mm, exact=True, max_tokens=256, signed=True)
    ids = [mm.tokenize(t) for t in TEXTS[:2]]

    def nll(zero=None):
        tot = n = 0
        with torch.inference_mode(), (mm.steer(zero=zero) if zero else torch.no_grad()):
            for x in ids:
                lg = mm.model(input_ids=torch.tensor([x])).logits[0, :-1].double()
                tot += float(torch.nn.functional.cross_entropy(lg, torch.tensor(x[1:]), reduction="sum"))
                n += len(x) - 1
        return tot / n

    base = nll()
    signs = set()
    for layer, e in [(0, 0), (1, 5), (0, 3), (1, 1), (0, 6)]:
        want = nll(f"L{layer}:E{e}") - base
        signs.add(want > 0)
        assert _score(signed, layer, e) == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert _score(s, layer, e) == pytest.approx(abs(want), rel=1e-6, abs=1e-12)
    assert signs == {True, False}  # both signs occur, so the magnitude is a different ranking


# ---------------------------------------------------------------------------------------------
# which experts go


def _scores(rows):
    return pl.DataFrame(rows, schema={"layer": pl.Int16, "expert": pl.Int16, "score": pl.Float64}, orient="row")


def test_choose_uniform_hand_worked():
    s = _scores([(0, e, v) for e, v in enumerate([5, 1, 3, 1, 9, 0, 7, 2])])
    assert prune_mod.choose(s, 0.25, 8, 2) == {0: [1, 5]}  # E5 (0), then E1 and E3 tie at 1: lower id
    assert prune_mod.choose(s, 0.25, 8, 2, protect=[(0, 5)]) == {0: [1, 3]}
    assert prune_mod.choose(s, 0.5, 8, 2) == {0: [1, 3, 5, 7]}
    with pytest.raises(WorkbenchError, match="fewer than the 4 each token uses"):
        prune_mod.choose(s, 0.75, 8, 4)
    with pytest.raises(WorkbenchError, match="not a routed expert"):
        prune_mod.choose(s, 0.25, 8, 2, protect=[(3, 1)])


def test_choose_group_limited_keeps_groups_balanced():
    # two groups of 4: the lowest two overall (E0, E1) are both in group 0; balanced removal takes one per group
    s = _scores([(1, e, v) for e, v in enumerate([0, 1, 5, 6, 3, 2, 8, 9])])
    assert prune_mod.choose(s, 0.25, 8, 2, n_group=2, topk_group=1) == {1: [0, 5]}
    with pytest.raises(WorkbenchError, match="multiple of 2"):
        prune_mod.choose(s, 0.125, 8, 2, n_group=2, topk_group=1)
    with pytest.raises(WorkbenchError, match="at least 2"):
        prune_mod.choose(s, 0.75, 8, 2, n_group=2, topk_group=2)
    with pytest.raises(WorkbenchError, match="uniform"):
        prune_mod.choose(s, 0.25, 8, 2, per_layer="global", n_group=2)


def test_choose_global_budget_hand_worked():
    # layer 0 scores sum to 8 per 4 experts (mean 2), layer 1 mean 20: after dividing by the mean |score|,
    # layer 0: [0.5, 1.5, 0.25, 1.75], layer 1: [0.05, 1.95, 1.0, 1.0]. Budget 0.5 * 4 * 2 = 4, at most 4-2 = 2
    # per layer: 0.05 (L1E0), 0.25 (L0E2), 0.5 (L0E0), then L0 is full, next 1.0 (L1E2, lower id of the tie)
    s = _scores([(0, 0, 1.0), (0, 1, 3.0), (0, 2, 0.5), (0, 3, 3.5), (1, 0, 1.0), (1, 1, 39.0), (1, 2, 20.0),
                 (1, 3, 20.0)])
    assert prune_mod.choose(s, 0.5, 4, 2, per_layer="global") == {0: [0, 2], 1: [0, 2]}
    # layer 1 mean 21: L1E0 -> 5/21 = 0.238 < L0E2's 0.25 < L0E0's 0.5; raw, L0E2 (0.5) and L0E0 (1) come first
    s2 = _scores([(0, 0, 1.0), (0, 1, 3.0), (0, 2, 0.5), (0, 3, 3.5), (1, 0, 5.0), (1, 1, 39.0), (1, 2, 20.0),
                  (1, 3, 20.0)])
    assert prune_mod.choose(s2, 0.25, 4, 2, per_layer="global") == {0: [2], 1: [0]}
    assert prune_mod.choose(s2, 0.25, 4, 2, per_layer="global", normalise=False) == {0: [0, 2], 1: []}


# ---------------------------------------------------------------------------------------------
# checkpoints against independent references


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(model_type) -> a routing + experts capture of the tiny model (cached)."""
    from workbench.capture import capture
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny

    cache = {}

    def get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(f"compress_{model_type}")
            path = make_tiny(model_type, root / "model", **SIZES)
            mm = load_model(str(path))
            run = capture(mm, TEXTS, root / "run", probes=["routing", "experts"], progress=False)
            cache[model_type] = (path, run)
        return cache[model_type]

    return get


def _ids(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    return torch.tensor([tok(t, add_special_tokens=False)["input_ids"][:40] for t in TEXTS[:2]])


def _plain(path, dtype=torch.float64):
    from transformers import AutoModelForCausalLM

    # eager experts: grouped_mm has no float64 kernel
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, experts_implementation="eager").eval()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "phimoe"])
def test_pruned_checkpoint_equals_base_with_ban(model_type, runs, tmp_path):
    """Renormalised top-k (qwen3 norm_topk_prob, mixtral), softmax over the top-k (gpt-oss) and the sparsemixer:
    the checkpoint, loaded by plain transformers, gives the base model's logits with the experts banned."""
    from workbench.models.loading import wrap_model
    from transformers import AutoTokenizer

    path, run = runs(model_type)
    _, info = prune_mod.prune(str(path), run, 0.25, "random", tmp_path / "p", seed=1, progress=False)
    assert info["equals_ban"] and info["n_experts_after"] == 6
    pruned = _plain(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert 6 in [cfg.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")]
    base = wrap_model(_plain(path), AutoTokenizer.from_pretrained(str(path)))
    ids = _ids(path)
    with torch.inference_mode():
        plain = base.model(input_ids=ids).logits
        with base.steer(ban=info["ban"]):
            banned = base.model(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
    assert (plain - banned).abs().max() > 1e-3  # the ban changes the model, so the equality says something
    assert (got - banned).abs().max() < 1e-5


def test_olmoe_pruned_differs_from_ban_by_the_renormalisation(runs, tmp_path):
    """OLMoE softmaxes over all experts and keeps the top-k probabilities as they are: a pruned checkpoint
    is not the base model with a ban; it is the base model whose router softmaxes over the kept experts only
    (re-implemented here as a router hook on the unpruned model)."""
    from transformers import AutoTokenizer

    from workbench.models.loading import wrap_model

    path, run = runs("olmoe")
    _, info = prune_mod.prune(str(path), run, 0.25, "random", tmp_path / "p", seed=1, progress=False)
    assert not info["equals_ban"] and "1/(1 - removed probability mass)" in info["exactness"]
    base = wrap_model(_plain(path), AutoTokenizer.from_pretrained(str(path)))
    ids = _ids(path)
    removed = {int(k): v["removed"] for k, v in info["layers"].items()}

    def kept_softmax(layer):
        def hook(module, args, out):
            z = out[0].float().clone()
            z[:, removed[layer]] = -torch.inf
            p = torch.softmax(z, -1)
            w, idx = torch.topk(p, base.top_k, -1)
            return out[0], w.to(out[1].dtype), idx
        return hook

    with torch.inference_mode():
        with base.steer(ban=info["ban"]):
            banned = base.model(input_ids=ids).logits
        hs = [lay.router.register_forward_hook(kept_softmax(lay.index)) for lay in base.layers]
        try:
            oracle = base.model(input_ids=ids).logits
        finally:
            for h in hs:
                h.remove()
        got = _plain(tmp_path / "p")(input_ids=ids).logits
    assert (got - oracle).abs().max() < 1e-5
    assert (got - banned).abs().max() > 1e-4  # measurably not the ban


def test_deepseek_v3_pruned_equals_ban_before_group_selection(runs, tmp_path):
    """Group-limited sigmoid routing: the same number removed per group, and the checkpoint equals the base
    router with the removed experts excluded before the group scores (a hand-written router)."""
    from transformers import AutoTokenizer

    from workbench.models.loading import wrap_model

    path, run = runs("deepseek_v3")
    _, info = prune_mod.prune(str(path), run, 0.25, "random", tmp_path / "p", seed=2, progress=False)
    base = wrap_model(_plain(path), AutoTokenizer.from_pretrained(str(path)))
    cfg = base.model.config
    for v in info["layers"].values():  # one of each group of 4
        assert sorted(e // 4 for e in v["removed"]) == [0, 1]
    removed = {int(k): v["removed"] for k, v in info["layers"].items()}

    def router(layer):
        def hook(module, args, out):
            h = args[0].reshape(-1, cfg.hidden_size)
            logits = torch.nn.functional.linear(h.float(), module.weight.float())
            scores = logits.sigmoid()
            choice = scores + module.e_score_correction_bias
            choice[:, removed[layer]] = -torch.inf
            t, e = choice.shape
            gs = choice.view(t, cfg.n_group, e // cfg.n_group).topk(2, -1)[0].sum(-1)
            gmask = torch.zeros_like(gs).scatter_(1, gs.topk(cfg.topk_group, -1)[1], 1)
            smask = gmask[:, :, None].expand(-1, -1, e // cfg.n_group).reshape(t, e).bool()
            idx = choice.masked_fill(~smask, -torch.inf).topk(cfg.num_experts_per_tok, -1)[1]
            w = scores.gather(1, idx)
            w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
            return logits, w, idx
        return hook

    ids = _ids(path)
    with torch.inference_mode():
        hs = [lay.router.register_forward_hook(router(lay.index)) for lay in base.layers]
        try:
            oracle = base.model(input_ids=ids).logits
        finally:
            for h in hs:
                h.remove()
        plain = base.model(input_ids=ids).logits
        got = _plain(tmp_path / "p")(input_ids=ids).logits
    assert (plain - oracle).abs().max() > 1e-4
    assert (got - oracle).abs().max() < 1e-5


def test_global_budget_bans_what_one_expert_count_cannot_hold(runs, tmp_path):
    """Non-uniform removal: the checkpoint drops as many experts as the least-pruned layer loses, and
    ban_after_load on the checkpoint completes the plan: equal to the base model with the full ban."""
    from transformers import AutoTokenizer

    from workbench.models.loading import wrap_model

    path, run = runs("qwen3_moe")
    _, info = prune_mod.prune(str(path), run, 0.25, "frequency", tmp_path / "p", per_layer="global", progress=False)
    counts = [len(v["removed"]) for v in info["layers"].values()]
    assert sum(counts) == 4 and info["n_experts_after"] == 8 - min(counts)
    tok = AutoTokenizer.from_pretrained(str(path))
    base = wrap_model(_plain(path), tok)
    pruned = wrap_model(_plain(tmp_path / "p"), tok)
    ids = _ids(path)
    with torch.inference_mode():
        with base.steer(ban=info["ban"]):
            want = base.model(input_ids=ids).logits
        with pruned.steer(ban=info["ban_after_load"] or None):
            got = pruned.model(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-5


def test_protect_super_experts_and_refusals(runs, tmp_path):
    path, run = runs("qwen3_moe")
    ses = prune_mod.super_experts(run)
    assert ses  # a random tiny model's top expert passes the rule (the analysis notes why)
    _, info = prune_mod.prune(str(path), run, 0.5, "reap", None, protect="super-experts,L1:E0", progress=False)
    removed = {(int(k), e) for k, v in info["layers"].items() for e in v["removed"]}
    assert not removed & (set(ses) | {(1, 0)})
    assert info["protected"]
    with pytest.raises(WorkbenchError, match="fewer than the 2 each token uses"):
        prune_mod.prune(str(path), run, 0.9, "reap", None, progress=False)


# ---------------------------------------------------------------------------------------------
# merging


def test_group_hand_worked():
    freq = np.array([10.0, 1.0, 8.0, 2.0])
    sim = np.array([[1, .1, .2, .9], [.1, 1, .7, .3], [.2, .7, 1, .4], [.9, .3, .4, 1]])
    assert merge_mod.group(freq, sim, 2) == [[0, 3], [2, 1]]  # dominants E0, E2 (most frequent)
    assert merge_mod.group(freq, sim, 2, protect={3}) == [[0, 1, 2], [3]]  # E3 protected: dominant, absorbs nobody


def test_merged_checkpoint_is_the_frequency_weighted_average(runs, tmp_path):
    """Each merged expert is sum f_i W_i / sum f_i over its group (f = routed slots in the run), read back
    through plain transformers; router rows: the dominant's, or the same weighted average."""
    path, run = runs("qwen3_moe")
    _, info = merge_mod.merge(str(path), run, 0.5, "weight", "dominant", tmp_path / "m", progress=False)
    _, info_avg = merge_mod.merge(str(path), run, 0.5, "weight", "average", tmp_path / "a", progress=False)
    base, got, avg = _plain(path), _plain(tmp_path / "m"), _plain(tmp_path / "a")
    freq = saliency.frequency(run)
    assert got.config.num_experts == 4 and info_avg["router"] == "average"
    for layer in (0, 1):
        groups = info["layers"][str(layer)]["groups"]
        assert sorted(e for g in groups for e in g) == list(range(8))
        b, m, a = (x.model.layers[layer].mlp for x in (base, got, avg))
        for i, g in enumerate(groups):
            f = np.array([_score(freq, layer, e) for e in g])
            assert g[0] == max(g, key=lambda e: (_score(freq, layer, e), -e))  # the dominant is the most frequent
            w = f / f.sum() if f.sum() else np.full(len(g), 1 / len(g))
            for name in ("gate_up_proj", "down_proj"):
                want = sum(float(wi) * getattr(b.experts, name)[e] for wi, e in zip(w, g))
                assert torch.allclose(getattr(m.experts, name)[i], want, atol=1e-6)
            assert torch.equal(m.gate.weight[i], b.gate.weight[g[0]])
            want_row = sum(float(wi) * b.gate.weight[e] for wi, e in zip(w, g))
            assert torch.allclose(a.gate.weight[i], want_row, atol=1e-6)


def test_merge_output_similarity_runs_the_experts(runs, tmp_path):
    """The HC-SMoE feature is each expert's mean output over the calibration tokens: checked against the
    SwiGLU expert written out by hand for one expert."""
    from workbench.models.loading import load_model

    path, run = runs("qwen3_moe")
    mm = load_model(str(path))
    lay = mm.layers[0]
    h = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    feats = merge_mod.output_features(mm, lay, h)
    gu, dn = lay.experts.gate_up_proj[3].double(), lay.experts.down_proj[3].double()
    g, u = (h.double() @ gu.T).chunk(2, -1)
    want = ((torch.nn.functional.silu(g) * u) @ dn.T).mean(0)
    assert torch.allclose(feats[3], want, atol=1e-5)
    _, info = merge_mod.merge(mm, run, 0.25, "output", "dominant", None, progress=False)
    assert info["n_experts_after"] == 6 and info["calibration_tokens"] > 0


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_against_a_hand_computed_reference(runs, tmp_path):
    """ppl from the logits by hand; a model against itself agrees fully; a pruned model's routing overlap and
    removed mass equal what the base routing (traced here) says about the removed experts."""
    from workbench.compress.evaluate import evaluate
    from workbench.models.loading import load_model

    path, run = runs("qwen3_moe")
    prune_mod.prune(str(path), run, 0.25, "frequency", tmp_path / "p", progress=False)
    info = json.loads((tmp_path / "p" / "pruning.json").read_text())
    res = evaluate([str(path), str(path), str(tmp_path / "p")], TEXTS, max_tokens=None, seq_len=None,
                   batch_size=1, progress=False)
    t = res.tables["models"]
    mm = load_model(str(path))
    nll = n = 0
    sel = {0: [], 1: []}
    wts = {0: [], 1: []}
    def rec(i):
        def hook(module, args, out):
            sel[i].append(out[2])
            wts[i].append(out[1])
        return hook

    hs = [lay.router.register_forward_hook(rec(lay.index)) for lay in mm.layers]
    with torch.inference_mode():
        for text in TEXTS:
            x = mm.tokenize(text)
            lg = mm.model(input_ids=torch.tensor([x])).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(lg, torch.tensor(x[1:]), reduction="sum"))
            n += len(x) - 1
    for h in hs:
        h.remove()
    assert t["ppl"][0] == pytest.approx(math.exp(nll / n), rel=1e-6) and t["tokens"][0] == n
    assert t["agreement"][1] == 1.0 and t["kl"][1] == pytest.approx(0, abs=1e-6) and t["overlap"][1] == 1.0
    ov, mass = [], []
    for layer in (0, 1):
        gone = set(info["layers"][str(layer)]["removed"])
        s, w = torch.cat(sel[layer]), torch.cat(wts[layer]).double()
        hit = torch.tensor([[int(e) in gone for e in row] for row in s.tolist()])
        ov.append(float((1 - hit.double().mean(1)).mean()))  # a kept expert stays in the top-k once others go
        mass.append(float(((w * hit).sum(1) / w.sum(1)).mean()))
    per = res.tables["layers"].filter(pl.col("model") == str(tmp_path / "p")).sort("layer")
    # the first MoE layer sees the same input: exactly the kept share of the base's choice; later layers'
    # routing also moves with the changed residual stream
    assert per["overlap"][0] == pytest.approx(ov[0], abs=1e-9)
    assert per["overlap"][1] != pytest.approx(1.0)
    assert per["removed_mass"].to_list() == pytest.approx(mass, abs=1e-6)  # reference routing only
    assert t["removed_mass"][2] == pytest.approx(np.mean(mass), abs=1e-6)
    assert t["agreement"][2] < 1.0 and t["kl"][2] > 0


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_prune_evaluate_and_errors(runs, tmp_path, capsys):
    from workbench.cli import main

    path, run = runs("qwen3_moe")
    out = tmp_path / "cli"
    assert main(["prune", str(path), "--run", str(run.path), "--ratio", "0.25", "--by", "frequency",
                 "--out", str(out)]) == 0
    o = capsys.readouterr().out
    assert "pruned 2 of 8 experts per layer" in o and "exact:" in o
    info = json.loads((out / "pruning.json").read_text())
    assert info["criterion"] == "frequency" and info["ban"].count("L") == 4
    assert main(["prune", str(path), "--run", str(run.path), "--ratio", "0.25", "--out", str(out)]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["prune", str(path), "--run", str(run.path), "--ratio", "1.5", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and len(err.strip().splitlines()) == 1
    assert main(["prune", str(path), "--run", str(run.path), "--ratio", "0.9", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "fewer than the 2 each token uses" in err and "Traceback" not in err
    assert main(["prune", str(path), "--run", str(tmp_path / "nope"), "--ratio", "0.25", "--out",
                 str(tmp_path / "z")]) == 2
    capsys.readouterr()
    data = tmp_path / "held.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    assert main(["evaluate", str(path), str(out), "--data", str(data), "--out", str(tmp_path / "e.csv")]) == 0
    assert pl.read_csv(tmp_path / "e.csv").height == 2
    assert main(["merge", str(path), "--run", str(run.path), "--ratio", "0.5", "--similarity", "weight",
                 "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "merging.json").exists()
