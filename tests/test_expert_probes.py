"""expert-probes: expert_stats / hidden / attention rows against independent recomputations.

Independent routes: the expert is called alone (eager, no probe attached) on the MoE input of one
document run without padding, weight 1; hidden states come from `output_hidden_states`; sink
shares from eager attention with `output_attentions=True` (the full matrix, materialised).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

import workbench as wb
from conftest import FAMILIES
from workbench.capture import _batch_context, build_sequences
from workbench.data import load_dataset
from workbench.errors import WorkbenchError
from workbench.probes.experts import ExpertsProbe, dequantize


def _moe_inputs(mm, ids):
    """Run one document alone with the plain model; return {layer: MoE input [T, H]} and logits."""
    seen, hs = {}, []
    for layer in mm.layers:
        hs.append(layer.experts.register_forward_pre_hook(
            lambda m, a, i=layer.index: seen.__setitem__(i, a[0].detach().clone())))
    try:
        with torch.no_grad():
            out = mm.model(ids)
    finally:
        for h in hs:
            h.remove()
    return seen, out.logits


def _alone(mm, layer_index, x, experts):
    """Expert `experts[t]` on token row x[t], weight 1, via the experts module itself (eager)."""
    ex = mm.layer(layer_index).experts
    with torch.no_grad():
        return ex(x, torch.tensor(np.asarray(experts), dtype=torch.long)[:, None], torch.ones(x.shape[0], 1, dtype=x.dtype))


def _shared_alone(mm, layer_index, x):
    layer = mm.layer(layer_index)
    with torch.no_grad():
        y = layer.shared(x)
        w = torch.sigmoid(layer.shared_gate(x))[:, 0] if layer.shared_gate is not None else torch.ones(x.shape[0])
    return y, w


def _check_rows(got, y, w=None):
    y = y.double()
    ref_max = y.abs().max(1).values.numpy()
    np.testing.assert_allclose(got["out_maxabs"].to_numpy(), ref_max, rtol=1e-5)
    np.testing.assert_array_equal(got["out_argmax"].to_numpy(), y.abs().argmax(1).numpy())
    np.testing.assert_allclose(got["out_l2"].to_numpy(), y.norm(dim=1).numpy(), rtol=1e-5)
    if w is not None:
        np.testing.assert_allclose(got["weight"].to_numpy(), w, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_stats_equal_expert_called_alone(family, tiny_model, sample_texts, tmp_path):
    mm = tiny_model(family)
    run = wb.capture(mm, sample_texts, tmp_path / "run", probes=["routing", "experts"], batch_size=4,
                     progress=False)
    es = run.expert_stats.collect()
    rt = run.routing.collect()
    k = mm.top_k
    shared = mm.n_shared > 0
    assert es.height == rt.height * (k + int(shared))
    for doc_id, text in enumerate(sample_texts):
        ids = torch.tensor([mm.tokenize(text)])
        inputs, _ = _moe_inputs(mm, ids)
        for layer in mm.moe_layers:
            x = inputs[layer]
            d = es.filter((pl.col("doc_id") == doc_id) & (pl.col("layer") == layer))
            r = rt.filter((pl.col("doc_id") == doc_id) & (pl.col("layer") == layer)).sort("pos")
            for slot in range(k):
                got = d.filter(pl.col("slot") == slot).sort("pos")
                assert got.height == ids.shape[1]
                routed = np.stack(r["experts"].to_list())[:, slot]
                np.testing.assert_array_equal(got["expert"].to_numpy(), routed)
                y = _alone(mm, layer, x, got["expert"].to_numpy())
                _check_rows(got, y, np.stack(r["weights"].to_list())[:, slot])
            if shared:
                got = d.filter(pl.col("slot") == -1).sort("pos")
                assert (got["expert"] == -1).all() and got.height == ids.shape[1]
                y, w = _shared_alone(mm, layer, x)
                _check_rows(got, y, w.numpy())


def _forward(mm, texts, probe=None):
    seqs = build_sequences(load_dataset(texts), mm.tokenizer)
    ctx, *_ = _batch_context(seqs, mm.tokenizer.pad_token_id, mm.device)
    if probe is not None:
        probe.attach(mm)
        probe.begin(ctx)
    try:
        with torch.inference_mode():
            out = mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits
        arrays = probe.harvest() if probe is not None else None
    finally:
        if probe is not None:
            probe.detach()
    return out, arrays


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_bit_identical_to_eager(family, tiny_model, sample_texts):
    mm = tiny_model(family)
    assert mm.model.config._experts_implementation == "eager"
    plain, _ = _forward(mm, sample_texts)
    probed, arrays = _forward(mm, sample_texts, ExpertsProbe())
    assert torch.equal(plain, probed)
    assert mm.model.config._experts_implementation == "eager"  # restored on detach
    assert arrays["maxabs"].shape[1:] == (len(mm.moe_layers), mm.top_k)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_grouped_path_matches_loop(family, tiny_model, sample_texts):
    """The GPU path (sort + grouped GEMM + scatter through the permutation) on CPU, vs the loop."""
    mm = tiny_model(family)
    loop, a = _forward(mm, sample_texts, ExpertsProbe(mode="loop"))
    grouped, b = _forward(mm, sample_texts, ExpertsProbe(mode="grouped"))
    torch.testing.assert_close(grouped, loop, rtol=1e-4, atol=1e-5)
    for key in ("experts", "weights"):
        assert torch.equal(a[key], b[key])
    torch.testing.assert_close(b["maxabs"], a["maxabs"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["l2"], a["l2"], rtol=1e-5, atol=1e-6)
    assert (b["argmax"] == a["argmax"]).float().mean() > 0.99  # near-ties may flip under reordering


def test_probe_honours_edited_weights(tiny_model, sample_texts):
    """An intervention pre-hook that halves every routing weight: outputs follow, stats before weight don't."""
    mm = tiny_model("olmoe")
    _, ref = _forward(mm, sample_texts, ExpertsProbe())
    hooks = [layer.experts.register_forward_pre_hook(lambda m, a: (a[0], a[1], a[2] * 0.5), prepend=True)
             for layer in mm.layers]
    try:
        halved_logits, got = _forward(mm, sample_texts, ExpertsProbe())
        plain_halved, _ = _forward(mm, sample_texts)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(halved_logits, plain_halved)
    # the first MoE layer sees the same input and routing, so only its weights change
    assert torch.equal(got["experts"][:, 0], ref["experts"][:, 0])
    torch.testing.assert_close(got["weights"][:, 0], ref["weights"][:, 0] * 0.5)
    torch.testing.assert_close(got["maxabs"][:, 0], ref["maxabs"][:, 0])
    assert not torch.equal(halved_logits, _forward(mm, sample_texts)[0])


