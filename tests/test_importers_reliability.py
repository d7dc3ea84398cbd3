"""Imports bound what an input can carry (issue reliability-2, items 3 and 7): ids are range-checked against
the run's column types and the model (or the trace's own maxima), declared sizes against the payload, a
physical->logical map holding -1 is refused where it is used, malformed fields give one sentence, a refused
import leaves no folder that blocks the retry, and a resumed import's counts cover every row.

Responses are built as the engines emit them (SGLang python/sglang/srt/managers/tokenizer_manager.py:
meta_info.routed_experts = base64 int32 [seqlen - 1, num_hidden_layers, top_k]; vLLM vllm/outputs.py:
CompletionOutput.routed_experts [prompt + output - 1, num_hidden_layers, top_k]), then damaged.
"""

from __future__ import annotations

import base64
import copy
import json
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.importers import import_routed_experts

E, K, NL = 8, 2, 4


@pytest.fixture(scope="module")
def model(tiny_dir):
    return str(tiny_dir("deepseek_v2", layers=NL, experts=E, top_k=K))


def _routing(n, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((n, NL, K), np.int32)
    for t in range(n):
        for layer in range(1, NL):
            a[t, layer] = rng.choice(E, K, replace=False)
    return a


def _sg(n_prompt=5, n_gen=4, seed=0, arr=None):
    arr = _routing(n_prompt + n_gen - 1, seed) if arr is None else arr
    return {"text": "", "output_ids": list(range(100, 100 + n_gen)),
            "meta_info": {"id": f"q{seed}", "prompt_tokens": n_prompt, "completion_tokens": n_gen,
                          "cached_tokens": 0, "prompt_token_ids": list(range(10, 10 + n_prompt)),
                          "routed_experts": base64.b64encode(np.ascontiguousarray(arr, "<i4").tobytes()).decode()}}


def _vl(experts, prompt=(1, 2, 3), gen=(4, 5)):
    return NS(request_id="r", prompt_token_ids=list(prompt),
              outputs=[NS(index=0, token_ids=list(gen), routed_experts=np.asarray(experts))])


# ------------------------------------------------------------------------------------------ ids


@pytest.mark.parametrize("bad,msg", [(65539, "beyond what a run stores"), (40000, "beyond what a run stores")])
def test_expert_id_beyond_int16_refused_without_model(tmp_path, bad, msg):
    """Without --model the trace's own maximum sets E; an id the int16 column cannot hold is refused
    (it was stored as 65539 -> 3, 40000 -> -25536, exit 0)."""
    ex = np.tile(np.array([[0, 1], [2, 3]]), (4, 1, 1))
    ex[1, 1, 0] = bad
    with pytest.raises(WorkbenchError, match=msg):
        import_routed_experts([_vl(ex)], tmp_path / "r", engine="vllm", progress=False)
    assert not (tmp_path / "r").exists()
    with pytest.raises(WorkbenchError, match="out of range for 8 experts"):
        import_routed_experts([_vl(ex)], tmp_path / "r", engine="vllm", n_experts=8, progress=False)
    assert not (tmp_path / "r").exists()


def test_negative_or_64bit_expert_ids_refused(tmp_path):
    """-1 pads an empty slot; any other negative id was dropped as an empty row: refused instead, as is an id
    past 64 bits in a JSON list."""
    ex = np.tile(np.array([[0, 1], [2, 3]]), (4, 1, 1))
    ex[1, 0, 0] = -5
    with pytest.raises(WorkbenchError, match="negative"):
        import_routed_experts([_vl(ex)], tmp_path / "r", engine="vllm", progress=False)
    big = np.tile(np.array([[0, 1], [2, 3]]), (4, 1, 1)).tolist()
    big[1][0][0] = 2**64 - 1
    rec = {"id": "c", "choices": [{"index": 0, "prompt_token_ids": [1, 2, 3], "token_ids": [4, 5],
                                   "routed_experts": big}]}
    with pytest.raises(WorkbenchError, match="64-bit|integer array"):  # numpy reads the mix as float64
        import_routed_experts([rec], tmp_path / "r", engine="vllm", progress=False)
    assert not (tmp_path / "r").exists()


def test_token_id_beyond_int32_or_vocab_refused(model, tmp_path):
    ex = np.tile(np.array([[0, 1], [2, 3]]), (4, 1, 1))
    with pytest.raises(WorkbenchError, match="outside the stored range"):
        import_routed_experts([_vl(ex, prompt=(1, 2**32 + 17, 3))], tmp_path / "r", engine="vllm", progress=False)
    r = _sg()
    r["meta_info"]["prompt_token_ids"][2] = 10**6  # the tiny model's vocabulary is far smaller
    with pytest.raises(WorkbenchError, match="vocabulary"):
        import_routed_experts([r], tmp_path / "r", engine="sglang", model=model, progress=False)
    assert not (tmp_path / "r").exists()


def test_physical_to_logical_map_with_minus_one(model, tmp_path):
    """A map slot of -1 (unused) that routed tokens hit would add them to the last expert (m[-1]): refused;
    a -1 at a slot nobody used is harmless and the import exact."""
    p2l = np.array([3, 1, 0, 7, 5, 2, 6, 4, -1, 5])
    l2p = {int(v): i for i, v in enumerate(p2l) if v >= 0}
    logical = _routing(8)
    phys = np.vectorize(lambda e: l2p[int(e)])(logical)
    phys[:, 0] = 0
    m = np.tile(p2l, (NL, 1))
    imp = import_routed_experts([_sg(arr=phys)], tmp_path / "ok", engine="sglang", model=model,
                                physical_to_logical=m, engine_version="0.5.8", progress=False)
    got = np.stack(imp.routing.sort("pos", "layer").collect()["experts"].to_list()).reshape(8, NL - 1, K)
    assert (got == logical[:, 1:]).all()
    phys[3, 2, 1] = 8  # a token routed to the slot the map leaves empty
    with pytest.raises(WorkbenchError, match="to -1"):
        import_routed_experts([_sg(arr=phys)], tmp_path / "bad", engine="sglang", model=model,
                              physical_to_logical=m, engine_version="0.5.8", progress=False)
    assert not (tmp_path / "bad").exists()
    # per-pass counts on a -1 slot (sglang expert_distribution.py per_pass records)
    g = np.zeros((NL, 10), np.int32)
    g[1:, :8] = 5
    rec = {"forward_pass_id": 0, "rank": 0, "global_physical_count": torch.from_numpy(g)}
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.from_numpy(m)}, tmp_path / "ok.pt")
    run = import_routed_experts(str(tmp_path / "ok.pt"), tmp_path / "d_ok", engine="sglang-dump", model=model,
                                progress=False)
    cnt = run.table("expert_load").sort("layer", "expert").collect()["count"].to_numpy().reshape(NL - 1, E)
    want = np.bincount(p2l[:8], weights=np.full(8, 5), minlength=E)
    assert (cnt == want).all()
    g[2, 8] = 7
    rec["global_physical_count"] = torch.from_numpy(g)
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.from_numpy(m)}, tmp_path / "bad.pt")
    with pytest.raises(WorkbenchError, match="7 counts fall there"):
        import_routed_experts(str(tmp_path / "bad.pt"), tmp_path / "d_bad", engine="sglang-dump", model=model,
                              progress=False)
    assert not (tmp_path / "d_bad").exists()


