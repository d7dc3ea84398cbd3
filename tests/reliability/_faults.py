"""Shared helpers of the fault suite: run the real CLI in a process, check its one-sentence failure,
and prove that nothing outside the run folder changed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl

WB = [sys.executable, "-m", "workbench.cli"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
           TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def wb(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(WB + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)


def cli(*argv) -> tuple[int, str, str]:
    """The CLI's main() in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from workbench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def cli_sentence(rc: int, err: str, needle: str) -> str:
    """An in-process CLI call failed with exit 2 and one `workbench...` line holding `needle`, no traceback."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("workbench")]
    assert rc == 2 and "Traceback" not in err, (rc, err[-1500:])
    assert len(lines) == 1 and needle in lines[0], err[-1500:]
    return lines[0]


def one_sentence(r: subprocess.CompletedProcess, code: int = 2, needle: str | None = None) -> str:
    """The process failed with `code` and said why in a single stderr line, with no traceback."""
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    if needle is not None:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """path -> sha256 of every file under root except those under `skip` (the run folder)."""
    out = {}
    for f in sorted(Path(root).rglob("*")):
        if skip is not None and (f == skip or skip in f.parents):
            continue
        if f.is_file():
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def corpus(path: Path, n: int = 400) -> Path:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 13))
            f.write(json.dumps({"text": text, "group": f"g{i % 3}"}) + "\n")
    return path


def tables_equal(a, b) -> None:
    """Two runs hold the same rows (order of parts aside)."""
    for table, keys in [("tokens", ["doc_id", "pos"]), ("routing", ["doc_id", "pos", "layer"])]:
        ta = a.table(table).collect().sort(keys)
        tb = b.table(table).collect().sort(keys)
        assert ta.height == tb.height, (table, ta.height, tb.height)
        assert ta.equals(tb), table
        assert ta.select(keys).is_duplicated().sum() == 0


def unlisted(run_dir: Path) -> list[str]:
    """Part or temp files in the run folder that its manifest does not list."""
    m = json.loads((run_dir / "manifest.json").read_text())
    listed = {f for p in m["parts"] for f in p["files"].values()}
    return [str(f.relative_to(run_dir)) for f in run_dir.glob("*/*")
            if f.is_file() and str(f.relative_to(run_dir)) not in listed]


__all__ = ["WB", "ENV", "wb", "one_sentence", "snapshot", "corpus", "tables_equal", "unlisted", "pl"]
