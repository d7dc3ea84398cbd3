"""Issue 22 items 4, 5 and 8: sizes a run declares are checked against what it holds before any data is decoded;
a FIFO is refused, not waited on; `--recompute` replaces a stored result and the CLI and the API share one;
stale export leftovers are cleaned; a run being read cannot be replaced under the reader (and vice versa);
NaN/inf routing weights are reported in a sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import workbench as wb
from workbench.analysis import AnalysisResult, persist
from workbench.app.synthetic import write_synthetic_run
from workbench.store import RunLocked, file_checksum, lock_replace, reading

from reliability._faults import cli as _cli, cli_sentence as _sentence, wb as wb_proc  # tests/ is on sys.path


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return write_synthetic_run(tmp_path_factory.mktemp("store") / "pristine", n_tokens=1200, n_layers=2, n_experts=4,
                               part_tokens=400, probes=("routing",))


@pytest.fixture
def run(syn, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(syn.path, out, ignore=shutil.ignore_patterns(".workbench*", "analyses"))
    return out


def _reseal(run: Path, part: int, table: str, new: pa.Table | None = None) -> Path:
    """Replace a part file (or keep it) and record its size and checksum in the manifest, as a forger would."""
    m = json.loads((run / "manifest.json").read_text())
    f = run / m["parts"][part]["files"][table]
    if new is not None:
        pq.write_table(new, f, compression="zstd")
    m["parts"][part]["bytes"][table] = f.stat().st_size
    m["parts"][part]["checksums"][table] = file_checksum(f)
    (run / "manifest.json").write_text(json.dumps(m))
    return f


# ---------------------------------------------------------------------------------- item 4: declared sizes

def test_a_row_bomb_is_named_by_check_before_any_data_is_decoded(run):
    """A small routing part that decompresses to millions of rows (checksum resealed) passed `check`."""
    m = json.loads((run / "manifest.json").read_text())
    want = m["parts"][0]["tokens"] * len(m["model"]["moe_layers"])  # tokens x MoE layers
    n = 2_000_000
    bomb = pa.table({"doc_id": pa.array(np.zeros(n, np.int64)), "pos": pa.array(np.zeros(n, np.int32)),
                     "layer": pa.array(np.zeros(n, np.int16)),
                     "experts": pa.array([[0, 1]] * 1, pa.list_(pa.int16())).take(pa.array(np.zeros(n, np.int64))),
                     "weights": pa.array([[0.5, 0.5]], pa.list_(pa.float32())).take(pa.array(np.zeros(n, np.int64)))})
    f = _reseal(run, 0, "routing", bomb)
    assert f.stat().st_size < 2_000_000  # small on disk
    rc, out, err = _cli("check", run)
    assert rc == 2 and f"holds {n} rows where the manifest's" in out and f"exactly {want}" in out, out + err
    t0 = time.perf_counter()
    _sentence(*_cli("analyze", "stats", run)[::2], f"holds {n} rows")
    assert time.perf_counter() - t0 < 20


def test_a_list_value_bomb_is_named(run):
    """Right row count, but every routing row holding 5000 experts."""
    part = pq.read_table(run / "routing" / "part-000000.parquet")
    big = part.set_column(3, "experts", pa.array([list(range(5000))] * part.num_rows, pa.list_(pa.int16())))
    _reseal(run, 0, "routing", big)
    rc, out, _ = _cli("check", run)
    assert rc == 2 and "declares" in out and "values in its list column experts" in out, out


@pytest.mark.parametrize("how", ["renamed", "retyped"])
def test_a_schema_mismatch_is_named_by_check(run, how):
    """Right checksum, other columns: named by `check`, not a traceback later."""
    part = pq.read_table(run / "routing" / "part-000000.parquet")
    if how == "renamed":
        new = part.rename_columns(["doc_id", "pos", "layer", "expert_ids", "weights"])
        needle = "lacks the column 'experts'"
    else:
        new = part.set_column(2, "layer", pa.array([str(x) for x in part.column("layer").to_pylist()]))
        needle = "has column 'layer' of type string instead of int16"
    _reseal(run, 0, "routing", new)
    rc, out, err = _cli("check", run)
    assert rc == 2 and needle in out, out + err
    _sentence(*_cli("analyze", "stats", run)[::2], needle)


@pytest.mark.parametrize("what", ["part", "manifest"])
def test_a_fifo_is_refused_not_waited_on(run, what):
    """A named pipe where a part (listed without size, as in runs from before checksums) or the manifest is
    expected blocked every reader forever."""
    m = json.loads((run / "manifest.json").read_text())
    if what == "part":
        f = run / m["parts"][1]["files"]["routing"]
        for key in ("bytes", "checksums"):
            m["parts"][1].pop(key)
        (run / "manifest.json").write_text(json.dumps(m))
        needle = "is not a regular file"
    else:
        f = run / "manifest.json"
        needle = "manifest.json is not a regular file"
    f.unlink()
    os.mkfifo(f)
    for argv in (("check", run), ("analyze", "stats", run)):
        try:
            r = wb_proc(*argv, timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{argv[0]} waited on a FIFO")
        assert r.returncode == 2 and needle in r.stdout + r.stderr, (argv, r.stdout, r.stderr[-800:])


# ---------------------------------------------------------------------------------- item 5: one stored result

def test_recompute_replaces_the_stored_result(run):
    r = wb.open_run(run)
    first = AnalysisResult("stats", {"t": pl.DataFrame({"v": [1]})}, "t")
    second = AnalysisResult("stats", {"t": pl.DataFrame({"v": [2]})}, "t")
    persist.cached("stats", r, lambda **o: first, {"top_n": 3})
    got = persist.cached("stats", r, lambda **o: second, {"top_n": 3}, reuse=False)  # --recompute
    assert got.table["v"].to_list() == [2]
    again = persist.cached("stats", r, lambda **o: pytest.fail("must be reused"), {"top_n": 3})
    assert again.meta.get("reused") and again.table["v"].to_list() == [2]
    assert len([d for d in (run / "analyses" / "stats").iterdir() if not d.name.startswith(".")]) == 1


def test_cli_and_notebook_share_one_stored_result(run):
    rc, _, err = _cli("analyze", "stats", run)
    assert rc == 0, err[-800:]
    res = wb.analysis.analyze("stats", wb.open_run(run))  # the notebook spelling: no options
    assert res.meta.get("reused"), "the notebook recomputed what the CLI stored"
    rc, out, _ = _cli("analyze", "stats", run, "--recompute")
    assert rc == 0 and "reused" not in out
    entries = [d for d in (run / "analyses" / "stats").iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1, entries


# ---------------------------------------------------------------------------------- item 8: left behind, races

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_export_cleans_partial_folders_of_dead_exports_only(run, tmp_path):
    out = tmp_path / "exp"
    dead, live = _dead_pid(), os.getppid()
    for name in (f".exp.partial-{dead}", f".exp.old-{dead}", f".exp.partial-{live}", f".other.partial-{dead}"):
        (tmp_path / name / "analysis").mkdir(parents=True)
        (tmp_path / name / "routing.parquet").write_bytes(b"half")
    (tmp_path / f".exp.old-{dead}" / "schema.json").write_text(json.dumps({"files": [{"path": "routing.parquet"}]}))
    rc, _, err = _cli("export", run, "--out", out, "--what", "tokens")
    assert rc == 0, err[-800:]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == sorted([f".exp.partial-{live}", f".other.partial-{dead}"]), left  # a live one, another OUT's


def test_export_refuses_to_replace_a_folder_holding_files_it_did_not_write(run, tmp_path):
    out = tmp_path / "exp"
    assert _cli("export", run, "--out", out, "--what", "tokens")[0] == 0
    (out / "my_notes.md").write_text("mine")
    _sentence(*_cli("export", run, "--out", out, "--what", "tokens")[::2], "my_notes.md")
    assert (out / "my_notes.md").read_text() == "mine"
    os.symlink(out, tmp_path / "alias")
    _sentence(*_cli("export", run, "--out", tmp_path / "alias", "--what", "tokens")[::2], "symbolic link")


def test_a_run_being_read_is_not_replaced_and_a_run_being_replaced_is_not_read(run):
    """The store's readers lock: `capture --overwrite` / `check --repair` take it exclusive before deleting
    parts, analyses and exports take it shared, so neither sees the other's half-done state."""
    r = wb.open_run(run)
    with reading(r):
        with pytest.raises(RunLocked, match="being read by another process"):
            lock_replace(run)
        # check --repair on a damaged run would delete parts under us: refused
        part = run / "routing" / "part-000002.parquet"
        good = part.read_bytes()
        part.write_bytes(good[:-5])
        _sentence(*_cli("check", run, "--repair")[::2], "being read by another process")
        assert len(json.loads((run / "manifest.json").read_text())["parts"]) == len(r.manifest["parts"])  # none dropped
        part.write_bytes(good)
    held = lock_replace(run)
    try:
        _sentence(*_cli("analyze", "stats", run)[::2], "being replaced by another process")
        _sentence(*_cli("export", run, "--out", run.parent / "e")[::2], "being replaced by another process")
    finally:
        held.close()
    # a run replaced after a reader opened it: the reader is told, it does not mix old and new parts
    m = json.loads((run / "manifest.json").read_text())
    m["created"] = "2099-01-01T00:00:00"
    (run / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunLocked, match="replaced or repaired after it was opened"):
        wb.analysis.analyze("stats", r)


def test_nonfinite_routing_weights_are_reported(run):
    f = run / "routing" / "part-000001.parquet"
    t = pq.read_table(f)
    w = t.column("weights").to_pylist()
    w[3] = [float("nan"), 0.5]
    w[7] = [float("inf"), 0.5]
    _reseal(run, 1, "routing", t.set_column(4, "weights", pa.array(w, pa.list_(pa.float32()))))
    rc, _, err = _cli("analyze", "stats", run)
    assert rc == 0, err[-800:]
    notes = [ln for ln in err.splitlines() if "NaN or infinite routing weight" in ln]
    assert len(notes) == 1 and "holds 2 NaN" in notes[0], err[-800:]


def test_a_rust_panic_is_one_sentence(run, monkeypatch):
    """polars raises pyo3's PanicException (a BaseException, so no `except Exception` saw it): a traceback."""
    import workbench.cli as cli

    class PanicException(BaseException):  # the name pyo3 gives it; its module is pyo3_runtime
        pass

    def panics(args):
        raise PanicException("called `Option::unwrap()` on a `None` value\nmore lines")

    monkeypatch.setitem(cli.COMMANDS, "check", panics)
    _sentence(*_cli("check", run)[::2], "Rust panic: called `Option::unwrap()`")
