"""Imports of what vLLM (0.14..0.34) and SGLang (0.5.4..0.5.23) send, per release, built exactly as each
release's source emits them from a known routing (a direct capture) and checked to import exactly.

Sources, one stored version each (named in each test): vllm/outputs.py (RequestOutput, CompletionOutput),
vllm/entrypoints/openai/protocol.py (CompletionResponseChoice / ChatCompletionResponse: routed_experts
"base64-encoded .npy bytes ... dtype uint8/uint16", prompt_token_ids), vllm/sampling_params.py
(routed_experts_prompt_start), sglang python/sglang/srt/managers/io_struct.py (GenerateReqInput:
return_routed_experts, routed_experts_start_len "response covers [routed_experts_start_len, seqlen - 1)",
return_prompt_token_ids), python/sglang/srt/eplb/expert_distribution.py (recorder records, _StatAccumulator,
_CircularBuffer, _convert_local_to_global_physical_count).
"""

from __future__ import annotations

import base64
import io
import json
import tracemalloc
from types import SimpleNamespace as NS

import numpy as np
import polars as pl
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.importers import import_routed_experts

TEXTS = ["The quick brown fox jumps over.", "def add(a, b): return a+b", "Der Hund schläft heute.", "2 + 2 = 4 ok"]
E, K, NL = 8, 2, 4  # tiny deepseek_v2: 4 decoder layers, layer 0 dense


@pytest.fixture(scope="module")
def cap(tiny_dir, tmp_path_factory):
    """A direct capture and its routing as the engines' buffers hold it: [n, num_hidden_layers, top_k]."""
    import workbench as wb

    model = tiny_dir("deepseek_v2", layers=NL, experts=E, top_k=K)
    run = wb.capture(str(model), TEXTS, tmp_path_factory.mktemp("cap") / "run", progress=False)
    r = run.routing.sort("doc_id", "pos", "layer").collect()
    t = run.tokens.sort("doc_id", "pos").collect()
    docs = []
    for d in range(len(TEXTS)):
        ids = t.filter(pl.col("doc_id") == d)["token_id"].to_list()
        arr = np.zeros((len(ids), NL, K), np.int32)  # dense layer 0 stays zero, as in the engines' buffers
        for pos, layer, ex in r.filter(pl.col("doc_id") == d).select("pos", "layer", "experts").iter_rows():
            arr[pos, layer] = ex
        docs.append((ids, arr))
    return model, run, docs


KEY = ["doc_id", "pos", "layer", "experts"]


def _routing(run, docs=None):
    df = run.routing.sort("doc_id", "pos", "layer").collect().select(KEY)
    return df if docs is None else df.filter(pl.col("doc_id").is_in(docs))


def _tokens(run):
    return run.tokens.sort("doc_id", "pos").collect().select("doc_id", "pos", "token_id", "phase")


def _same(imp, run, phases=True):
    assert _routing(imp).equals(_routing(run))
    a, b = _tokens(imp), _tokens(run)
    assert a.select("doc_id", "pos", "token_id").equals(b.select("doc_id", "pos", "token_id"))


def _npy_b64(a: np.ndarray) -> str:
    """vllm/entrypoints/openai (0.22+): base64.b64encode of np.save bytes."""
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def _vllm_dtype(release: tuple) -> str:
    """int32 up to 0.20, int16 in 0.21, uint8 from 0.22 (uint16 above 256 experts)."""
    return "int32" if release < (0, 21) else "int16" if release < (0, 22) else "uint8"


def _split(ids):
    p = len(ids) // 2
    return ids[:p], ids[p:] + [7]  # the last sampled token is never fed back: it has no row


# --------------------------------------------------------------------------------------------- vLLM


