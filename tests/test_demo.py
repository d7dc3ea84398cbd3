"""`workbench demo --quick`: the main job end to end on the bundled model, offline."""

from __future__ import annotations

import re

import pytest

from workbench.demo import plans


def _get(url: str) -> tuple[int, str, str]:
    """(status, Location, body) without following redirects."""
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    c.request("GET", u.path or "/", headers={"Host": f"127.0.0.1:{u.port}"})
    r = c.getresponse()
    return r.status, r.getheader("Location") or "", r.read().decode("utf-8", "replace")


@pytest.mark.slow
def test_quick_demo_serves_after_the_first_capture_writes_a_full_report_and_reuses_captures(tmp_path, monkeypatch,
                                                                                              capsys):
    import workbench.demo as demo
    from workbench.cli import main

    served = []
    monkeypatch.setattr(demo, "_serve_forever", served.append)  # return instead of serving until Ctrl-C
    out = tmp_path / "demo"
    import socket

    with socket.socket() as sock:  # a free port (the demo's --port takes 1-65535)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert main(["demo", "--quick", "--out", str(out), "--port", str(port)]) == 0
    said = capsys.readouterr().out.splitlines()
    (live,) = served
    try:
        # the dashboard was up right after the first capture, before the second began
        at = {key: next(i for i, line in enumerate(said) if key in line)
              for key in ("[demo] dashboard: http://", "[demo] capture multilingual", "[demo] report:")}
        assert at["[demo] dashboard: http://"] < at["[demo] capture multilingual"] < at["[demo] report:"]
        url = re.search(r"(http://\S+/)", said[at["[demo] dashboard: http://"]]).group(1)

        run_plans, analysis_plans = plans(quick=True)
        html = (out / "report.html").read_text()
        for ap in analysis_plans:
            assert ap.title in html.replace("&amp;", "&")
        # every analysis ran: no section says it failed or was skipped, and each wrote its main table
        notes = re.findall(r"<p class='note'>(.*?)</p>", html)
        assert not [n for n in notes if n.startswith(("failed:", "skipped:"))], notes
        for ap in analysis_plans:
            assert (out / "tables" / f"{ap.analysis}-{ap.run}.parquet").exists()
        assert len(re.findall(r'class="plotly-graph-div"', html)) >= len(analysis_plans)
        assert "<script src=" not in html and "<link " not in html  # self-contained: plotly inlined, nothing fetched
        assert "Comparison: code prompts with the top-8 code experts banned" in html

        # the dashboard serves every run (the comparison's banned run too), `/` goes to the first
        names = [rp.name + "-quick" for rp in run_plans] + ["code-banned-quick"]
        assert list(live.apps) == names and not live.pending()
        status, where, _ = _get(url)
        assert status == 302 and where.endswith("/calibration-quick/")
        for name in names:
            status, _, body = _get(f"{url}{name}/")
            assert status == 200 and "_dash-config" in body, name
            assert live.apps[name].workbench.service is not None  # the Steering lab has the model
        # the pages hold the demo's results: the code run's closed loop and the comparison need no button
        code = live.apps["code-quick"].workbench.data
        assert code.analysis("behavior", variant="behavior:loop", start=False) is not None
        from workbench.app.compare import cached_result

        assert cached_result(code.run, live.apps["code-banned-quick"].workbench.run, "none") is not None
    finally:
        live.http.close()

    # a second demo reuses the completed captures: their manifests are not rewritten
    manifests = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/manifest.json")}
    assert len(manifests) == len(run_plans) + 1
    main(["demo", "--quick", "--out", str(out), "--no-serve"])
    assert {p: p.stat().st_mtime_ns for p in manifests} == manifests
    assert len(served) == 1


def test_demo_recaptures_a_run_whose_plan_changed(tmp_path, monkeypatch, capsys):
    """A newer workbench may change what the demo captures: its old run is redone, not an error."""
    import workbench.demo as demo
    from workbench.cli import main
    from workbench.store import open_run

    def small(tokens):
        return lambda quick: ([demo.RunPlan("calibration", "calibration", seq_len=128, max_tokens=tokens,
                                            interleave="domain")],
                              [demo.AnalysisPlan("stats", "calibration", title="Routing statistics")])

    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "plans", small(512))
    assert main(["demo", "--out", str(out), "--no-serve"]) == 0
    monkeypatch.setattr(demo, "plans", small(4096))
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--no-serve"]) == 0
    assert "capturing again" in capsys.readouterr().out
    run = open_run(out / "runs" / "calibration")
    assert run.manifest["status"] == "complete" and sum(p["tokens"] for p in run.manifest["parts"]) == 4096
    # every domain made it into the first 4096 tokens (documents are ~400 tokens)
    assert run.tokens.select("domain").unique().collect().height == 5


def test_the_app_extra_is_enough_for_the_demo_and_the_dashboard():
    """`pip install -e ".[app]"` (core dependencies only) runs the demo and the dashboard: their code imports
    nothing that only the [test] extra brings (Jupyter, nbconvert, selenium, datasets, ...)."""
    import subprocess
    import sys
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "app" in extras and "demo" in extras
    core = {re.split(r"[<>=\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"dash", "waitress", "plotly", "umap-learn"} <= core
    test_only = {re.split(r"[<>=\[ ]", d)[0].lower().replace("-", "_") for d in extras["test"]} - \
        {c.replace("-", "_") for c in core} - {"pytest", "hypothesis"}
    code = ("import sys, workbench.demo, workbench.app, workbench.app.live, workbench.plots, workbench.analysis.atlas;"
            "from workbench.app import analyses, compare, export, overview, placement, steering_lab, tokens;"
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    mods = {m.strip(" '[]\n") for m in loaded.split(",")}
    assert test_only and not (mods & test_only), mods & test_only
