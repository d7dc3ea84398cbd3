"""The dashboard's Fidelity page and the figures it shares with the notebook: it shows what replay and
stability wrote, read back from their folders."""

from __future__ import annotations

import json

import plotly
import pytest

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
         "Der schnelle braune Fuchs springt."]


def _text(component) -> str:
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


@pytest.fixture(scope="module")
def banned(tiny_dir, tmp_path_factory):
    """A run captured with a ban, its replay on the plain model in RUN/fidelity/replay, and a stability
    result in RUN/fidelity/stab."""
    import workbench as wb

    model = str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2))
    mm = wb.load_model(model)
    run = wb.capture(mm, TEXTS, tmp_path_factory.mktemp("fid") / "run", interventions={"ban": "L1:E3"},
                     progress=False)
    rep = wb.replay(mm, run, out=run.path / "fidelity" / "replay", progress=False)
    st = wb.stability(mm, TEXTS, vary=["dtype=float32,bfloat16"], out=run.path / "fidelity" / "stab", progress=False)
    return run, rep, st


def test_results_read_back_equal_what_was_written(banned):
    from workbench.fidelity.figures import find_results, open_result

    run, rep, st = banned
    found = find_results(run)
    assert set(found) == {"replay: replay", "stability: stab"}
    back = open_result(found["replay: replay"])
    assert back.layers.equals(rep.layers) and back.tokens.equals(rep.tokens) and back.summary["agreement"] == \
        rep.summary["agreement"]
    sb = open_result(found["stability: stab"])
    assert sb.decisions.equals(st.decisions) and sb.summary["variants"] == st.summary["variants"]
    # a replay written beside the run is found when it names this run; one of another run is not
    (run.path.parent / "other_replay").mkdir()
    (run.path.parent / "other_replay" / "replay.json").write_text(json.dumps({"kind": "replay", "run": "/else"}))
    beside = rep.summary | {}
    (run.path.parent / "beside").mkdir()
    (run.path.parent / "beside" / "replay.json").write_text(json.dumps(beside))
    assert set(find_results(run)) == {"replay: replay", "stability: stab", "replay: beside"}


def test_page_shows_replay_and_stability(banned):
    from workbench.app import fidelity as page
    from workbench.app import make_app
    from workbench.fidelity.figures import replay_figures

    run, rep, st = banned
    ctx = make_app(run, warm=()).workbench
    text = _text(page.layout(ctx))
    assert "Routing fidelity" in text and "replay: replay" in text
    body = _text(page.body(ctx, "replay: replay"))
    assert f"agreement {rep.summary['agreement']:.2%}" in body and "not re-applied" in body
    fig = replay_figures(rep)["agreement"]
    assert list(fig.data[0].y) == rep.layers.sort("layer")["agreement"].to_list()
    body = _text(page.body(ctx, "stability: stab"))
    assert "dtype=bfloat16" in body and "First-flip rate by router margin" in body
    assert "no fidelity result" in _text(page.body(ctx, "nope"))
    assert "fid-body.children" in " ".join(ctx.app.callback_map)


def test_page_without_results_says_what_to_run(tiny_dir, tmp_path):
    import workbench as wb
    from workbench.app import fidelity as page
    from workbench.app import make_app

    run = wb.capture(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2)), TEXTS[:1], tmp_path / "r",
                     progress=False)
    text = _text(page.layout(make_app(run, warm=()).workbench))
    assert "No replay or stability result" in text and "workbench replay" in text
