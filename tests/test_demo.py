"""`workbench demo --quick`: the main job end to end on the bundled model, offline."""

from __future__ import annotations

import re

import pytest

from workbench.demo import plans


@pytest.mark.slow
def test_quick_demo_writes_a_full_report_serves_every_run_and_reuses_captures(tmp_path, monkeypatch):
    import workbench.app as wa
    from workbench.cli import main

    served = []
    monkeypatch.setattr(wa, "serve", lambda runs, model=None, port=8050, **kw: served.append((runs, model, port)))
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out), "--port", "8123"])

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
    # the dashboard gets every run and the model
    (runs, model, port), = served
    # (plus the comparison's run: the code prompts with the top code experts banned)
    assert sorted(p.split("/")[-1] for p in runs) == sorted([rp.name + "-quick" for rp in run_plans]
                                                            + ["code-banned-quick"])
    assert "Comparison: code prompts with the top-8 code experts banned" in html
    assert model == "demo" and port == 8123

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
