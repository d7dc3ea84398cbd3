"""Persisted analyses: computed once, reused while the run and options are unchanged, invalidated by new parts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa

from workbench.analysis import analyze, persist
from workbench.store import RunWriter, open_run

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("synthetic_run", ROOT / "benchmarks" / "synthetic_run.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)


def test_reused_then_invalidated_by_a_new_part(tmp_path):
    run = synth.write_synthetic_run(tmp_path / "r", n_tokens=400, n_layers=2, n_experts=6, top_k=2, seq_len=40,
                                    part_tokens=200, vocab=20)
    a = analyze("stats", run, progress=False, top_n=3)
    assert not a.meta.get("reused")
    entries = list((run.path / "analyses" / "stats").iterdir())
    assert len(entries) == 1 and (entries[0] / "result.json").exists()
    b = analyze("stats", run, progress=False, top_n=3)
    assert b.meta["reused"] and b.summary == a.summary
    for t in a.tables:
        assert b.tables[t].equals(a.tables[t])
    # other options: a second entry, the first kept
    analyze("stats", run, progress=False, top_n=4)
    assert len(list((run.path / "analyses" / "stats").iterdir())) == 2
    # a damaged entry is not trusted: recomputed
    (entries[0] / "0.parquet").write_bytes(b"garbage")
    c = analyze("stats", run, progress=False, top_n=3)
    assert not c.meta.get("reused") or c.tables["experts"].equals(a.tables["experts"])
    # resume: one more part changes the run's fingerprint; old entries are dropped when the next is stored
    w = RunWriter(run.path, run.manifest, resume=True, overwrite=False)
    assert w.already_complete
    m = dict(run.manifest, status="running")
    w.manifest = m
    t = 40
    doc = np.full(t, 100, np.int64)
    pos = np.arange(t, dtype=np.int32)
    ex = np.tile(np.array([[0, 1]], np.int16), (t * 2, 1))
    wt = np.tile(np.array([[0.6, 0.4]], np.float32), (t * 2, 1))
    lst = lambda v, ty: pa.ListArray.from_arrays(pa.array(np.arange(0, v.size + 1, 2, dtype=np.int32)),  # noqa: E731
                                                 pa.array(v.reshape(-1), ty))
    tok = run.tokens.head(1).collect().to_arrow().slice(0, 0)
    tokens = pa.table({c: pa.array([None] * t, tok.schema.field(c).type) for c in tok.schema.names})
    tokens = tokens.set_column(0, "doc_id", pa.array(doc)).set_column(1, "pos", pa.array(pos))
    w.write_part({"tokens": tokens, "routing": pa.table({
        "doc_id": pa.array(np.repeat(doc, 2)), "pos": pa.array(np.repeat(pos, 2)),
        "layer": pa.array(np.tile(np.array([0, 1], np.int16), t)),
        "experts": lst(ex, pa.int16()), "weights": lst(wt, pa.float32())})}, batch_end=999, n_tokens=t)
    w.finish()
    run2 = open_run(run.path)
    assert persist.load("stats", run2, {"top_n": 3}) is None
    d = analyze("stats", run2, progress=False, top_n=3)
    assert not d.meta.get("reused") and d.meta["tokens"] == 440
    assert len(list((run.path / "analyses" / "stats").iterdir())) == 1  # stale entries gone


def test_unkeyable_options_are_computed_not_stored(tmp_path):
    run = synth.write_synthetic_run(tmp_path / "r", n_tokens=100, n_layers=1, n_experts=4, top_k=1, seq_len=50)
    assert persist.cache_key("stats", run, {"model": object()}) is None
    assert persist.cache_key("stats", run, {"m": (4, 16)}) == persist.cache_key("stats", run, {"m": [4, 16]})
    assert persist.cache_key("stats", run, {"progress": False}) == persist.cache_key("stats", run, {})


def test_cli_reuses_and_recomputes(tmp_path, capsys):
    from workbench.cli import main

    run = synth.write_synthetic_run(tmp_path / "r", n_tokens=200, n_layers=2, n_experts=4, top_k=2, seq_len=50)
    assert main(["analyze", "stats", str(run.path)]) == 0
    assert "reused" not in capsys.readouterr().out
    assert main(["analyze", "stats", str(run.path)]) == 0
    assert "reused the stored result" in capsys.readouterr().out
    assert main(["analyze", "stats", str(run.path), "--recompute", "--chunk-tokens", "17"]) == 0
    from workbench.analysis import common

    assert common._chunk_tokens is None  # the option applied to that command only
    assert "reused" not in capsys.readouterr().out


def test_progress_reported_per_chunk_and_shown_while_computing(tmp_path, monkeypatch):
    """A first computation reports how much of the run it has read; the dashboard page shows it."""
    import threading

    from test_app import _text
    from workbench.analysis import common, stats
    from workbench.app import make_app
    from workbench.app.analyses import SECTIONS, _body

    run = synth.write_synthetic_run(tmp_path / "r", n_tokens=1000, n_layers=2, n_experts=6, top_k=2, seq_len=50,
                                    part_tokens=500, vocab=20)
    seen = []
    with common.report_progress(lambda desc, done, total, chunks: seen.append((desc, done, total, chunks))):
        stats.analyze(run, progress=False, chunk_tokens=100)
    assert seen[0] == ("stats", 0, 1000, 0) and seen[-1] == ("stats", 1000, 1000, 10)
    assert [s[1] for s in seen] == [100 * i for i in range(11)]

    # the page while the computation is held after its third chunk of 10
    hold, reached = threading.Event(), threading.Event()
    real = stats._iter

    def slow(run_, need, chunk, progress, **kw):
        for i, ch in enumerate(real(run_, need, 100, progress, **kw)):
            if i == 3:
                reached.set()
                hold.wait(30)
            yield ch

    monkeypatch.setattr(stats, "_iter", slow)
    ctx = make_app(run, warm=()).workbench
    sec = next(s for s in SECTIONS.values() if s.analysis == "stats" and not s.loop)
    body, done = _body(ctx, sec)
    assert reached.wait(30)
    body, done = _body(ctx, sec)
    assert not done and "stats: 40% read (4 chunks)" in _text(body)
    hold.set()
    ctx.data.analysis("stats", wait=30)
    body, done = _body(ctx, sec)
    assert done and "% read" not in _text(body)


def test_overwrite_with_another_model_never_serves_the_old_results(tiny_dir, sample_texts, tmp_path):
    """Same data, same sizes, same part names and token counts, other weights: the stored results of the
    first capture belong to it alone (they used to match the second run's fingerprint)."""
    import workbench as wb
    from workbench.models.loading import load_model

    out = tmp_path / "run"
    first = wb.capture(load_model(str(tiny_dir("mixtral", seed=0))), sample_texts, out, progress=False)
    a = analyze("stats", first, progress=False)
    second = wb.capture(load_model(str(tiny_dir("mixtral", seed=1))), sample_texts, out, overwrite=True,
                        progress=False)
    assert [p["tokens"] for p in second.manifest["parts"]] == [p["tokens"] for p in first.manifest["parts"]]
    assert not (out / "analyses").exists()  # the old run's results left with it
    b = analyze("stats", second, progress=False)
    assert not b.meta.get("reused")
    fresh = analyze("stats", open_run(out), reuse=False, progress=False)
    assert b.tables["experts"].equals(fresh.tables["experts"])
    assert not b.tables["experts"].equals(a.tables["experts"])  # other weights, other routing
    assert persist.run_fingerprint(first) != persist.run_fingerprint(second)
