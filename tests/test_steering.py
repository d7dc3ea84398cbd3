"""Interventions on the nine families' tiny models, prefill and generate.

Independent truths used here:
- a plain-Python/numpy reference router (per token, float64, sorted lists) written from the family
  rules, applied to the logits the capture recorded;
- transformers' own router outputs (the redone rule with no intervention must match bit for bit)
  and PhiMoE's own `sparsemixer` run on the logits with the banned expert's column deleted;
- weight surgery: zeroing / halving an expert's down_proj in a copy of the model must give the same
  logits as the zero / scale hooks.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import polars as pl
import pytest
import torch

from workbench import capture, capture_generate
from workbench.errors import WorkbenchError
from workbench.probes.interventions import active_plan, route, router_params, steer

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"]
RENORM_OR_MASK = [f for f in FAMILIES if f != "phimoe"]  # families where a ban leaves other tokens bit-identical

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Der schnelle braune Fuchs springt über den faulen Hund.", "2 + 2 = 4, and 3 * 7 = 21."]


# ------------------------------------------------------------------------------------------------
# reference router (independent of probes/interventions.py)


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _cfg(mm, name, default):
    v = getattr(mm.model.config, name, None)
    return default if v is None else v


def reference_route(mm, layer, z, ban=(), force=()):
    """Expected {expert: weight} of one token from its logits z [E] under ban/force, per the family rule."""
    mt = mm.model.config.model_type
    k, n = mm.top_k, len(z)
    z = np.asarray(z, np.float64)
    ban, force = set(ban), list(force)

    def pick(score, allowed):
        cands = [e for e in allowed if e not in ban]
        cands.sort(key=lambda e: (e not in force, -score[e]))
        return cands[:k]

    if mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        p = _softmax(z)
        sel = pick(p, range(n))
        w = p[sel]
        if mt == "mixtral" or _cfg(mm, "norm_topk_prob", False):
            w = w / w.sum()
    elif mt in ("gpt_oss", "granitemoe"):
        sel = pick(z, range(n))
        w = _softmax(z[sel])
    elif mt == "deepseek_v2":
        p = _softmax(z)
        if _cfg(mm, "topk_method", "greedy") == "group_limited_greedy":
            sel = _grouped(p, k, mm, ban, force, lambda g: max(g))
        else:
            sel = pick(p, range(n))
        w = p[sel] * _cfg(mm, "routed_scaling_factor", 1.0)
    elif mt == "deepseek_v3":
        s = 1 / (1 + np.exp(-z))
        bias = mm.layer(layer).router.e_score_correction_bias.double().numpy()
        sel = _grouped(s + bias, k, mm, ban, force, lambda g: sum(sorted(g, reverse=True)[:2]))
        w = s[sel]
        if _cfg(mm, "norm_topk_prob", False):
            w = w / (w.sum() + 1e-20)
        w = w * _cfg(mm, "routed_scaling_factor", 1.0)
    else:
        raise AssertionError(mt)
    return dict(zip(sel, w.tolist()))


def _grouped(score, k, mm, ban, force, gscore):
    """Group-limited choice: groups by their score (forced experts' groups first), ban after grouping;
    if the chosen groups keep fewer than k, groups again without the banned, then no group limit."""
    n = len(score)
    g, tg = int(_cfg(mm, "n_group", 1)), int(_cfg(mm, "topk_group", 1))
    size = n // g

    def groups(excl):
        gs = []
        for gi in range(g):
            members = [e for e in range(gi * size, (gi + 1) * size) if e not in excl]
            forced = any(e in force for e in members)
            if len(members) < (2 if gscore([1, 1, 1]) == 2 else 1):
                val = -math.inf
            else:
                val = gscore([score[e] for e in members])
            gs.append((not forced, -val, gi))
        return {gi for _, _, gi in sorted(gs)[:tg]}

    def cands(chosen):
        return [e for e in range(n) if (e // size in chosen or e in force) and e not in ban]

    c = cands(groups(set()))
    if len(c) < k:
        c = cands(groups(ban))
        if len(c) < k:
            c = [e for e in range(n) if e not in ban]
    c.sort(key=lambda e: (e not in force, -score[e]))
    return c[:k]


def phimoe_reference_ban(z, banned):
    """PhiMoE with the banned experts removed: transformers' own sparsemixer on the other columns."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    keep = [e for e in range(len(z)) if e not in banned]
    w, idx = sparsemixer(torch.tensor([list(np.asarray(z)[keep])], dtype=torch.float32), jitter_eps=0.01,
                         training=False)
    return {keep[i]: float(x) for i, x in zip(idx[0].tolist(), w[0].tolist())}


# ------------------------------------------------------------------------------------------------
# helpers


def routes(mm, tmp_path, name, interventions=None, logits=True):
    run = capture(mm, TEXTS, tmp_path / name, logits=logits, batch_size=2, interventions=interventions,
                  progress=False)
    return run, run.routing.collect().sort("doc_id", "pos", "layer")


def gen_routes(mm, tmp_path, name, interventions=None, n=6):
    run = capture_generate(mm, TEXTS[:2], tmp_path / name, max_new_tokens=n, logits=True,
                           interventions=interventions, progress=False)
    tok = run.tokens.collect()
    return run, run.routing.collect().join(tok.select("doc_id", "pos", "phase"), on=["doc_id", "pos"]) \
        .sort("doc_id", "pos", "layer")


def top_expert(df, layer):
    counts = df.filter(pl.col("layer") == layer).explode("experts").group_by("experts").len().sort(
        ["len", "experts"], descending=[True, False])
    return int(counts["experts"][0])


def selected(df, layer, expert):
    return df.filter(pl.col("layer") == layer).with_columns(
        hit=pl.col("experts").list.contains(expert))["hit"].to_list()


def assert_rows_match_reference(mm, df, layer, ban=(), force=(), tol=2e-5):
    rows = df.filter(pl.col("layer") == layer).iter_rows(named=True)
    n = 0
    for r in rows:
        got = dict(zip(r["experts"], r["weights"]))
        if mm.model.config.model_type == "phimoe":
            exp = phimoe_reference_ban(r["logits"], set(ban))
        else:
            exp = reference_route(mm, layer, r["logits"], ban, force)
        assert set(got) == set(exp), (r["doc_id"], r["pos"], got, exp)
        for e in got:
            assert got[e] == pytest.approx(exp[e], rel=tol, abs=1e-7)
        n += 1
    assert n > 0


# ------------------------------------------------------------------------------------------------
# the redone rule is the model's rule


def _router_outputs(mm, ids):
    seen, hs = {}, []
    for layer in mm.layers:
        hs.append(layer.router.register_forward_hook(lambda m, a, o, i=layer.index: seen.__setitem__(i, o)))
    try:
        with torch.no_grad():
            mm.model(input_ids=ids)
    finally:
        for h in hs:
            h.remove()
    return seen


def _variant(model_type, **overrides):
    """An in-memory tiny model with config overrides (e.g. group-limited DeepSeek routing)."""
    from transformers import AutoModelForCausalLM

    from workbench.models.loading import wrap_model
    from workbench.models.tiny import _spread_router, byte_tokenizer, tiny_config

    cfg = tiny_config(model_type, layers=3, experts=16, top_k=3 if model_type != "phimoe" else 2)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    _spread_router(model, 3)
    return wrap_model(model, byte_tokenizer())


VARIANTS = {
    "deepseek_v2_group": ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
    "deepseek_v3_4groups": ("deepseek_v3", {"n_group": 4, "topk_group": 2, "norm_topk_prob": False}),
    "qwen3_no_norm": ("qwen3_moe", {"norm_topk_prob": False}),
    "olmoe_norm": ("olmoe", {"norm_topk_prob": True}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_redone_rule_equals_router_bit_for_bit(tiny_model, family):
    mm = tiny_model(family)
    ids = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(1))
    for index, out in _router_outputs(mm, ids).items():
        _, w, idx = route(router_params(mm, mm.layer(index)), out[0])
        assert torch.equal(idx, out[2]), (family, index)
        assert torch.equal(w.to(out[1].dtype), out[1]), (family, index)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_redone_rule_equals_router_for_config_variants(variant):
    mt, over = VARIANTS[variant]
    mm = _variant(mt, **over)
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(2))
    for index, out in _router_outputs(mm, ids).items():
        _, w, idx = route(router_params(mm, mm.layer(index)), out[0])
        # sorted=False top-k: compare as expert -> weight maps
        for t in range(idx.shape[0]):
            got = dict(zip(idx[t].tolist(), w[t].tolist()))
            exp = dict(zip(out[2][t].tolist(), out[1][t].tolist()))
            assert got == exp, (variant, index, t)


# ------------------------------------------------------------------------------------------------
# ban


@pytest.mark.parametrize("family", FAMILIES)
def test_ban_prefill(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[1]
    e = top_expert(base, layer)
    assert any(selected(base, layer, e))
    run, st = routes(mm, tmp_path, "ban", {"ban": f"L{layer}:E{e}"})
    assert run.manifest["interventions"] == {"ban": [f"L{layer}:E{e}"]}
    assert not any(selected(st, layer, e))
    assert_rows_match_reference(mm, st, layer, ban=[e])
    # layers before the banned one see unchanged inputs: identical routing
    for lyr in mm.moe_layers[:1]:
        a, b = base.filter(pl.col("layer") == lyr), st.filter(pl.col("layer") == lyr)
        assert a.select("experts", "weights").equals(b.select("experts", "weights"))
    # other layers are unaffected as routers: the expert is still used there
    assert any(selected(st, mm.moe_layers[0], top_expert(base, mm.moe_layers[0])))


@pytest.mark.parametrize("family", RENORM_OR_MASK)
def test_ban_leaves_other_tokens_bit_identical(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[1]
    e = top_expert(base, layer)
    _, st = routes(mm, tmp_path, "ban", {"ban": [(layer, e)]})
    a, b = base.filter(pl.col("layer") == layer), st.filter(pl.col("layer") == layer)
    hit = selected(base, layer, e)
    untouched = [i for i, h in enumerate(hit) if not h]
    assert untouched and any(hit)
    for i in untouched:
        assert a["experts"][i].to_list() == b["experts"][i].to_list()
        assert a["weights"][i].to_list() == b["weights"][i].to_list()  # exact float32 equality
    for i in [i for i, h in enumerate(hit) if h]:
        assert a["experts"][i].to_list() != b["experts"][i].to_list()


def test_deepseek_v3_ban_beats_positive_correction_bias(tmp_path):
    """A -inf logit does not ban a DeepSeek-V3 expert (sigmoid(-inf) + bias > 0); the ban must."""
    mm = _variant("deepseek_v3", n_group=4, topk_group=2)
    layer = mm.moe_layers[0]
    router = mm.layer(layer).router
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[5] = 5.0  # expert 5 always wins on the choice score
    _, base = routes(mm, tmp_path, "base")
    assert all(selected(base, layer, 5))
    _, st = routes(mm, tmp_path, "ban", {"ban": f"L{layer}:E5"})
    assert not any(selected(st, layer, 5))
    assert_rows_match_reference(mm, st, layer, ban=[5])


def test_deepseek_group_ban_emptying_groups_falls_back(tmp_path):
    """Banning most of a group: replacements still come from the rule and the ban always holds."""
    mm = _variant("deepseek_v3", n_group=4, topk_group=1)
    layer = mm.moe_layers[0]
    banned = [(layer, e) for e in range(0, 13)]  # leaves 13, 14, 15 (group 3) for top-3
    _, st = routes(mm, tmp_path, "ban", {"ban": banned})
    rows = st.filter(pl.col("layer") == layer)
    assert all(sorted(x) == [13, 14, 15] for x in rows["experts"].to_list())
    assert_rows_match_reference(mm, st, layer, ban=[e for _, e in banned])


@pytest.mark.parametrize("variant", ["deepseek_v2_group", "deepseek_v3_4groups"])
def test_ban_and_force_grouped_variants(tmp_path, variant):
    mt, over = VARIANTS[variant]
    mm = _variant(mt, **over)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[0]
    e = top_expert(base, layer)
    _, st = routes(mm, tmp_path, "ban", {"ban": [(layer, e)]})
    assert not any(selected(st, layer, e))
    assert_rows_match_reference(mm, st, layer, ban=[e])
    f = 15 if e != 15 else 0
    _, fo = routes(mm, tmp_path, "force", {"force": [(layer, f)]})
    assert all(selected(fo, layer, f))
    assert_rows_match_reference(mm, fo, layer, force=[f])


# ------------------------------------------------------------------------------------------------
# force


@pytest.mark.parametrize("family", FAMILIES)
def test_force_prefill(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[-1]
    counts = base.filter(pl.col("layer") == layer).explode("experts").group_by("experts").len()
    rare = min(range(mm.n_experts), key=lambda x: (dict(counts.iter_rows()).get(x, 0), x))
    assert not all(selected(base, layer, rare))
    _, st = routes(mm, tmp_path, "force", {"force": f"L{layer}:E{rare}"})
    assert all(selected(st, layer, rare))
    if family == "phimoe":
        w = [dict(zip(r["experts"], r["weights"]))[rare] for r in st.filter(pl.col("layer") == layer).iter_rows(
            named=True)]
        assert all(0 < x <= 1 for x in w)
    else:
        assert_rows_match_reference(mm, st, layer, force=[rare])


# ------------------------------------------------------------------------------------------------
# boost


@pytest.mark.parametrize("family", FAMILIES)
def test_boost_adds_lambda_std_and_routes_on_it(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[0]
    counts = dict(base.filter(pl.col("layer") == layer).explode("experts").group_by("experts").len().iter_rows())
    e = min(range(mm.n_experts), key=lambda x: (counts.get(x, 0), x))
    lam = 1.5
    _, st = routes(mm, tmp_path, "boost", {"boost": {f"L{layer}:E{e}": lam}})
    a, b = base.filter(pl.col("layer") == layer), st.filter(pl.col("layer") == layer)
    for za, zb in zip(a["logits"].to_list(), b["logits"].to_list()):
        za, zb = np.asarray(za, np.float64), np.asarray(zb, np.float64)
        want = za.copy()
        want[e] += lam * za.std()
        np.testing.assert_allclose(zb, want, rtol=1e-5, atol=1e-5)
    # the family rule applied to the boosted logits is what the model used
    if family == "phimoe":
        for r in b.iter_rows(named=True):
            assert dict(zip(r["experts"], r["weights"])) == pytest.approx(phimoe_reference_ban(r["logits"], set()))
    else:
        assert_rows_match_reference(mm, st, layer)
    assert sum(selected(st, layer, e)) > counts.get(e, 0)
    _, neg = routes(mm, tmp_path, "neg", {"boost": f"L{layer}:E{top_expert(base, layer)}=-3"})
    top = top_expert(base, layer)
    assert sum(selected(neg, layer, top)) < sum(selected(base, layer, top))


# ------------------------------------------------------------------------------------------------
# zero / scale == weight surgery


def _surgery(mm, layer, expert, factor):
    """A copy of the model whose expert (or shared expert) output is multiplied by `factor` in its weights."""
    model = copy.deepcopy(mm.model)
    from workbench.models.loading import find_moe_layers

    _, _, layers = find_moe_layers(model, mm.family)
    lyr = next(x for x in layers if x.index == layer)
    with torch.no_grad():
        if expert == -1:
            lyr.shared.down_proj.weight.mul_(factor)
        else:
            lyr.experts.down_proj[expert].mul_(factor)
            if hasattr(lyr.experts, "down_proj_bias"):
                lyr.experts.down_proj_bias[expert].mul_(factor)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["zero", "scale"])
def test_zero_and_scale_equal_weight_surgery(tiny_model, family, kind):
    mm = tiny_model(family)
    ids = torch.tensor([mm.tokenize(t)[:24] for t in TEXTS[:3]])
    layer = mm.moe_layers[0]
    targets = [0] + ([-1] if mm.layer(layer).shared is not None else [])
    base = _logits(mm.model, ids)
    for expert in targets:
        factor = 0.0 if kind == "zero" else 0.5
        spec = f"L{layer}:E{expert}" if kind == "zero" else {f"L{layer}:E{expert}": factor}
        with mm.steer(**{kind: spec}):
            got = _logits(mm.model, ids)
        want = _logits(_surgery(mm, layer, expert, factor), ids)
        assert not torch.equal(got, base)
        assert torch.equal(got, want), (family, kind, expert, (got - want).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_keeps_routing_and_drops_contribution(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = routes(mm, tmp_path, "base")
    layer = mm.moe_layers[0]
    e = top_expert(base, layer)
    run, st = routes(mm, tmp_path, "zero", {"zero": f"L{layer}:E{e}"})
    a, b = base.filter(pl.col("layer") == layer), st.filter(pl.col("layer") == layer)
    assert a.select("experts", "weights", "logits").equals(b.select("experts", "weights", "logits"))
    assert run.manifest["interventions"] == {"zero": [f"L{layer}:E{e}"]}
    # the experts module gets weight exactly 0 for that slot and the same weights elsewhere
    seen = {}
    h = mm.layer(layer).experts.register_forward_pre_hook(lambda m, a: seen.__setitem__("w", (a[1], a[2])))
    try:
        ids = torch.tensor([mm.tokenize(TEXTS[0])])
        with mm.steer(zero=[(layer, e)]):
            _logits(mm.model, ids)
        idx, w = seen["w"]
        _logits(mm.model, ids)
        _, w0 = seen["w"]
    finally:
        h.remove()
    assert (idx == e).any()
    assert torch.all(w[idx == e] == 0)
    assert torch.equal(w[idx != e], w0[idx != e])


# ------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_ban_and_force(tiny_model, tmp_path, family):
    mm = tiny_model(family)
    _, base = gen_routes(mm, tmp_path, "base")
    lb, lf = mm.moe_layers[1], mm.moe_layers[-1]
    e = top_expert(base, lb)
    counts = dict(base.filter(pl.col("layer") == lf).explode("experts").group_by("experts").len().iter_rows())
    f = min(range(mm.n_experts), key=lambda x: (counts.get(x, 0), x))
    run, st = gen_routes(mm, tmp_path, "steer", {"ban": f"L{lb}:E{e}", "force": f"L{lf}:E{f}"})
    assert set(st["phase"].to_list()) == {"prefill", "decode"}
    for phase in ("prefill", "decode"):
        ph = st.filter(pl.col("phase") == phase)
        assert not any(selected(ph, lb, e))
        assert all(selected(ph, lf, f))
    if family != "phimoe":
        assert_rows_match_reference(mm, st, lb, ban=[e])
        assert_rows_match_reference(mm, st, lf, force=[f])
    assert run.manifest["interventions"] == {"ban": [f"L{lb}:E{e}"], "force": [f"L{lf}:E{f}"]}


# ------------------------------------------------------------------------------------------------
# the context manager


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_nested_contexts_compose_and_unwind(tiny_model):
    mm = tiny_model("qwen3_moe")
    ids = torch.tensor([mm.tokenize(TEXTS[0])])
    n0 = _hook_counts(mm.model)
    layer = mm.moe_layers[1]
    base = _router_outputs(mm, ids)[layer][2]
    a, b = int(base[:, 0].mode().values), None
    with mm.steer(ban=[(layer, a)]):
        inner_base = _router_outputs(mm, ids)[layer][2]
        assert not (inner_base == a).any()
        b = int(inner_base[:, 0].mode().values)
        with steer(mm, ban=f"L{layer}:E{b}", boost={f"L{layer}:E7": 0.25}):
            both = _router_outputs(mm, ids)[layer][2]
            assert not (both == a).any() and not (both == b).any()
            assert active_plan(mm).ban == [(layer, a), (layer, b)]
            with mm.steer(boost={f"L{layer}:E7": 0.25}):
                assert active_plan(mm).boost == {(layer, 7): 0.5}
        assert torch.equal(_router_outputs(mm, ids)[layer][2], inner_base)
    assert torch.equal(_router_outputs(mm, ids)[layer][2], base)
    assert _hook_counts(mm.model) == n0


def test_exception_inside_removes_hooks(tiny_model):
    mm = tiny_model("mixtral")
    n0 = _hook_counts(mm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with mm.steer(ban="L1:E0", zero="L2:E1", scale={"L3:E2": 2.0}):
            assert _hook_counts(mm.model) > n0
            raise RuntimeError("boom")
    assert _hook_counts(mm.model) == n0
    assert active_plan(mm).empty()


def test_conflicting_nested_plan_is_refused_and_outer_kept(tiny_model):
    mm = tiny_model("olmoe")
    with mm.steer(ban="L1:E3"):
        with pytest.raises(WorkbenchError, match="both banned and forced"):
            with mm.steer(force="L1:E3"):
                pass
        assert active_plan(mm).ban == [(1, 3)]
    assert active_plan(mm).empty()


def test_intervention_hooks_run_before_capture_hooks(tiny_model):
    """A router hook registered before steering still sees the steered routing (prepend=True)."""
    mm = tiny_model("granitemoe")
    seen = {}
    h = mm.layer(1).router.register_forward_hook(lambda m, a, o: seen.__setitem__("idx", o[2]))
    try:
        with mm.steer(force="L1:E6"):
            _logits(mm.model, torch.tensor([mm.tokenize(TEXTS[1])]))
    finally:
        h.remove()
    assert (seen["idx"] == 6).any(-1).all()


# ------------------------------------------------------------------------------------------------
# validation with the model


@pytest.mark.parametrize("kwargs,match", [
    ({"ban": "L9:E1"}, "layer 9 in --ban does not exist: the model has 4 decoder layers"),
    ({"ban": "L0:E1"}, "layer 0 in --ban is a dense layer, not an MoE layer; MoE layers are 1-3"),
    ({"force": "L2:E8"}, "expert 8 in --force is out of range: layer 2 has experts 0-7"),
    ({"zero": "L2 E1"}, "malformed expert 'L2 E1' in --zero"),
    ({"boost": "L2:E1=abc"}, "value 'abc' for L2:E1 in --boost is not a number"),
    ({"scale": "L2:E1"}, "--scale needs a value per expert"),
    ({"ban": "L2:E-1"}, "--ban cannot apply to the shared expert L2:E-1"),
    ({"force": "L2:E1,L2:E2,L2:E3"}, "cannot force 3 experts in layer 2: each token uses only 2"),
    ({"ban": "L2:E1", "force": "L2:E1"}, "L2:E1 is both banned and forced"),
    ({"ban": ",".join(f"L2:E{i}" for i in range(7))}, "cannot ban 7 of 8 experts in layer 2"),
])
def test_errors_are_one_sentence(tiny_model, kwargs, match):
    mm = tiny_model("deepseek_v2")
    with pytest.raises(WorkbenchError, match=match.replace("(", r"\(")) as ei:
        with mm.steer(**kwargs):
            pass
    assert "\n" not in str(ei.value)


def test_shared_expert_needs_a_shared_expert(tiny_model):
    mm = tiny_model("mixtral")
    with pytest.raises(WorkbenchError, match="layer 1 in --zero has no shared expert"):
        with mm.steer(zero="L1:E-1"):
            pass


def test_generic_family_refuses_routing_interventions(tiny_model):
    import dataclasses

    from workbench.models.families import Family

    mm = dataclasses.replace(tiny_model("mixtral"), family=Family("mixtral", "generic"), generic=True)
    with pytest.raises(WorkbenchError, match="unknown for mixtral"):
        with mm.steer(ban="L1:E0"):
            pass
    with mm.steer(zero="L1:E0"):  # zero and scale need no routing rule
        pass


def test_deepseek_v3_force_beyond_group_limit(tmp_path):
    """Forced experts in more groups than topk_group are all selected: force wins over the group limit."""
    mm = _variant("deepseek_v3", n_group=4, topk_group=1)
    layer = mm.moe_layers[0]
    _, st = routes(mm, tmp_path, "force", {"force": [(layer, 0), (layer, 5), (layer, 10)]})
    assert all(selected(st, layer, 0)) and all(selected(st, layer, 5)) and all(selected(st, layer, 10))
    assert_rows_match_reference(mm, st, layer, force=[0, 5, 10])
