"""--device-map / --max-memory: a model split by accelerate (here: CPU + disk offload forced by a tiny
max_memory) captures exactly the rows of the same model on one device, probes and interventions included."""

from __future__ import annotations

import polars as pl
import pytest

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.models.loading import load_model, parse_max_memory

pytest.importorskip("accelerate")

KEYS = {"routing": ["doc_id", "pos", "layer"], "expert_stats": ["doc_id", "pos", "layer", "slot"],
        "hidden": ["doc_id", "pos", "layer"], "tokens": ["doc_id", "pos"]}


def _frames(run):
    return {t: run.table(t).collect().sort(k) for t, k in KEYS.items() if run.has(t)}


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])  # shared experts + gate; group routing
def test_disk_offload_rows_equal_single_device(tiny_dir, tmp_path, sample_texts, family):
    path = str(tiny_dir(family))
    ref_mm = load_model(path)
    split = load_model(path, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=str(tmp_path / "off"))
    # the weights really are offloaded: parameters of the decoder layers live on `meta` between calls
    assert "disk" in set(split.model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in split.layers[-1].experts.parameters())
    assert split.device.type == "cpu"
    ban = {"ban": f"L{split.moe_layers[-1]}:E1"}
    for probes, inter in ((["routing", "experts", "hidden"], None), (["routing", "experts"], ban)):
        kw = dict(probes=probes, logits=True, batch_size=2, progress=False, interventions=inter,
                  dump_experts=f"L{split.moe_layers[0]}:E0")
        a = wb.capture(ref_mm, sample_texts, tmp_path / f"ref{bool(inter)}", **kw)
        b = wb.capture(split, sample_texts, tmp_path / f"split{bool(inter)}", **kw)
        fa, fb = _frames(a), _frames(b)
        assert fa.keys() == fb.keys() and "expert_stats" in fa
        for t in fa:
            assert fa[t].equals(fb[t]), t
        da = a.table("dump_experts").collect().sort(["doc_id", "pos"])
        db = b.table("dump_experts").collect().sort(["doc_id", "pos"])
        assert da.height > 0 and da.equals(db)
    # the ban took effect in both: the banned expert never appears in the banned layer
    r = b.routing.filter(pl.col("layer") == split.moe_layers[-1]).explode("experts").collect()
    assert 1 not in r["experts"].to_list()


def test_max_memory_parsing():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    for bad in ("gpu0=1GiB", "0=", "cpu=lots", ""):
        with pytest.raises(WorkbenchError):
            parse_max_memory(bad)
    with pytest.raises(WorkbenchError, match="device-map"):
        load_model("demo", device_map="everywhere")


def test_cli_device_map_and_layerwise(tiny_dir, tmp_path, capsys):
    """The command line: --device-map/--max-memory and --layerwise give the one-device rows; a bad
    --max-memory is one sentence and exit code 2, before any run folder exists."""
    from workbench.cli import main

    model = str(tiny_dir("olmoe"))
    data = tmp_path / "d.txt"
    data.write_text("alpha beta gamma delta\nthe quick brown fox\nzeta eta theta iota kappa\n")
    base = ["capture", model, "--data", str(data), "--probes", "routing,experts", "--no-progress", "--device", "cpu"]
    assert main(base + ["--out", str(tmp_path / "ref")]) == 0
    assert main(base + ["--out", str(tmp_path / "split"), "--device-map", "auto", "--max-memory", "cpu=60KB",
                        "--offload-folder", str(tmp_path / "off")]) == 0
    assert main(base + ["--out", str(tmp_path / "lw"), "--layerwise", "--offload-folder", str(tmp_path / "off2")]) == 0
    ref = _frames(wb.open_run(tmp_path / "ref"))
    for name in ("split", "lw"):
        got = _frames(wb.open_run(tmp_path / name))
        assert all(ref[t].equals(got[t]) for t in ref), name
    assert main(base + ["--out", str(tmp_path / "bad"), "--device-map", "auto", "--max-memory", "cpu=lots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("workbench: error: --max-memory") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "bad").exists()
