"""Serving the dashboard safely: the steering queue is bounded and fair, the Host header is checked,
options that expose it need confirming, it runs under waitress, and no page or callback answers 500."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from workbench.app import make_app
from workbench.app.main import (allowed_hosts_for, check_serve_options, install_host_check, make_multi_app,
                                wsgi_server)
from workbench.app.service import ModelService
from workbench.app.steering_lab import queue_status
from workbench.app.synthetic import write_synthetic_run
from workbench.errors import WorkbenchError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("serve") / "run", n_tokens=600, n_layers=2, n_experts=4,
                               top_k=2, seq_len=100, probes=("routing",))


# -- the steering queue --------------------------------------------------------------------------------


class _FakeModule:
    def register_forward_pre_hook(self, fn):
        return type("H", (), {"remove": lambda self: None})()


class _FakeModel:
    """Just what ModelService touches outside `compare` (which the tests replace)."""

    spec = "fake"
    model = _FakeModule()

    def tokenize(self, text):
        return text.split()


@pytest.fixture
def fake_compare(monkeypatch):
    """workbench.steering.compare replaced by a recorder that takes `delay` seconds per call."""
    import workbench.steering as steering

    calls, gate = [], {"delay": 0.0}

    def compare(mm, prompt, inter, **kw):
        calls.append(prompt)
        time.sleep(gate["delay"])
        return prompt

    monkeypatch.setattr(steering, "compare", compare)
    return calls, gate


def _wait(svc, job, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        state, payload = svc.poll(job)
        if state not in ("queued", "running"):
            return state, payload
        time.sleep(0.01)
    raise AssertionError("job did not finish")


def test_one_session_cannot_make_another_wait_behind_its_jobs(fake_compare):
    calls, _ = fake_compare
    svc = ModelService(_FakeModel())
    svc.lock.acquire()  # the model is busy: everything queues
    try:
        first = svc.submit("A", "a0", [])
        time.sleep(0.1)
        assert svc.poll(first)[0] == "running"
        jobs_a = [svc.submit("A", f"a{i}", []) for i in range(1, 31)]  # 30 requests from one tab
        b = svc.submit("B", "b", [])
        state, where = svc.poll(b)
        # behind A's newest request only: the 29 older ones were superseded, and so was A's running one
        # (it stops at its next step, so it is not counted as ahead)
        assert state == "queued" and where["ahead"] == 1
        assert svc.queue_length() == 2
        assert all(svc.poll(j)[0] == "cancelled" for j in jobs_a[:-1])
        assert svc.poll(jobs_a[-1])[0] == "queued" and svc.poll(jobs_a[-1])[1]["ahead"] == 0
        assert "1 request ahead of yours" in queue_status(where)
        assert "2 requests ahead" in queue_status({"ahead": 2, "seconds": 1.0})
    finally:
        svc.lock.release()
    assert _wait(svc, b)[0] == "done" and _wait(svc, jobs_a[-1])[0] == "done"
    assert _wait(svc, first)[0] == "cancelled"  # superseded while waiting for the model: never ran
    assert calls == ["a30", "b"]  # nothing else reached the model


def test_queue_is_bounded_overall_and_refuses_in_one_sentence(fake_compare):
    calls, _ = fake_compare
    svc = ModelService(_FakeModel(), max_queued=3)
    svc.lock.acquire()
    try:
        running = svc.submit("S0", "x", [])
        time.sleep(0.1)
        queued = [svc.submit(f"S{i}", "x", []) for i in range(1, 4)]
        with pytest.raises(WorkbenchError, match="busy with 3 queued requests") as e:
            svc.submit("S9", "x", [])
        assert "\n" not in str(e.value)
        assert svc.queue_length() == 3  # the refusal changed nothing
        again = svc.submit("S2", "y", [])  # a queued session may still replace its own request
        assert svc.poll(queued[1])[0] == "cancelled" and svc.poll(again)[1]["ahead"] == 3
    finally:
        svc.lock.release()
    for j in [running, queued[0], queued[2], again]:
        assert _wait(svc, j)[0] == "done"


def test_abandoned_jobs_are_dropped_unrun(fake_compare):
    calls, _ = fake_compare
    svc = ModelService(_FakeModel(), abandon_after=0.3)
    svc.lock.acquire()
    try:
        first = svc.submit("A", "a", [])
        gone = svc.submit("B", "b", [])  # nobody polls this one
        kept = svc.submit("C", "c", [])
        for _ in range(8):
            time.sleep(0.1)
            svc.poll(kept)
    finally:
        svc.lock.release()
    assert _wait(svc, kept)[0] == "done"
    state, msg = svc.poll(gone)
    assert state == "cancelled" and "nobody" in msg and "b" not in calls


def test_superseded_running_generation_stops_and_leaves_the_model_clean(tiny_dir):
    """A real generation cancelled mid-way stops within one forward pass, and leaves no hook behind."""
    import torch

    from workbench.models.loading import load_model
    from workbench.steering import compare

    mm = load_model(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64)))
    forwards = []
    counter = mm.model.register_forward_pre_hook(lambda m, a: forwards.append(time.time()))
    slow = mm.model.register_forward_pre_hook(lambda m, a: time.sleep(0.05))
    try:
        svc = ModelService(mm)
        long_job = svc.submit("A", "The quick brown fox", [[0, 1, "ban", None]], max_new_tokens=64)
        while len(forwards) < 3:
            time.sleep(0.01)
        newer = svc.submit("A", "Hello", [], max_new_tokens=2)
        assert _wait(svc, long_job)[0] == "cancelled"
        n_cancelled = len(forwards)
        assert _wait(svc, newer)[0] == "done"
    finally:
        counter.remove()
        slow.remove()
    assert n_cancelled < 64  # a full comparison is 2 x 64 generation steps + 1 forward
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mm.model.modules()]
    assert sum(hooks) == 0
    ids = mm.tokenize("The quick brown fox")
    with torch.no_grad():
        fresh = load_model(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64)))
        a = mm.model(torch.tensor([ids])).logits
        b = fresh.model(torch.tensor([ids])).logits
    assert torch.equal(a, b)  # same weights, same output: nothing steers the model any more
    assert compare(mm, "Hi", {}, max_new_tokens=2).baseline_ids == compare(fresh, "Hi", {}, max_new_tokens=2).baseline_ids


# -- Host header --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host, ok", [("127.0.0.1:8050", True), ("localhost:8050", True), ("[::1]:8050", True),
                                      ("LOCALHOST", True), ("127.0.0.2", True), ("evil.example:8050", False),
                                      ("127.0.0.1.evil.example", False), ("10.0.0.5:8050", False), ("", False)])
def test_loopback_app_answers_only_loopback_host_names(run, host, ok):
    client = make_app(run, warm=()).server.test_client()
    r = client.get("/", headers={"Host": host})
    assert r.status_code == (200 if ok else 403)
    if not ok:
        assert b"does not answer to the host name" in r.data and b"Traceback" not in r.data
        assert client.get("/_dash-layout", headers={"Host": host}).status_code == 403  # the data too


def test_allowed_hosts_follow_the_bound_host(run):
    from flask import Flask

    def status(allowed, host):
        server = Flask("t")
        server.add_url_rule("/", "i", lambda: "ok")
        install_host_check(server, allowed)
        return server.test_client().get("/", headers={"Host": host}).status_code

    named = allowed_hosts_for("dash.lab.example")
    assert status(named, "dash.lab.example:8050") == 200 and status(named, "other.example") == 403
    assert status(named, "10.1.2.3") == 403
    wild = allowed_hosts_for("0.0.0.0", extra=["proxy.example"])
    # a wildcard bind answers to IP literals (which DNS rebinding cannot forge) and its own names, not others
    assert status(wild, "10.1.2.3:8050") == 200 and status(wild, "[fe80::1]:9") == 200
    assert status(wild, "proxy.example") == 200 and status(wild, "evil.example") == 403
    assert status("*", "evil.example") == 200
    server = make_multi_app([run.path], warm=())
    assert server.test_client().get("/", headers={"Host": "evil.example"}).status_code == 403


def test_waitress_serves_the_app_and_rejects_a_rebound_host(run):
    app = make_app(run, warm=())
    srv = wsgi_server(app.server, host="127.0.0.1", port=0)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    try:
        def get(path, host):
            c = http.client.HTTPConnection("127.0.0.1", srv.effective_port, timeout=30)
            c.request("GET", path, headers={"Host": host})
            r = c.getresponse()
            return r.status, r.getheader("Server"), r.read()

        status, server, body = get("/_dash-layout", f"127.0.0.1:{srv.effective_port}")
        assert status == 200 and server == "workbench" and b"wb-page" in body  # waitress, not Werkzeug
        assert get("/_dash-layout", "rebind.evil.example")[0] == 403
    finally:
        srv.close()
        t.join(5)


# -- options that expose the dashboard -------------------------------------------------------------------


def test_remote_host_needs_confirmation_and_debug_stays_on_loopback():
    check_serve_options("127.0.0.1")
    check_serve_options("localhost", debug=True)
    check_serve_options("0.0.0.0", allow_remote=True)
    with pytest.raises(WorkbenchError, match="--allow-remote"):
        check_serve_options("0.0.0.0")
    with pytest.raises(WorkbenchError, match="--allow-remote"):
        check_serve_options("192.168.1.4")
    with pytest.raises(WorkbenchError, match="Werkzeug debugger"):
        check_serve_options("0.0.0.0", debug=True, allow_remote=True)


def test_cli_refuses_a_remote_host_before_loading_anything(run, monkeypatch, capsys):
    import workbench.models.loading as loading
    from workbench.cli import main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the model before checking"))
    assert main(["app", str(run.path), "--host", "0.0.0.0", "--model", "demo"]) == 2
    err = capsys.readouterr().err
    assert "--allow-remote" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_debug_warns_about_the_werkzeug_debugger(run, monkeypatch, capsys):
    import dash

    from workbench.cli import main

    seen = {}
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: seen.update(kw))
    assert main(["app", str(run.path), "--debug"]) == 0
    assert seen["debug"] is True and seen["host"] == "127.0.0.1"
    assert "Werkzeug debugger" in capsys.readouterr().err


# -- never HTTP 500 ----------------------------------------------------------------------------------------


def _post(client, outputs, inputs, state=()):
    def spec(o):
        return {"id": o[0], "property": o[1]}

    body = {"output": ".." + "...".join(f"{a}.{b}" for a, b in outputs) + "..",
            "outputs": [spec(o) for o in outputs],
            "inputs": [{**spec(i), "value": i[2]} for i in inputs], "state": [{**spec(s), "value": s[2]} for s in state],
            "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"]}
    if len(outputs) == 1:
        body["output"] = f"{outputs[0][0]}.{outputs[0][1]}"
        body["outputs"] = spec(outputs[0])
    return client.post("/_dash-update-component", json=body)


PAGES = ["/", "/tokens", "/experts", "/super-experts", "/locality", "/multilingual", "/behavior", "/atlas",
         "/steering", "/export"]


def test_a_store_error_is_one_sentence_in_the_page_never_500(run, monkeypatch):
    from workbench.app import state as app_state

    sentence = "routing part 00003 of the run is damaged (checksum mismatch); run `workbench check RUN --repair`"

    def broken(self, *a, **k):
        raise WorkbenchError(sentence)

    monkeypatch.setattr(app_state.RunData, "doc_routing", broken)
    monkeypatch.setattr(app_state.RunData, "summary", broken)
    monkeypatch.setattr(app_state.RunData, "docs", broken)
    client = make_app(run, warm=()).server.test_client()
    for page in PAGES:
        r = _post(client, [("wb-page", "children"), ("wb-nav", "children")], [("url", "pathname", page)])
        assert r.status_code == 200, (page, r.data[:300])
    r = _post(client, [("wb-page", "children"), ("wb-nav", "children")], [("url", "pathname", "/")])
    assert sentence in json.dumps(r.get_json())
    # a page callback (choosing a document on the Tokens page): 200, the sentence in the error bar
    r = _post(client, [("tok-offset", "max"), ("tok-offset", "value"), ("tok-sel", "data")], [("tok-doc", "value", 0)])
    assert r.status_code == 200
    side = r.get_json()["sideUpdate"]["wb-error"]
    assert side["children"] == sentence and side["style"] == {"display": "block"}


def test_a_damaged_part_never_gives_500(tmp_path):
    """Bytes of a routing part destroyed: whatever the store raises, pages and callbacks answer 200."""
    run = write_synthetic_run(tmp_path / "run", n_tokens=600, n_layers=2, n_experts=4, top_k=2, seq_len=100,
                              probes=("routing",))
    for part in run.files("routing"):
        part.write_bytes(part.read_bytes()[:40])
    client = make_app(run, warm=()).server.test_client()
    for page in PAGES:
        r = _post(client, [("wb-page", "children"), ("wb-nav", "children")], [("url", "pathname", page)])
        assert r.status_code == 200, (page, r.data[:300])
    r = _post(client, [("tok-offset", "max"), ("tok-offset", "value"), ("tok-sel", "data")], [("tok-doc", "value", 0)])
    assert r.status_code == 200
    msg = r.get_json()["sideUpdate"]["wb-error"]["children"]
    assert msg and "Traceback" not in msg and "\n" not in msg
