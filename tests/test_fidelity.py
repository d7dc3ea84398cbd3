"""Routing fidelity: replay of recorded routes and stability of routing decisions, against planted truth.

Independent references: the plain forward without any hook (self-replay), the steered model's own forward
(replay of a --ban run), a routing written in vLLM's format from a known random routing (engine trace),
margins recomputed in numpy from stored logits, and router rows edited so that chosen decisions sit within
1e-6 of a tie (planted near-ties).
"""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import polars as pl
import pytest
import torch

from workbench.errors import WorkbenchError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Der schnelle braune Fuchs springt.", "2 + 2 = 4, and 3 * 7 = 21.", "Le renard brun rapide saute.",
         "Быстрая коричневая лиса."]


def _plain_logits(mm, texts, batch_size=8):
    """Logits of the valid tokens from a forward with no hook at all (the independent reference)."""
    from workbench.fidelity.common import Seq, make_batches

    enc = [np.asarray(mm.tokenize(t), np.int64) for t in texts]
    out = []
    for b in make_batches([Seq(i, e) for i, e in enumerate(enc)], batch_size, mm.tokenizer.pad_token_id):
        with torch.inference_mode():
            lg = mm.model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.mask),
                          use_cache=False).logits
        out.append(lg.reshape(-1, lg.shape[-1])[torch.from_numpy(b.rows)])
    return torch.cat(out)


def _replayed_logits(mm, run, texts, batch_size=8, with_weights=True):
    """Logits of a forward with the run's recorded routes forced (ForcedRoutes used directly)."""
    from workbench.fidelity.common import Seq, make_batches
    from workbench.probes.interventions import forced_routes

    r = run.routing.sort("doc_id", "pos", "layer").collect()
    enc = [np.asarray(mm.tokenize(t), np.int64) for t in texts]
    out = []
    with forced_routes(mm) as fr, torch.inference_mode():
        for b in make_batches([Seq(i, e) for i, e in enumerate(enc)], batch_size, mm.tokenizer.pad_token_id):
            routes = {}
            for layer in mm.moe_layers:
                rows, idx, w = [], [], []
                for bi, s in enumerate(b.seqs):
                    g = r.filter((pl.col("doc_id") == s.doc_id) & (pl.col("layer") == layer)).sort("pos")
                    rows.append(bi * b.width + g["pos"].to_numpy())
                    idx.append(np.stack(g["experts"].to_list()))
                    w.append(np.stack(g["weights"].to_list()))
                routes[layer] = (torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(idx)).long(),
                                 torch.from_numpy(np.concatenate(w)) if with_weights else None)
            fr.set(routes)
            lg = mm.model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.mask),
                          use_cache=False).logits
            out.append(lg.reshape(-1, lg.shape[-1])[torch.from_numpy(b.rows)])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# Margins


def _np_margin(rule, z, k, bias=None, n_group=1, topk_group=1):
    """The k-th minus (k+1)-th selection score, written from the rules' definitions in numpy (float64)."""
    z = z.astype(np.float64)
    if rule == "sigmoid_bias_group":
        s = 1 / (1 + np.exp(-z)) + (0 if bias is None else bias)
        T, E = s.shape
        g = s.reshape(T, n_group, E // n_group)
        gs = -np.sort(-g, axis=-1)[..., :2].sum(-1)
        order = np.argsort(-gs, axis=-1)
        keep = np.zeros((T, n_group), bool)
        np.put_along_axis(keep, order[:, :topk_group], True, axis=-1)
        s = np.where(np.repeat(keep, E // n_group, axis=1), s, -np.inf)
        top = -np.sort(-s, axis=-1)
        m = top[:, k - 1] - top[:, k]
        sg = -np.sort(-gs, axis=-1)
        return np.minimum(m, sg[:, topk_group - 1] - sg[:, topk_group])
    top = -np.sort(-z, axis=-1)  # every other rule ranks in logit order
    return top[:, k - 1] - top[:, k]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "phimoe"])
def test_margin_column_matches_numpy(tiny_dir, tmp_path, family):
    import workbench as wb

    model = str(tiny_dir(family, layers=2, experts=8, top_k=2))
    mm = wb.load_model(model)
    run = wb.capture(mm, TEXTS[:3], tmp_path / "run", logits=True, margin=True, progress=False)
    r = run.routing.sort("doc_id", "pos", "layer").collect()
    assert run.manifest["probes"]["routing"] == {"logits": True, "margin": True}
    for layer in mm.moe_layers:
        g = r.filter(pl.col("layer") == layer)
        z = np.stack(g["logits"].to_list())
        cfg = mm.model.config
        bias = getattr(mm.layer(layer).router, "e_score_correction_bias", None)
        want = _np_margin(mm.family.rule, z, mm.top_k, None if bias is None else bias.detach().double().numpy(),
                          getattr(cfg, "n_group", 1) or 1, getattr(cfg, "topk_group", 1) or 1)
        got = g["margin"].to_numpy()
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6), (family, layer)
        assert (got >= 0).all()


