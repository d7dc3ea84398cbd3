"""Research-size machinery on small runs: the synthetic generator, chunked analyses equal to the dense
implementation, and the DuckDB query that reads routing/ without the package."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from workbench.analysis import stats
from workbench.store import SCHEMAS, open_run

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


synth = _load(ROOT / "benchmarks" / "synthetic_run.py", "synthetic_run")
dense = _load(Path(__file__).with_name("_dense_stats.py"), "_dense_stats")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    """3 parts, documents of 50 tokens, 4 layers x 8 experts top-2, expert_stats with planted super experts."""
    return synth.write_synthetic_run(tmp_path_factory.mktemp("syn") / "run", n_tokens=1500, n_layers=4, n_experts=8,
                                     top_k=2, seq_len=50, part_tokens=500, expert_stats=True,
                                     super_experts=((1, 5),), vocab=40, seed=3)


def test_generated_run_is_a_valid_run(syn):
    run = open_run(syn.path)
    assert run.complete and len(run.manifest["parts"]) == 3
    for t in ("tokens", "routing", "expert_stats"):
        got = run.table(t).collect_schema()
        for f in SCHEMAS[t]:
            assert f.name in got
    r = run.routing.collect()
    assert r.height == 1500 * 4
    ex = np.stack(r["experts"].to_list())
    assert ex.min() >= 0 and ex.max() < 8
    assert all(len(set(row)) == 2 for row in ex.tolist())  # distinct experts per token
    w = np.stack(r["weights"].to_list())
    assert np.allclose(w.sum(1), 1, atol=1e-5) and (np.diff(w, axis=1) <= 0).all()
    # persistence planted: consecutive tokens share their expert set far more often than chance
    same = (ex[4:] == ex[:-4]).all(1).mean()
    assert same > 0.4
    # the manifest is the store's: parts list their files
    assert json.loads((syn.path / "manifest.json").read_text())["parts"][0]["files"]["routing"]


def test_every_analysis_accepts_a_generated_run(syn):
    from workbench.analysis import lrc, multilingual, super_experts
    from workbench.analysis import atlas, behavior

    s = stats.analyze(syn, progress=False, chunk_tokens=300)
    assert {"lang", "domain"} <= set(s.meta["labels"])
    assert lrc.analyze(syn, m=[4, 16], n_boot=20, progress=False).tables["srp"].height
    ml = multilingual.analyze(syn, reference="en")
    assert ml.tables
    se = super_experts.analyze(syn)
    found = se.tables[se.main]
    assert {(1, 5)} <= {(int(a), int(b)) for a, b in found.select("layer", "expert").iter_rows()}
    b = behavior.analyze(syn, label="domain", target="code", permutations=50, progress=False)
    assert b.tables[b.main].height
    a = atlas.analyze(syn, labels=["lang"], max_tokens=200)
    assert a.tables["experts"].height and a.tables["tokens"].height == 200


def _same(a: pl.DataFrame, b: pl.DataFrame):
    assert a.columns == b.columns and a.height == b.height
    for c in a.columns:
        x, y = a[c], b[c]
        if x.dtype.is_float():
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-12, atol=0, equal_nan=True)
        else:
            assert x.to_list() == y.to_list(), c


@pytest.mark.parametrize("chunk", [7, 333, 10**9])
def test_chunked_stats_equal_the_dense_implementation(syn, chunk):
    new = stats.analyze(syn, progress=False, chunk_tokens=chunk)
    old = dense.analyze(syn, progress=False)
    assert set(new.tables) == set(old.tables)
    for name in old.tables:
        _same(new.tables[name], old.tables[name])
    assert new.meta["top_tokens_exact"]


def test_top_tokens_sketch_is_flagged(syn):
    new = stats.analyze(syn, progress=False, chunk_tokens=100, max_token_pairs=50, top_n=3)
    assert new.meta["top_tokens_exact"] is False
    # the all-token counts are untouched by the sketch
    _same(new.tables["experts"].drop("top_token_share"), dense.analyze(syn, progress=False).tables["experts"]
          .drop("top_token_share"))


def test_chunk_size_setting_and_streamed_profiles(syn, monkeypatch):
    from workbench.analysis import common, multilingual
    from workbench.errors import WorkbenchError

    monkeypatch.setenv("WORKBENCH_CHUNK_TOKENS", "13")
    assert common.chunk_tokens() == 13
    sizes = [len(ch.ra.doc) for ch in common.iter_routing(syn)]
    assert max(sizes) <= 13 and sum(sizes) == 1500
    p_small = multilingual.profiles(syn)
    monkeypatch.setenv("WORKBENCH_CHUNK_TOKENS", str(10**9))
    p_big = multilingual.profiles(syn)
    # independent truth: dense arrays of the whole run
    ra = common.routing_arrays(syn)
    doc, ntok, imp, frq = multilingual.routing_profiles(ra)
    for p in (p_small, p_big):
        assert p.doc_id.tolist() == doc.tolist()
        np.testing.assert_array_equal(p.frequency, frq)
        np.testing.assert_allclose(p.importance, imp, rtol=1e-12)
    common.set_chunk_tokens(None)
    with pytest.raises(WorkbenchError):
        common.set_chunk_tokens(0)


def test_duckdb_load_straight_from_routing(syn):
    duckdb = pytest.importorskip("duckdb")
    # the README's query, verbatim in spirit: unnest the experts list of every routing part
    q = f"""
        SELECT layer, expert, count(*) AS selections
        FROM (SELECT layer, unnest(experts) AS expert FROM read_parquet('{syn.path}/routing/*.parquet'))
        GROUP BY layer, expert ORDER BY layer, expert
    """
    got = pl.from_arrow(duckdb.sql(q).arrow()) if hasattr(duckdb.sql(q), "arrow") else pl.from_pandas(duckdb.sql(q).df())
    ref = stats.analyze(syn, progress=False).tables["experts"].filter(pl.col("label").is_null() & (pl.col("count") > 0))
    assert got["layer"].cast(pl.Int64).to_list() == ref["layer"].cast(pl.Int64).to_list()
    assert got["expert"].cast(pl.Int64).to_list() == ref["expert"].cast(pl.Int64).to_list()
    assert got["selections"].cast(pl.Int64).to_list() == ref["count"].to_list()
