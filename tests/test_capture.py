"""capture-core: recorded routing equals an independent recomputation, for all nine families.

The independent route: run each document alone (no padding, no batching) with
`output_router_logits=True` (transformers' own output recorder, not our hooks) and apply each
family's selection rule written out here from the papers/model cards, not from our code.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

import workbench as wb
from conftest import FAMILIES


def _reference_choice(family: str, logits: torch.Tensor, router) -> tuple[np.ndarray, np.ndarray]:
    """Per token: the chosen expert ids (as a sorted set) and the weight of each, from raw logits."""
    k = router.top_k
    z = logits.double()
    if family == "deepseek_v3":
        s = torch.sigmoid(z)
        choice = s + router.e_score_correction_bias.double()
        g = router.num_group
        per = choice.shape[-1] // g
        gscore = choice.view(-1, g, per).topk(2, dim=-1).values.sum(-1)
        keep = gscore.topk(router.topk_group, dim=-1).indices
        allowed = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
        allowed = allowed.repeat_interleave(per, dim=1)
        idx = choice.masked_fill(~allowed, float("-inf")).topk(k, dim=-1).indices
        w = s.gather(1, idx)
        if router.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        w = w * router.routed_scaling_factor
    elif family in ("gpt_oss", "granitemoe"):
        top = z.topk(k, dim=-1)
        idx, w = top.indices, torch.softmax(top.values, dim=-1)
    elif family == "phimoe":
        idx = z.topk(2, dim=-1).indices  # eval-mode sparsemixer picks the two largest logits
        w = None
    else:
        p = torch.softmax(z, dim=-1)
        top = p.topk(k, dim=-1)
        idx, w = top.indices, top.values
        renorm = family == "mixtral" or getattr(router, "norm_topk_prob", False)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        if family == "deepseek_v2":
            w = w * router.routed_scaling_factor
    order = idx.argsort(dim=-1)
    idx_sorted = idx.gather(1, order).numpy()
    w_sorted = None if w is None else w.gather(1, order).numpy()
    return idx_sorted, w_sorted


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_equals_independent_recomputation(family, tiny_model, sample_texts, tmp_path):
    mm = tiny_model(family)
    run = wb.capture(mm, sample_texts, tmp_path / "run", batch_size=4, logits=True, progress=False)
    df = run.routing.sort("doc_id", "pos", "layer").collect()
    assert sorted(df["layer"].unique().to_list()) == mm.moe_layers
    checked = 0
    for doc_id, text in enumerate(sample_texts):
        ids = torch.tensor([mm.tokenize(text)])
        with torch.no_grad():
            out = mm.model(ids, output_router_logits=True)
        for li, layer in enumerate(mm.moe_layers):
            logits = out.router_logits[li].reshape(-1, mm.n_experts).float()
            ref_idx, ref_w = _reference_choice(family, logits, mm.layer(layer).router)
            got = df.filter((pl.col("doc_id") == doc_id) & (pl.col("layer") == layer)).sort("pos")
            assert got.height == ids.shape[1]
            ex = np.stack(got["experts"].to_list())
            w = np.stack(got["weights"].to_list())
            order = ex.argsort(axis=1)
            np.testing.assert_array_equal(np.take_along_axis(ex, order, 1), ref_idx)
            if ref_w is not None:
                np.testing.assert_allclose(np.take_along_axis(w, order, 1), ref_w, rtol=2e-4, atol=1e-6)
            np.testing.assert_allclose(np.stack(got["logits"].to_list()), logits.numpy(), rtol=1e-4, atol=1e-4)
            checked += ids.shape[1]
    assert checked == sum(len(mm.tokenize(t)) for t in sample_texts) * len(mm.moe_layers)


def test_float_columns_are_byte_stream_split_and_read_back_bit_exact(tiny_model, sample_texts, tmp_path):
    """Logits and weights are written BYTE_STREAM_SPLIT (faster and smaller with zstd); every reader we
    document (pyarrow, polars, DuckDB) gets the same float32 bits the probe held."""
    import pyarrow.parquet as pq

    mm = tiny_model("mixtral")
    run = wb.capture(mm, sample_texts[:3], tmp_path / "run", batch_size=4, logits=True, progress=False)
    part = sorted((run.path / "routing").glob("part-*.parquet"))[0]
    meta = pq.ParquetFile(part).metadata.row_group(0)
    enc = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "BYTE_STREAM_SPLIT" in enc["logits.list.element"] and "BYTE_STREAM_SPLIT" in enc["weights.list.element"]
    assert "BYTE_STREAM_SPLIT" not in enc["experts.list.element"]
    ids = torch.tensor([mm.tokenize(sample_texts[0])])
    with torch.no_grad():
        out = mm.model(ids, output_router_logits=True)
    layer = mm.moe_layers[0]
    want = out.router_logits[0].reshape(-1, mm.n_experts).float().numpy()
    got = run.routing.filter((pl.col("doc_id") == 0) & (pl.col("layer") == layer)).sort("pos").collect()
    np.testing.assert_allclose(np.stack(got["logits"].to_list()), want, rtol=1e-4, atol=1e-4)
    by_arrow = pq.read_table(part).to_pydict()["logits"]
    by_polars = pl.read_parquet(part)["logits"].to_list()
    assert np.array_equal(np.array(by_arrow, np.float32), np.array(by_polars, np.float32))
    duckdb = pytest.importorskip("duckdb")
    total = duckdb.sql(f"SELECT sum(list_sum(logits)) FROM read_parquet('{part}')").fetchall()[0][0]
    assert np.isclose(total, np.array(by_arrow, np.float64).sum(), rtol=1e-9)


def test_dense_layers_are_not_rows_and_layer_is_decoder_index(tiny_model, sample_texts, tmp_path):
    mm = tiny_model("deepseek_v3")  # layer 0 is dense (first_k_dense_replace=1)
    run = wb.capture(mm, sample_texts[:2], tmp_path / "r", progress=False)
    layers = sorted(run.routing.select("layer").unique().collect()["layer"].to_list())
    assert layers == [1, 2, 3] == run.manifest["model"]["moe_layers"]


def test_padding_and_batching_never_reach_the_tables(tiny_model, sample_texts, tmp_path):
    mm = tiny_model("qwen3_moe")
    a = wb.capture(mm, sample_texts, tmp_path / "a", batch_size=1, progress=False)
    b = wb.capture(mm, sample_texts, tmp_path / "b", batch_size=6, progress=False)
    ta, tb = (r.tokens.sort("doc_id", "pos").collect() for r in (a, b))
    assert ta.equals(tb)
    n_tokens = sum(len(mm.tokenize(t)) for t in sample_texts)
    assert ta.height == n_tokens  # no pad token rows
    ra, rb = (r.routing.sort("doc_id", "pos", "layer").collect() for r in (a, b))
    assert ra.height == n_tokens * len(mm.moe_layers)
    assert ra["experts"].to_list() == rb["experts"].to_list()
    np.testing.assert_allclose(np.stack(ra["weights"].to_list()), np.stack(rb["weights"].to_list()), atol=1e-5)


def test_seq_len_packs_the_stream_and_keeps_labels(tiny_model, tmp_path):
    mm = tiny_model("olmoe")
    recs = [{"text": "alpha beta gamma", "lang": "en"}, {"text": "eins zwei drei vier", "lang": "de"},
            {"text": "un deux trois", "lang": "fr"}]
    run = wb.capture(mm, recs, tmp_path / "r", seq_len=7, progress=False)
    tok = run.tokens.sort("doc_id", "pos").collect()
    stream = []
    for i, r in enumerate(recs):
        ids = mm.tokenize(r["text"]) + [mm.tokenizer.eos_token_id]
        stream += [(t, i, r["lang"]) for t in ids]
    assert tok.height == len(stream)
    assert tok["token_id"].to_list() == [s[0] for s in stream]
    assert tok["src_doc"].to_list() == [s[1] for s in stream]
    assert tok["lang"].to_list() == [s[2] for s in stream]
    sizes = tok.group_by("doc_id").len().sort("doc_id")["len"].to_list()
    assert sizes[:-1] == [7] * (len(sizes) - 1) and 0 < sizes[-1] <= 7
    assert tok["pos"].to_list() == [i % 7 for i in range(len(stream))]


def test_max_tokens_caps_the_capture(tiny_model, sample_texts, tmp_path):
    mm = tiny_model("mixtral")
    run = wb.capture(mm, sample_texts, tmp_path / "r", max_tokens=50, progress=False)
    assert run.tokens.collect().height == 50
    assert run.routing.collect().height == 50 * len(mm.moe_layers)


def test_labels_from_jsonl_are_token_columns(tiny_model, tmp_path):
    mm = tiny_model("mixtral")
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "lang": l, "key": k})
                           for t, l, k in [("hello there", "en", 1), ("hallo da", "de", 1)]))
    run = wb.capture(mm, str(f), tmp_path / "r", progress=False)
    tok = run.tokens.collect()
    assert set(run.label_columns) == {"lang", "key"}
    per_doc = tok.group_by("doc_id").agg(pl.col("lang").unique(), pl.col("key").unique()).sort("doc_id")
    assert per_doc["lang"].to_list() == [["en"], ["de"]]
    assert run.manifest["dataset"]["sha256"]


def test_generation_capture_phases_and_decode_routing(tiny_model, tmp_path):
    mm = tiny_model("qwen2_moe")
    prompt = "The cat sat on"
    run = wb.capture_generate(mm, [prompt], tmp_path / "g", max_new_tokens=6, progress=False)
    tok = run.tokens.sort("pos").collect()
    n_prompt = len(mm.tokenize(prompt))
    assert tok["phase"].to_list() == ["prefill"] * n_prompt + ["decode"] * 5  # last token never fed back
    assert tok["pos"].to_list() == list(range(n_prompt + 5))
    # Independent truth: one plain forward over prompt + generated tokens routes the same way.
    ids = torch.tensor([tok["token_id"].to_list()])
    with torch.no_grad():
        out = mm.model(ids, output_router_logits=True)
    got = run.routing.sort("pos", "layer").collect()
    for li, layer in enumerate(mm.moe_layers):
        ref = out.router_logits[li].float().softmax(-1).topk(mm.top_k, dim=-1).indices.sort(-1).values.numpy()
        ex = np.sort(np.stack(got.filter(pl.col("layer") == layer)["experts"].to_list()), axis=1)
        np.testing.assert_array_equal(ex, ref)
    assert run.manifest["generations"][0]


def test_open_run_frames_and_manifest(tiny_model, sample_texts, tmp_path):
    mm = tiny_model("granitemoe")
    run = wb.capture(mm, sample_texts[:3], tmp_path / "r", progress=False)
    again = wb.open_run(tmp_path / "r")
    assert again.complete and again.manifest["model"]["model_type"] == "granitemoe"
    assert again.routing.collect().schema["experts"] == pl.List(pl.Int16)
    assert again.manifest["versions"]["transformers"]
    assert run.n_experts == 8 and run.top_k == 2


def test_experts_implementation_auto_is_eager_on_cpu(tiny_dir):
    from workbench.models.loading import load_model

    path = str(tiny_dir("qwen3_moe"))
    assert load_model(path).model.config._experts_implementation == "eager"
    assert load_model(path, device="cpu").model.config._experts_implementation == "eager"
    assert load_model(path, experts_implementation=None).model.config._experts_implementation != "eager"
