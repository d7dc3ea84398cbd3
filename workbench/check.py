"""`workbench check RUN [--repair]`: verify every part a run lists; with --repair, drop damaged parts.

A capture resumes after its last listed part (parts are consecutive batches), so repair drops the
first damaged part *and every later one*: `--resume` then captures exactly those batches again and
the result equals an uninterrupted capture. Repair holds the run's writer lock.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq

from .errors import WorkbenchError
from .safefs import remove_file
from .store import (MANIFEST, DamagedRun, check_links, lock_replace, lock_run, manifest_problem, part_problem,
                    read_manifest, write_manifest)


def _readable(path: Path) -> str | None:
    """Decode every page (streamed): catches damage a run captured before checksums cannot show otherwise."""
    try:
        for _ in pq.ParquetFile(path).iter_batches(batch_size=65536):
            pass
    except Exception:
        return "is not a readable Parquet file"
    return None


def check_run(path, repair: bool = False) -> dict:
    """{'parts': n, 'files': n, 'damaged': [{'part', 'file', 'why'}], 'dropped': [part indices], 'manifest': why|None}."""
    root = Path(path)
    if not root.is_dir():
        raise WorkbenchError(f"run folder {path} does not exist")
    lock = lock_run(root) if repair else None
    readers = None
    try:
        m = read_manifest(root, validate=False)
        check_links(root, m if isinstance(m, dict) and not manifest_problem(m) else None)
        if repair:
            readers = lock_replace(root)  # dropping parts under a running analysis would pull them from under it
        report = {"parts": 0, "files": 0, "damaged": [], "dropped": [], "manifest": manifest_problem(m)}
        if report["manifest"]:
            if repair:
                if not isinstance(m, dict) or not isinstance(m.get("identity"), dict):
                    raise DamagedRun(f"{root / MANIFEST} is damaged ({report['manifest']}) beyond repair: it does "
                                     "not say what was captured; capture the run again with --overwrite")
                # nothing listed can be trusted: start over; --resume removes the unlisted files
                _drop(root, m, 0, {"reason": report["manifest"]}, report)
            return report
        parts = m["parts"]
        report["parts"] = len(parts)
        for i, part in enumerate(parts):
            for table, rel in part["files"].items():
                report["files"] += 1
                why = part_problem(root, part, table, deep=True, manifest=m)
                if why is None and not (part.get("checksums") or {}).get(table):
                    why = _readable(root / rel)
                if why:
                    report["damaged"].append({"part": i, "file": rel, "why": why})
        if repair and report["damaged"]:
            first = min(d["part"] for d in report["damaged"])
            _drop(root, m, first, {"damaged": report["damaged"]}, report)
        return report
    finally:
        if readers is not None:
            readers.close()
        if lock is not None:
            lock.close()


def _drop(root: Path, m: dict, first: int, why: dict, report: dict) -> None:
    """Unlist parts[first:] (manifest first, so a kill now leaves a consistent run), then delete their files."""
    parts = m.get("parts") if isinstance(m.get("parts"), list) else []
    dropped = parts[first:]
    report["dropped"] = list(range(first, len(parts))) if parts else []
    m["parts"] = parts[:first]
    m["status"] = "running"
    m.setdefault("repairs", []).append(dict(why, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            dropped_parts=report["dropped"]))
    write_manifest(root, m)
    for part in dropped:
        files = part.get("files") if isinstance(part, dict) else None
        for rel in (files or {}).values():
            if isinstance(rel, str):
                remove_file(root, rel)  # regular files inside the run only, never through a link


def check_command(run: str, repair: bool = False) -> None:
    """`workbench check RUN [--repair]`: the report on stdout; DamagedRun when damage is found and not repaired."""
    report = check_run(run, repair=repair)
    if report["manifest"]:
        if repair:
            print(f"repaired {run}: its manifest was damaged ({report['manifest']}); every part was "
                  "unlisted, so `workbench capture ... --resume` captures the whole run again")
            return
        raise DamagedRun(f"{Path(run) / MANIFEST} is damaged ({report['manifest']}); "
                         f"`workbench check {run} --repair` resets it so --resume captures the run again")
    for d in report["damaged"]:
        print(f"damaged: part {d['part']}: {d['file']} {d['why']}")
    if not report["damaged"]:
        print(f"ok: {run}: {report['parts']} parts, {report['files']} files verified")
        return
    if repair:
        print(f"repaired {run}: dropped parts {report['dropped'][0]}..{report['dropped'][-1]} "
              f"({len(report['dropped'])} parts: a capture resumes after its last intact part); "
              "run the same `workbench capture ... --resume` to capture them again")
        return
    d = report["damaged"][0]
    raise DamagedRun(f"run {run} has {len(report['damaged'])} damaged part file(s), first {d['file']} "
                     f"which {d['why']}; `workbench check {run} --repair` drops them so --resume captures them again")
