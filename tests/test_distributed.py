"""Data-parallel capture under torchrun (gloo, 2 CPU processes): a rank killed mid-run leaves a valid
manifest, and --resume finishes with exactly the rows of one uninterrupted single-process capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import workbench as wb
from workbench.distributed import done_batches, merged_parts
from workbench.store import read_manifest

pytestmark = pytest.mark.slow

KEYS = {"routing": ["doc_id", "pos", "layer"], "expert_stats": ["doc_id", "pos", "layer", "slot"],
        "tokens": ["doc_id", "pos"]}

# Runs the real CLI under torchrun; rank 1 SIGKILLs itself right after listing its 2nd part.
KILLER = textwrap.dedent("""
    import json, os, signal, sys, time
    import workbench.distributed as d
    orig = d.RankWriter.commit_part
    def commit(self, *a, **k):
        orig(self, *a, **k)
        if self.rank == 1 and len(self.parts) == 2:
            # the kill must land after rank 0 committed a part too (the test checks both rank files); on a
            # loaded machine rank 0 can lag, so wait for its file, bounded, rather than flake
            other = self.file.with_name("rank-0.json")
            for _ in range(600):
                try:
                    if json.loads(other.read_text())["parts"]:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
    d.RankWriter.commit_part = commit
    from workbench.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _corpus(path, n=60):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j) % 12] for j in range(6 + i % 11)),
                                "group": f"g{i % 3}"}) + "\n")


def _torchrun(args, env_extra=None, script=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    target = [script] if script else ["-m", "workbench"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_kill_one_rank_then_resume_equals_single_process(tiny_dir, tmp_path):
    model = str(tiny_dir("qwen2_moe"))  # shared expert: expert -1 rows in expert_stats too
    data = tmp_path / "data.jsonl"
    _corpus(data)
    common = ["capture", model, "--data", str(data), "--batch-size", "3", "--part-tokens", "40",
              "--probes", "routing,experts", "--logits", "--ban", "L1:E2", "--no-progress"]
    ref = wb.capture(model, str(data), tmp_path / "ref", probes=["routing", "experts"], logits=True, batch_size=3,
                     part_tokens=40, interventions={"ban": "L1:E2"}, progress=False)

    out = tmp_path / "dp"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    r = _torchrun(common + ["--out", str(out)], script=str(killer))
    assert r.returncode != 0, r.stdout + r.stderr
    # the manifest is valid right after the kill and lists only whole parts, from both ranks
    m = read_manifest(out)
    assert m["status"] == "running" and m["distributed"]["world_size"] == 2
    partial = wb.open_run(out)
    listed = [f for p in m["parts"] for f in p["files"].values()]
    assert all((out / f).exists() for f in listed)
    rank_files = list((out / "ranks").glob("rank-*.json"))
    assert {json.loads(f.read_text())["rank"] for f in rank_files} == {0, 1}
    n_batches = -(-len(ref.tokens.collect()["doc_id"].unique()) // 3)
    assert 0 < len(done_batches(merged_parts(m["parts"], [])) | {b for f in rank_files
               for p in json.loads(f.read_text())["parts"] for b in p["batches"]}) < n_batches
    assert partial.routing.collect().height < ref.routing.collect().height

    r = _torchrun(common + ["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    run = wb.open_run(out)
    assert run.complete and not (out / "ranks").exists()
    assert sorted(b for p in run.manifest["parts"] for b in p["batches"]) == list(range(n_batches))
    assert {p["rank"] for p in run.manifest["parts"]} == {0, 1}
    for t, k in KEYS.items():
        a, b = ref.table(t).collect().sort(k), run.table(t).collect().sort(k)
        assert a.height > 0 and a.equals(b), t
    # the ban held on every rank
    assert 2 not in run.routing.filter(wb_layer(1)).explode("experts").collect()["experts"].to_list()


def test_accelerate_launch_two_processes(tiny_dir, tmp_path):
    """`accelerate launch --multi_gpu` sets the same environment torchrun does (gloo on a CPU machine)."""
    pytest.importorskip("accelerate")
    model = str(tiny_dir("olmoe"))
    data = tmp_path / "data.jsonl"
    _corpus(data, n=24)
    ref = wb.capture(model, str(data), tmp_path / "ref", batch_size=4, part_tokens=60, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "workbench", "capture",
           model, "--data", str(data), "--out", str(out), "--batch-size", "4", "--part-tokens", "60", "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    run = wb.open_run(out)
    assert run.complete and run.manifest["distributed"]["world_size"] == 2
    assert {p["rank"] for p in run.manifest["parts"]} == {0, 1}
    a, b = ref.routing.collect().sort(KEYS["routing"]), run.routing.collect().sort(KEYS["routing"])
    assert a.equals(b)


def wb_layer(i):
    import polars as pl

    return pl.col("layer") == i


def test_single_process_resume_of_a_launcher_run_and_mismatch(tiny_dir, tmp_path):
    """A run a launcher started can be finished without one (world size 1), and the split adapts."""
    from workbench import distributed

    model = str(tiny_dir("olmoe"))
    data = tmp_path / "data.jsonl"
    _corpus(data, n=30)
    ref = wb.capture(model, str(data), tmp_path / "ref", batch_size=2, part_tokens=30, progress=False)
    # fake a 2-rank attempt that died after rank 1 listed batches 1 and 3: only its rank file exists
    out = tmp_path / "dp"
    assert distributed.world() == (0, 1) and not distributed.wanted(out)
    half = wb.capture(model, str(data), tmp_path / "half", batch_size=2, part_tokens=1, progress=False)
    assert half.complete
    m = dict(read_manifest(half.path))
    # keep batches 1 and 3 only, as if written by rank 1 of 2, and declare the run distributed
    keep = [p for p in m["parts"] if p["batch_end"] in (2, 4)]
    assert len(keep) == 2
    (out / "ranks").mkdir(parents=True)
    for p in keep:
        for rel in p["files"].values():
            (out / rel).parent.mkdir(exist_ok=True)
            (out / rel).write_bytes((half.path / rel).read_bytes())
    rank_parts = [dict(p, batches=[p["batch_end"] - 1], rank=1) for p in keep]
    (out / "ranks" / "rank-1.json").write_text(json.dumps({"rank": 1, "parts": rank_parts}))
    m.update(parts=[], status="running", distributed={"world_size": 2})
    (out / "manifest.json").write_text(json.dumps(m))
    assert distributed.wanted(out)
    run = wb.capture(model, str(data), out, batch_size=2, part_tokens=30, resume=True, progress=False)
    assert run.complete and run.manifest["distributed"]["world_size"] == 1
    assert sorted(b for p in run.manifest["parts"] for b in p["batches"]) == list(range(half.manifest["parts"][-1]["batch_end"]))
    a, b = ref.routing.collect().sort(KEYS["routing"]), run.routing.collect().sort(KEYS["routing"])
    assert a.equals(b)
