"""A scripted crash campaign: captures are SIGKILLed (or Ctrl-C'd) at random points, during start-up,
between parts, and while resuming; `--resume` must then give exactly the run an uninterrupted capture
gives. 3 trials by default; WORKBENCH_RELIABILITY_TRIALS=20 for the full campaign
(WORKBENCH_RELIABILITY_SEED picks another random schedule)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest

import workbench as wb
from workbench.cli import main
from workbench.store import read_manifest

from ._faults import ENV, WB, corpus, snapshot, tables_equal, unlisted

TRIALS = int(os.environ.get("WORKBENCH_RELIABILITY_TRIALS", "3"))
SEED = int(os.environ.get("WORKBENCH_RELIABILITY_SEED", "12"))


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    data = corpus(root / "data.jsonl", n=200)
    args = ["capture", str(tiny_dir("olmoe")), "--data", str(data), "--batch-size", "2", "--part-tokens", "100",
            "--logits", "--no-progress"]
    ref = root / "ref"
    assert main(args + ["--out", str(ref)]) == 0
    return root, args, wb.open_run(ref)


def _parts(run) -> int:
    try:
        return len(read_manifest(run)["parts"])
    except Exception:
        return -1  # no manifest yet (start-up)


def _interrupt(args, run, rng: random.Random, resume: bool) -> str:
    """Start a capture and hit it at a random point; returns what was done, for the failure message."""
    sig = signal.SIGINT if rng.random() < 0.25 else signal.SIGKILL
    startup = rng.random() < 0.25
    target = rng.randint(0, 6)
    proc = subprocess.Popen(WB + args + ["--out", str(run)] + (["--resume"] if resume else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    if startup:
        time.sleep(rng.uniform(1.0, 4.0))  # importing torch, loading the model, reading the data
        what = "start-up"
    else:
        start = max(_parts(run), 0)
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _parts(run) < start + target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # land between parts, inside a write, or in the manifest update
        what = f"after {target} new parts"
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    label = f"{sig.name} at {what} ({'resume' if resume else 'first run'}, rc {rc})"
    if rc == 0:
        return label + ", finished first"
    if sig == signal.SIGINT:  # Ctrl-C: exit code 130, one line, no traceback
        assert rc == 130 and "Traceback" not in err, (label, err[-3000:])
        assert err.strip().splitlines()[-1].startswith("workbench: interrupted"), (label, err[-3000:])
    else:
        assert rc == -signal.SIGKILL, (label, err[-3000:])
    return label


@pytest.mark.parametrize("trial", range(TRIALS))
def test_interrupt_then_resume_equals_uninterrupted(setup, tmp_path, trial):
    root, args, ref = setup
    rng = random.Random(SEED * 1000 + trial)
    run = tmp_path / "run"
    outside = snapshot(root, skip=root / "ref")
    log = [_interrupt(args, run, rng, resume=False)]
    if rng.random() < 0.4:  # a second crash, this time of the resume
        log.append(_interrupt(args, run, rng, resume=True))
    if (run / "manifest.json").exists():
        half = wb.open_run(run)  # whatever the crash point: readable, every listed part verifies
        for t in ("tokens", "routing"):
            half.files(t)
    assert main(args + ["--out", str(run), "--resume"]) == 0, log
    done = wb.open_run(run)
    assert done.complete and not unlisted(run), log
    tables_equal(done, ref)
    assert snapshot(root, skip=root / "ref") == outside, log  # nothing outside the run folder changed
