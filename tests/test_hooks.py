"""Named hook sites (workbench.models.hooks): RouterOut, decoder_layers, mm.hooks, mm.trace_routing.

Independent references: capture's routing table (the RoutingProbe and the batched pipeline, written to
disk and read back), transformers' own `output_hidden_states` and `output_router_logits` recorders, and
the model's logits with and without a hook.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench as wb
from conftest import FAMILIES
from workbench.errors import WorkbenchError
from workbench.models.hooks import ExpertsCall, RouterOut, decoder_layers


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_routing_equals_the_captured_run(family, tiny_model, sample_texts, tmp_path):
    """In memory, the same experts, weights and logits capture writes to the run's routing table."""
    mm = tiny_model(family)
    before = _hook_count(mm.model)
    tr = mm.trace_routing(sample_texts, logits=True)
    run = wb.capture(mm, sample_texts, tmp_path / "run", batch_size=1, logits=True, progress=False)
    df = run.routing.sort("doc_id", "pos", "layer").collect()
    nl = len(mm.moe_layers)
    assert tr.layers == mm.moe_layers
    assert tr.experts.shape == (df.height // nl, nl, mm.top_k)
    np.testing.assert_array_equal(tr.doc, df["doc_id"].to_numpy()[::nl])
    np.testing.assert_array_equal(tr.pos, df["pos"].to_numpy()[::nl])
    np.testing.assert_array_equal(tr.experts.reshape(-1, mm.top_k), np.stack(df["experts"].to_list()))
    np.testing.assert_array_equal(tr.weights.reshape(-1, mm.top_k), np.stack(df["weights"].to_list()))
    np.testing.assert_array_equal(tr.logits.reshape(-1, mm.n_experts), np.stack(df["logits"].to_list()))
    toks = run.tokens.sort("doc_id", "pos").collect()
    np.testing.assert_array_equal(tr.token_ids, toks["token_id"].to_numpy())
    assert tr.tokens == toks["token"].to_list()
    assert _hook_count(mm.model) == before  # nothing left behind


def test_trace_routing_matches_transformers_router_logits(tiny_model, sample_texts):
    """Another route: transformers' own output recorder, one text at a time."""
    mm = tiny_model("qwen3_moe")
    tr = mm.trace_routing(sample_texts[:2], logits=True, batch_size=2)
    for i, text in enumerate(sample_texts[:2]):
        with torch.no_grad():
            out = mm.model(torch.tensor([mm.tokenize(text)]), output_router_logits=True)
        rows = tr.text(i)
        for li in range(len(mm.moe_layers)):
            ref = out.router_logits[li].reshape(-1, mm.n_experts).float().numpy()
            np.testing.assert_allclose(tr.logits[rows, li], ref, rtol=1e-4, atol=1e-5)
            top = np.sort(np.argsort(-ref, axis=1)[:, :mm.top_k], axis=1)
            np.testing.assert_array_equal(np.sort(tr.experts[rows, li], axis=1), top)
    np.testing.assert_array_equal(tr.doc_bounds, [0, rows.start, rows.stop])


def test_trace_routing_records_steered_routing(tiny_model, sample_texts):
    mm = tiny_model("mixtral")
    base = mm.trace_routing(sample_texts[:3])
    hit = int(np.bincount(base.experts[:, 0].reshape(-1)).argmax())
    assert (base.experts[:, 0] == hit).any()
    with mm.steer(ban=f"L{mm.moe_layers[0]}:E{hit}"):
        steered = mm.trace_routing(sample_texts[:3])
    assert not (steered.experts[:, 0] == hit).any()
    np.testing.assert_array_equal(mm.trace_routing(sample_texts[:3]).experts, base.experts)


def test_residual_site_is_the_decoder_layer_output(tiny_model, sample_texts):
    mm = tiny_model("olmoe")
    n = len(decoder_layers(mm))
    got = {}

    def keep(i):
        def fn(module, args, out):
            got[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return fn

    ids = torch.tensor([mm.tokenize(sample_texts[0])])
    with torch.no_grad():
        ref = mm.model(ids, output_hidden_states=True).hidden_states  # installs transformers' own recorders
    before = _hook_count(mm.model)
    with torch.no_grad(), mm.hooks({f"L{i}.residual": keep(i) for i in range(n)}):
        mm.model(ids)
    for i in range(n - 1):  # the last entry of hidden_states is after the final norm
        torch.testing.assert_close(got[i], ref[i + 1], rtol=0, atol=0)
    assert _hook_count(mm.model) == before  # removed at the end of the block


def test_experts_in_sees_the_routers_choice_and_shared_out_fires(tiny_model, sample_texts):
    mm = tiny_model("qwen2_moe")
    layer = mm.moe_layers[0]
    seen = {}

    def router(module, args, out):
        seen["router"] = RouterOut.of(out).index.clone()

    def experts_in(module, args, kwargs):
        seen["experts"] = ExpertsCall.of(module, args, kwargs).index.clone()

    def shared(module, args, out):
        seen["shared"] = out.shape

    sites = {f"L{layer}.router": router, f"L{layer}.experts.in": experts_in, f"L{layer}.shared.out": shared}
    with torch.no_grad(), mm.hooks(sites):
        mm.model(torch.tensor([mm.tokenize(sample_texts[0])]))
    torch.testing.assert_close(seen["router"], seen["experts"])
    assert seen["shared"][-1] == mm.model.config.hidden_size
    assert f"L{layer}.shared.out" in mm.hook_sites()
    assert "L0.residual" in mm.hook_sites()


def test_a_router_hook_can_replace_the_output(tiny_model, sample_texts):
    """Returning a RouterOut's tuple form changes the forward: zero routing weights in one layer give the
    logits of zeroing that layer's experts output at the `experts.out` site (mixtral has no shared expert)."""
    mm = tiny_model("mixtral")
    layer = mm.moe_layers[1]
    ids = torch.tensor([mm.tokenize(sample_texts[0])])

    def no_weights(module, args, out):
        r = RouterOut.of(out)
        return r.replace(weights=torch.zeros_like(r.weights)).to_output()

    with torch.no_grad():
        plain = mm.model(ids).logits
        with mm.hooks({f"L{layer}.router": no_weights}):
            zero_w = mm.model(ids).logits
        with mm.hooks({f"L{layer}.experts.out": lambda m, a, o: torch.zeros_like(o)}):
            zero_out = mm.model(ids).logits
        again = mm.model(ids).logits
    assert not torch.allclose(plain, zero_w)
    torch.testing.assert_close(zero_w, zero_out, rtol=0, atol=0)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_router_out_reads_tuples_and_refuses_others():
    t = torch.zeros(2, 4), torch.ones(2, 2), torch.tensor([[0, 1], [2, 3]]), "extra"
    r = RouterOut.of(t)
    assert r.index is t[2] and r.weights is t[1] and r.logits is t[0] and r.rest == ("extra",)
    assert r.to_output() == t
    assert RouterOut.of(r) is r
    with pytest.raises(WorkbenchError, match="not \\(logits, weights, index\\)"):
        RouterOut.of(torch.zeros(3))
    with pytest.raises(WorkbenchError):
        RouterOut.of((torch.zeros(2, 4), torch.ones(2, 2)))


def test_bad_sites_are_refused_and_nothing_is_attached(tiny_model):
    mm = tiny_model("deepseek_v2")  # layer 0 is dense
    ok = {f"L{mm.moe_layers[0]}.router": lambda m, a, o: None}
    before = _hook_count(mm.model)
    for bad, msg in [("L0.router", "not an MoE layer"), ("L99.residual", "decoder layers 0 to"),
                     ("router", "not a hook site"), ("L1.nonsense", "not a hook site")]:
        with pytest.raises(WorkbenchError, match=msg):
            mm.hooks({**ok, bad: lambda *a: None})
        assert _hook_count(mm.model) == before
    with pytest.raises(WorkbenchError, match="no shared gate"):
        mm.hooks({f"L{mm.moe_layers[0]}.shared_gate.out": lambda *a: None})
    with pytest.raises(WorkbenchError, match="not a function"):
        mm.hooks({f"L{mm.moe_layers[0]}.router": 3})
    with pytest.raises(WorkbenchError, match="no tokens"):
        mm.trace_routing(["fine", ""])
    with pytest.raises(WorkbenchError, match="not an MoE layer"):
        mm.trace_routing("fine", layers=[0])


def test_hooks_remove_and_prepend_order(tiny_model, sample_texts):
    mm = tiny_model("mixtral")
    layer = mm.moe_layers[0]
    order = []
    before = _hook_count(mm.model)
    h = mm.hooks({f"L{layer}.router": lambda m, a, o: order.append("late")})
    with mm.hooks({f"L{layer}.router": lambda m, a, o: order.append("early")}, prepend=True):
        with torch.no_grad():
            mm.model(torch.tensor([mm.tokenize("ab")]))
    assert order == ["early", "late"]
    assert _hook_count(mm.model) == before + 1
    h.remove()
    assert _hook_count(mm.model) == before


def test_decoder_layers_old_private_name_is_kept(tiny_model):
    from workbench.models.loading import _decoder_layers

    mm = tiny_model("mixtral")
    assert _decoder_layers(mm.model) is decoder_layers(mm) is mm.model.model.layers


def test_experts_call_reads_positional_and_keyword_calls():
    h, i, w = torch.zeros(2, 4), torch.tensor([[0, 1], [1, 2]]), torch.ones(2, 2)
    pos = ExpertsCall.of(None, (h, i, w), {})
    assert pos.index is i and pos.weights is w
    args, kwargs = pos.with_weights(w * 0)
    assert args[0] is h and args[1] is i and torch.equal(args[2], w * 0) and kwargs == {}
    kw = ExpertsCall.of(None, (h,), {"top_k_index": i, "top_k_weights": w})
    assert kw.index is i and kw.weights is w
    args, kwargs = kw.with_weights(w * 2)
    assert args == (h,) and kwargs["top_k_index"] is i and torch.equal(kwargs["top_k_weights"], w * 2)
    mixed = ExpertsCall.of(None, (h, i), {"routing_weights": w})
    assert mixed.index is i and mixed.weights is w
    with pytest.raises(WorkbenchError, match="attribution needs experts\\(hidden, index, weights\\)"):
        ExpertsCall.of(torch.nn.Identity(), (h,), {}, "attribution")
