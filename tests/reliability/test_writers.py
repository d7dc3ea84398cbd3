"""One writer per run folder (an OS lock, two real processes), `--overwrite` that never destroys a run
it cannot replace, and disk full mid-capture: one sentence, exit code 2, a consistent resumable run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest

import workbench as wb
from workbench.cli import main
from workbench.store import read_manifest

from ._faults import ENV, WB, corpus, one_sentence, snapshot, tables_equal, unlisted
from ._faults import wb as wb_cli


def _wait_parts(run, n, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(read_manifest(run)["parts"]) >= n:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"capture ended or stalled before {n} parts (rc {proc.poll()})")


def _stopped(proc, timeout=30):
    """Wait until every thread of `proc` is stopped: SIGSTOP is asynchronous, and an encoder thread inside a
    write() finishes it first, so a snapshot taken at once can miss the file it was writing."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            states = [open(f"/proc/{proc.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                      for t in os.listdir(f"/proc/{proc.pid}/task")]
        except OSError:  # a thread ended while we looked
            continue
        if states and all(st in "tT" for st in states):
            return
        time.sleep(0.01)
    raise AssertionError("the writer did not stop")


def test_second_writer_is_refused_while_the_first_holds_the_lock(tiny_dir, tmp_path):
    model = str(tiny_dir("olmoe"))
    data = corpus(tmp_path / "data.jsonl", n=120)
    args = ["capture", model, "--data", data, "--batch-size", "2", "--part-tokens", "100", "--no-progress"]
    run = tmp_path / "run"
    a = subprocess.Popen(WB + [str(x) for x in args] + ["--out", str(run)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_parts(run, 1, a)
        a.send_signal(signal.SIGSTOP)  # the first writer is alive and holds the lock, deterministically
        _stopped(a)
        before = snapshot(run)
        for extra in (["--resume"], ["--overwrite"]):
            one_sentence(wb_cli(*args, "--out", run, *extra), needle=f"is being written by another process (pid {a.pid})")
        one_sentence(wb_cli("check", run, "--repair"), needle=f"(pid {a.pid})")
        assert snapshot(run) == before  # the refused writers touched nothing
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0, a.stderr.read()
    ref = tmp_path / "ref"
    assert main([str(x) for x in args] + ["--out", str(ref)]) == 0
    done = wb.open_run(run)
    assert done.complete and not unlisted(run)
    tables_equal(done, wb.open_run(ref))

    # a SIGKILLed writer's lock goes with it: the next writer resumes at once
    run2 = tmp_path / "run2"
    b = subprocess.Popen(WB + [str(x) for x in args] + ["--out", str(run2)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=ENV)
    _wait_parts(run2, 1, b)
    b.send_signal(signal.SIGKILL)
    b.wait()
    assert main([str(x) for x in args] + ["--out", str(run2), "--resume"]) == 0
    tables_equal(wb.open_run(run2), wb.open_run(ref))


@pytest.fixture
def small_run(tiny_dir, tmp_path):
    model = str(tiny_dir("mixtral"))
    d1 = tmp_path / "one.txt"
    d1.write_text("one two three\nfour five six seven\n")
    run = tmp_path / "run"
    assert main(["capture", model, "--data", str(d1), "--out", str(run), "--no-progress", "--part-tokens", "8",
                 "--batch-size", "1"]) == 0
    return model, run


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("mixtral"))
    (tmp_path / "d.txt").write_text("text\n")
    out = tmp_path / "mine"
    (out / "routing").mkdir(parents=True)
    (out / "routing" / "part-000000.parquet").write_bytes(b"my own file")
    (out / "thesis.tex").write_text("do not delete")
    before = snapshot(tmp_path)
    assert main(["capture", model, "--data", str(tmp_path / "d.txt"), "--out", str(out), "--overwrite",
                 "--no-progress"]) == 2
    assert "not a run" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_failed_overwrite_start_leaves_the_old_run_intact(small_run, tiny_model, tmp_path, monkeypatch):
    model, run = small_run
    before = snapshot(run)
    mm = wb.load_model(model)

    def broken(*a, **k):
        raise RuntimeError("the new capture fails in its first forward")

    monkeypatch.setattr(mm.model, "forward", broken)
    with pytest.raises(RuntimeError):
        wb.capture(mm, ["something else entirely"], run, overwrite=True, progress=False)
    assert snapshot(run) == before
    assert wb.open_run(run).complete


def test_overwrite_removes_only_what_the_old_manifest_lists(small_run, tmp_path):
    model, run = small_run
    old = wb.open_run(run)
    old_files = [f for p in old.manifest["parts"] for f in p["files"].values()]
    assert len(old.manifest["parts"]) >= 2
    (run / "notes.txt").write_text("keep")
    (run / "routing" / "README.txt").write_text("keep too")
    (tmp_path / "two.txt").write_text("zz\n")
    assert main(["capture", model, "--data", str(tmp_path / "two.txt"), "--out", str(run), "--overwrite",
                 "--no-progress"]) == 0
    assert (run / "notes.txt").read_text() == "keep" and (run / "routing" / "README.txt").read_text() == "keep too"
    new = wb.open_run(run)
    assert new.tokens.collect()["token"].to_list() == ["z", "z"]
    assert not unlisted(run) or unlisted(run) == ["routing/README.txt"]
    assert set(old_files) - {f for p in new.manifest["parts"] for f in p["files"].values()} == {
        f for f in old_files if not (run / f).exists()}


def _tmpfs(path, size: int) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_mid_capture_then_resume(tiny_dir, tmp_path, capsys, monkeypatch):
    model = str(tiny_dir("olmoe"))
    data = corpus(tmp_path / "data.jsonl", n=80)
    args = ["capture", model, "--data", str(data), "--batch-size", "4", "--part-tokens", "200", "--logits",
            "--no-progress"]
    ref = tmp_path / "ref"
    assert main(args + ["--out", str(ref)]) == 0
    need = sum(f.stat().st_size for f in ref.rglob("*") if f.is_file())
    fs = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mounted = _tmpfs(fs, max(64 * 1024, need // 2 // 4096 * 4096))
    if not mounted:  # no root or no mount here: the same failure through a patched write
        import workbench.store as store

        real, calls = store.pq.write_table, {"n": 0}

        def full(*a, **k):
            calls["n"] += 1
            if calls["n"] > 6:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[1]))
            return real(*a, **k)

        monkeypatch.setattr(store.pq, "write_table", full)
        fs.mkdir()
    try:
        run = fs / "run"
        outside = snapshot(tmp_path, skip=fs)
        capsys.readouterr()
        assert main(args + ["--out", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1 and "disk full" in err, err
        half = wb.open_run(run)  # consistent: every listed part verifies, nothing unlisted or temporary
        assert not half.complete and not unlisted(run)
        for t in ("tokens", "routing"):
            half.files(t)
        assert snapshot(tmp_path, skip=fs) == outside
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={need * 4}", str(fs)], check=True)
        else:
            monkeypatch.undo()
        assert main(args + ["--out", str(run), "--resume"]) == 0
        tables_equal(wb.open_run(run), wb.open_run(ref))
        assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def _replace_lock_held(run, pid: int) -> bool:
    """Whether process `pid` holds the run's readers lock exclusively, read from /proc/locks (probing with
    flock would itself take the lock shared for an instant and could make the overwrite refuse)."""
    try:
        ino = os.stat(run / ".workbench.readers").st_ino
        lines = open("/proc/locks").read().splitlines()
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if len(f) >= 6 and f[1] == "FLOCK" and f[3] == "WRITE" and f[4] == str(pid) and f[5].endswith(f":{ino}"):
            return True
    return False


def test_analyze_while_overwrite_replaces_the_run(tiny_dir, tmp_path):
    """Issue 22 item 8, two real processes: an `analyze` while `capture --overwrite` replaces the same run is
    refused in one sentence (it died in a Rust panic and could mix old and new parts), and an overwrite while
    an analysis reads the run is refused with the old run untouched; afterwards both work and the run is the
    new capture."""
    from workbench.store import reading

    model = str(tiny_dir("olmoe"))
    data = corpus(tmp_path / "data.jsonl", n=40)
    args = ["capture", model, "--data", data, "--batch-size", "2", "--part-tokens", "100", "--no-progress"]
    run = tmp_path / "run"
    assert main([str(x) for x in args] + ["--out", str(run)]) == 0
    # 1. a reader holds the run: the overwrite is refused and changes nothing
    def data(run):  # the run's content (the lock files record who last held them)
        return {k: v for k, v in snapshot(run).items() if not k.startswith(".workbench")}

    before = data(run)
    with reading(wb.open_run(run)):
        one_sentence(wb_cli(*args, "--max-tokens", "300", "--out", run, "--overwrite"),
                     needle="is being read by another process")
    assert data(run) == before
    # 2. the overwrite holds the run (paused while it replaces it): a reader is refused, not half-fed
    # another corpus in one part: the old run stays until the whole new capture is done (a window of seconds)
    new = [str(x) for x in args[:2]] + ["--data", str(corpus(tmp_path / "data2.jsonl", n=200)), "--batch-size", "2",
                                        "--part-tokens", "1000000", "--no-progress"]
    a = subprocess.Popen(WB + new + ["--out", str(run), "--overwrite"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.time() + 180
        while not _replace_lock_held(run, a.pid) and a.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert a.poll() is None, a.stderr.read()[-2000:]
        a.send_signal(signal.SIGSTOP)
        _stopped(a)
        assert _replace_lock_held(run, a.pid), "the overwrite ended before it was seen replacing the run"
        for argv in (("analyze", "stats", run), ("export", run, "--out", tmp_path / "exp")):
            one_sentence(wb_cli(*argv), needle="is being replaced by another process")
    finally:
        a.send_signal(signal.SIGCONT)
    assert a.wait(timeout=300) == 0, a.stderr.read()
    assert wb_cli("analyze", "stats", run).returncode == 0
    ref = tmp_path / "ref"
    assert main(new + ["--out", str(ref)]) == 0
    tables_equal(wb.open_run(run), wb.open_run(ref))