@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_dump_experts_rows(fmt, tiny_model, sample_texts, tmp_path):
    mm = tiny_model("qwen2_moe")
    layer = mm.moe_layers[1]
    run = wb.capture(mm, sample_texts, tmp_path / "run", probes=["experts"], batch_size=4, progress=False,
                     dump_experts=f"L{layer}:E3,L{layer}:E-1", dump_format=fmt)
    dump = run.table("dump_experts").collect()
    es = run.expert_stats.filter(pl.col("layer") == layer).collect()
    want = es.filter(pl.col("expert").is_in([3, -1]))
    assert dump.height == want.height > 0
    if fmt == "int8":
        assert dump["values"].dtype == pl.Array(pl.Int8, mm.model.config.hidden_size)
    for doc_id, text in enumerate(sample_texts):
        ids = torch.tensor([mm.tokenize(text)])
        x = _moe_inputs(mm, ids)[0][layer]
        for e in (3, -1):
            d = dump.filter((pl.col("doc_id") == doc_id) & (pl.col("expert") == e)).sort("pos")
            if d.height == 0:
                continue
            pos = d["pos"].to_numpy()
            y = (_alone(mm, layer, x, [e] * x.shape[0]) if e >= 0 else _shared_alone(mm, layer, x)[0])[pos].numpy()
            vals = np.stack(d["values"].to_list())
            v = dequantize(vals, d["scale"].to_numpy() if fmt == "int8" else None)
            tol = (np.abs(y).max(1, keepdims=True) / 127 * 0.51 + 1e-6) if fmt == "int8" else np.abs(y) * 1e-3 + 1e-4
            assert (np.abs(v - y) <= tol).all()
            s = es.filter((pl.col("doc_id") == doc_id) & (pl.col("expert") == e)).sort("pos")
            np.testing.assert_array_equal(s["pos"].to_numpy(), pos)
            np.testing.assert_allclose(d["weight"].to_numpy(), s["weight"].to_numpy(), rtol=1e-6)
            if e >= 0:
                np.testing.assert_array_equal(d["slot"].to_numpy(), s["slot"].to_numpy())