def test_runs_without_margin_are_written_as_before(tiny_dir, tmp_path):
    import workbench as wb

    run = wb.capture(str(tiny_dir("qwen3_moe", layers=2)), TEXTS[:2], tmp_path / "run", progress=False)
    assert run.manifest["probes"] == {"routing": {"logits": False}}  # no margin key: identities unchanged
    assert run.routing.collect_schema().names() == ["doc_id", "pos", "layer", "experts", "weights"]


# ---------------------------------------------------------------------------------------------------------
# Replay


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss",
                                    "phimoe", "granitemoe", "olmoe"])
def test_self_replay_is_exact(tiny_dir, tmp_path, family):
    """Replaying a run on the model that made it: 100% agreement and logits bit-identical to a forward
    without any hook, with the recorded weights and with the model's own (the rule redone per token)."""
    import workbench as wb
    from workbench.fidelity import replay

    mm = wb.load_model(str(tiny_dir(family, layers=3, experts=8, top_k=2)))
    run = wb.capture(mm, TEXTS, tmp_path / "run", batch_size=4, progress=False)
    plain = _plain_logits(mm, TEXTS, 4)
    for w in ("recorded", "model"):
        res = replay(mm, run, out=tmp_path / f"rep_{w}", weights=w, progress=False)
        assert res.layers["agreement"].to_list() == [1.0] * len(mm.moe_layers)
        assert res.layers["agreement_free"].to_list() == [1.0] * len(mm.moe_layers)
        assert res.summary["logits_bit_identical"] and res.summary["weights"] == w
        assert (res.tokens["kl"] == 0).all() and (res.tokens["dlogprob"].drop_nulls() == 0).all()
        assert res.summary["loss_own"] == res.summary["loss_replayed"]
        assert torch.equal(_replayed_logits(mm, run, TEXTS, 4, with_weights=w == "recorded"), plain)
    saved = json.loads((tmp_path / "rep_model" / "replay.json").read_text())
    assert saved["agreement"] == 1.0 and pl.read_parquet(tmp_path / "rep_model" / "layers.parquet").height == len(mm.moe_layers)


def test_replay_of_a_banned_run_shows_what_the_ban_changed(tiny_dir, tmp_path):
    """A run captured with --ban, replayed on the plain model (the ban not re-applied): layers before the
    ban agree fully; at the banned layer exactly the tokens whose plain choice held the banned expert
    disagree; and the replayed forward reproduces the banned model's logits bit for bit."""
    import workbench as wb
    from workbench.fidelity import replay

    mm = wb.load_model(str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2)))
    plain = wb.capture(mm, TEXTS, tmp_path / "plain", progress=False)
    p = plain.routing.filter(pl.col("layer") == 1).sort("doc_id", "pos").collect()
    counts = np.bincount(np.concatenate(p["experts"].to_list()), minlength=8)
    e = int(counts.argmax())
    banned = wb.capture(mm, TEXTS, tmp_path / "banned", interventions={"ban": f"L1:E{e}"}, progress=False)
    res = replay(mm, banned, progress=False)
    assert res.summary["interventions_in_run"] == {"ban": [f"L1:E{e}"]}
    ag = dict(zip(res.layers["layer"].to_list(), res.layers["agreement"].to_list()))
    had = np.array([e in x for x in p["experts"].to_list()])
    assert ag[0] == 1.0
    assert ag[1] == pytest.approx(1 - had.mean()) and had.any()
    fc = res.tokens.sort("doc_id", "pos")["first_changed_layer"].fill_null(-1).to_numpy()
    assert (fc[had] == 1).all() and not np.isin(fc[~had], [0, 1]).any()  # later layers may follow from it
    with mm.steer(ban=f"L1:E{e}"):
        steered = _plain_logits(mm, TEXTS)
    assert torch.equal(_replayed_logits(mm, banned, TEXTS), steered)
    assert res.summary["kl_max"] > 0 and not res.summary["logits_bit_identical"]


