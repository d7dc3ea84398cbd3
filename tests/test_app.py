"""The dashboard's server side: caches, missing-table notices, export safety, the model service.

Browser behaviour (clicks, sessions, console errors) is in tests/e2e/.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import threading
import time
import types

import numpy as np
import plotly
import polars as pl
import pytest

from workbench.analysis import AnalysisResult
from workbench.analysis.common import routing_arrays
from workbench.app import make_app
from workbench.app import state as app_state
from workbench.app.analyses import SECTIONS, _body
from workbench.app.export import table_for
from workbench.app.service import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, ModelService, interventions_from_state
from workbench.app.steering_lab import _toggle, render_result
from workbench.app.synthetic import write_synthetic_run
from workbench.app.tokens import route_figure
from workbench.app.ui import table_page
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def syn_run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("app") / "run", n_tokens=3000, n_layers=3, n_experts=8,
                               top_k=2, seq_len=200, first_dense=1)


@pytest.fixture(scope="module")
def bare_run(tmp_path_factory):
    """Routing only, no labels: what a plain `workbench capture` of unlabelled text gives."""
    return write_synthetic_run(tmp_path_factory.mktemp("app") / "bare", n_tokens=800, n_layers=2, n_experts=4,
                               top_k=2, seq_len=100, labels=False, probes=("routing",))


def _text(component) -> str:
    """All text of a Dash component tree (what a user would read)."""
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


@pytest.fixture
def fake_analysis(monkeypatch):
    """Install workbench.analysis.<name> as a fake module; returns a call counter dict."""
    import workbench.analysis as wa
    from workbench.analysis import persist

    calls = {}

    def install(name, analyze):
        modname = f"_fake_{name.replace('-', '_')}"
        mod = types.ModuleType(f"workbench.analysis.{modname}")
        mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)

        def counted(run, **kw):
            calls[name] = calls.get(name, 0) + 1
            return analyze(run, **kw)

        mod.analyze = counted
        mod.figures = lambda res: {}
        # results persisted in the (shared) run folder would stand in for the fake, and the fake's must
        # not stand in for later tests' real ones
        monkeypatch.setattr(persist, "load", lambda *a, **k: None)
        monkeypatch.setattr(persist, "store", lambda *a, **k: None)
        monkeypatch.setitem(sys.modules, f"workbench.analysis.{modname}", mod)
        monkeypatch.setitem(wa.MODULES, name, modname)
        return calls

    return install


# -- reading the run ----------------------------------------------------------------------------


def test_doc_routing_matches_the_store(syn_run):
    app = make_app(syn_run, warm=())
    ra = routing_arrays(syn_run)  # independent reader: dense arrays of the whole run
    for doc in (0, 7, 14):
        toks, per_layer = app.workbench.data.doc_routing(doc)
        rows = ra.doc == doc
        assert toks["pos"].to_list() == ra.pos[rows].tolist()
        assert sorted(per_layer) == syn_run.moe_layers == [1, 2, 3]
        for li, layer in enumerate(ra.layers):
            ex, w = per_layer[layer]
            np.testing.assert_array_equal(ex, ra.experts[rows, li])
            np.testing.assert_allclose(w, ra.weights[rows, li])


def test_summary_and_docs_count_what_was_written(syn_run):
    data = make_app(syn_run, warm=()).workbench.data
    s = data.summary()
    assert s["tokens"] == 3000 and s["docs"] == 15
    assert s["tables"]["routing"]["rows"] == 3000 * 3
    assert s["tables"]["expert_stats"]["rows"] == 3000 * 3 * 2
    docs = data.docs()
    assert docs["n_tokens"].to_list() == [200] * 15
    assert docs["lang"].to_list()[:5] == ["en", "de", "fr", "ru", "zh"]
    tok = syn_run.tokens.filter(pl.col("doc_id") == 2).sort("pos").collect()["token"].to_list()
    assert docs.filter(pl.col("doc_id") == 2)["preview"].item() == "".join(tok[:48])[:60]


def test_route_figure_hand_example():
    ex = np.array([[3, 5], [0, -1]])
    w = np.array([[0.7, 0.3], [1.0, 0.0]], np.float32)
    fig = route_figure([1, 4], ex, w, 8, "tok")
    line, pts = fig.data
    assert list(zip(pts.x, pts.y)) == [(1, 3), (1, 5), (4, 0)]
    assert list(zip(line.x, line.y)) == [(1, 3), (4, 0)]  # the top-1 path
    assert pts.marker.size[0] > pts.marker.size[1]  # heavier weight, bigger marker


# -- every page renders; missing inputs become notices ------------------------------------------------


def test_every_page_lays_out(syn_run):
    from workbench.app.main import _pages

    app = make_app(syn_run, warm=())
    for page in _pages():
        out = _text(page.layout(app.workbench))
        assert out and "Traceback" not in out


def test_missing_expert_stats_says_what_to_capture(bare_run):
    ctx = make_app(bare_run, warm=()).workbench
    body, done = _body(ctx, SECTIONS["super-experts"])
    text = _text(body)
    assert done and "expert_stats" in text and "--probes routing,experts" in text
    body, done = _body(ctx, SECTIONS["multilingual"])
    assert done and "lang" in _text(body) and "--data multilingual" in _text(body)


def test_tokens_page_without_routing_is_a_notice(tmp_path):
    run = write_synthetic_run(tmp_path / "r", n_tokens=100, n_layers=2, n_experts=4, probes=())
    from workbench.app.tokens import layout

    assert "routing" in _text(layout(make_app(run, warm=()).workbench))


def test_absent_module_says_not_available(syn_run, monkeypatch):
    monkeypatch.setattr(app_state, "analysis_available", lambda name: False)
    ctx = make_app(syn_run, warm=()).workbench
    body, done = _body(ctx, SECTIONS["atlas"])
    assert done and "not available yet" in _text(body)


def test_analysis_errors_become_notices(syn_run, fake_analysis):
    def needs_labels(run, **kw):
        raise WorkbenchError("this run has no `class` label")

    def buggy(run, **kw):
        raise ZeroDivisionError("oops")

    fake_analysis("behavior", needs_labels)
    fake_analysis("atlas", buggy)
    ctx = make_app(syn_run, warm=()).workbench
    ctx.data.analysis("behavior", wait=10)
    ctx.data.analysis("atlas", wait=10)
    text = _text(_body(ctx, SECTIONS["behavior"])[0])
    assert "no `class` label" in text and "--data behavior" in text
    text = _text(_body(ctx, SECTIONS["atlas"])[0])
    assert "failed" in text and "ZeroDivisionError" in text


def test_analysis_computed_once_and_shown_while_computing(syn_run, fake_analysis):
    gate = threading.Event()

    def slow(run, **kw):
        gate.wait(20)
        return AnalysisResult("stats", {"load": pl.DataFrame({"layer": [1], "expert": [0], "count": [5]})}, "load")

    calls = fake_analysis("stats", slow)
    ctx = make_app(syn_run, warm=()).workbench
    body, done = _body(ctx, SECTIONS["experts"])
    assert not done and "Computing the stats analysis" in _text(body)
    threads = [threading.Thread(target=ctx.data.analysis, args=("stats",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gate.set()
    assert isinstance(ctx.data.analysis("stats", wait=20), AnalysisResult)
    body, done = _body(ctx, SECTIONS["experts"])
    assert done and "load" in _text(body)
    assert calls["stats"] == 1


def test_table_page_sorts_and_pages_like_python():
    rng = np.random.default_rng(1)
    df = pl.DataFrame({"a": rng.integers(0, 50, 37), "b": rng.normal(size=37), "l": [[1, 2]] * 37})
    rows, cols, n_pages = table_page(df, 2, 10, [{"column_id": "b", "direction": "desc"}])
    assert n_pages == 4 and [c["id"] for c in cols] == ["a", "b", "l"]
    want = sorted(df["b"].to_list(), reverse=True)[20:30]
    assert [r["b"] for r in rows] == pytest.approx(want, rel=1e-4)
    assert rows[0]["l"] == "1, 2"
    rows, _, _ = table_page(df, 99, 10, [])  # past the end: the last page
    assert len(rows) == 7


# -- export ---------------------------------------------------------------------------------------


def test_export_names_only_what_the_run_has(syn_run):
    ctx = make_app(syn_run, warm=()).workbench
    df, why = table_for(ctx, "run/tokens")
    assert why is None and df.equals(syn_run.tokens.collect())
    for bad in ("../../etc/passwd", "run/../../etc/passwd", "/etc/passwd", "run/manifest.json",
                "analysis/stats/../../x", "run/tokens/x", "", None):
        df, why = table_for(ctx, bad)
        assert df is None and why


def test_export_analysis_tables_after_compute(syn_run, fake_analysis):
    t = pl.DataFrame({"layer": [1, 2], "srp": [0.5, 0.25]})
    fake_analysis("lrc", lambda run, **kw: AnalysisResult("lrc", {"srp": t}, "srp"))
    ctx = make_app(syn_run, warm=()).workbench
    assert table_for(ctx, "analysis/lrc/srp")[0] is None  # not computed yet
    ctx.data.analysis("lrc", wait=10)
    assert table_for(ctx, "analysis/lrc/srp")[0].equals(t)


def test_export_offers_to_compute_only_what_one_run_can_give(syn_run, fake_analysis):
    """compare and attribution need a second run or the model: never "not computed yet" here."""
    from workbench.app.export import computable, layout

    t = pl.DataFrame({"layer": [1], "srp": [0.5]})
    fake_analysis("lrc", lambda run, **kw: AnalysisResult("lrc", {"srp": t}, "srp"))
    ctx = make_app(syn_run, warm=()).workbench
    pending = computable(ctx)
    assert "lrc" in pending and "stats" in pending
    assert "compare" not in pending and "attribution" not in pending
    text = _text(layout(ctx))
    assert "Not computed yet:" in text and "compare," not in text and "attribution" not in text.split("Not computed yet:")[1]
    ctx.data.analysis("lrc", wait=10)
    assert "lrc" not in computable(ctx)


# -- steering state and the model service ------------------------------------------------------------


def test_toggle_semantics():
    s = _toggle([], 1, 3, "ban", 0.5)
    assert s == [[1, 3, "ban", None]]
    s = _toggle(s, 2, 0, "boost", 1.5)
    assert s == [[1, 3, "ban", None], [2, 0, "boost", 1.5]]
    assert _toggle(s, 1, 3, "ban", 0.5) == [[2, 0, "boost", 1.5]]  # same action again: off
    assert _toggle(s, 1, 3, "force", 0.5)[0] == [1, 3, "force", None]  # other action: replaces


def test_interventions_from_state():
    got = interventions_from_state([[1, 3, "ban", None], [2, 0, "boost", 1.5], [1, 4, "ban", None], [3, 1, "zero", None]])
    assert got == {"ban": [(1, 3), (1, 4)], "boost": {"L2:E0": 1.5}, "zero": [(3, 1)]}
    with pytest.raises(WorkbenchError):
        interventions_from_state([[1, 3, "explode", None]])


@pytest.fixture(scope="module")
def strong_model(tiny_dir):
    """A tiny qwen3_moe whose experts dominate the residual, so steering visibly changes the text."""
    import torch

    from workbench.models.loading import load_model

    mm = load_model(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64)))
    with torch.no_grad():
        for layer in mm.layers:
            layer.experts.down_proj.mul_(40)
    return mm


def _wait(svc, job, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        state, payload = svc.poll(job)
        if state not in ("queued", "running"):
            return state, payload
        time.sleep(0.05)
    raise AssertionError("job did not finish")


def test_service_steering_changes_text_and_caps(strong_model):
    svc = ModelService(strong_model)
    state, base = _wait(svc, svc.submit("s", "The quick brown fox", [], max_new_tokens=8))
    assert state == "done" and base["result"].baseline_ids == base["result"].steered_ids
    # ban half of layer 0's experts: the text must change
    from workbench.steering import compare

    r = compare(strong_model, "The quick brown fox", {}, max_new_tokens=1)
    assert r.routing_changes.height == 0
    items = [[0, e, "ban", None] for e in range(4)]
    state, pay = _wait(svc, svc.submit("s", "The quick brown fox", items, max_new_tokens=8))
    res = pay["result"]
    assert state == "done" and res.steered_ids != res.baseline_ids and res.routing_changes.height > 0
    assert set(res.routing_changes["layer"].to_list()) >= {0}
    text = _text(render_result(res))
    assert "tok changed" in text and "Routing changes" in text
    # caps: generated tokens clipped, long prompts refused in one sentence
    state, pay = _wait(svc, svc.submit("s", "a", [], max_new_tokens=10_000))
    assert state == "done" and len(pay["result"].baseline_ids) <= MAX_NEW_TOKENS
    with pytest.raises(WorkbenchError, match="at most"):
        svc.submit("s", "x " * (MAX_PROMPT_TOKENS + 10), [])
    with pytest.raises(WorkbenchError):
        svc.submit("s", "   ", [])


def test_service_sessions_do_not_cancel_each_other(strong_model):
    svc = ModelService(strong_model)
    svc.lock.acquire()  # hold the model: the first job blocks, the rest queue behind it
    try:
        b0 = svc.submit("B", "zero", [], max_new_tokens=2)
        time.sleep(0.2)
        a2 = svc.submit("A", "two", [], max_new_tokens=2)
        b1 = svc.submit("B", "three", [], max_new_tokens=2)
        a3 = svc.submit("A", "four", [[0, 1, "ban", None]], max_new_tokens=2)
        assert svc.poll(a2)[0] == "cancelled"  # superseded by a3 before it ran
        assert svc.poll(b1)[0] == "queued"
    finally:
        svc.lock.release()
    assert _wait(svc, b0)[0] == "cancelled"  # B's newer request superseded its running one
    assert _wait(svc, b1)[0] == "done" and _wait(svc, b1)[1]["result"].prompt == "three"
    state, pay = _wait(svc, a3)
    assert state == "done" and pay["interventions"] == {"ban": [(0, 1)]}


def test_steering_page_lays_out_with_a_model(syn_run, strong_model):
    from workbench.app.steering_lab import PAGE

    ctx = make_app(syn_run, model=strong_model, warm=()).workbench
    text = _text(PAGE.layout(ctx))
    assert "steer-map" in text and "steer-prompt" in text


def test_service_reports_bad_spec_in_one_sentence(strong_model):
    svc = ModelService(strong_model)
    with pytest.raises(WorkbenchError):
        svc.parse("L99:E0")
    with pytest.raises(WorkbenchError):
        svc.parse("L0:E999")
    assert svc.parse("L0:E1,L1:E2") == [(0, 1), (1, 2)]


def _fake_waitress(monkeypatch, seen):
    """serve() builds its waitress server through wsgi_server; record the call and return at once."""
    import workbench.app.main as app_main

    class Srv:
        effective_port = 0

        def run(self):
            seen["ran"] = True

        def close(self):
            pass

    def fake(server, host="127.0.0.1", port=8050, threads=8):
        seen.update(host=host, port=port, server=server)
        return Srv()

    monkeypatch.setattr(app_main, "wsgi_server", fake)


def test_serve_binds_loopback_by_default(syn_run, monkeypatch):
    seen = {}
    _fake_waitress(monkeypatch, seen)
    from workbench.app import serve

    serve(str(syn_run.path))
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8050 and seen["ran"]
    serve(str(syn_run.path), host="0.0.0.0", port=9000, allow_remote=True)
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9000


def test_steering_map_marks_selected_cells(strong_model):
    from workbench.app.steering_lab import MODE_CODE, _map_figure

    share = np.zeros((2, 8), np.float32)
    share[1, 5] = 0.4
    share[0, 2] = 0.1
    fig = _map_figure(strong_model, [[0, 1, "ban", None], [1, 3, "boost", 2.0]], share)
    z = np.asarray(fig.data[0].z)
    assert z[0, 1] == MODE_CODE["ban"] + 0.5 and z[1, 3] == MODE_CODE["boost"] + 0.5
    assert 0.99 < z[1, 5] < 1.0 and z[0, 2] == pytest.approx(0.25 * 0.999)  # shaded by share, below any action
    assert "boost 2.0" in fig.data[0].text[1][3] and "run share 0.400" in fig.data[0].text[1][5]


def test_closed_loop_runs_only_on_request_with_the_model_locked(tmp_path, strong_model, fake_analysis):
    """The pruning button: absent without a model, refused for another model, runs under the model lock."""
    from workbench.app.analyses import _model_check

    seen = {}

    def analyze(run, model=None, prune=False, **kw):
        tables = {"experts": pl.DataFrame({"layer": [0], "expert": [1], "max_abs": [9.0]})}
        if prune:
            seen["locked"] = svc.lock.locked()
            seen["model"] = model
            tables["prune"] = pl.DataFrame({"what": ["baseline", "super experts"], "ppl": [10.0, 60.0]})
        return AnalysisResult("super-experts", tables, "experts")

    fake_analysis("super-experts", analyze)
    run = write_synthetic_run(tmp_path / "r", n_tokens=400, n_layers=2, n_experts=8, seq_len=100)
    assert "without one" in _text(_body(make_app(run, warm=()).workbench, SECTIONS["super-experts-loop"])[0])
    other = write_synthetic_run(tmp_path / "o", n_tokens=400, n_layers=3, n_experts=8, seq_len=100)
    assert _model_check(make_app(other, model=strong_model, warm=()).workbench).message.startswith("The live model")

    ctx = make_app(run, model=strong_model, warm=()).workbench
    svc = ctx.service
    ctx.data.analysis("super-experts", wait=10)
    body, done = _body(ctx, SECTIONS["super-experts-loop"])
    assert done and "loop-go" in _text(body) and "evaluate pruning" in _text(body)
    assert "prune" not in seen  # nothing ran before the click
    sec = SECTIONS["super-experts-loop"]
    res = ctx.data.analysis(sec.analysis, variant=sec.variant, options=sec.loop.options(ctx), lock=svc.lock, wait=20)
    assert seen == {"locked": True, "model": strong_model}
    assert "prune" in res.tables
    text = _text(_body(ctx, sec)[0])
    assert "prune (2 rows)" in text and "experts (1 rows)" not in text  # only what the loop adds


def _route(client, prefix: str, page: str) -> str:
    """What the router callback returns for `page` of the app under `prefix` (through Dash's HTTP API)."""
    body = {"output": "..wb-page.children...wb-nav.children..",
            "outputs": [{"id": "wb-page", "property": "children"}, {"id": "wb-nav", "property": "children"}],
            "inputs": [{"id": "url", "property": "pathname", "value": prefix + page.lstrip("/")}],
            "changedPropIds": ["url.pathname"], "state": []}
    r = client.post(prefix + "_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:500]
    return json.dumps(r.get_json())  # Dash escapes "/" in its responses; compare decoded text


def test_multi_run_app_serves_each_run_with_a_switcher(syn_run, bare_run, tmp_path, monkeypatch):
    from workbench.app.main import make_multi_app, resolve_runs

    server = make_multi_app([syn_run.path, bare_run.path], warm=())
    names = list(server.workbench_apps)
    assert names == [syn_run.path.name, bare_run.path.name]
    client = server.test_client()
    r = client.get("/")
    assert r.status_code in (301, 302) and r.headers["Location"].endswith(f"/{names[0]}/")
    for name, run in zip(names, (syn_run, bare_run)):
        assert server.workbench_apps[name].workbench.run.path == run.path
        assert client.get(f"/{name}/").status_code == 200
        out = _route(client, f"/{name}/", "/")
        # the overview of *this* run, and links to the same page of every run
        assert f"/{names[0]}/" in out and f"/{names[1]}/" in out
        assert f"Run {name}" in out
    # a page of the unlabelled run says what it lacks rather than showing the other run's data
    assert "--data multilingual" in _route(client, f"/{names[1]}/", "/multilingual")
    # a folder of runs expands to its runs; a folder that is neither says so in one sentence
    assert resolve_runs(syn_run.path.parent) == [syn_run.path]
    with pytest.raises(WorkbenchError, match="not a run folder"):
        resolve_runs(tmp_path)


def test_serve_several_runs_binds_loopback(syn_run, bare_run, monkeypatch):
    seen = {}
    _fake_waitress(monkeypatch, seen)
    from workbench.app import serve

    serve([str(syn_run.path), str(bare_run.path)])
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8050
    assert set(seen["server"].workbench_apps) == {syn_run.path.name, bare_run.path.name}


def test_app_cli_loads_the_model_on_the_named_device(syn_run, monkeypatch, capsys):
    import workbench.models.loading as loading
    from workbench.cli import main

    seen = {}
    _fake_waitress(monkeypatch, seen)
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, **kw: seen.setdefault("load", (spec, kw)) and real(spec, **kw))
    assert main(["app", str(syn_run.path), "--model", "demo", "--device", "cpu", "--dtype", "float32"]) == 0
    assert seen["load"] == ("demo", {"device": "cpu", "dtype": "float32"})
    assert seen["host"] == "127.0.0.1"
    assert main(["app", str(syn_run.path), "--device", "cpu"]) == 2
    assert "--model" in capsys.readouterr().err
