"""[compress] dashboard page: the plan, its predicted cost (checked by hand against the run's routing), the
measured cost on the live model (checked against the written checkpoint), and the page without a model."""

from __future__ import annotations

import json
import math

import plotly
import pytest

from workbench.errors import WorkbenchError

TEXTS = ["The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
         "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
         "2 + 2 = 4, and 3 * 7 = 21; 12 / 4 = 3 and 9 - 5 = 4."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from workbench.capture import capture
    from workbench.models.loading import load_model
    from workbench.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("prn")
    path = make_tiny("qwen3_moe", root / "model", layers=2, experts=8, top_k=2, hidden=32)
    mm = load_model(str(path))
    run = capture(mm, TEXTS, root / "run", probes=["routing", "experts"], progress=False)
    return path, mm, run


def _text(component) -> str:
    return json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder)


def test_plan_and_predicted_cost_by_hand(tiny):
    from workbench.app.pruning import plan_for, render

    path, mm, run = tiny
    p = plan_for(run, "frequency", 0.25)
    assert p["n_removed"] == 2 and p["ban"].count("L") == 4
    rows = run.routing.select("layer", "experts", "weights").collect()
    for layer in (0, 1):
        gone = set(p["removed"][layer])
        shares = [sum(w for e, w in zip(es, ws) if e in gone) / sum(ws)
                  for lay, es, ws in rows.iter_rows() if lay == layer]
        got = p["predicted"].filter(p["predicted"]["layer"] == layer)["removed_mass"][0]
        assert got == pytest.approx(sum(shares) / len(shares), rel=1e-6)
    text = _text(render(run, p, False, None))
    assert "workbench prune" in text and "--by frequency" in text and p["ban"] in text


def test_page_without_a_model_offers_the_command(tiny):
    from workbench.app import make_app
    from workbench.app.pruning import PAGE, plan_for
    from workbench.app.state import Unavailable

    path, mm, run = tiny
    ctx = make_app(run, warm=()).workbench
    text = _text(PAGE.layout(ctx))
    assert "prn-by" in text and "prn-measure" not in text
    u = plan_for(run, "attribution", 0.25)
    assert isinstance(u, Unavailable) and "--model" in u.hint
    u = plan_for(run, "frequency", 0.9)
    assert isinstance(u, Unavailable) and "fewer than the 2" in u.message


def test_measured_cost_equals_the_written_checkpoint(tiny, tmp_path):
    """The page measures the plan as a ban on the live model; for a renormalising router (qwen3,
    norm_topk_prob) that is the pruned checkpoint's perplexity on the same tokens."""
    from workbench.analysis.common import doc_token_ids
    from workbench.app import make_app
    from workbench.app.pruning import PAGE, measure, plan_for
    from workbench.compress.evaluate import evaluate
    from workbench.compress.prune import prune

    path, mm, run = tiny
    ctx = make_app(run, model=mm, warm=()).workbench
    assert "prn-measure" in _text(PAGE.layout(ctx))
    p = plan_for(run, "reap", 0.25, mm=mm)
    m = measure(mm, run, p["ban"])
    prune(str(path), run, 0.25, "reap", tmp_path / "ck", progress=False)
    seqs = [ids for ids in doc_token_ids(run).values()]
    ev = evaluate([str(path), str(tmp_path / "ck")], seqs, max_tokens=None, seq_len=None, batch_size=1,
                  progress=False).tables["models"]
    assert m["tokens"] == sum(len(s) for s in seqs)
    assert m["ppl"] == pytest.approx(ev["ppl"][0], rel=1e-5)
    assert m["ppl_pruned"] == pytest.approx(ev["ppl"][1], rel=1e-5)
    assert m["ratio"] == pytest.approx(ev["ppl"][1] / ev["ppl"][0], rel=1e-5) and not math.isclose(m["ratio"], 1)
    with pytest.raises(WorkbenchError):
        measure(mm, run, "L0:E99")


def _post(app, key, values):
    spec = app.callback_map[key]
    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in key.strip(".").split("...")]
    body = {"output": key, "outputs": outs if len(outs) > 1 else outs[0],
            "changedPropIds": [f"{spec['inputs'][0]['id']}.{spec['inputs'][0]['property']}"],
            "inputs": [{"id": i["id"], "property": i["property"], "value": values.get(i["id"])} for i in spec["inputs"]],
            "state": [{"id": i["id"], "property": i["property"], "value": values.get(i["id"])}
                      for i in spec.get("state", [])]}
    r = app.server.test_client().post("/_dash-update-component", json=body)
    assert r.status_code == 200
    return r.get_data(as_text=True)


def test_page_callbacks_through_the_server(tiny):
    """The plan callback answers a browser's request, and a criterion or ratio the page does not offer is one
    sentence in the error bar (never a cached computation)."""
    from workbench.app import make_app
    from workbench.app import pruning

    path, mm, run = tiny
    app = make_app(run, warm=())
    key = next(k for k in app.callback_map if "prn-body.children" in k)
    text = _post(app, key, {"prn-by": "frequency", "prn-ratio": 0.25, "prn-protect": []})
    assert "Predicted cost" in text and "workbench prune" in text
    before = len(pruning._CACHE)
    for by, ratio in (("nonsense", 0.25), ("frequency", 0.3), ("frequency", "x" * 100)):
        text = _post(app, key, {"prn-by": by, "prn-ratio": ratio, "prn-protect": []})
        assert "unknown criterion" in text or "unsupported ratio" in text
    assert len(pruning._CACHE) == before
    dl = next(k for k in app.callback_map if "prn-download.data" in k)
    text = _post(app, dl, {"prn-dl-btn": 1, "prn-by": "reap", "prn-ratio": 0.5, "prn-protect": ["se"]})
    assert "pruning_plan_reap_0.5.json" in text and "ban" in text
