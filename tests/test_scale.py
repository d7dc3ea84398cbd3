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


refs = _load(Path(__file__).with_name("_dense_refs.py"), "_dense_refs")


def test_stats_pass_per_label_equals_the_dense_implementation(syn, monkeypatch):
    # too many label-value combinations for one pass: each label gets its own pass, same tables
    monkeypatch.setattr(stats, "_UNIT_CELLS", 0)
    new = stats.analyze(syn, progress=False, chunk_tokens=333)
    old = dense.analyze(syn, progress=False)
    for name in old.tables:
        _same(new.tables[name], old.tables[name])


def test_stats_duplicate_experts_and_missing_tokens(tmp_path):
    # an expert twice in a token's top-k (multiplicity in co-activation) and a routed token with no
    # tokens/ row (null token id and labels): the streamed tables still equal the dense ones
    from test_stats import write_run

    ex = np.array([[[0, 0], [1, 2]], [[1, 2], [2, 2]], [[0, 1], [0, 1]], [[2, 1], [0, 2]]])
    run = write_run(tmp_path / "r", ex, [0, 0, 1, 1], 3, token_ids=[4, 5, 4, 6], labels={"lang": ["en", "de", None, "en"]})
    new = stats.analyze(run, progress=False, chunk_tokens=3)
    old = dense.analyze(run, progress=False)
    for name in old.tables:
        _same(new.tables[name], old.tables[name])


@pytest.mark.parametrize("chunk", [7, 10**9])
def test_streamed_atlas_equals_the_dense_profiles_and_sample(syn, chunk):
    from workbench.analysis import atlas, common

    common.set_chunk_tokens(chunk)
    try:
        index, blocks = atlas.expert_profiles(syn, labels=["lang", "domain"], top_tokens=12)
        _, _, sub, tok = atlas._scan(syn, ["lang"], sample=atlas._sample_keys(syn, 300, 5, None), profiles=False)
    finally:
        common.set_chunk_tokens(None)
    r_index, r_blocks = refs.expert_profiles(syn, labels=["lang", "domain"], top_tokens=12)
    assert index.equals(r_index)
    assert blocks.keys() == r_blocks.keys()
    for k in blocks:
        assert blocks[k][0] == r_blocks[k][0]
        np.testing.assert_array_equal(blocks[k][1], r_blocks[k][1])
    r_sub, r_tok = refs.token_sample(syn, ["lang"], 300, 5)
    assert tok.select(r_tok.columns).equals(r_tok)
    np.testing.assert_array_equal(atlas.token_vectors(sub), atlas.token_vectors(r_sub))


def test_streamed_super_experts_equal_the_dense_query(syn):
    from workbench.analysis import super_experts as se

    for mode in ("true", "first_row"):
        got = se.expert_max(syn, mode, chunk_rows=97)
        ref = refs.expert_max(syn, mode)
        assert got.equals(ref), mode


def test_super_expert_ties_and_shared_rows(tmp_path):
    from test_super_experts import _row, write_run
    from workbench.analysis import super_experts as se

    # (layer 0, expert 1): equal maxima; the first in file order is doc 1, the earliest document doc 0.
    # A NaN row is ignored; the shared expert (-1) keeps its true max in first_row mode.
    rows = [_row(1, 0, 0, 1, 5.0, ch=1), _row(0, 0, 0, 1, 5.0, ch=2), _row(0, 1, 0, 1, 2.0, ch=3),
            _row(0, 2, 0, 1, float("nan"), ch=4), _row(0, 0, 0, -1, 1.0, ch=5), _row(0, 3, 0, -1, 3.0, ch=6),
            _row(1, 5, 1, 0, 7.0, ch=7), _row(1, 2, 1, 0, 8.0, ch=8)]
    run = write_run(tmp_path / "r", 2, [0, 1], 4, stats_rows=rows)
    for mode in ("true", "first_row"):
        for chunk in (1, 3, 100):
            got = se.expert_max(run, mode, chunk_rows=chunk)
            assert got.equals(refs.expert_max(run, mode)), (mode, chunk)
    t = se.expert_max(run, "true").filter((pl.col("layer") == 0) & (pl.col("expert") == 1)).row(0, named=True)
    f = se.expert_max(run, "first_row").filter((pl.col("layer") == 0) & (pl.col("expert") == 1)).row(0, named=True)
    assert (t["channel"], t["doc_id"], t["selections"]) == (1, 1, 3)
    assert (f["channel"], f["doc_id"]) == (2, 0)
    # layer 1 expert 0 in first_row mode: doc 1's first row is pos 2 (8.0), not the later 7.0
    assert se.expert_max(run, "first_row").filter(pl.col("layer") == 1)["max_abs"].to_list() == [8.0]