def _vllm_outputs(token_ids: list[list[int]], routing: list[np.ndarray]):
    """vLLM RequestOutput-like objects (CompletionOutput.routed_experts [tokens, num_hidden_layers, top_k],
    prompt + output minus the last generated token, as vLLM's source defines it)."""
    outs = []
    for i, (ids, arr) in enumerate(zip(token_ids, routing)):
        p = len(ids) // 2
        outs.append(NS(request_id=f"r{i}", prompt_token_ids=ids[:p], num_cached_tokens=0,
                       outputs=[NS(index=0, token_ids=ids[p:] + [7], routed_experts=arr.astype(np.int16))]))
    return outs


def test_replay_of_an_engine_trace_recovers_a_known_routing(tiny_dir, tmp_path):
    """An engine trace made from a known random routing: the replayed forward feeds the experts exactly that
    routing, with the weights the family's rule gives the forced experts (softmax over the router logits,
    restricted to them, renormalised as norm_topk_prob says); a trace of the model's own routing replays
    with 100% agreement and zero KL."""
    import workbench as wb
    from workbench.fidelity import replay
    from workbench.importers import import_routed_experts

    model = str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2))
    mm = wb.load_model(model)
    ids = [mm.tokenize(t) for t in TEXTS]
    rng = np.random.default_rng(0)
    known = [np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in x]) for x in ids]
    imp = import_routed_experts(_vllm_outputs(ids, known), tmp_path / "imp", model=model, progress=False)
    seen_idx, seen_w, seen_z = {}, {}, {}

    def experts_in(layer):
        def hook(module, args, kwargs):
            seen_idx.setdefault(layer, []).append(args[1].clone())
            seen_w.setdefault(layer, []).append(args[2].clone())
        return hook

    def router_out(layer):
        def hook(module, args, out):
            seen_z.setdefault(layer, []).append(out[0].clone())
        return hook

    hs = [lay.experts.register_forward_pre_hook(experts_in(lay.index), with_kwargs=True) for lay in mm.layers]
    hs += [lay.router.register_forward_hook(router_out(lay.index)) for lay in mm.layers]
    try:
        res = replay(mm, imp, batch_size=len(TEXTS), progress=False)
    finally:
        for h in hs:
            h.remove()
    assert res.summary["weights"] == "model" and res.summary["source"] == "vllm"
    lengths = [len(x) for x in ids]
    S = max(lengths)
    rows = np.concatenate([b * S + np.arange(n) for b, n in enumerate(lengths)])
    for layer in mm.moe_layers:
        got = seen_idx[layer][1].numpy()[rows]  # call 0 is the free forward, call 1 the replayed one
        want = np.concatenate([k[:, layer] for k in known])
        order = np.argsort(got, 1)  # rows whose set is the model's own keep its order; compare by expert
        assert (np.take_along_axis(got, order, 1) == np.sort(want, 1)).all()
        z = seen_z[layer][1].double().numpy()[rows]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w = np.take_along_axis(p, np.sort(want, 1), 1)
        w /= w.sum(1, keepdims=True)  # the tiny qwen3_moe has norm_topk_prob=True
        got_w = np.take_along_axis(seen_w[layer][1].double().numpy()[rows], order, 1)
        assert np.allclose(got_w, w, atol=1e-6)
    assert res.summary["agreement"] < 0.5  # a random routing is not the model's
    # the model's own routing as an engine trace
    own = wb.capture(mm, TEXTS, tmp_path / "own", progress=False).routing.sort("doc_id", "pos", "layer").collect()
    arrs = [np.stack(own.filter(pl.col("doc_id") == d)["experts"].to_list()).reshape(len(x), 3, 2)
            for d, x in enumerate(ids)]
    imp2 = import_routed_experts(_vllm_outputs(ids, arrs), tmp_path / "imp2", model=model, progress=False)
    res2 = replay(mm, imp2, out=tmp_path / "rep2", progress=False)
    assert res2.summary["agreement"] == 1.0 and res2.summary["kl_max"] == 0.0
    assert res2.summary["logits_bit_identical"]


