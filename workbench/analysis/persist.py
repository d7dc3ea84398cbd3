"""Persisted analyses: computed once, stored in the run folder, reused by the CLI, notebooks and app.

Layout: `RUN/analyses/<name>/<key>/` with one Parquet file per table and `result.json` (main table,
summary, meta, the options and the run fingerprint). `key` hashes the analysis options and the run's
parts (their files and token counts), so a capture that adds parts (`--resume`) changes the key and
the stale entries are removed the next time the analysis is stored. An entry is written to a
temporary folder and renamed into place, so a crash never leaves a half-written result that a
reader would trust. Options that cannot be written as JSON (a loaded model, a callable) make the
call uncacheable: it is computed and not stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import polars as pl

from . import AnalysisResult

FOLDER = "analyses"
RESULT = "result.json"
FORMAT = 1
# options that change how, not what, is computed
_NOT_KEYED = {"progress", "chunk_tokens", "threads"}  # how a result is computed, not what it is


def run_fingerprint(run) -> str:
    """Hash of what every analysis reads: the listed parts (files, tokens, content checksums), the status,
    and the capture's identity and start time. File names and token counts alone repeat when a run is
    captured again with `--overwrite` (another model, the same data): its stored results must not be
    served for the new one."""
    m = run.manifest
    parts = [(p.get("index"), sorted(p["files"].items()), p.get("tokens"), sorted((p.get("checksums") or {}).items()))
             for p in m.get("parts", [])]
    blob = json.dumps([parts, m.get("status"), m.get("identity"), m.get("created")], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(x) -> bool:
    try:
        json.dumps(x, sort_keys=True)
        return True
    except (TypeError, ValueError):
        return False


def _norm(x):
    """Options as JSON sees them (tuples -> lists), so `m=(4, 16)` and `m=[4, 16]` share one entry."""
    return json.loads(json.dumps(x, sort_keys=True))


def cache_key(name: str, run, options: dict) -> str | None:
    """The entry's folder name, or None when an option cannot be keyed (then nothing is stored)."""
    opts = {k: v for k, v in options.items() if k not in _NOT_KEYED}
    if not _jsonable(opts):
        return None
    blob = json.dumps({"format": FORMAT, "name": name, "options": _norm(opts), "run": run_fingerprint(run)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_path(name: str, run, options: dict) -> Path | None:
    key = cache_key(name, run, options)
    return None if key is None else Path(run.path) / FOLDER / name.replace("/", "_") / key


def load(name: str, run, options: dict) -> AnalysisResult | None:
    """The stored result for these options on this run as it is now, or None."""
    p = entry_path(name, run, options)
    if p is None or not (p / RESULT).exists():
        return None
    try:
        info = json.loads((p / RESULT).read_text())
        if info.get("run") != run_fingerprint(run):
            return None
        tables = {t: pl.read_parquet(p / f"{i}.parquet") for i, t in enumerate(info["tables"])}
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError):
        return None  # damaged or foreign: recompute
    return AnalysisResult(info["name"], tables, info["main"], info.get("summary", ""), info.get("meta", {}))


def store(result: AnalysisResult, run, options: dict) -> Path | None:
    """Write `result` crash-safely (temp folder + rename); drop entries of older states of the run.

    Returns the entry folder, or None when the options are not keyable or the run folder is read-only."""
    p = entry_path(result.name, run, options)
    if p is None:
        return None
    fp = run_fingerprint(run)
    tmp = p.parent / f".tmp-{p.name}-{os.getpid()}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        names = list(result.tables)
        for i, t in enumerate(names):
            result.tables[t].write_parquet(tmp / f"{i}.parquet")
        info = {"format": FORMAT, "name": result.name, "main": result.main, "summary": result.summary,
                "tables": names, "meta": _norm_meta(result.meta), "run": fp,
                "options": _norm({k: v for k, v in options.items() if k not in _NOT_KEYED})}
        (tmp / RESULT).write_text(json.dumps(info, indent=1, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if p.exists():  # another process stored the same result first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.rename(tmp, p)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    _drop_stale(p.parent, fp)
    return p


def _norm_meta(meta: dict):
    return json.loads(json.dumps(meta, default=_to_json))


def _to_json(x):
    import numpy as np

    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def _drop_stale(folder: Path, fingerprint: str) -> None:
    """Remove entries computed on an earlier state of the run (fewer parts) and orphaned temp folders."""
    for d in folder.iterdir():
        if d.name.startswith(".tmp-"):
            try:
                pid = int(d.name.rsplit("-", 1)[1])
                os.kill(pid, 0)  # still being written by a live process
            except PermissionError:
                pass  # alive, another user's
            except (ValueError, ProcessLookupError):
                shutil.rmtree(d, ignore_errors=True)
            continue
        try:
            if json.loads((d / RESULT).read_text()).get("run") != fingerprint:
                shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            shutil.rmtree(d, ignore_errors=True)


def cached(name: str, run, compute, options: dict, reuse: bool = True, key: dict | None = None) -> AnalysisResult:
    """Return the stored result for (name, options, run) or compute it with `compute(**options)` and store it.

    key: what identifies the result when `options` hold objects (e.g. {"model": "demo"} for a loaded model)."""
    k = options if key is None else key
    if reuse:
        hit = load(name, run, k)
        if hit is not None:
            hit.meta = dict(hit.meta, reused=True)
            return hit
    result = compute(**options)
    store(result, run, k)
    return result
