"""Importers: engine outputs built in the engines' own formats must give the run a direct capture gives."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace as NS

import numpy as np
import polars as pl
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.importers import import_routed_experts

TEXTS = ["The quick brown fox jumps.", "def add(a, b): return a+b", "Der Hund schläft.", "2 + 2 = 4"]


@pytest.fixture(scope="module")
def captured(tiny_dir, tmp_path_factory):
    """A direct capture of a tiny deepseek_v2 (layer 0 dense) and its routing as [n, n_layers, K] per doc."""
    import workbench as wb

    model = tiny_dir("deepseek_v2", layers=4, experts=8, top_k=2)
    run = wb.capture(str(model), TEXTS, tmp_path_factory.mktemp("cap") / "run", progress=False)
    r = run.routing.sort("doc_id", "pos", "layer").collect()
    t = run.tokens.sort("doc_id", "pos").collect()
    docs = []
    for d in range(len(TEXTS)):
        ids = t.filter(pl.col("doc_id") == d)["token_id"].to_list()
        arr = np.zeros((len(ids), 4, 2), np.int32)  # the engines' buffers: dense layer 0 stays zero
        for pos, layer, ex in r.filter(pl.col("doc_id") == d).select("pos", "layer", "experts").iter_rows():
            arr[pos, layer] = ex
        docs.append((ids, arr))
    return model, run, docs


def _same(imp, run, drop_last=False):
    key = ["doc_id", "pos", "layer", "experts"]
    a = imp.routing.sort("doc_id", "pos", "layer").collect().select(key)
    b = run.routing.sort("doc_id", "pos", "layer").collect().select(key)
    ta = imp.tokens.sort("doc_id", "pos").collect().select("doc_id", "pos", "token_id", "token")
    tb = run.tokens.sort("doc_id", "pos").collect().select("doc_id", "pos", "token_id", "token")
    assert a.equals(b)
    assert ta.equals(tb)


def _vllm_outputs(docs, split=False):
    """RequestOutput-like objects: prompt = first half, output = rest + one token never fed back."""
    outs = []
    for i, (ids, arr) in enumerate(docs):
        p = len(ids) // 2
        gen = ids[p:] + [7]  # the last generated token has no routing
        if split:  # newer vLLM: prompt_routed_experts + the completion's generated rows
            outs.append(NS(request_id=f"r{i}", prompt_token_ids=ids[:p], num_cached_tokens=0,
                           prompt_routed_experts=arr[:p].astype(np.int16),
                           outputs=[NS(index=0, token_ids=gen, routed_experts=arr[p:].astype(np.int16))]))
        else:
            outs.append(NS(request_id=f"r{i}", prompt_token_ids=ids[:p], num_cached_tokens=0,
                           outputs=[NS(index=0, token_ids=gen, routed_experts=arr.astype(np.int16))]))
    return outs


@pytest.mark.parametrize("split", [False, True])
def test_vllm_equals_capture(captured, tmp_path, split):
    model, run, docs = captured
    imp = import_routed_experts(_vllm_outputs(docs, split), tmp_path / "imp", model=str(model), progress=False)
    _same(imp, run)
    assert imp.manifest["source"] == "vllm" and imp.moe_layers == [1, 2, 3]  # dense layer 0 from the config
    assert imp.manifest["import"]["tokens_without_routing"] == len(docs)  # each request's last token
    w = imp.routing.select("weights").collect()["weights"].explode()
    assert w.null_count() == w.len()  # engines record no weights
    tok = imp.tokens.sort("doc_id", "pos").collect()
    d0 = tok.filter(pl.col("doc_id") == 0)
    assert d0["phase"].to_list() == ["prefill"] * (len(docs[0][0]) // 2) + ["decode"] * (len(d0) - len(docs[0][0]) // 2)


def test_vllm_json_without_model_infers_dense_layers(captured, tmp_path):
    model, run, docs = captured
    lines = [json.dumps({"request_id": o.request_id, "prompt_token_ids": o.prompt_token_ids,
                         "outputs": [{"index": 0, "token_ids": o.outputs[0].token_ids,
                                      "routed_experts": o.outputs[0].routed_experts.tolist()}]})
             for o in _vllm_outputs(docs)]
    src = tmp_path / "out.jsonl"
    src.write_text("\n".join(lines))
    imp = import_routed_experts(str(src), tmp_path / "imp", engine="vllm", n_experts=8, progress=False)
    assert imp.moe_layers == [1, 2, 3] and imp.n_experts == 8 and imp.top_k == 2
    key = ["doc_id", "pos", "layer", "experts"]
    assert imp.routing.sort(key[:3]).collect().select(key).equals(run.routing.sort(key[:3]).collect().select(key))


def test_vllm_prefix_cache_and_batch(captured, tmp_path):
    """Two completions of one request (n=2) and a prefix-cached prompt whose cached slots the engine left
    zero-filled: those tokens are dropped (counted), the rest imported exactly."""
    model, run, docs = captured
    ids, arr = docs[0]
    zeroed = arr.copy()
    zeroed[:3] = 0
    req = NS(request_id="a", prompt_token_ids=ids[:5], num_cached_tokens=3,
             outputs=[NS(index=0, token_ids=ids[5:] + [1], routed_experts=zeroed),
                      NS(index=1, token_ids=ids[5:] + [2], routed_experts=arr)])
    imp = import_routed_experts([req], tmp_path / "imp", model=str(model), progress=False)
    tok = imp.tokens.sort("doc_id", "pos").collect()
    assert tok.filter(pl.col("doc_id") == 0)["pos"].min() == 3  # cached, unrouted slots dropped
    assert tok.filter(pl.col("doc_id") == 1).height == len(ids)
    assert tok.filter((pl.col("doc_id") == 1) & (pl.col("pos") < 3))["cached"].all()
    assert imp.manifest["import"]["dropped_empty_routing"] == 3
    assert sorted(tok["completion"].unique().to_list()) == [0, 1]


def _sglang_response(ids, arr, p, rid):
    flat = np.ascontiguousarray(arr, "<i4")
    return {"text": "", "output_ids": ids[p:] + [5],
            "meta_info": {"id": rid, "prompt_tokens": p, "completion_tokens": len(ids) - p + 1, "cached_tokens": 0,
                          "routed_experts": base64.b64encode(flat.tobytes()).decode("ascii")}}


def test_sglang_base64_with_eplb_physical_ids(captured, tmp_path):
    """SGLang reports physical ids (after its EPLB mapping): with the placement they map back exactly."""
    model, run, docs = captured
    # 8 logical experts on 10 physical slots: a permutation plus replicas of experts 1 and 5
    p2l = np.array([3, 1, 0, 7, 5, 2, 6, 4, 1, 5])
    l2p = {int(lg): [i for i, x in enumerate(p2l) if x == lg] for lg in range(8)}
    resp, toks = [], []
    for i, (ids, arr) in enumerate(docs):
        phys = np.vectorize(lambda e: l2p[int(e)][-1])(arr)  # replicas chosen where they exist
        phys[:, 0] = 0  # dense layer
        resp.append(_sglang_response(ids, phys, len(ids) // 2, f"q{i}"))
        toks.append({"input_ids": ids[: len(ids) // 2], "lang": "xx"})
    m = np.tile(np.arange(10) % 8, (4, 1))
    m[1:] = p2l
    loc = tmp_path / "loc.json"
    loc.write_text(json.dumps({"physical_to_logical_map": m.tolist()}))
    imp = import_routed_experts(resp, tmp_path / "imp", engine="sglang", model=str(model), tokens=toks,
                                physical_to_logical=str(loc), progress=False)
    _same(imp, run)
    assert "lang" in imp.label_columns
    with pytest.raises(WorkbenchError, match="physical"):
        import_routed_experts(resp, tmp_path / "imp2", engine="sglang", model=str(model), tokens=toks, progress=False)


def test_sglang_dump_chunked_prefill_and_decode(captured, tmp_path):
    """Per-token recorder dump: doc 0 prefilled in two chunks, doc 1 in one, then decode steps of both."""
    model, run, docs = captured
    (ids0, a0), (ids1, a1) = docs[0], docs[1]
    n0, n1 = len(ids0), len(ids1)
    p2l = np.tile(np.arange(8), (4, 1))  # trivial placement

    def rec(fid, parts, ext):
        ids = [t for d, s, e in parts for t in (docs[d][0][s:e])]
        pos = [q for d, s, e in parts for q in range(s, e)]
        topk = torch.full((4, len(ids), 8), -1, dtype=torch.int32)
        rows = np.concatenate([docs[d][1][s:e] for d, s, e in parts])  # [n, 4, 2]
        topk[1:, :, :2] = torch.from_numpy(rows.transpose(1, 0, 2)[1:].copy())
        return {"forward_pass_id": fid, "rank": 0, "gatherer_key": "primary", "input_ids": ids, "positions": pos,
                "extend_seq_lens": ext, "forward_mode": 1 if ext else 2, "topk_ids_of_layer": topk,
                "misc_objects": [], "global_physical_count": torch.zeros(4, 8, dtype=torch.int32)}

    c, d0, d1 = 4, n0 - 2, n1 - 2  # decode the last two tokens of each doc
    # the chunked request is the last one of its prefill batch (SGLang's PrefillAdder truncates the request it
    # adds last) and resumes in the next prefill batch
    records = [rec(0, [(1, 0, d1), (0, 0, c)], [d1, c]),
               rec(1, [(0, c, d0)], [d0 - c]),
               rec(2, [(0, d0, d0 + 1), (1, d1, d1 + 1)], None),
               rec(3, [(1, d1 + 1, d1 + 2), (0, d0 + 1, d0 + 2)], None)]  # batch order may change
    dump = tmp_path / "expert_distribution_recorder_1.0_0.pt"
    torch.save({"records": records, "last_physical_to_logical_map": torch.from_numpy(p2l)}, dump)
    dup = tmp_path / "expert_distribution_recorder_1.0_1.pt"  # a TP peer saw the same tokens
    torch.save({"records": [dict(r, rank=1) for r in records],
                "last_physical_to_logical_map": torch.from_numpy(p2l)}, dup)
    imp = import_routed_experts(str(tmp_path), tmp_path / "imp", engine="sglang-dump", model=str(model),
                                progress=False)
    key = ["pos", "layer", "experts"]
    got = imp.routing.sort("doc_id", "pos", "layer").collect()
    want = run.routing.sort("doc_id", "pos", "layer").collect()
    for seq, doc in ((0, 1), (1, 0)):  # sequences numbered as they appear: doc 1 is the first segment
        assert got.filter(pl.col("doc_id") == seq).select(key).equals(want.filter(pl.col("doc_id") == doc).select(key))
    ph = imp.tokens.filter(pl.col("doc_id") == 1).sort("pos").collect()["phase"].to_list()
    assert ph == ["prefill"] * d0 + ["decode"] * 2


def test_sglang_stat_dump_feeds_placement(captured, tmp_path):
    model, _, _ = captured
    counts = torch.zeros(3, 4, 8, dtype=torch.int32)
    counts[:, 1:, :] = 10
    counts[:, 1:, 3] = 50  # expert 3 hot in every MoE layer (the trivial map replicates 0 and 1 only)
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None},
               tmp_path / "stat.pt")
    imp = import_routed_experts(str(tmp_path / "stat.pt"), tmp_path / "imp", model=str(model), progress=False)
    assert not imp.has("routing") and imp.has("expert_load")
    from workbench.analysis import analyze

    res = analyze("placement", imp, ep=2, redundant=2, fit_fraction=1.0)
    lay = res.tables["layers"]
    assert (lay["balancedness_eplb"] > lay["balancedness_contiguous"]).all()


def test_analyses_on_imported_run(captured, tmp_path):
    """Id-only analyses give the capture's answers on the import; those needing outputs say so."""
    from workbench.analysis import analyze

    model, run, docs = captured
    imp = import_routed_experts(_vllm_outputs(docs), tmp_path / "imp", model=str(model), progress=False)
    a = analyze("stats", imp, progress=False).tables["experts"].filter(pl.col("label").is_null())
    b = analyze("stats", run, progress=False).tables["experts"].filter(pl.col("label").is_null())
    assert a["count"].to_list() == b["count"].to_list()
    assert a["mean_weight"].is_nan().all()  # no weights: honest NaN, not a made-up number
    la = analyze("lrc", imp, m=[4], n_boot=0, progress=False).table
    lb = analyze("lrc", run, m=[4], n_boot=0, progress=False).table
    assert la.height == lb.height
    with pytest.raises(WorkbenchError):
        analyze("super-experts", imp)