# ------------------------------------------------------------------------------------------ malformed fields


def _set(d, path, v):
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = v


SG_BAD = [(("meta_info",), 5), (("meta_info", "routed_experts"), 5), (("meta_info", "routed_experts"), "@@"),
          (("meta_info", "prompt_tokens"), "abc"), (("meta_info", "prompt_tokens"), 6e8),
          (("meta_info", "prompt_tokens"), -4), (("meta_info", "completion_tokens"), True),
          (("output_ids",), "xyz"), (("output_ids",), [1.5, 2]), (("meta_info", "prompt_token_ids"), [None]),
          (("meta_info", "cached_tokens"), -3), (("meta_info", "routed_experts_start_len"), "x"),
          (("meta_info", "routed_experts_start_len"), 50), (("meta_info", "output_token_logprobs"), 7)]


@pytest.mark.parametrize("path,value", SG_BAD, ids=[f"{'.'.join(p)}={v!r}"[:40] for p, v in SG_BAD])
def test_cli_malformed_sglang_fields_one_sentence(model, tmp_path, capsys, path, value):
    from workbench.cli import main

    r = _sg()
    if path[-1] == "output_token_logprobs":  # read only where output_ids are absent
        r.pop("output_ids")
    _set(r, path, value)
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(r))
    assert main(["import", "sglang", str(src), "--out", str(tmp_path / "run"), "--model", model]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error:") and "Traceback" not in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()


VL_BAD = [(("choices",), "x"), (("choices", 0, "routed_experts"), [[[1, 2]], [[3]]]),
          (("choices", 0, "routed_experts"), [[["a", "b"]]]), (("choices", 0, "token_ids"), [None]),
          (("choices", 0, "prompt_token_ids"), [2**40]), (("choices", 0, "index"), "z"),
          (("usage", "prompt_tokens"), -1), (("choices", 0, "routed_experts"), 12)]


@pytest.mark.parametrize("path,value", VL_BAD, ids=[f"{'.'.join(map(str, p))}={v!r}"[:40] for p, v in VL_BAD])
def test_cli_malformed_vllm_fields_one_sentence(tmp_path, capsys, path, value):
    from workbench.cli import main

    r = {"id": "c", "choices": [{"index": 0, "prompt_token_ids": [1, 2, 3], "token_ids": [4, 5],
                                 "routed_experts": np.tile([[0, 1], [2, 3]], (4, 1, 1)).tolist()}],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    _set(r, path, value)
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(r))
    assert main(["import", "vllm", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("workbench: error:") and "Traceback" not in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()


_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(-2**40, 2**40), max_size=6),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
_fields = st.sampled_from([("meta_info", "prompt_tokens"), ("meta_info", "completion_tokens"), ("output_ids",),
                           ("meta_info", "routed_experts"), ("meta_info", "cached_tokens"),
                           ("meta_info", "prompt_token_ids"), ("meta_info", "routed_experts_start_len"),
                           ("meta_info", "output_token_logprobs"), ("meta_info",), ("request",)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(_fields, _values), min_size=1, max_size=3))
def test_generated_damage_is_exact_or_one_sentence(model, tmp_path_factory, edits):
    """Any value in any field: the import is exact (the field did not matter) or refused with a
    WorkbenchError and no folder; never another exception, never a different routing."""
    good = _sg()
    r = copy.deepcopy(good)
    for path, v in edits:
        try:
            _set(r, path, v)
        except TypeError:  # the parent was replaced by a scalar: a different damage, still fine
            pass
    out = tmp_path_factory.mktemp("gen") / "run"
    try:
        run = import_routed_experts([r], out, engine="sglang", model=model, progress=False)
    except WorkbenchError as e:
        assert "\n" not in str(e) and not out.exists()
        return
    ex = np.stack(run.routing.sort("pos", "layer").collect()["experts"].to_list())
    want = _routing(8)[:, 1:].reshape(-1, K)
    assert ex.shape == want.shape and (ex == want).all()


# ------------------------------------------------------------------------------------------ folders, resume


def test_refused_import_leaves_no_folder_and_retry_works(model, tmp_path):
    r = _sg()
    r["meta_info"]["prompt_tokens"] = 50  # declares more than its routing holds
    with pytest.raises(WorkbenchError, match="declares"):
        import_routed_experts([r], tmp_path / "run", engine="sglang", model=model, progress=False)
    assert not (tmp_path / "run").exists()
    run = import_routed_experts([_sg()], tmp_path / "run", engine="sglang", model=model, progress=False)
    assert run.manifest["import"]["tokens"] == 8


def test_refusal_during_the_write_removes_the_fresh_folder(model, tmp_path, monkeypatch):
    import workbench.importers as imp

    def refuse(*a, **k):
        raise WorkbenchError("refused late")

    monkeypatch.setattr(imp, "_write", refuse)
    with pytest.raises(WorkbenchError, match="refused late"):
        import_routed_experts([_sg()], tmp_path / "run", engine="sglang", model=model, progress=False)
    assert not (tmp_path / "run").exists()


def test_resume_counts_cover_all_rows(model, tmp_path, monkeypatch):
    """After a kill and --resume the manifest's import counts are the whole input's (they counted only the
    resumed documents)."""
    from workbench.store import RunWriter

    resp = [_sg(5 + i, 3, seed=i) for i in range(5)]
    resp[2]["meta_info"]["cached_tokens"] = 2
    full = import_routed_experts(resp, tmp_path / "full", engine="sglang", model=model, part_tokens=1,
                                 progress=False)
    real = RunWriter.write_part
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(RunWriter, "write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        import_routed_experts(resp, tmp_path / "imp", engine="sglang", model=model, part_tokens=1, progress=False)
    monkeypatch.setattr(RunWriter, "write_part", real)
    imp = import_routed_experts(resp, tmp_path / "imp", engine="sglang", model=model, part_tokens=1, resume=True,
                                progress=False)
    assert imp.manifest["import"] == full.manifest["import"]
    assert imp.manifest["import"]["documents"] == 5