@pytest.mark.parametrize("release", [(0, 14), (0, 20), (0, 21), (0, 22), (0, 34)])
def test_vllm_python_objects_per_release(cap, tmp_path, release):
    """vllm/outputs.py: CompletionOutput.routed_experts covers prompt + output - 1 rows; 0.21.0 alone
    splits it into RequestOutput.prompt_routed_experts + the generated rows; 0.22+ repeats the prompt
    rows in each of the n samples. Two samples per request here (both of the same routing)."""
    model, run, docs = cap
    dt = _vllm_dtype(release)
    outs = []
    for i, (ids, arr) in enumerate(docs):
        prompt, gen = _split(ids)
        a = arr.astype(dt)
        if release == (0, 21):
            outs.append(NS(request_id=f"r{i}", prompt_token_ids=prompt, num_cached_tokens=0,
                           prompt_routed_experts=a[: len(prompt)],
                           outputs=[NS(index=j, token_ids=gen, routed_experts=a[len(prompt):]) for j in range(2)]))
        else:
            outs.append(NS(request_id=f"r{i}", prompt_token_ids=prompt, num_cached_tokens=0,
                           outputs=[NS(index=j, token_ids=gen, routed_experts=a.copy()) for j in range(2)]))
    imp = import_routed_experts(outs, tmp_path / "imp", model=str(model), progress=False,
                                engine_version=".".join(map(str, release)))
    got = imp.routing.sort("doc_id", "pos", "layer").collect()
    for d in range(len(docs)):  # doc 2d and 2d+1 are the two samples of request d
        want = _routing(run, [d]).drop("doc_id")
        for s in (2 * d, 2 * d + 1):
            assert got.filter(pl.col("doc_id") == s).select(KEY[1:]).equals(want)
    assert imp.manifest["import"]["documents"] == 2 * len(docs)