def test_replay_of_an_sglang_trace_without_and_with_prompt_ids(tiny_dir, tmp_path):
    """SGLang /generate responses (meta_info.routed_experts: base64 of int32 [seqlen - 1, layers, top_k], as
    its source writes it): without prompt token ids the replay is refused in one sentence; with them (the
    import's --tokens) the model's own routing replays exactly."""
    import base64

    import workbench as wb
    from workbench.fidelity import replay
    from workbench.importers import import_routed_experts

    model = str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2))
    mm = wb.load_model(model)
    own = wb.capture(mm, TEXTS, tmp_path / "own", progress=False).routing.sort("doc_id", "pos", "layer").collect()
    resp, toks = [], []
    for d, t in enumerate(TEXTS):
        ids = mm.tokenize(t)
        arr = np.stack(own.filter(pl.col("doc_id") == d)["experts"].to_list()).reshape(len(ids), 3, 2)
        p = len(ids) // 2
        resp.append({"text": "", "output_ids": ids[p:] + [5], "meta_info": {
            "id": f"q{d}", "prompt_tokens": p, "completion_tokens": len(ids) - p + 1, "cached_tokens": 0,
            "routed_experts": base64.b64encode(np.ascontiguousarray(arr, "<i4").tobytes()).decode("ascii")}})
        toks.append({"input_ids": ids[:p]})
    bare = import_routed_experts(resp, tmp_path / "bare", engine="sglang", model=model, progress=False)
    with pytest.raises(WorkbenchError, match="no token id"):
        replay(mm, bare, progress=False)
    imp = import_routed_experts(resp, tmp_path / "imp", engine="sglang", model=model, tokens=toks, progress=False)
    res = replay(mm, imp, progress=False)
    assert res.summary["agreement"] == 1.0 and res.summary["kl_max"] == 0.0 and res.summary["weights"] == "model"