def test_resume_after_crash(captured, tmp_path, monkeypatch):
    model, run, docs = captured
    outs = _vllm_outputs(docs)
    from workbench.store import RunWriter

    real = RunWriter.write_part
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(RunWriter, "write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        import_routed_experts(outs, tmp_path / "imp", model=str(model), part_tokens=1, progress=False)
    monkeypatch.setattr(RunWriter, "write_part", real)
    with pytest.raises(WorkbenchError, match="resume"):
        import_routed_experts(outs, tmp_path / "imp", model=str(model), progress=False)
    imp = import_routed_experts(outs, tmp_path / "imp", model=str(model), part_tokens=1, resume=True, progress=False)
    _same(imp, run)


def test_cli_import_and_errors(captured, tmp_path, capsys):
    from workbench.cli import main

    model, run, docs = captured
    src = tmp_path / "resp.jsonl"
    src.write_text("\n".join(json.dumps(_sglang_response(ids, arr, len(ids) // 2, i)) for i, (ids, arr) in enumerate(docs)))
    assert main(["import", "sglang", str(src), "--out", str(tmp_path / "r"), "--model", str(model)]) == 0
    assert main(["import", "sglang", str(src), "--out", str(tmp_path / "r2")]) == 2  # no model: one sentence
    err = capsys.readouterr().err
    assert "--model" in err and "Traceback" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"meta_info": {"routed_experts": "@@@"}}')
    assert main(["import", "sglang", str(bad), "--out", str(tmp_path / "r3"), "--model", str(model)]) == 2
    assert not (tmp_path / "r3" / "routing").exists()
