"""Exports: raw tables round-trip, analysis tables, schema note, Hugging Face datasets can load them."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from test_stats import write_run
from workbench.cli import main
from workbench.export import export_run


@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(0)
    T, L, K, E = 60, 2, 2, 5
    ex = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)])
    doc = np.repeat(np.arange(4), 15)
    return write_run(tmp_path / "run", ex, doc, E, layers=[1, 2], weights=rng.random((T, L, K)),
                     labels={"lang": ["en", "de"] * 30})


def test_parquet_export_roundtrip_and_datasets(run, tmp_path):
    out = tmp_path / "exp"
    schema = export_run(run, out, "parquet", what="raw,stats,lrc,super-experts", progress=False)
    got = pl.read_parquet(out / "routing.parquet").sort("doc_id", "pos", "layer")
    want = run.routing.collect().sort("doc_id", "pos", "layer")
    assert got.equals(want)
    assert pl.read_parquet(out / "tokens.parquet")["lang"].to_list() == run.tokens.collect()["lang"].to_list()
    srp = pl.read_parquet(out / "analysis" / "lrc" / "srp.parquet")
    assert srp.filter(pl.col("level") == "model")["layer"].null_count() == srp.filter(pl.col("level") == "model").height
    assert (out / "analysis" / "stats" / "coactivation.parquet").exists()
    assert "super-experts" in schema["skipped"] and "expert_stats" in schema["skipped"]["super-experts"]
    meta = json.loads((out / "schema.json").read_text())
    files = {f["path"]: f for f in meta["files"]}
    assert files["routing.parquet"]["rows"] == want.height
    assert files["analysis/stats/experts.parquet"]["main"] is True
    assert any(c["name"] == "srp" and c["description"] for c in files["analysis/lrc/srp.parquet"]["columns"])
    note = (out / "SCHEMA.md").read_text()
    assert "## `routing.parquet`" in note and "| `experts` |" in note and "Not exported" in note

    datasets = pytest.importorskip("datasets")
    if not hasattr(datasets, "load_dataset"):  # only the repo's own data folder (a namespace) was found
        pytest.skip("Hugging Face datasets not installed")
    for rel in ("routing.parquet", "analysis/lrc/srp.parquet", "analysis/stats/experts.parquet"):
        ds = datasets.load_dataset("parquet", data_files=str(out / rel), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == files[rel]["rows"]
    ds = datasets.load_dataset("parquet", data_files=str(out / "routing.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    first = want.row(0, named=True)
    row = ds.sort(["doc_id", "pos", "layer"])[0]
    assert row["experts"] == first["experts"] and row["layer"] == first["layer"]


def test_csv_and_json(run, tmp_path):
    schema = export_run(run, tmp_path / "c", "csv", what="routing,stats", progress=False)
    csv = pl.read_csv(tmp_path / "c" / "routing.csv")
    first = run.routing.collect().row(0, named=True)
    assert csv["experts"][0] == ";".join(str(e) for e in first["experts"])
    assert {f["path"] for f in schema["files"]} >= {"routing.csv", "analysis/stats/experts.csv"}
    export_run(run, tmp_path / "j", "json", what="tokens,lrc", progress=False)
    lines = (tmp_path / "j" / "tokens.jsonl").read_text().splitlines()
    assert len(lines) == 60 and json.loads(lines[0])["lang"] == "en"
    assert pl.read_ndjson(tmp_path / "j" / "analysis" / "lrc" / "srp.jsonl").height > 0


def test_cli(run, tmp_path, capsys):
    assert main(["export", str(run.path), "--format", "parquet", "--out", str(tmp_path / "o"), "--what", "routing,stats"]) == 0
    assert "exported" in capsys.readouterr().out
    assert main(["export", str(run.path), "--out", str(tmp_path / "o2"), "--what", "nonsense"]) == 2
    assert main(["export", str(run.path), "--format", "xml", "--out", str(tmp_path / "o3")]) == 2  # usage error