def test_replay_refuses_another_model_and_permuted_experts(tiny_dir, tmp_path, capsys):
    import workbench as wb
    from workbench.analysis.compare import permute_experts
    from workbench.cli import main
    from workbench.fidelity import replay

    a = str(tiny_dir("qwen3_moe", layers=3, experts=8, top_k=2))
    run = wb.capture(a, TEXTS[:2], tmp_path / "run", progress=False)
    other = str(tiny_dir("qwen3_moe", layers=3, experts=16, top_k=2))
    with pytest.raises(WorkbenchError, match="16 experts per layer|8 experts per layer"):
        replay(other, run, progress=False)
    with pytest.raises(WorkbenchError, match="mixtral"):
        replay(str(tiny_dir("mixtral", layers=3, experts=8, top_k=2)), run, progress=False)
    perm, _ = permute_experts(a, tmp_path / "perm")
    with pytest.raises(WorkbenchError, match="permuted"):
        replay(str(perm), run, progress=False)
    # an engine trace (no weight-file hashes) of the permuted checkpoint, replayed on the original: the ids
    # are found permuted from the routing itself; the same trace of the original's own routing is accepted
    texts = TEXTS * 4
    ids = [wb.load_model(a).tokenize(t) for t in texts]
    for src, refused in ((str(perm), True), (a, False)):
        r = wb.capture(src, texts, tmp_path / f"cap_{refused}", progress=False).routing.sort("doc_id", "pos",
                                                                                                "layer").collect()
        arrs = [np.stack(r.filter(pl.col("doc_id") == d)["experts"].to_list()).reshape(len(x), 3, 2)
                for d, x in enumerate(ids)]
        from workbench.importers import import_routed_experts

        imp = import_routed_experts(_vllm_outputs(ids, arrs), tmp_path / f"imp_{refused}", model=a, progress=False)
        if refused:
            with pytest.raises(WorkbenchError, match="look permuted"):
                replay(a, imp, progress=False)
        else:
            assert replay(a, imp, progress=False).summary["agreement"] == 1.0
    assert main(["replay", str(perm), str(run.path), "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' own loading bar may come first)
    assert err.startswith("workbench: error:") and "permuted" in err
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------
# Stability and planted near-ties


@pytest.fixture(scope="module")
def tie_model_dir(tmp_path_factory):
    from workbench.models.tiny import make_tiny

    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("ties"), layers=4, experts=32, top_k=2)


def _planted_frame(planted):
    return pl.DataFrame(planted, schema=["doc_id", "pos", "layer"], orient="row").with_columns(
        pl.col("pos").cast(pl.Int32), pl.col("layer").cast(pl.Int16), pl.lit(True).alias("planted"))


def test_no_near_ties_no_flips_across_batch_sizes_in_float32(tie_model_dir):
    """The tiny model as made has no decision within 1e-4 of a tie: in float32 no decision flips across
    batch sizes. The same check on a copy with planted near-ties does find flips, all of them planted."""
    import workbench as wb
    from workbench.fidelity import stability
    from workbench.fidelity.margins import plant_near_ties

    mm = wb.load_model(str(tie_model_dir))
    res = stability(mm, TEXTS, vary=["batch=8,1,3"], progress=False)
    assert res.summary["reference_min_margin"] > 1e-4
    assert all(v["flipped"] == 0 and v["first"] == 0 for v in res.summary["variants"])
    assert (res.layers["flipped"] == 0).all()
    planted = plant_near_ties(mm, TEXTS, per_layer=16, layers=[3])
    res = stability(mm, TEXTS, vary=["batch=8,1,3"], progress=False)
    d = res.decisions.join(_planted_frame(planted), on=["doc_id", "pos", "layer"], how="left")
    flips = d.filter(pl.col("flipped[batch=1]") | pl.col("flipped[batch=3]"))
    assert flips.height > 0 and flips["planted"].fill_null(False).all()


def test_planted_near_ties_flip_in_half_precision_and_the_margin_flags_them(tie_model_dir):
    import workbench as wb
    from workbench.fidelity import stability
    from workbench.fidelity.margins import plant_near_ties

    mm = wb.load_model(str(tie_model_dir))
    planted = plant_near_ties(mm, TEXTS, per_layer=16, layers=[3])
    assert len(planted) >= 8
    res = stability(mm, TEXTS, vary=["dtype=float32,bfloat16,float16"], progress=False)
    d = res.decisions.join(_planted_frame(planted), on=["doc_id", "pos", "layer"], how="left").with_columns(
        pl.col("planted").fill_null(False))
    # the margin flags exactly the planted decisions
    assert set(map(tuple, d.filter(pl.col("margin") < 1e-5).select("doc_id", "pos", "layer").rows())) == set(planted)
    assert d.filter(pl.col("planted"))["margin"].max() < 5e-6  # 5e-7 planted, float32 logits add ~1e-6
    for v in ("bfloat16", "float16"):
        first = d[f"first[dtype={v}]"]
        n_planted = int((first & d["planted"]).sum())
        assert n_planted >= 3, (v, n_planted)  # about half of them: which of two tied experts wins is rounding
        m = res.margins.filter(pl.col("variant") == f"dtype={v}")
        tie_rate = m.filter(pl.col("margin_hi") <= 1e-6)["first"].sum() / m.filter(pl.col("margin_hi") <= 1e-6)[
            "decisions"].sum()
        wide = m.filter(pl.col("margin_lo") >= 0.1)
        assert tie_rate >= 0.25 and wide["first"].sum() / wide["decisions"].sum() < 0.02
        ex = res.experts.filter((pl.col("variant") == f"dtype={v}") & (pl.col("kind") == "first"))
        assert ex.filter(pl.col("layer") == 3)["involved"].sum() == 2 * int(
            first.filter(d["layer"] == 3).sum())  # each flip: one expert left, one entered


def test_first_flips_equal_a_replay_of_reference_routes_up_to_the_layer(tie_model_dir):
    """`first` at layer l must be what forcing the reference routes at layers < l alone gives (checked layer
    by layer with separate forwards), and inherited = flipped and not first."""
    import workbench as wb
    from workbench.fidelity import stability
    from workbench.fidelity.common import Seq, make_batches, same_set
    from workbench.fidelity.margins import plant_near_ties
    from workbench.probes.interventions import forced_routes

    mm = wb.load_model(str(tie_model_dir))
    plant_near_ties(mm, TEXTS, per_layer=12)
    res = stability(mm, TEXTS, vary=["dtype=float32,bfloat16"], progress=False)
    d = res.decisions.sort("doc_id", "pos", "layer")
    L = len(mm.moe_layers)
    # reference routes: the float32 model's own choices, batched as stability's reference (8 a forward)
    enc = [np.asarray(mm.tokenize(t), np.int64) for t in TEXTS]
    batches = make_batches([Seq(i, e) for i, e in enumerate(enc)], 8, mm.tokenizer.pad_token_id)
    (b,) = batches
    with forced_routes(mm) as fr, torch.inference_mode():
        fr.set(None)
        mm.model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.mask), use_cache=False)
        ref_idx = {lay: fr.own[lay][torch.from_numpy(b.rows)].clone() for lay in mm.moe_layers}
    import copy

    from workbench.models.loading import wrap_model

    half = wrap_model(copy.deepcopy(mm.model).to(torch.bfloat16), mm.tokenizer)
    first = d["first[dtype=bfloat16]"].to_numpy().reshape(-1, L)
    flipped = d["flipped[dtype=bfloat16]"].to_numpy().reshape(-1, L)
    rows = torch.from_numpy(b.rows)
    for j, layer in enumerate(half.moe_layers):
        with forced_routes(half) as fr, torch.inference_mode():
            fr.set({lay: (rows, ref_idx[lay], None) for lay in half.moe_layers if lay < layer})
            half.model(input_ids=torch.from_numpy(b.input_ids), attention_mask=torch.from_numpy(b.mask),
                       use_cache=False)
            own = fr.own[layer][rows].numpy()
        assert (~same_set(own, ref_idx[layer].numpy()) == first[:, j]).all(), layer
    lay = res.layers.filter(pl.col("variant") == "dtype=bfloat16").sort("layer")
    assert lay["inherited"].to_list() == (flipped & ~first).sum(0).tolist()
    assert first.sum() > 0