def _openai_completion(docs, b64=True, chat=False):
    """vllm/entrypoints/openai/protocol.py, 0.22+: choices[i].routed_experts base64 .npy (uint8), token_ids;
    completions put prompt_token_ids on each choice (return_token_ids), chat on the response."""
    resp = []
    for i, (ids, arr) in enumerate(docs):
        prompt, gen = _split(ids)
        re = _npy_b64(arr.astype(np.uint8)) if b64 else arr.tolist()
        choice = {"index": 0, "text": "", "finish_reason": "length", "token_ids": gen, "routed_experts": re}
        if chat:
            resp.append({"id": f"chatcmpl-{i}", "object": "chat.completion", "prompt_token_ids": prompt,
                         "choices": [dict(choice, message={"role": "assistant", "content": ""})],
                         "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(gen)}})
        else:
            resp.append({"id": f"cmpl-{i}", "object": "text_completion",
                         "choices": [dict(choice, prompt_token_ids=prompt)],
                         "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(gen)}})
    return resp


@pytest.mark.parametrize("kind", ["completions-0.22", "chat-0.22", "completions-0.20-lists"])
def test_vllm_openai_http_responses(cap, tmp_path, kind):
    """The OpenAI server's JSON, as a .jsonl of responses: base64 .npy from 0.22 (the import stopped on
    '<U360' before), nested lists before; prompt ids from the response, no --tokens needed."""
    model, run, docs = cap
    resp = _openai_completion(docs, b64="0.22" in kind, chat=kind.startswith("chat"))
    src = tmp_path / "resp.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in resp))
    imp = import_routed_experts(str(src), tmp_path / "imp", engine="vllm", model=str(model), progress=False)
    _same(imp, run)
    assert (imp.tokens.collect()["token_id"] >= 0).all()  # prompt ids came from the response


def test_vllm_npy_size_bomb_and_bad_payloads(cap, tmp_path):
    """A .npy header that declares more than it carries is refused before np.load would allocate it."""
    model, _, docs = cap
    resp = _openai_completion(docs[:1])
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": "|u1", "fortran_order": False,
                                               "shape": (600_000_000, NL, 8)})
    resp[0]["choices"][0]["routed_experts"] = base64.b64encode(b"\x93NUMPY\x01\x00" + hdr.getvalue()[8:] +
                                                               b"\x00" * 64).decode()
    tracemalloc.start()
    with pytest.raises(WorkbenchError, match="declares shape"):
        import_routed_experts(resp, tmp_path / "a", engine="vllm", model=str(model), progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6 and not (tmp_path / "a").exists()
    for bad, msg in [("@@@", "base64"), (base64.b64encode(b"hello").decode(), "npy"),
                     (_npy_b64(np.zeros((2, 4, 2), np.float32)), "whole expert ids")]:
        resp[0]["choices"][0]["routed_experts"] = bad
        with pytest.raises(WorkbenchError, match=msg):
            import_routed_experts(resp, tmp_path / "b", engine="vllm", model=str(model), progress=False)
        assert not (tmp_path / "b").exists()


def test_vllm_routed_experts_prompt_start(cap, tmp_path):
    """vllm/sampling_params.py (0.34): routed_experts_prompt_start skips the first prompt rows; the rows are
    placed from that position (with the option, or the request saved with the response), and a row count
    that does not fit is refused in one sentence instead of shifting every row to position 0."""
    model, run, docs = cap
    S = 3
    resp = _openai_completion(docs)
    for r, (ids, arr) in zip(resp, docs):
        r["choices"][0]["routed_experts"] = _npy_b64(arr[S:].astype(np.uint8))
    with pytest.raises(WorkbenchError, match="--routed-start"):
        import_routed_experts(resp, tmp_path / "no", engine="vllm", model=str(model), progress=False)
    assert not (tmp_path / "no").exists()
    imp = import_routed_experts(resp, tmp_path / "imp", engine="vllm", model=str(model), routed_start=S,
                                progress=False)
    want = _routing(run).filter(pl.col("pos") >= S)
    assert _routing(imp).equals(want)
    assert imp.tokens.collect()["pos"].min() == S
    saved = [dict(r, request={"routed_experts_prompt_start": S}) for r in resp]  # request stored alongside
    imp2 = import_routed_experts(saved, tmp_path / "imp2", engine="vllm", model=str(model), progress=False)
    assert _routing(imp2).equals(want)


@pytest.mark.parametrize("release,physical", [("0.14.1", True), ("0.15.0", True), ("0.16.0", False)])
def test_vllm_eplb_physical_ids_of_014_015(cap, tmp_path, release, physical):
    """vLLM 0.14-0.15 captured ids after the EPLB remap (physical); 0.16+ before it (logical)."""
    model, run, docs = cap
    p2l = np.array([3, 1, 0, 7, 5, 2, 6, 4, 1, 5])  # 8 logical experts on 10 physical slots
    l2p = {int(lg): [i for i, x in enumerate(p2l) if x == lg][-1] for lg in range(E)}
    outs = []
    for i, (ids, arr) in enumerate(docs):
        prompt, gen = _split(ids)
        a = np.vectorize(lambda e: l2p[int(e)])(arr) if physical else arr.copy()
        a[:, 0] = 0
        outs.append(NS(request_id=f"r{i}", prompt_token_ids=prompt, outputs=[NS(index=0, token_ids=gen,
                                                                                 routed_experts=a)]))
    m = np.tile(p2l, (NL, 1))
    if physical:
        imp = import_routed_experts(outs, tmp_path / "imp", model=str(model), physical_to_logical=m,
                                    engine_version=release, progress=False)
        _same(imp, run)
    else:
        with pytest.raises(WorkbenchError, match="logical"):
            import_routed_experts(outs, tmp_path / "imp", model=str(model), physical_to_logical=m,
                                  engine_version=release, progress=False)
        _same(import_routed_experts(outs, tmp_path / "imp2", model=str(model), engine_version=release,
                                    progress=False), run)


# --------------------------------------------------------------------------------------------- SGLang


def _sg(ids, arr, rid, start=0, prompt_ids=False, where_start="meta"):
    """sglang tokenizer_manager: meta_info.routed_experts = base64 of int32 rows [start, seqlen - 1)."""
    prompt, gen = _split(ids)
    flat = np.ascontiguousarray(arr[start:], "<i4")
    r = {"text": "", "output_ids": gen,
         "meta_info": {"id": rid, "prompt_tokens": len(prompt), "completion_tokens": len(gen), "cached_tokens": 0,
                       "finish_reason": {"type": "length"},
                       "routed_experts": base64.b64encode(flat.tobytes()).decode("ascii")}}
    if prompt_ids:  # return_prompt_token_ids (0.5.13+)
        r["prompt_token_ids"] = prompt
    if start and where_start == "meta":
        r["meta_info"]["routed_experts_start_len"] = start
    elif start and where_start == "request":
        r["request"] = {"routed_experts_start_len": start}
    return r


def test_sglang_prompt_ids_and_batch_list(cap, tmp_path):
    """0.5.13+ returns prompt_token_ids; a batch (or n > 1) request is answered by one JSON list of
    responses, saved as one line of the .jsonl (the import refused 'response 1 has no meta_info')."""
    model, run, docs = cap
    resp = [_sg(ids, arr, f"q{i}", prompt_ids=True) for i, (ids, arr) in enumerate(docs)]
    src = tmp_path / "batch.jsonl"
    src.write_text(json.dumps(resp[:2]) + "\n" + json.dumps(resp[2:]) + "\n")
    imp = import_routed_experts(str(src), tmp_path / "imp", engine="sglang", model=str(model),
                                engine_version="0.5.13", progress=False)
    _same(imp, run)
    assert (imp.tokens.collect()["token_id"] >= 0).all()  # no --tokens needed
    assert imp.manifest["settings"]["expert_ids"] == "logical"


def test_sglang_logical_from_0510_physical_0507_0509(cap, tmp_path):
    """sglang 0.5.10+ captures routed experts before the logical->physical remap (logical ids): a map must
    not be applied (it corrupted 2,366 of 2,784 counts); 0.5.7-0.5.9 captured physical ids."""
    model, run, docs = cap
    p2l = np.array([3, 1, 0, 7, 5, 2, 6, 4])  # a permutation: every physical id is below E
    l2p = np.argsort(p2l)
    m = np.tile(p2l, (NL, 1))
    logical = [_sg(ids, arr, i, prompt_ids=True) for i, (ids, arr) in enumerate(docs)]
    phys = []
    for i, (ids, arr) in enumerate(docs):
        a = l2p[arr]
        a[:, 0] = 0
        phys.append(_sg(ids, a, i, prompt_ids=True))
    with pytest.raises(WorkbenchError, match="drop --physical-to-logical"):
        import_routed_experts(logical, tmp_path / "a", engine="sglang", model=str(model), physical_to_logical=m,
                              engine_version="0.5.10", progress=False)
    with pytest.raises(WorkbenchError, match="--engine-version"):  # ids all < E: cannot tell, so ask
        import_routed_experts(logical, tmp_path / "b", engine="sglang", model=str(model), physical_to_logical=m,
                              progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    _same(import_routed_experts(logical, tmp_path / "c", engine="sglang", model=str(model),
                                engine_version="0.5.23", progress=False), run)
    _same(import_routed_experts(phys, tmp_path / "d", engine="sglang", model=str(model), physical_to_logical=m,
                                engine_version="0.5.8", progress=False), run)


@pytest.mark.parametrize("where", ["meta", "request", "option"])
def test_sglang_routed_experts_start_len(cap, tmp_path, where):
    """io_struct.py: with routed_experts_start_len the response covers [start, seqlen - 1): the rows are
    placed from there (the import put them at position 0 before: 12 of 572 sets right)."""
    model, run, docs = cap
    S = 2
    resp = [_sg(ids, arr, i, start=S, prompt_ids=True, where_start=where) for i, (ids, arr) in enumerate(docs)]
    kw = {"routed_start": S} if where == "option" else {}
    imp = import_routed_experts(resp, tmp_path / "imp", engine="sglang", model=str(model), progress=False,
                                engine_version="0.5.20", **kw)
    assert _routing(imp).equals(_routing(run).filter(pl.col("pos") >= S))
    if where == "option":
        with pytest.raises(WorkbenchError, match="--routed-start"):
            import_routed_experts(resp, tmp_path / "no", engine="sglang", model=str(model), progress=False)


def test_sglang_declared_size_bomb(cap, tmp_path):
    """A 600-byte response declaring prompt_tokens=6e8 is refused before anything of that size exists."""
    model, _, docs = cap
    ids, arr = docs[0]
    r = _sg(ids, arr, 0)
    r["meta_info"]["prompt_tokens"] = 6e8
    r.pop("output_ids")
    tracemalloc.start()
    with pytest.raises(WorkbenchError, match="declares"):
        import_routed_experts([r], tmp_path / "a", engine="sglang", model=str(model), progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6 and not (tmp_path / "a").exists()


# --------------------------------------------------------------------------------------------- recorder dumps


def _rec(docs, fid, parts, ext, rank=0, mode=None):
    """expert_distribution.py _DetailSinglePassGatherer.collect: metadata (input_ids, positions,
    extend_seq_lens, forward_mode) + topk_ids_of_layer [layers, tokens, 8] (-1 padded)."""
    ids = [t for d, s, e in parts for t in docs[d][0][s:e]]
    pos = [q for d, s, e in parts for q in range(s, e)]
    topk = torch.full((NL, len(ids), 8), -1, dtype=torch.int32)
    rows = np.concatenate([docs[d][1][s:e] for d, s, e in parts])
    topk[1:, :, :K] = torch.from_numpy(rows.transpose(1, 0, 2)[1:].copy())
    return {"forward_pass_id": fid, "rank": rank, "gatherer_key": "primary", "input_ids": ids, "positions": pos,
            "extend_seq_lens": ext, "forward_mode": mode or (1 if ext else 2), "topk_ids_of_layer": topk,
            "misc_objects": [], "global_physical_count": torch.zeros(NL, E, dtype=torch.int32)}


def test_dump_chunk_resumes_where_another_prefill_stopped(cap, tmp_path):
    """A realistic schedule: request A (c tokens) prefills whole in the same pass as the first c-token chunk
    of B (the chunked request is the one added last); the next prefill pass resumes B at position c, where
    A also stopped, alongside a new request C whose first c tokens hit the prefix cache. The old
    first-come rule appended B's second chunk to A (460/548 sets right)."""
    model, run, docs = cap
    (ida, _), (idb, _), (idc, _) = docs[0], docs[1], docs[2]
    c = 4
    A = [(0, 0, c)]  # A is a c-token prompt: its first c tokens
    nb, nc = len(idb), len(idc)
    recs = [_rec(docs, 0, [A[0], (1, 0, c)], [c, c]),
            _rec(docs, 1, [(1, c, nb - 1), (2, c, nc - 1)], [nb - 1 - c, nc - 1 - c]),
            _rec(docs, 2, [(0, c, c + 1), (1, nb - 1, nb), (2, nc - 1, nc)], None)]
    torch.save({"records": recs, "last_physical_to_logical_map": torch.arange(E).repeat(NL, 1)},
               tmp_path / "expert_distribution_recorder_1.0_0.pt")
    imp = import_routed_experts(str(tmp_path / "expert_distribution_recorder_1.0_0.pt"), tmp_path / "imp",
                                engine="sglang-dump", model=str(model), progress=False)
    got = imp.routing.sort("doc_id", "pos", "layer").collect()
    want = _routing(run)
    # sequences in order of appearance: A, B, C
    for seq, (d, lo, hi) in enumerate([(0, 0, c + 1), (1, 0, nb), (2, c, nc)]):
        w = want.filter((pl.col("doc_id") == d) & (pl.col("pos") >= lo) & (pl.col("pos") < hi)).drop("doc_id")
        assert got.filter(pl.col("doc_id") == seq).select(KEY[1:]).equals(w), seq
    tok = imp.tokens.filter(pl.col("doc_id") == 1).sort("pos").collect()
    assert tok["phase"].to_list() == ["prefill"] * (nb - 1) + ["decode"]
    assert imp.tokens.filter(pl.col("doc_id") == 2).collect()["pos"].min() == c  # cached prefix: not routed here


def test_dump_links_sequences_by_request_ids_when_records_carry_them(cap, tmp_path):
    """Where records carry request ids (one per segment; per token in decode) they link the sequences, even
    where positions and pass order alone would not (here B's second chunk follows a decode pass and A's
    prefill stopped where B's first chunk did, so the order rule alone could not tell them apart)."""
    model, run, docs = cap
    c = 4
    nb = len(docs[1][0])
    recs = [_rec(docs, 0, [(1, 0, c), (0, 0, c)], [c, c]),
            _rec(docs, 1, [(0, c, c + 1)], None),
            _rec(docs, 2, [(1, c, nb)], [nb - c])]
    recs[0]["rids"], recs[1]["rids"], recs[2]["rids"] = ["B", "A"], ["A"], ["B"]
    torch.save({"records": recs, "last_physical_to_logical_map": torch.arange(E).repeat(NL, 1)},
               tmp_path / "expert_distribution_recorder_1.0_0.pt")
    imp = import_routed_experts(str(tmp_path / "expert_distribution_recorder_1.0_0.pt"), tmp_path / "imp",
                                engine="sglang-dump", model=str(model), progress=False)
    got = imp.routing.sort("doc_id", "pos", "layer").collect()
    want = _routing(run)
    for seq, (d, hi) in enumerate([(1, nb), (0, c + 1)]):
        w = want.filter((pl.col("doc_id") == d) & (pl.col("pos") < hi)).drop("doc_id")
        assert got.filter(pl.col("doc_id") == seq).select(KEY[1:]).equals(w), seq


def test_dump_per_pass_deepep_ranks_and_tp_duplicates(cap, tmp_path):
    """DeepEP: each rank counts its own tokens into its slice of the physical experts
    (_convert_local_to_global_physical_count), under the same forward_pass_ids: all ranks add up. A TP
    peer's identical records are counted once."""
    model, _, _ = cap
    rng = np.random.default_rng(0)
    truth = np.zeros((3, NL, E), np.int64)
    for rank in range(2):
        recs = []
        for fid in range(3):
            local = rng.integers(0, 50, (NL, E // 2))
            g = np.zeros((NL, E), np.int64)
            g[:, rank * E // 2:(rank + 1) * E // 2] = local
            truth[fid] += g
            recs.append({"forward_pass_id": fid, "rank": rank, "gatherer_key": "primary",
                         "global_physical_count": torch.from_numpy(g.astype(np.int32))})
        d = {"records": recs, "last_physical_to_logical_map": torch.arange(E).repeat(NL, 1)}
        torch.save(d, tmp_path / f"expert_distribution_recorder_1.0_{rank}.pt")
        if rank == 0:  # a TP peer of rank 0 (rank 2) saw the same tokens
            torch.save({**d, "records": [dict(r, rank=2) for r in recs]},
                       tmp_path / "expert_distribution_recorder_1.0_2.pt")
    imp = import_routed_experts(str(tmp_path), tmp_path / "imp", engine="sglang-dump", model=str(model),
                                progress=False)
    got = imp.table("expert_load").sort("window", "layer", "expert").collect()
    want = truth[:, 1:, :].reshape(-1)  # MoE layers 1..3
    assert got["count"].to_numpy().tolist() == want.tolist()


def test_stat_dump_drops_empty_buffer_slots(cap, tmp_path):
    """_StatAccumulator dumps its whole _CircularBuffer (zeros until written, no write index): the unused
    slots are dropped; a full buffer may have wrapped, so the window order is reported unknown."""
    from workbench.analysis import analyze

    model, _, _ = cap
    buf = torch.zeros(1000, NL, E, dtype=torch.int32)
    rng = np.random.default_rng(1)
    filled = torch.from_numpy(rng.integers(1, 40, (33, NL, E)).astype(np.int32))
    filled[:, 0] = 0
    buf[:33] = filled
    torch.save({"rank": 0, "logical_count": buf}, tmp_path / "stat.pt")
    imp = import_routed_experts(str(tmp_path / "stat.pt"), tmp_path / "imp", model=str(model), progress=False)
    info = imp.manifest["import"]
    assert info["windows"] == 33 and info["empty_windows_dropped"] == 967
    assert info["window_order"] == "as recorded"
    got = imp.table("expert_load").sort("window", "layer", "expert").collect()["count"].to_numpy()
    assert got.tolist() == filled[:, 1:].numpy().reshape(-1).tolist()
    res = analyze("placement", imp, ep=2, redundant=2, fit_fraction=0.5)
    assert res.tables["balance"]["window"].max() == 32
    torch.save({"rank": 0, "logical_count": filled}, tmp_path / "full.pt")  # every slot written: maybe wrapped
    imp2 = import_routed_experts(str(tmp_path / "full.pt"), tmp_path / "imp2", model=str(model), progress=False)
    assert imp2.manifest["import"]["window_order"].startswith("unknown")
    assert "window order is unknown" in analyze("placement", imp2, ep=2, redundant=2).summary
    assert "window order" not in res.summary


def test_placement_skips_empty_windows_of_older_imports(cap, tmp_path):
    """A run imported before empty slots were dropped keeps them in expert_load: placement ignores them
    (it fitted and judged on 967 empty windows of 1,000, '1.000 -> 1.000')."""
    from workbench.analysis import analyze
    from workbench.importers import Counts, model_facts, write_run

    model, _, _ = cap
    rng = np.random.default_rng(2)
    c = np.zeros((12, NL, E), np.int64)
    c[:4, 1:] = rng.integers(1, 60, (4, NL - 1, E))
    mi = model_facts(str(model))
    old = write_run(lambda: iter([Counts(counts=c, window="recorder step")]), tmp_path / "old", "sglang-dump", mi,
                    progress=False)
    new = write_run(lambda: iter([Counts(counts=c[:4], window="recorder step")]), tmp_path / "new", "sglang-dump",
                    mi, progress=False)
    a = analyze("placement", old, ep=2, redundant=2, fit_fraction=0.5)
    b = analyze("placement", new, ep=2, redundant=2, fit_fraction=0.5)
    assert a.tables["balance"]["window"].max() == 3
    assert a.tables["layers"].equals(b.tables["layers"])


def test_requests_without_routed_experts_are_counted_not_fatal(cap, tmp_path):
    """vllm protocol.py: routed_experts is None "if the request was aborted before any forward pass"
    (SGLang leaves meta_info.routed_experts out likewise): such a request is counted, the rest imported
    exactly; when none carries any, the sentence says how to turn the recording on."""
    model, run, docs = cap
    resp = _openai_completion(docs)
    resp.insert(2, {"id": "cmpl-aborted", "choices": [{"index": 0, "text": "", "token_ids": [],
                                                         "prompt_token_ids": [1, 2], "routed_experts": None}]})
    imp = import_routed_experts(resp, tmp_path / "v", engine="vllm", model=str(model), progress=False)
    got = imp.routing.sort("doc_id", "pos", "layer").collect()
    for d in range(len(docs)):  # doc ids follow the input order: the aborted request was number 2
        assert got.filter(pl.col("doc_id") == (d if d < 2 else d + 1)).select(KEY[1:]).equals(
            _routing(run, [d]).drop("doc_id"))
    assert imp.manifest["import"]["requests_without_routing"] == 1
    sg = [_sg(ids, arr, i, prompt_ids=True) for i, (ids, arr) in enumerate(docs)]
    for r in sg:
        r["meta_info"].pop("routed_experts")
    with pytest.raises(WorkbenchError, match="--enable-return-routed-experts"):
        import_routed_experts(sg, tmp_path / "s", engine="sglang", model=str(model), progress=False)
    assert not (tmp_path / "s").exists()