def test_dump_spec_errors(tiny_model, tmp_path, sample_texts):
    mm = tiny_model("olmoe")
    with pytest.raises(WorkbenchError):
        wb.capture(mm, sample_texts, tmp_path / "a", probes=["experts"], dump_experts="L0:E-1", progress=False)
    with pytest.raises(WorkbenchError):
        wb.capture(mm, sample_texts, tmp_path / "b", probes=["experts"], dump_experts="L9:E1", progress=False)
    with pytest.raises(WorkbenchError):
        wb.capture(mm, sample_texts, tmp_path / "c", probes=["experts"], dump_experts="nonsense", progress=False)
    with pytest.raises(WorkbenchError):
        wb.capture(mm, sample_texts, tmp_path / "d", probes=["hidden"], dump_hidden="99", progress=False)
    # refused before anything is written: no half-made run folder is left behind
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_hidden_probe_equals_output_hidden_states(family, tiny_model, sample_texts, tmp_path):
    mm = tiny_model(family)
    run = wb.capture(mm, sample_texts, tmp_path / "run", probes=["hidden"], batch_size=4, progress=False,
                     dump_hidden="1", dump_format="fp16")
    hid = run.hidden.collect()
    dump = run.table("dump_hidden").collect()
    for doc_id, text in enumerate(sample_texts):
        ids = torch.tensor([mm.tokenize(text)])
        with torch.no_grad():
            hs = mm.model(ids, output_hidden_states=True).hidden_states
        for layer in range(mm.n_layers):
            h = hs[layer + 1][0].double()
            if layer == mm.n_layers - 1:
                continue  # transformers applies the final norm to the last entry; our hook sees the raw residual
            got = hid.filter((pl.col("doc_id") == doc_id) & (pl.col("layer") == layer)).sort("pos")
            np.testing.assert_allclose(got["maxabs"].to_numpy(), h.abs().max(1).values.numpy(), rtol=1e-5)
            np.testing.assert_array_equal(got["argmax"].to_numpy(), h.abs().argmax(1).numpy())
        d = dump.filter(pl.col("doc_id") == doc_id).sort("pos")
        np.testing.assert_allclose(np.stack(d["values"].to_list()).astype(np.float32), hs[2][0].numpy(),
                                   rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_sink_share_equals_full_attention(family, tiny_dir, sample_texts, tmp_path):
    from workbench.models.loading import load_model

    impls = ("eager",) if family == "gpt_oss" else ("eager", "sdpa")  # gpt-oss has no sdpa path
    for impl in impls:
        mm = load_model(str(tiny_dir(family)))
        mm.model.set_attn_implementation(impl)
        plain, _ = _forward(mm, sample_texts)
        from workbench.probes.attention import AttentionProbe

        probed, _ = _forward(mm, sample_texts, AttentionProbe())
        assert torch.equal(plain, probed), impl
        assert mm.model.config._attn_implementation == impl
        run = wb.capture(mm, sample_texts, tmp_path / f"run_{impl}", probes=["attention"], batch_size=4,
                         progress=False)
        att = run.attention.collect()
        mm.model.set_attn_implementation("eager")
        for doc_id, text in enumerate(sample_texts):
            ids = torch.tensor([mm.tokenize(text)])
            with torch.no_grad():
                attn = mm.model(ids, output_attentions=True).attentions
            for layer, a in enumerate(attn):
                ref = a[0, :, :, 0].double().mean(-1).numpy()  # [heads]
                got = att.filter((pl.col("doc_id") == doc_id) & (pl.col("layer") == layer)).sort("head")
                np.testing.assert_allclose(got["sink_share"].to_numpy(), ref, rtol=1e-4, atol=1e-6)


def test_parallel_part_writer_keeps_order_and_rows(tiny_model, sample_texts, tmp_path):
    """Parts encode on several threads but are listed in order, each once, with every row."""
    mm = tiny_model("olmoe")
    run = wb.capture(mm, sample_texts * 3, tmp_path / "run", probes=["routing", "experts"], batch_size=1,
                     part_tokens=8, progress=False)
    parts = run.manifest["parts"]
    assert [p["index"] for p in parts] == list(range(len(parts))) and len(parts) > 5
    assert [p["batch_end"] for p in parts] == sorted(p["batch_end"] for p in parts)
    n_tok = sum(len(mm.tokenize(t)) for t in sample_texts * 3)
    assert sum(p["tokens"] for p in parts) == run.tokens.collect().height == n_tok
    assert run.expert_stats.collect().height == n_tok * len(mm.moe_layers) * mm.top_k
    docs = run.routing.collect()["doc_id"].unique().sort().to_list()
    assert docs == list(range(len(sample_texts) * 3))


def test_dump_of_an_expert_nobody_reached_says_so(tiny_model, sample_texts, tmp_path):
    """Banning the dumped expert means no token reaches it: the missing dump table is explained."""
    mm = tiny_model("olmoe")
    layer = mm.moe_layers[0]
    run = wb.capture(mm, sample_texts, tmp_path / "run", probes=["experts"], dump_experts=f"L{layer}:E3",
                     interventions={"ban": f"L{layer}:E3"}, progress=False)
    assert run.expert_stats.filter((pl.col("layer") == layer) & (pl.col("expert") == 3)).collect().height == 0
    with pytest.raises(WorkbenchError, match=f"dumped L{layer}:E3 but no token reached them"):
        run.table("dump_experts")
    with pytest.raises(WorkbenchError, match="has no 'dump_hidden' table"):
        run.table("dump_hidden")
