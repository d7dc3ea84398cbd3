"""Placement: hand-worked loads, the EPLB scheme, and the SGLang export."""

from __future__ import annotations

import json

import numpy as np

from workbench.analysis.placement import balancedness, contiguous, eplb, gpu_loads


def test_contiguous_and_balancedness_by_hand():
    # 4 experts on 2 GPUs: GPU0 {0,1}, GPU1 {2,3}; loads 6,2,1,1 -> GPU loads 8 and 2
    plan = contiguous(4, 2)
    assert plan.tolist() == [[0, 1], [2, 3]]
    g = gpu_loads(np.array([6.0, 2, 1, 1]), plan)
    assert g.tolist() == [8, 2]
    assert balancedness(g) == 5 / 8  # mean 5 / max 8


def test_eplb_replicates_the_hot_expert_by_hand():
    # loads 6,2,1,1 on 2 GPUs with 2 spare slots: both spares go to expert 0 (6 -> 3 -> 2 per replica),
    # then replicas are packed heaviest first onto the lighter GPU: 2+2+1 and 2+2+1 -> perfectly balanced
    plan = eplb(np.array([6.0, 2, 1, 1]), ep=2, redundant=2)
    assert sorted(plan.reshape(-1).tolist()) == [0, 0, 0, 1, 2, 3]
    g = gpu_loads(np.array([6.0, 2, 1, 1]), plan)
    assert g.tolist() == [5, 5] and balancedness(g) == 1.0
    # hot expert 3 is not among the trivial map's spares (p % E repeats 0 and 1): loads 2 | 7 there;
    # EPLB gives it three replicas of 2 -> the best split of {2,2,2,1,1,1} over two GPUs, 5 | 4
    hot = np.array([1.0, 1, 1, 6])
    assert gpu_loads(hot, contiguous(4, 2, 2)).tolist() == [2, 7]
    assert sorted(gpu_loads(hot, eplb(hot, ep=2, redundant=2)).tolist()) == [4, 5]


def test_placement_on_a_run_and_sglang_export(tiny_dir, tmp_path):
    import workbench as wb
    from workbench.analysis import analyze

    model = tiny_dir("deepseek_v2", layers=4, experts=8, top_k=2)
    run = wb.capture(str(model), ["a b c d e f g h i j k l m n o p"] * 4, tmp_path / "run", progress=False)
    out = tmp_path / "loc.json"
    res = analyze("placement", run, ep=4, redundant=4, window=16, export=str(out))
    lay = res.tables["layers"]
    assert (lay["balancedness_eplb"] >= lay["balancedness_contiguous"] - 1e-9).all()
    m = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(m) == 4 and all(len(r) == 12 for r in m)  # every decoder layer, E + redundant slots
    assert m[0] == [p % 8 for p in range(12)]  # dense layer 0: the trivial map
    assert all(sorted(set(r)) == list(range(8)) for r in m[1:])  # every logical expert placed
    b = res.tables["balance"].filter(res.tables["balance"]["placement"] == "eplb")
    assert b["held_out"].any() and (~b["held_out"]).any()


def test_export_from_a_stored_result_is_the_fitted_map(tiny_dir, tmp_path):
    """A reused (persisted) result still writes the JSON, and the same map: its meta went through JSON."""
    import workbench as wb
    from workbench.analysis import analyze
    from workbench.analysis.placement import hot_experts, sglang_map

    model = tiny_dir("deepseek_v2", layers=4, experts=8, top_k=2)
    run = wb.capture(str(model), ["a b c d e f g h i j k l m n o p"] * 4, tmp_path / "run", progress=False)
    first = analyze("placement", run, ep=4, redundant=4, window=16, export=str(tmp_path / "a.json"))
    want = json.loads((tmp_path / "a.json").read_text())
    again = analyze("placement", run, ep=4, redundant=4, window=16, export=str(tmp_path / "a.json"))
    assert again.meta.get("reused")
    (tmp_path / "a.json").unlink()
    again = analyze("placement", run, ep=4, redundant=4, window=16, export=str(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text()) == want  # written again, not skipped
    assert sglang_map(again) == sglang_map(first) == want["physical_to_logical_map"]
    # every layer's map holds each logical expert as often as the experts table counts its replicas
    hot = hot_experts(first)
    ex = first.tables["experts"]
    for layer in run.moe_layers:
        reps = ex.filter(ex["layer"] == layer).sort("expert")["replicas"].to_list()
        assert np.bincount(want["physical_to_logical_map"][layer], minlength=8).tolist() == reps
    assert hot["replicas"].min() > 1 and hot.height == int((ex["replicas"] > 1).sum())
