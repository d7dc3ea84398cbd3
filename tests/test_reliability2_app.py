"""Issue 22 item 6: every dashboard cache is bounded (entries and bytes), request bodies are capped, the steering
selection a request carries is checked before any work, and malformed Dash requests answer 4xx with a sentence."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from workbench.app import make_app
from workbench.app.synthetic import write_synthetic_run
from workbench.errors import WorkbenchError

ROUTE = {"output": "..wb-page.children...wb-nav.children..",
         "outputs": [{"id": "wb-page", "property": "children"}, {"id": "wb-nav", "property": "children"}],
         "inputs": [{"id": "url", "property": "pathname", "value": "/"}], "changedPropIds": ["url.pathname"],
         "state": []}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("app2")
    a = write_synthetic_run(root / "a", n_tokens=1200, n_layers=2, n_experts=4, part_tokens=600, probes=("routing",))
    b = write_synthetic_run(root / "b", n_tokens=1200, n_layers=2, n_experts=4, part_tokens=600, probes=("routing",),
                            seed=1)
    return a, b


@pytest.fixture
def client(runs):
    logging.getLogger("workbench.app").setLevel(logging.CRITICAL)
    app = make_app(runs[0], warm=())
    return app, app.server.test_client()


def test_malformed_dash_requests_answer_400_with_a_sentence(client):
    app, c = client
    url = "/_dash-update-component"
    bodies = {"not json": dict(data=b"{nope", content_type="application/json"),
              "a list": dict(json=[1, 2]),
              "no output": dict(json={"inputs": []}),
              "unknown output": dict(json={**ROUTE, "output": "nope.children"}),
              "inputs not a list": dict(json={**ROUTE, "inputs": "x"}),
              "input without id": dict(json={**ROUTE, "inputs": [{"property": "pathname"}]}),
              "form body": dict(data=b"a=b", content_type="application/x-www-form-urlencoded")}
    for what, kw in bodies.items():
        r = c.post(url, **kw)
        text = r.get_data(as_text=True)
        assert 400 <= r.status_code < 500, (what, r.status_code, text[:200])
        assert text.count("\n") == 1 and "<html" not in text.lower(), (what, text[:200])
    assert c.post(url, json=ROUTE).status_code == 200  # a well-formed one still works


def test_request_bodies_are_capped(client):
    from workbench.app.main import MAX_REQUEST_BYTES, wsgi_server

    app, c = client
    big = b'{"output": "' + b"x" * (MAX_REQUEST_BYTES + 10) + b'"}'
    r = c.post("/_dash-update-component", data=big, content_type="application/json")
    assert r.status_code == 413 and "larger than the dashboard accepts" in r.get_data(as_text=True)
    srv = wsgi_server(app.server, port=0)
    try:
        assert srv.adj.max_request_body_size == MAX_REQUEST_BYTES  # waitress' own cap (default 1 GB)
    finally:
        srv.close()


def test_steering_rows_are_checked_and_capped_before_any_work():
    from workbench.app.service import clean_items, interventions_from_state
    from workbench.app.steering_lab import _map_figure

    mm = SimpleNamespace(moe_layers=[1, 2], n_experts=4)
    huge = [[1, 0, "ban", None]] * 2_500_000  # the 52 MB POST of the campaign
    t0 = time.perf_counter()
    with pytest.raises(WorkbenchError, match="at most 10 fit this model"):
        clean_items(huge, mm)
    assert time.perf_counter() - t0 < 0.5
    # duplicates collapse to one row per cell (the last wins): the map draws at most layers x experts cells
    rows = [[1, 0, "ban", None], [2, 3, "boost", 0.7], [1, 0, "zero", None]]
    assert clean_items(rows, mm) == [[1, 0, "zero", None], [2, 3, "boost", 0.7]]
    assert interventions_from_state(rows, mm) == {"zero": [(1, 0)], "boost": {"L2:E3": 0.7}}
    fig = _map_figure(SimpleNamespace(moe_layers=[1, 2], n_experts=4), clean_items(rows * 3, mm))
    assert max(len(t) for row in fig.data[0].text for t in row) < 40
    for bad, needle in (([[1, 0]], "malformed"), ([[1, 9, "ban"]], "not an expert"), ([[5, 0, "ban"]], "not an expert"),
                        ([["1", 0, "ban"]], "whole numbers"), ([[1, 0, "explode"]], "unknown intervention"),
                        ([[1, 0, "boost", float("nan")]], "finite"), ("rows", "not a list")):
        with pytest.raises(WorkbenchError, match=needle):
            clean_items(bad, mm)


def test_compare_cache_is_bounded_and_keyed_only_by_known_matchings(runs):
    from workbench.app import compare as cmp_page

    a, b = runs
    server_app = make_app(a, warm=())
    c = server_app.server.test_client()
    cmp_page._CACHE.pop((str(a.path), str(b.path), "none"), None)
    before = len(cmp_page._CACHE)
    key = next((k for k in server_app.callback_map if "cmp-body.children" in k), None)
    if key is None:
        pytest.skip("the Compare page has no cmp-body callback in this version")
    spec = server_app.callback_map[key]
    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in key.strip(".").split("...")]
    values = {"cmp-other": b.path.name, "cmp-match": None}
    body = {"output": key, "outputs": outs if len(outs) > 1 else outs[0], "changedPropIds": ["cmp-match.value"],
            "inputs": [{"id": i["id"], "property": i["property"], "value": values.get(i["id"], 0)}
                       for i in spec["inputs"]], "state": []}
    match_at = [i["id"] for i in spec["inputs"]].index("cmp-match")
    server_app.server.workbench_apps = {a.path.name: server_app, b.path.name: make_app(b, warm=())}
    for i in range(40):  # a client inventing a matching per request
        body["inputs"][match_at]["value"] = f"m{i}-" + "x" * 1000
        r = c.post("/_dash-update-component", json=body)
        assert r.status_code == 200 and "unknown matching" in r.get_data(as_text=True)
    keys = cmp_page._CACHE.keys() if hasattr(cmp_page._CACHE, "keys") else []
    assert len(cmp_page._CACHE) <= max(before, 8), len(cmp_page._CACHE)
    assert not [k for k in keys if k[2] not in cmp_page.MATCHES]


def test_analysis_variants_are_bounded(runs):
    """Placement options come from the request: each distinct choice was kept forever."""
    from workbench.app import state

    app = make_app(runs[0], warm=())
    data = app.workbench.data
    for w in range(1, 15):
        opts = {"ep": 2, "redundant": 0, "window": 8 * w}
        got = data.analysis("placement", variant=f"placement:w{w}", options=opts, wait=60)
        assert got is not None
    kept = [k for k in list(data._cache) if isinstance(k, tuple) and k[0] == "analysis" and str(k[1]).startswith("placement:")]
    assert len(kept) <= getattr(state, "MAX_VARIANTS", 8), len(kept)
    assert len([k for k in data._jobs if k.startswith("placement:")]) <= getattr(state, "MAX_VARIANTS", 8)
    # an evicted variant asked again is computed again, not lost
    again = data.analysis("placement", variant="placement:w1", options={"ep": 2, "redundant": 0, "window": 8}, wait=60)
    assert again is not None and "Unavailable" not in type(again).__name__


def test_a_running_comparison_never_blocks_request_threads(runs, monkeypatch):
    """The Compare page's start()/cached_result() ran under the lock a comparison held for its whole
    computation: every request touching Compare waited for it (a waitress thread each)."""
    import threading

    import workbench.analysis.compare as analysis_compare
    from workbench.app import compare as cmp_page

    a, b = runs
    gate, entered = threading.Event(), threading.Event()

    def slow(run, other=None, match="none", **kw):
        entered.set()
        gate.wait(10)
        raise WorkbenchError("stopped by the test")

    monkeypatch.setattr(analysis_compare, "analyze", slow)
    for m in ("none", "routing", "weights"):
        cmp_page._CACHE.pop((str(a.path), str(b.path), m), None)
        cmp_page._STARTED.pop((str(a.path), str(b.path), m), None)
    try:
        cmp_page.start(a, b, "none")
        assert entered.wait(10)
        t0 = time.perf_counter()
        assert cmp_page.cached_result(a, b, "none") is None
        cmp_page.start(a, b, "routing")  # queued behind the running one, without waiting for it
        cmp_page.remember(a, b, "weights", "res", {})
        assert time.perf_counter() - t0 < 1.0
    finally:
        gate.set()
    deadline = time.time() + 20
    while cmp_page.cached_result(a, b, "routing") is None and time.time() < deadline:
        time.sleep(0.05)
    assert "stopped by the test" in cmp_page.cached_result(a, b, "routing")[0].message
