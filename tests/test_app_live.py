"""The newcomer's dashboard: it grows while the demo captures, pages point at the run they apply to,
Compare pairs a run with its counterpart, Export offers only what applies, the Overview reads as text."""

from __future__ import annotations

import json

import plotly
import pytest
from werkzeug.test import Client

from workbench.app.synthetic import write_synthetic_run


def _text(component) -> str:
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("live") / "labelled", n_tokens=1200, n_layers=2, n_experts=8,
                               top_k=2, seq_len=100)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """Routing only, no labels, no expert statistics."""
    return write_synthetic_run(tmp_path_factory.mktemp("live") / "bare", n_tokens=600, n_layers=2, n_experts=8,
                               top_k=2, seq_len=100, labels=False, probes=("routing",))


def test_a_run_still_being_captured_has_a_waiting_page_until_it_is_added(labelled, bare):
    from workbench.app.live import LiveDashboard

    live = LiveDashboard(["first", "second"])
    c = Client(live)
    r = c.get("/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/first/")
    live.add("first", labelled.path, warm=())
    live.set_state("second", "capturing 80 records of behavior")
    r = c.get("/second/tokens")
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and "capturing 80 records of behavior" in body and "http-equiv='refresh'" in body
    assert "_dash-config" not in body and live.pending() == ["second"]
    assert "_dash-config" in c.get("/first/").get_data(as_text=True)
    live.add("second", bare.path, warm=())
    assert "_dash-config" in c.get("/second/").get_data(as_text=True)
    assert c.get("/second").status_code in (301, 302, 308)  # the prefix without its slash
    assert c.get("/nope/").status_code == 404
    # every app sees the others (the Compare page and the run switcher read these)
    assert live.apps["first"].server.workbench_apps is live.apps
    assert not live.pending()


def test_host_check_holds_on_the_growing_dashboard(labelled):
    from workbench.app.live import LiveDashboard

    live = LiveDashboard(["a", "b"])
    live.add("a", labelled.path, warm=())
    c = Client(live)
    assert c.get("/a/", headers={"Host": "evil.example"}).status_code == 403
    assert c.get("/b/", headers={"Host": "evil.example"}).status_code == 403


def test_compare_defaults_to_the_run_of_the_same_data(tmp_path):
    from workbench.app.compare import pair_for

    runs = {n: write_synthetic_run(tmp_path / n, n_tokens=200, n_layers=2, n_experts=4, top_k=2, seq_len=50,
                                   probes=("routing",)) for n in ("calibration", "code", "code-banned")}
    for n, data in (("calibration", "aaa"), ("code", "bbb"), ("code-banned", "bbb")):
        runs[n].manifest["identity"] = {"data": data, "model": {"spec": "demo"}}
    assert pair_for(runs["code-banned"], runs) == "code"
    assert pair_for(runs["code"], runs) == "code-banned"
    assert pair_for(runs["calibration"], runs) == "code"  # nothing pairs: the first other run
    assert pair_for(runs["code"], {"code": runs["code"]}) is None


def test_pages_link_to_the_served_run_they_apply_to(labelled, bare):
    from workbench.app.analyses import SECTIONS, _body
    from workbench.app.main import make_multi_app

    server = make_multi_app([bare.path, labelled.path], warm=())
    ctx = server.workbench_apps["bare"].workbench
    for key, page in (("behavior", "/labelled/behavior"), ("multilingual", "/labelled/multilingual"),
                      ("super-experts", "/labelled/super-experts")):
        body, done = _body(ctx, SECTIONS[key])
        text = _text(body)
        assert done and "Open this page on a run it applies to" in text and f'"{page}"' in text, key
    # on the labelled run itself the behaviour section computes instead
    body, _ = _body(server.workbench_apps["labelled"].workbench, SECTIONS["behavior"])
    assert "Open this page on a run" not in _text(body)


def test_export_offers_only_the_analyses_that_apply(labelled, bare):
    from workbench.app import make_app
    from workbench.app.export import computable

    on_bare = computable(make_app(bare, warm=()).workbench)
    on_labelled = computable(make_app(labelled, warm=()).workbench)
    for name in ("behavior", "multilingual", "super-experts"):
        assert name not in on_bare and name in on_labelled
    assert "stats" in on_bare and "lrc" in on_bare


def test_overview_probes_card_reads_as_text_not_json(labelled):
    from workbench.app import make_app
    from workbench.app.overview import layout

    text = _text(layout(make_app(labelled, warm=()).workbench))
    probes = labelled.manifest["probes"]
    assert probes and "{\\\"" not in text and "{'" not in text  # no JSON or dict literal on the page
    for name in probes:
        assert name in text


def test_a_stored_closed_loop_result_shows_without_the_button(labelled):
    """`workbench app demo_out/runs --model demo` after the demo: the demo's stored interventions show."""
    from types import SimpleNamespace

    import polars as pl

    from workbench.analysis.persist import store
    from workbench.app import make_app
    from workbench.app.analyses import SECTIONS, _body
    from workbench.app.service import ModelService

    spec = labelled.model_info.get("spec")
    from workbench.analysis import behavior

    loop = behavior.analyze(labelled, permutations=20, bootstrap=5, progress=False)  # the maps, then the loop's table
    loop.tables["stored_marker"] = pl.DataFrame({"class": ["target"], "change_top": [-0.5]})
    store(loop, labelled, {"intervene": 3, "score": "text", "model": spec})
    mm = SimpleNamespace(spec=spec, moe_layers=list(labelled.moe_layers), n_experts=labelled.n_experts)
    ctx = make_app(labelled, service=ModelService(mm), warm=()).workbench
    sec = SECTIONS["behavior-loop"]
    body, done = _body(ctx, sec)
    assert "loop-go" not in _text(body)  # no "run the interventions" button
    ctx.data.analysis("behavior", variant=sec.variant, wait=30, start=False)
    body, done = _body(ctx, sec)
    assert done and "stored_marker" in _text(body)


def test_commands_say_what_they_load_first_at_a_terminal(tmp_path, capsys, monkeypatch):
    """At a terminal the first line comes before the slow imports and the model; in a pipe errors stay one line."""
    import sys

    from workbench.cli import main

    missing = str(tmp_path / "no-such-run")
    assert main(["app", missing, "--model", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "starting the dashboard" not in err  # a pipe: just the error
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["app", missing, "--model", "demo"]) == 2
    first, *rest = capsys.readouterr().err.strip().splitlines()
    assert first == "workbench: starting the dashboard and loading the model demo ..." and "not a run folder" in rest[-1]


def test_a_queued_section_says_what_it_waits_behind(tmp_path, monkeypatch):
    import threading
    import time

    from workbench.analysis import atlas
    from workbench.app import make_app
    from workbench.app.analyses import SECTIONS, _body

    run = write_synthetic_run(tmp_path / "q", n_tokens=400, n_layers=2, n_experts=4, top_k=2, seq_len=100,
                              probes=("routing",))
    gate = threading.Event()
    monkeypatch.setattr(atlas, "analyze", lambda run, **kw: gate.wait(30) and None)
    data = make_app(run, warm=()).workbench.data
    data.analysis("atlas")
    end = time.time() + 30
    while data.running("atlas") is None and time.time() < end:
        time.sleep(0.05)
    try:
        ctx = make_app(run, warm=()).workbench
        ctx.data = data  # the same run state, as a page sees it
        body, done = _body(ctx, SECTIONS["experts"])  # stats, queued behind the atlas on the one CPU worker
        assert not done and "Queued: the stats analysis" in _text(body) and "atlas analysis before it" in _text(body)
    finally:
        gate.set()
