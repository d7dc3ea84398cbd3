"""The dashboard's Placement page on imported runs (vLLM trace, SGLang counts-only dump)."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import plotly
import pytest
import torch

from workbench.app import make_app
from workbench.app import placement as page
from workbench.app.state import Unavailable
from workbench.importers import import_routed_experts

E, K, LAYERS = 8, 2, 3


def _text(component) -> str:
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return tiny_dir("qwen3_moe", layers=LAYERS, experts=E, top_k=K)


@pytest.fixture(scope="module")
def trace_run(model, tmp_path_factory):
    """A vLLM trace where expert 3 is hot in every layer: 6 requests of 40 tokens (39 routed each)."""
    rng = np.random.default_rng(0)
    p = np.full(E, 1.0)
    p[3] = 8.0
    p /= p.sum()
    outs = []
    for i in range(6):
        ids = rng.integers(0, 200, 40).tolist()
        routed = np.stack([[rng.choice(E, K, replace=False, p=p) for _ in range(LAYERS)] for _ in range(39)])
        outs.append(NS(request_id=f"r{i}", prompt_token_ids=ids[:30], num_cached_tokens=0,
                       outputs=[NS(index=0, token_ids=ids[30:], routed_experts=routed.astype(np.int16))]))
    return import_routed_experts(outs, tmp_path_factory.mktemp("pl") / "run", model=str(model), progress=False)


@pytest.fixture(scope="module")
def counts_run(model, tmp_path_factory):
    """An SGLang recorder `stat` dump: counts only, expert 5 hot."""
    d = tmp_path_factory.mktemp("stat")
    counts = torch.full((4, LAYERS, E), 10, dtype=torch.int32)
    counts[:, :, 5] = 70
    torch.save({"rank": 0, "logical_count": counts, "average_utilization_rate_over_window": None}, d / "stat.pt")
    return import_routed_experts(str(d / "stat.pt"), d / "run", model=str(model), progress=False)


def _ready(ctx, opts):
    res = page.result(ctx, opts, wait=60)
    assert res is not None and not isinstance(res, Unavailable), res
    return res


def test_options_are_checked_in_one_sentence():
    assert page.options_from(4, None, 64, 8) == ({"ep": 4, "redundant": 4, "window": 64}, None)
    assert page.options_from("2", "0", "16", 8)[0] == {"ep": 2, "redundant": 0, "window": 16}
    for bad in ((4, 1, 64), ("x", 4, 64), (4, 4, 0), (4, -4, 64)):
        opts, err = page.options_from(*bad, 8)
        assert opts is None and err.count(".") == 1
    assert "do not divide evenly over 4 GPUs" in page.options_from(4, 1, 64, 8)[1]
    assert page.ep_choices(8) == [1, 2, 4, 8] and page.ep_choices(6) == [1, 2]


def test_page_shows_the_analysis_and_downloads_its_map(trace_run):
    from workbench.analysis.placement import analyze as placement

    app = make_app(trace_run, warm=())
    ctx = app.workbench
    d = page.defaults(ctx)
    assert d == {"ep": 8, "redundant": 8, "window": 30}  # 234 routed tokens -> ~8 windows of 30
    assert "Expert placement" in _text(page.layout(ctx))
    res = _ready(ctx, d)
    direct = placement(trace_run, **d)  # the same analysis, outside the app
    assert res.summary == direct.summary
    body, done = page.body(ctx, d)
    text = _text(body)
    assert done and direct.summary.split(":")[0] in text and "download placement JSON" in text
    # the hot expert is the one replicated most in every layer, and the table lists it first per layer
    hot = direct.tables["experts"]
    for layer in trace_run.moe_layers:
        reps = hot.filter(hot["layer"] == layer).sort("expert")["replicas"].to_list()
        assert int(np.argmax(reps)) == 3 and reps[3] > 1
    # the download is the placement the page shows; recompute its held-out max/mean load from the raw routing
    dl = page.download(ctx, d)
    assert dl["filename"] == "expert_location_ep8_r8.json"
    pmap = json.loads(dl["content"])["physical_to_logical_map"]
    assert len(pmap) == LAYERS and all(len(r) == E + 8 for r in pmap)
    rt = trace_run.routing.sort("doc_id", "pos", "layer").collect()
    lay = direct.tables["layers"]
    for layer in trace_run.moe_layers:
        ex = np.array(rt.filter(rt["layer"] == layer)["experts"].to_list())  # [T, K] in token order
        held = np.arange(len(ex)) // d["window"] >= 4  # 8 windows, the first 4 fitted
        load = np.bincount(ex[held].reshape(-1), minlength=E).astype(float)
        phys = np.array(pmap[layer])
        reps = np.bincount(phys, minlength=E)
        gpu = (load[phys] / reps[phys]).reshape(8, -1).sum(1)
        want = lay.filter(lay["layer"] == layer)["max_over_mean_eplb"].item()
        assert gpu.max() / gpu.mean() == pytest.approx(want)


def test_other_options_and_layer_figure(trace_run):
    ctx = make_app(trace_run, warm=()).workbench
    opts, err = page.options_from(4, 0, 60, E)
    res = _ready(ctx, opts)
    assert res.meta["ep"] == 4 and res.meta["redundant"] == 0
    body, done = page.body(ctx, opts)
    assert done and "No expert is replicated" in _text(body)
    fig = page._window_fig(res, 2)
    b = res.tables["balance"]
    want = b.filter((b["layer"] == 2) & (b["placement"] == "contiguous")).sort("window")["balancedness"].to_list()
    assert list(fig.data[0].y) == pytest.approx(want)
    body, done = page.body(ctx, None, "EP degree and window must be at least 1.")
    assert done and "must be at least 1" in _text(body)
    keys = " ".join(ctx.app.callback_map)
    assert all(o in keys for o in ("pl-body.children", "pl-window-graph.figure", "pl-download.data"))


def test_counts_only_run_feeds_overview_and_placement(counts_run):
    from workbench.app.main import _pages

    app = make_app(counts_run, warm=())
    ctx = app.workbench
    d = page.defaults(ctx)
    res = _ready(ctx, d)
    ex = res.tables["experts"]
    assert (ex.filter(ex["expert"] == 5)["replicas"] > 1).all()  # the hot expert of the dump is replicated
    lay = res.tables["layers"]
    # By hand, one window (7 experts x 10, expert 5 x 70), EP 8 with 8 spares = 2 slots a GPU.
    # Contiguous: physical p holds p % 8, so every expert has 2 replicas and GPUs 2 and 6 hold {4, 5}:
    # 5 + 35 = 40 there, 10 elsewhere; mean 17.5 -> balancedness 17.5 / 40.
    # EPLB: spares go to expert 5 until 70/7 = 10 ties the rest (6 spares), then to experts 0 and 1
    # (replicas of 5); 12 replicas of 10 and 4 of 5 packed heaviest first: 4 GPUs at 20, 4 at 15 -> 17.5 / 20.
    assert lay["balancedness_contiguous"].to_list() == pytest.approx([17.5 / 40] * LAYERS)
    assert lay["balancedness_eplb"].to_list() == pytest.approx([17.5 / 20] * LAYERS)
    assert ex.filter(ex["layer"] == 0).sort("expert")["replicas"].to_list() == [2, 2, 1, 1, 1, 7, 1, 1]
    over = _text(_pages()[0].layout(ctx))
    assert "aggregated expert counts only" in over and "heatmap" in over.lower()
    for p in _pages():
        out = _text(p.layout(ctx))
        assert "This page failed" not in out and "Traceback" not in out, p.path
    assert "download placement JSON" in _text(page.body(ctx, d)[0])