def test_vary_parsing_refuses_bad_input():
    from workbench.fidelity.stability import parse_vary, variants

    assert parse_vary(["dtype=float32,bf16", "batch=1,8"]) == {"dtype": ["float32", "bfloat16"], "batch": [1, 8]}
    for bad, msg in ((["colour=red"], "unknown --vary axis"), (["batch=0,1"], "at least 1"),
                     (["dtype=float32,int8"], "unknown dtype"), (["batch"], "malformed"),
                     (["batch=1", "batch=2"], "twice")):
        with pytest.raises(WorkbenchError, match=msg):
            parse_vary(bad)
    with pytest.raises(WorkbenchError, match="nothing to compare"):
        variants(parse_vary(["batch=8"]), {"dtype": "float32", "batch": 8, "experts": None, "device": "cpu"})
    ref, vs = variants(parse_vary(["dtype=float32,bfloat16", "batch=1,8"]), {"experts": None, "device": "cpu"},
                       product=True)
    assert ref == {"dtype": "float32", "batch": 1, "experts": None, "device": "cpu"} and len(vs) == 3


def test_cli_replay_and_stability(tiny_dir, tmp_path, capsys):
    import workbench as wb
    from workbench.cli import main

    model = str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2))
    run = wb.capture(model, TEXTS[:3], tmp_path / "run", progress=False)
    assert main(["replay", model, str(run.path), "--out", str(tmp_path / "rep"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "agreement 100.00%" in out
    assert json.loads((tmp_path / "rep" / "replay.json").read_text())["agreement"] == 1.0
    assert main(["replay", model, str(run.path), "--out", str(tmp_path / "rep"), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    data = tmp_path / "d.txt"
    data.write_text("\n".join(TEXTS[:3]) + "\n")
    assert main(["stability", model, str(data), "--vary", "batch=1,2", "--vary", "dtype=float32,bfloat16",
                 "--out", str(tmp_path / "st"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "batch=2" in out and "dtype=bfloat16" in out
    s = json.loads((tmp_path / "st" / "stability.json").read_text())
    assert [v["name"] for v in s["variants"]] == ["batch=2", "dtype=bfloat16"]
    assert main(["stability", model, str(data), "--vary", "colour=red", "--out", str(tmp_path / "st2")]) == 2
    err = capsys.readouterr().err
    assert "unknown --vary axis" in err and err.count("\n") == 1  # refused before the model loads
    assert main(["stability", model, str(data), "--vary", "experts=eager,turbo", "--out", str(tmp_path / "st3"),
                 "--no-progress"]) == 2
    assert "unknown experts implementation 'turbo'" in capsys.readouterr().err
    assert not (tmp_path / "st3").exists()


def test_replay_says_the_disagreements_were_the_planted_near_ties(tie_model_dir, tmp_path):
    """Near-ties planted in the last layer; 'engine' runs of the model replayed on it. A float32 engine at batch
    size 1 (the replay batches 8) differs only where rounding resolved a planted tie the other way: every
    disagreement is a planted decision with a margin below 1e-5, earlier layers agree fully. A bfloat16 engine
    also flips ordinary decisions, but the disagreement rate is high among near-ties and near zero for clear
    ones."""
    import copy

    import workbench as wb
    from workbench.fidelity import replay
    from workbench.fidelity.margins import plant_near_ties
    from workbench.models.loading import wrap_model

    mm = wb.load_model(str(tie_model_dir))
    planted = plant_near_ties(mm, TEXTS, per_layer=16, layers=[3])
    run = wb.capture(mm, TEXTS, tmp_path / "b1", batch_size=1, progress=False)
    res = replay(mm, run, weights="model", batch_size=8, progress=False)
    ag = dict(zip(res.layers["layer"].to_list(), res.layers["agreement"].to_list()))
    assert ag[0] == ag[1] == ag[2] == 1.0 and ag[3] < 1.0
    dis = res.tokens.filter(pl.col("layers_changed") > 0)
    assert set(dis.select("doc_id", "pos").rows()) <= {(d, p) for d, p, _ in planted}
    assert (dis["first_changed_layer"] == 3).all() and (dis["min_margin"] < 1e-5).all()
    assert res.summary["disagreements_near_tie"] == 1.0

    engine = wrap_model(copy.deepcopy(mm.model).to(torch.bfloat16), mm.tokenizer, spec="engine")
    run = wb.capture(engine, TEXTS, tmp_path / "bf16", progress=False)
    res = replay(mm, run, weights="model", out=tmp_path / "rep", progress=False)
    m = res.margins
    low = m.filter(pl.col("margin_hi") <= 1e-5)
    high = m.filter(pl.col("margin_lo") >= 0.1)
    assert low["disagreed"].sum() / low["decisions"].sum() >= 0.25
    assert high["disagreed"].sum() / high["decisions"].sum() < 0.05
    lay3 = res.layers.filter(pl.col("layer") == 3)
    assert lay3["margin_median_disagreeing"][0] < lay3["margin_median_agreeing"][0]
    assert pl.read_parquet(tmp_path / "rep" / "margins.parquet").equals(m)


def test_stability_over_experts_implementations_leaves_the_model_as_it_was(tiny_dir):
    """--vary experts switches the given model's experts implementation for the variant and puts it back;
    eager and batched_mm differ only by float32 summation order, far below this model's margins."""
    import workbench as wb
    from workbench.fidelity import stability

    mm = wb.load_model(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2)))
    before = mm.model.config._experts_implementation
    res = stability(mm, TEXTS, vary={"experts": ["eager", "batched_mm"]}, progress=False)
    assert mm.model.config._experts_implementation == before == "eager"
    (v,) = res.summary["variants"]
    assert v["name"] == "experts=batched_mm" and v["settings"]["experts"] == "batched_mm"
    assert res.summary["reference"]["experts"] == "eager"
    assert v["first"] == 0 or res.summary["reference_min_margin"] < 1e-5
