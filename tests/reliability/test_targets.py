"""Targets a user names that cannot be written (a read-only file system) and devices the machine lacks:
one sentence, exit code 2, nothing created."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from workbench.cli import main

from ._faults import snapshot


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("workbench:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system (root can write anywhere else, so a mode bit would not do)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root and mount for a read-only file system")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if r.returncode:
        pytest.skip("mount not permitted here")
    yield ro
    subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_read_only_targets(tiny_dir, tmp_path, read_only, capsys):
    model = str(tiny_dir("mixtral"))
    (tmp_path / "d.txt").write_text("one two\nthree\n")
    run = tmp_path / "run"
    assert main(["capture", model, "--data", str(tmp_path / "d.txt"), "--out", str(run), "--no-progress"]) == 0
    before = snapshot(tmp_path, skip=run)  # (analyses may cache their results inside the run)
    capsys.readouterr()
    cases = [
        ["capture", model, "--data", str(tmp_path / "d.txt"), "--out", str(read_only / "run"), "--no-progress"],
        ["analyze", "stats", str(run), "--out", str(read_only / "x.parquet")],
        ["analyze", "stats", str(run), "--figures", str(read_only / "figs")],
        ["export", str(run), "--out", str(read_only / "exp")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        line = _err(capsys)
        assert "Read-only file system" in line and "cannot write" in line, line
    assert snapshot(tmp_path, skip=run) == before and not any(read_only.iterdir())


@pytest.mark.parametrize("device", ["cuda:9", "nonsense"])
def test_absent_device_is_one_sentence(tiny_dir, tmp_path, capsys, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 9:
        pytest.skip("this machine has a cuda:9")
    (tmp_path / "d.txt").write_text("x\n")
    out = tmp_path / "out"
    assert main(["capture", str(tiny_dir("mixtral")), "--data", str(tmp_path / "d.txt"), "--out", str(out),
                 "--device", device, "--no-progress"]) == 2
    line = _err(capsys)
    assert f"--device {device}" in line or f"--device {device!r}" in line, line
    assert not out.exists()


def test_ctrl_c_during_start_up(tiny_dir, tmp_path):
    """SIGINT while torch/transformers import and the model loads: exit code 130, one line, nothing written."""
    import signal
    import time

    from ._faults import ENV, WB

    (tmp_path / "d.txt").write_text("some text\n")
    out = tmp_path / "out"
    # Swept across the import window: a SIGINT inside torch's C++ start-up used to abort (-6), one inside a
    # dataclass's generated code made CPython re-kill itself with SIGINT (-2) after we returned 130.
    for delay in [0.3 + 0.2 * i for i in range(12)]:
        p = subprocess.Popen(WB + ["capture", str(tiny_dir("mixtral")), "--data", str(tmp_path / "d.txt"), "--out",
                                   str(out), "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, env=ENV)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        rc, err = p.wait(timeout=120), p.stderr.read()
        if rc == 0:
            continue  # finished first on a fast machine
        assert rc == 130 and "Traceback" not in err, (delay, rc, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("workbench: interrupted"), err
        if (out / "manifest.json").exists():  # interrupted after the run began: consistent, nothing unlisted
            import workbench as wb

            from ._faults import unlisted

            wb.open_run(out)
            assert not unlisted(out)
