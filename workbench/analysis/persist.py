"""Persisted analyses: computed once, stored in the run folder, reused by the CLI, notebooks and app.

Layout: `RUN/analyses/<name>/<key>/` with one Parquet file per table and `result.json` (main table,
summary, meta, the options and the run fingerprint). `key` hashes the analysis options and the run's
parts (their files and token counts), so a capture that adds parts (`--resume`) changes the key and
the stale entries are removed the next time the analysis is stored. An entry is written to a
temporary folder and renamed into place, so a crash never leaves a half-written result that a
reader would trust. Options that cannot be written as JSON (a loaded model, a callable) make the
call uncacheable: it is computed and not stored.

Options are keyed with the analysis' defaults filled in, so `workbench analyze stats RUN` (every option
spelled out by the CLI) and `analyze("stats", run)` share one entry; `reuse=False` / `--recompute`
replaces it. Cleanup deletes only the files an entry holds (`N.parquet`, `result.json`), inside the
run's real folder, never through a link (workbench.safefs): an `analyses/<name>` that is a link out of
the run is neither read, written nor cleaned.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

import polars as pl

from ..safefs import link_out, pid_alive, remove_tree
from .registry import ANALYSES
from .result import AnalysisResult

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


_ENTRY_FILE = re.compile(r"^(\d+\.parquet|result\.json)$")


def with_defaults(name: str, options: dict) -> dict:
    """`options` completed with the defaults of the analysis' `analyze` signature: a result is keyed by what
    was computed, not by which options the caller happened to spell out."""
    if name not in ANALYSES:
        return dict(options)
    try:
        import importlib

        sig = inspect.signature(importlib.import_module(f"workbench.analysis.{ANALYSES[name].module}").analyze)
    except Exception:  # an analysis that cannot be imported is keyed as given
        return dict(options)
    out = {}
    for pname, prm in list(sig.parameters.items())[1:]:  # after `run`
        if prm.kind in (prm.VAR_KEYWORD, prm.VAR_POSITIONAL):
            continue
        if prm.default is not prm.empty:
            out[pname] = prm.default
    out.update(options)
    return out


def cache_key(name: str, run, options: dict) -> str | None:
    """The entry's folder name, or None when an option cannot be keyed (then nothing is stored)."""
    opts = {k: v for k, v in with_defaults(name, options).items() if k not in _NOT_KEYED}
    if not _jsonable(opts):
        return None
    blob = json.dumps({"format": FORMAT, "name": name, "options": _norm(opts), "run": run_fingerprint(run)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def entry_path(name: str, run, options: dict) -> Path | None:
    key = cache_key(name, run, options)
    return None if key is None else Path(run.path) / FOLDER / name.replace("/", "_") / key


def _linked(run, p: Path) -> bool:
    """Whether the entry path passes through a link out of the run (then it is not used at all)."""
    return link_out(run.path, p.relative_to(run.path)) is not None


def load(name: str, run, options: dict) -> AnalysisResult | None:
    """The stored result for these options on this run as it is now, or None."""
    p = entry_path(name, run, options)
    if p is None or _linked(run, p) or not (p / RESULT).is_file():  # a FIFO named result.json would block
        return None
    try:
        info = json.loads((p / RESULT).read_text())
        if info.get("run") != run_fingerprint(run):
            return None
        files = [p / f"{i}.parquet" for i in range(len(info["tables"]))]
        if not all(f.is_file() and not f.is_symlink() for f in files):
            return None
        tables = {t: pl.read_parquet(f) for t, f in zip(info["tables"], files)}
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError):
        return None  # damaged or foreign: recompute
    return AnalysisResult(info["name"], tables, info["main"], info.get("summary", ""), info.get("meta", {}))


def _remove(run, folder: Path) -> None:
    """Delete an entry folder the workbench wrote: its entry files only, inside the run, never through a link."""
    remove_tree(run.path, folder.relative_to(run.path), keep=lambda n: not _ENTRY_FILE.match(n))


def store(result: AnalysisResult, run, options: dict, replace: bool = False) -> Path | None:
    """Write `result` crash-safely (temp folder + rename); drop entries of older states of the run.

    replace: an entry already stored for these options is replaced (`reuse=False`, `--recompute`); otherwise
    the first one stored wins (two processes computing the same result). Returns the entry folder, or None
    when the options are not keyable, the run folder is read-only, or the entry would pass through a link."""
    p = entry_path(result.name, run, options)
    if p is None or _linked(run, p):
        return None
    fp = run_fingerprint(run)
    tmp = p.parent / f".tmp-{p.name}-{os.getpid()}"
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        if _linked(run, p):  # created as a link meanwhile
            return None
        _remove(run, tmp)
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
        if p.exists() and replace:  # the old entry goes aside first: a reader sees the old or the new one
            old = p.parent / f".tmp-{p.name}-old-{os.getpid()}"
            _remove(run, old)
            os.rename(p, old)
            os.rename(tmp, p)
            _remove(run, old)
        elif p.exists():  # another process stored the same result first: keep theirs
            _remove(run, tmp)
        else:
            os.rename(tmp, p)
    except OSError:
        _remove(run, tmp)
        return None
    _drop_stale(run, p.parent, fp)
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


def _drop_stale(run, folder: Path, fingerprint: str) -> None:
    """Remove entries computed on an earlier state of the run (fewer parts) and orphaned temp folders.

    Only real folders inside the run are looked at (a link is never listed through); in each, only the
    files an entry holds are deleted, so a folder that holds anything else stays."""
    if _linked(run, folder) or folder.is_symlink():
        return
    for d in folder.iterdir():
        if d.is_symlink() or not d.is_dir():
            continue
        if d.name.startswith(".tmp-"):
            try:
                pid = int(d.name.rsplit("-", 1)[1])
            except ValueError:
                pid = -1
            if not pid_alive(pid):  # a live process is still writing it
                _remove(run, d)
            continue
        try:
            info = d / RESULT
            stale = not info.is_file() or json.loads(info.read_text()).get("run") != fingerprint
        except (OSError, ValueError):
            stale = True
        if stale:
            _remove(run, d)


def cached(name: str, run, compute, options: dict, reuse: bool = True, key: dict | None = None) -> AnalysisResult:
    """Return the stored result for (name, options, run) or compute it with `compute(**options)` and store it.

    key: what identifies the result when `options` hold objects (e.g. {"model": "demo"} for a loaded model)."""
    from ..store import reading

    k = options if key is None else key
    # under the run's readers lock: a `capture --overwrite` of this run is refused meanwhile instead of
    # deleting the parts being read (and a run replaced since it was opened is refused here)
    with reading(run):
        if reuse:
            hit = load(name, run, k)
            if hit is not None:
                hit.meta = dict(hit.meta, reused=True)
                return hit
        result = compute(**options)
        store(result, run, k, replace=not reuse)
    return result