@pytest.mark.parametrize("columns,chunk", [(60, 7), (60, 333), (400, 97)])
@pytest.mark.parametrize("threads", [1, 2])
def test_stats_dense_table_flushes_and_threads_equal_the_dense_implementation(syn, monkeypatch, columns, chunk,
                                                                               threads):
    # top tokens counted in a dense (layer, expert, (unit, token)) table of `columns` columns: flushed into
    # the sorted keys when full (chunk 7), or skipped for a chunk with more pairs than that (333); the
    # GEMMs, weight sums and decoding in worker threads (threads=2): the same tables as the dense oracle
    monkeypatch.setattr(stats, "_DENSE_CELLS", columns * 4 * 8)
    new = stats.analyze(syn, progress=False, chunk_tokens=chunk, threads=threads)
    old = dense.analyze(syn, progress=False)
    for name in old.tables:
        _same(new.tables[name], old.tables[name])
    assert new.meta["top_tokens_exact"]


@pytest.mark.parametrize("threads", [1, 2])
def test_stats_repeated_experts_in_worker_threads(tmp_path, threads):
    # repeated experts are found by the co-activation GEMM's trace (layer 1 of token 1 here), then counted
    # with their multiplicity; transitions use the same corrected indicator
    from test_stats import write_run

    ex = np.array([[[0, 1], [1, 2]], [[1, 2], [2, 2]], [[0, 1], [0, 1]], [[2, 1], [0, 2]]])
    run = write_run(tmp_path / "r", ex, [0, 0, 1, 1], 3, token_ids=[4, 5, 4, 6], labels={"lang": ["en", "de", None, "en"]})
    for chunk in (1, 3, 10):
        new = stats.analyze(run, progress=False, chunk_tokens=chunk, threads=threads)
        old = dense.analyze(run, progress=False)
        for name in old.tables:
            _same(new.tables[name], old.tables[name])
        co = new.tables["coactivation"].filter(pl.col("label").is_null() & (pl.col("layer") == 1)
                                               & (pl.col("expert") == 2) & (pl.col("other") == 2))
        assert co["count"].to_list() == [2]  # 2 x 2 - 2 from token 1


def test_stats_packed_sorts_equal_the_argsort_fallback(monkeypatch):
    # ranking and key sums sort packed int64 values when they fit; the lexsort/argsort fallback agrees
    rng = np.random.default_rng(0)
    seg, tie = rng.integers(0, 50, 5000), rng.integers(0, 300, 5000)
    key = np.unique(seg * 300 + tie)
    seg, tie = key // 300, key % 300
    count = rng.integers(1, 6, len(key))
    keys, cts = rng.integers(0, 1000, 8000), rng.integers(1, 9, 8000)
    fast = stats._segment_rank(seg, count, tie, 300), stats._sorted_sum(keys, cts), stats._by_key(key[::-1], count)
    monkeypatch.setattr(stats, "_packs", lambda *m: False)
    slow = stats._segment_rank(seg, count, tie, 300), stats._sorted_sum(keys, cts), stats._by_key(key[::-1], count)
    for a, b in zip(fast, slow):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    s, c, t, rank = fast[0]
    assert (np.diff(s) >= 0).all() and rank.max() > 0
    same = (np.diff(s) == 0)
    assert ((np.diff(c) < 0) | ((np.diff(c) == 0) & (np.diff(t) > 0)))[same].all()


def test_prefetched_chunks_progress_errors_and_early_stop(syn):
    import threading

    from workbench.analysis import common

    seen = []
    with common.report_progress(lambda desc, done, total, chunks: seen.append((done, threading.current_thread().name))):
        got = [len(ch.ra.doc) for ch in common.prefetched(lambda: common.iter_routing(syn, chunk_tokens_=400))]
    assert got == [len(ch.ra.doc) for ch in common.iter_routing(syn, chunk_tokens_=400)]
    assert seen[-1][0] == 1500 and seen[-1][1] == "prefetch"  # the caller's callback, called from the worker

    def broken():
        yield 1
        raise ValueError("damaged part")

    with pytest.raises(ValueError, match="damaged part"):
        list(common.prefetched(broken))
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    g = common.prefetched(endless)
    assert next(g) == 0
    g.close()  # the worker stops instead of filling memory
    n = len(made)
    assert n <= 4 and not any(t.name == "prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("cells", [0, 1 << 23])
def test_stats_top_token_ranking_dense_and_sorted_paths(syn, monkeypatch, cells):
    # per-layer ranking from a dense (expert, value, token) table, or by sorting the keys when it would not
    # fit (cells=0); top_n=1 and 3 make ties at the cut common (vocabulary of 40)
    monkeypatch.setattr(stats, "_RANK_CELLS", cells)
    for top_n in (1, 3):
        new = stats.analyze(syn, progress=False, chunk_tokens=333, top_n=top_n, threads=1)
        old = dense.analyze(syn, progress=False, top_n=top_n)
        for name in old.tables:
            _same(new.tables[name], old.tables[name])


def test_stats_threads_do_not_key_the_stored_result(tmp_path):
    # the thread count changes how stats is computed, not its tables: a stored result is reused across it
    from workbench.analysis import analyze

    run = synth.write_synthetic_run(tmp_path / "r", n_tokens=300, n_layers=2, n_experts=4, top_k=2, seq_len=50,
                                    vocab=10, seed=1)
    first = analyze("stats", run, threads=1, progress=False)
    again = analyze("stats", run, threads=2, progress=False)
    assert not first.meta.get("reused") and again.meta.get("reused")
