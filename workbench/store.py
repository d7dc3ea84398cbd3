"""The run store: a folder of Parquet part files plus `manifest.json`, readable without this package.

Crash safety: every part is written under a temporary name, fsynced and renamed; the manifest,
rewritten the same way, lists a part only after all of that part's tables are on disk. A reader
(or `--resume`) trusts the manifest, so a capture killed at any instant leaves a consistent run.

Integrity: the manifest records each part file's size and xxh3-128 checksum (computed by the encoder
threads, off the forward loop). Opening a run stats every listed file; a table's files are checksummed
the first time it is read. Damage is reported here, in one sentence naming the part (`DamagedRun`).

Exclusion: every writer of a run folder holds an OS lock (flock on `.workbench.lock`, released by
the kernel when the process dies), so two writers can never mix their parts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from . import manifest as _manifest
from .errors import RunMismatch, WorkbenchError
from .safefs import is_inside, refuse_links_out, remove_file, remove_tree

SCHEMA_VERSION = _manifest.SCHEMA_VERSION
MANIFEST = "manifest.json"
LOCK = ".workbench.lock"
READERS = ".workbench.readers"  # readers hold it shared; replacing a run (overwrite, repair) holds it exclusive
CHECKSUM = "xxh3_128"
_PART_FILE = re.compile(r"^part-\d{6}\.parquet$")
_PART_TMP = re.compile(r"^\.part-\d{6}\.parquet\.tmp$")
_ANALYSIS_FILE = re.compile(r"^(\d+\.parquet|result\.json)$")  # what a persisted analysis entry holds


class DamagedRun(WorkbenchError):
    """A part file the manifest lists is missing, truncated, altered or unreadable."""


class RunLocked(WorkbenchError):
    """Another process is writing the run folder."""

# Column contract (DESIGN.md). Label columns of `tokens` are added per run.
SCHEMAS: dict[str, pa.Schema] = {
    "tokens": pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()),
                         ("token", pa.string()), ("phase", pa.string())]),
    "routing": pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("layer", pa.int16()),
                          ("experts", pa.list_(pa.int16())), ("weights", pa.list_(pa.float32()))]),
    "expert_stats": pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("layer", pa.int16()),
                               ("slot", pa.int16()), ("expert", pa.int16()), ("weight", pa.float32()),
                               ("out_maxabs", pa.float32()), ("out_argmax", pa.int32()), ("out_l2", pa.float32())]),
    "hidden": pa.schema([("doc_id", pa.int64()), ("pos", pa.int32()), ("layer", pa.int16()),
                         ("maxabs", pa.float32()), ("argmax", pa.int32())]),
    "attention": pa.schema([("doc_id", pa.int64()), ("layer", pa.int16()), ("head", pa.int16()),
                            ("sink_share", pa.float32())]),
}
TABLES = tuple(SCHEMAS)


def _float_encodings(table: pa.Table) -> dict[str, str]:
    """BYTE_STREAM_SPLIT for float32/64 leaves (flat or inside lists): zstd then sees each byte plane on its
    own (the low mantissa bytes of router logits from a bf16 model are all zero), so a routing part with
    fp32 logits encodes ~30% faster and ~23% smaller. pyarrow, polars and DuckDB read it; float16 dumps keep
    the plain encoding (older readers lack split FIXED_LEN_BYTE_ARRAY)."""
    out = {}
    for f in table.schema:
        path, t = f.name, f.type
        while pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            path, t = f"{path}.list.element", t.value_type
        if pa.types.is_float32(t) or pa.types.is_float64(t):
            out[path] = "BYTE_STREAM_SPLIT"
    return out


def _dictionary_columns(table: pa.Table) -> list[str]:
    """Dictionary-encode keys and strings only: on float columns it costs 3-4x the write time for nothing."""
    return [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_string(f.type)]


def os_errno(e: OSError) -> int | None:
    """The errno of an OSError, also when polars/Rust only put it in the text ("... (os error 30): path")."""
    if e.errno is not None:
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def io_error(e: OSError, path, what: str = "writing") -> WorkbenchError:
    """An OS error a user can cause (disk full, read-only or forbidden target) as one sentence."""
    where = e.filename or path
    code = os_errno(e)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return WorkbenchError(f"disk full while {what} {where}; nothing incomplete was kept: free some space "
                              "and run the same command again (a capture continues with --resume)")
    if not where and e.errno is None:
        where = str(e).rsplit(": ", 1)[-1]
    reason = e.strerror or (os.strerror(code) if code else str(e).split(" (os error")[0])
    return WorkbenchError(f"cannot write {where}: {reason}")


def file_checksum(path: Path) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return f"{CHECKSUM}:{h.hexdigest()}"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_file(tmp.parent, tmp.name)  # our temp file; never through a link
        raise io_error(e, path) from None


atomic_write_bytes = _atomic_write_bytes  # public: other writers of a run folder (data-parallel rank files)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def n_tokens(manifest: dict) -> int:
    """Tokens in a manifest's committed parts."""
    return sum(p["tokens"] for p in manifest["parts"])


def write_manifest(path: Path, manifest: dict) -> None:
    _atomic_write_bytes(Path(path) / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
    _fsync_dir(Path(path))


def read_manifest(path: str | Path, validate: bool = True) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise WorkbenchError(f"{path} is not a workbench run (no {MANIFEST})")
    if not p.is_file():  # a FIFO or a device would block or stream forever
        raise DamagedRun(f"{p} is not a regular file; capture the run again with --overwrite")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DamagedRun(f"{p} is damaged (not valid JSON); capture the run again with --overwrite") from None
    except OSError as e:
        raise WorkbenchError(f"cannot read {p}: {e.strerror or e}") from None
    if validate:
        why = manifest_problem(m)
        if why:
            raise DamagedRun(f"{p} is damaged ({why}); `workbench check {path} --repair` resets it so "
                             "--resume captures the run again")
    return m


def manifest_problem(m) -> str | None:
    """Why a manifest's structure cannot be trusted, or None (workbench.manifest holds the contract)."""
    return _manifest.problem(m)


def _lock_holder(f) -> str:
    try:
        f.seek(0)
        return f.read().strip()[:20] or "unknown"
    except OSError:
        return "unknown"


def lock_run(path: Path):
    """Take the run folder's exclusive writer lock (non-blocking); returns the open lock file."""
    try:
        f = open(path / LOCK, "a+")
    except OSError as e:
        raise io_error(e, path) from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _lock_holder(f)
        f.close()
        raise RunLocked(f"{path} is being written by another process (pid {holder}); wait for it to finish "
                        "or stop it, then try again") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _readers_file(path: Path):
    try:
        return open(Path(path) / READERS, "a+")
    except OSError:
        return None  # a read-only run cannot be replaced either: nothing to coordinate


def lock_replace(path: Path):
    """Take the run's readers lock exclusively (non-blocking) before deleting listed parts (capture/import
    --overwrite, check --repair): refused in one sentence while a reader holds it. Returns the open file."""
    f = _readers_file(path)
    if f is None:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise RunLocked(f"{path} is being read by another process (an analysis, an export or a dashboard); "
                        "wait for it to finish or stop it, then replace the run") from None
    return f  # (the file stays empty: nothing in the run changes when a replacement is refused)


class reading:
    """`with reading(run):` hold the run's readers lock shared while reading its parts, so a
    `capture --overwrite` or `check --repair` cannot delete or replace them underneath (it is refused in one
    sentence instead). If the run was replaced since `run` was opened, raises RunLocked: run again."""

    def __init__(self, run: "Run"):
        self.run = run
        self._f = None

    def __enter__(self):
        path = Path(self.run.path)
        f = _readers_file(path)
        if f is None:
            return self.run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise RunLocked(f"{path} is being replaced by another process (capture --overwrite or check --repair); "
                            "run the command again when it has finished") from None
        self._f = f
        try:
            now = read_manifest(path, validate=False)
        except WorkbenchError:
            now = None
        if not _same_snapshot(self.run.manifest, now):
            self.__exit__(None, None, None)
            raise RunLocked(f"{path} was replaced or repaired after it was opened; run the command again")
        return self.run

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.close()
            self._f = None
        return False


def _same_snapshot(old: dict, new) -> bool:
    """`new` still lists every part `old` lists, unchanged (a running capture may have added parts)."""
    if not isinstance(new, dict) or not isinstance(new.get("parts"), list):
        return False
    if old.get("created") != new.get("created") or len(new["parts"]) < len(old["parts"]):
        return False
    return all(a.get("files") == b.get("files") and a.get("checksums") == b.get("checksums")
               for a, b in zip(old["parts"], new["parts"]))


def run_folders(path: Path, manifest: dict | None = None) -> list[str]:
    """Every name inside a run the workbench reads, writes or deletes through: the table folders (those the
    manifest lists too), the analyses folder and its entries."""
    names = set(TABLES) | {"dump_experts", "dump_hidden", "analyses", MANIFEST, LOCK, READERS}
    if isinstance(manifest, dict) and isinstance(manifest.get("parts"), list):
        for part in manifest["parts"]:
            files = part.get("files") if isinstance(part, dict) else None
            for rel in (files or {}).values() if isinstance(files, dict) else ():
                if isinstance(rel, str) and len(Path(rel).parts) > 1:
                    names.add(str(Path(*Path(rel).parts[:-1])))
    a = Path(path) / "analyses"
    if a.is_dir() and not a.is_symlink():
        try:
            names |= {f"analyses/{d.name}" for d in a.iterdir()}
        except OSError:
            pass
    return sorted(names)


def check_links(path: Path, manifest: dict | None = None) -> None:
    """Refuse (LinkedRun, one sentence) a run whose tables or analyses are links out of its folder."""
    refuse_links_out(path, run_folders(path, manifest))


def _model_by_content(identity):
    """The capture identity with the model named by its files' content: `./m`, `m`, `/abs/m` and `m/` are the
    same model when their files hash the same (the spelling of the path is not part of what was captured)."""
    if not isinstance(identity, dict) or not isinstance(identity.get("model"), dict):
        return identity
    model = identity["model"]
    if model.get("file_hashes"):
        model = {k: v for k, v in model.items() if k != "spec"}
    return {**identity, "model": model}


def _same_capture(old: dict, new: dict, keys: tuple[str, ...]) -> bool:
    """Same model, settings and data. Data is the same when the identity says so, or when both runs
    record the same selected records (content_sha256) under differently worded selections."""
    old = {k: _model_by_content(v) if k == "identity" else v for k, v in old.items()}
    new = {k: _model_by_content(v) if k == "identity" else v for k, v in new.items()}
    if all(old.get(k) == new.get(k) for k in keys):
        return True
    content = (old.get("dataset") or {}).get("content_sha256")
    if not content or content != (new.get("dataset") or {}).get("content_sha256"):
        return False

    def without_data(m: dict) -> list:
        return [{**m[k], "data": None} if isinstance(m.get(k), dict) else m.get(k) for k in keys]

    return without_data(old) == without_data(new)


class PartFiles:
    """Writes part files crash-safely (temporary name, fsync, rename) and remembers each one's size and
    checksum until its part is committed. The run store uses one; so does a data-parallel rank, which
    writes its own parts without the run's manifest or lock."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._sums: dict[str, tuple[int, str]] = {}
        self._sums_lock = threading.Lock()

    def write_table_file(self, idx: int, name: str, table: pa.Table) -> str:
        """Write (thread-safe) table `name` of part `idx`; nothing lists it until its part is committed."""
        d = self.path / name
        try:
            d.mkdir(exist_ok=True)
        except OSError as e:
            raise io_error(e, d) from None
        rel = f"{name}/part-{idx:06d}.parquet"
        tmp = d / f".part-{idx:06d}.parquet.tmp"
        flat = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
        try:
            # statistics of list columns (logits, dumped vectors) cost a third of the write and serve no filter
            pq.write_table(table, tmp, compression="zstd", use_dictionary=_dictionary_columns(table),
                           write_statistics=flat, column_encoding=_float_encodings(table))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = file_checksum(tmp)  # here, in the encoder thread, while the file is in the page cache
            size = tmp.stat().st_size
            os.replace(tmp, self.path / rel)
        except OSError as e:
            remove_file(tmp.parent, tmp.name)
            raise io_error(e, self.path / rel) from None
        _fsync_dir(d)
        with self._sums_lock:
            self._sums[rel] = (size, digest)
        return rel

    def take_checksums(self, files: dict[str, str]) -> dict:
        """The `bytes` and `checksums` entries of a part made of `files` (table -> relative path), each
        file's record handed over once; {} when one is unknown (the part is then listed without them)."""
        with self._sums_lock:
            got = {name: self._sums.pop(rel, None) for name, rel in files.items()}
        if not all(got.values()):
            return {}
        return {"bytes": {n: v[0] for n, v in got.items()}, "checksums": {n: v[1] for n, v in got.items()}}


class RunWriter:
    """Appends parts to a run folder. One part = consecutive batches, all tables at once."""

    def __init__(self, path: str | Path, manifest: dict, resume: bool = False, overwrite: bool = False,
                 identity_keys: tuple[str, ...] = ("identity",)):
        self.path = Path(path)
        self.part_files = PartFiles(self.path)
        self._old: dict | None = None  # with overwrite: the run to clear once the new capture writes
        self._lock = None
        self._replace_lock = None  # readers lock, held exclusive from an overwrite's start until the old run is gone
        if self.path.exists() and not self.path.is_dir():
            raise WorkbenchError(f"--out {self.path} exists and is not a folder")
        created = not self.path.exists()
        if not created:
            self._refuse_foreign()  # before the lock file: a folder that is not ours gets nothing added
            try:
                old = json.loads((self.path / MANIFEST).read_text()) if (self.path / MANIFEST).is_file() else None
            except (OSError, ValueError):
                old = None
            check_links(self.path, old)  # nothing is written or deleted through a link out of the run
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise io_error(e, self.path) from None
        try:
            self._lock = lock_run(self.path)
            self._open(manifest, resume, overwrite, identity_keys)
        except BaseException:
            self.release()
            if created:  # leave no trace of a capture that never started
                remove_file(self.path, LOCK)
                remove_file(self.path, READERS)
                with _suppress_oserror():
                    self.path.rmdir()
            raise

    def _open(self, manifest, resume, overwrite, identity_keys) -> None:
        existing = self.path / MANIFEST
        self.already_complete = False
        if existing.exists() and not overwrite:
            old = read_manifest(self.path)
            same = _same_capture(old, manifest, identity_keys)
            if old.get("status") == "complete" and same:
                self.manifest = old  # nothing to do: a finished capture of the same thing
                self.already_complete = True
                self.release()
                return
            if not resume:
                raise WorkbenchError(
                    f"{self.path} already holds a run; pass --resume to finish it or --overwrite to replace it"
                )
            if not same:
                raise RunMismatch(
                    f"cannot resume {self.path}: it was captured with a different model, data or settings"
                )
            self.manifest = old
            self._drop_orphans()
            return
        self._refuse_foreign()
        if existing.exists():  # overwrite: the old run stays whole until the new capture writes its first part
            self._old = read_manifest(self.path)
            self._replace_lock = lock_replace(self.path)  # refused while someone reads the old run
        self.manifest = dict(manifest, schema_version=SCHEMA_VERSION, status="running", parts=[],
                             created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if self._old is None:
            write_manifest(self.path, self.manifest)

    def _refuse_foreign(self) -> None:
        if (self.path / MANIFEST).exists():
            return
        try:
            foreign = [f for f in self.path.iterdir() if f.name not in (LOCK, READERS)]
        except OSError as e:
            raise io_error(e, self.path) from None
        if foreign:
            raise WorkbenchError(f"--out {self.path} is a non-empty folder that is not a run; use another path")

    def _table_dirs(self, manifest: dict) -> set[str]:
        names = set(TABLES) | {"dump_experts", "dump_hidden"}
        for part in manifest.get("parts", []):
            names |= {Path(f).parts[0] for f in part["files"].values()}
        return names

    def clear_previous(self) -> None:
        """With overwrite: replace the old run now (no-op when there is none). A capture does this when it
        writes its first part; data-parallel rank 0 does it before any rank writes."""
        if self._old is not None:
            self._clear_old()

    def _clear_old(self) -> None:
        """Replace the old run: new manifest first (a kill now leaves an empty, resumable run), then
        remove exactly the files the old manifest listed, plus part-named leftovers in its table folders."""
        old, self._old = self._old, None
        write_manifest(self.path, self.manifest)
        # safefs: regular files only, never through a link (a linked table folder keeps its files)
        for part in old.get("parts", []):
            for rel in part["files"].values():
                remove_file(self.path, rel)
        for name in self._table_dirs(old):
            d = self.path / name
            if not d.is_dir() or d.is_symlink():
                continue
            for f in d.iterdir():
                if _PART_FILE.match(f.name) or _PART_TMP.match(f.name):
                    remove_file(self.path, f"{name}/{f.name}")
            with _suppress_oserror():
                d.rmdir()  # only if empty: anything a user put there stays
        remove_tree(self.path, "analyses", keep=lambda n: not _ANALYSIS_FILE.match(n))  # old results (persist.FOLDER)
        self._release_replace()

    def _release_replace(self) -> None:
        if self._replace_lock is not None:
            self._replace_lock.close()
            self._replace_lock = None

    def release(self) -> None:
        """Give up the writer lock (the kernel also drops it if the process dies)."""
        self._release_replace()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def discard_uncommitted(self) -> None:
        """After a failed capture: remove part files written but never listed, so nothing half-done stays."""
        start = len(self.manifest["parts"])
        for idx in range(start, max(getattr(self, "_reserved", 0), start)):
            for name in self._table_dirs(self.manifest):
                for f in (f"{name}/part-{idx:06d}.parquet", f"{name}/.part-{idx:06d}.parquet.tmp"):
                    remove_file(self.path, f)
        self._reserved = start

    def _drop_orphans(self) -> None:
        """Remove part files a killed capture wrote after its last manifest update."""
        listed = {f for part in self.manifest["parts"] for f in part["files"].values()}
        for name in self._table_dirs(self.manifest):
            d = self.path / name
            if not d.is_dir() or d.is_symlink():
                continue
            for f in d.iterdir():
                rel = f"{name}/{f.name}"
                if (_PART_FILE.match(f.name) and rel not in listed) or _PART_TMP.match(f.name):
                    remove_file(self.path, rel)

    @property
    def next_batch(self) -> int:
        parts = self.manifest["parts"]
        return parts[-1]["batch_end"] if parts else 0

    @property
    def tokens_done(self) -> int:
        return n_tokens(self.manifest)

    def write_part(self, tables: dict[str, pa.Table], batch_end: int, n_tokens: int) -> None:
        idx = self.reserve_part()
        self.commit_part(idx, self.write_part_files(idx, tables), batch_end, n_tokens)

    def reserve_part(self) -> int:
        """The index of the next part; parts may then be written concurrently and committed in order."""
        if self._old is not None:
            self._clear_old()
        self._reserved = max(getattr(self, "_reserved", 0), len(self.manifest["parts"]))
        self._reserved += 1
        return self._reserved - 1

    def write_table_file(self, idx: int, name: str, table: pa.Table) -> str:
        """Write (thread-safe) table `name` of part `idx`; nothing lists it until `commit_part`."""
        return self.part_files.write_table_file(idx, name, table)

    def take_checksums(self, files: dict[str, str]) -> dict:
        """Sizes and checksums of written part files, for a part listed elsewhere (a data-parallel rank)."""
        return self.part_files.take_checksums(files)

    def write_part_files(self, idx: int, tables: dict[str, pa.Table]) -> dict[str, str]:
        """Write all tables of part `idx`, side by side (Arrow encodes with the GIL released)."""
        if len(tables) > 1:
            with ThreadPoolExecutor(max_workers=min(len(tables), 4)) as pool:
                futs = {name: pool.submit(self.write_table_file, idx, name, t) for name, t in tables.items()}
                return {name: f.result() for name, f in futs.items()}
        return {name: self.write_table_file(idx, name, t) for name, t in tables.items()}

    def commit_part(self, idx: int, files: dict[str, str], batch_end: int, n_tokens: int) -> None:
        """List a written part in the manifest; parts are committed strictly in index order."""
        if idx != len(self.manifest["parts"]):
            raise RuntimeError(f"part {idx} committed out of order (expected {len(self.manifest['parts'])})")
        part = {"index": idx, "batch_end": batch_end, "tokens": n_tokens, "files": files,
                **self.take_checksums(files)}
        self.manifest["parts"].append(part)
        try:
            write_manifest(self.path, self.manifest)
        except BaseException:
            self.manifest["parts"].pop()  # the part is not listed: discard_uncommitted may remove it
            raise

    def update(self, **fields) -> None:
        self.manifest.update(fields)
        write_manifest(self.path, self.manifest)

    def finish(self, **fields) -> None:
        if self._old is not None:
            self._clear_old()
        self.manifest.update(fields, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_manifest(self.path, self.manifest)
        self.release()


class _suppress_oserror:
    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        return et is not None and issubclass(et, OSError)


@dataclass
class Run:
    """A captured run: `run.routing`, `run.tokens`, ... are lazy polars frames of the listed parts."""

    path: Path
    manifest: dict

    def files(self, table: str) -> list[Path]:
        """The listed part files of `table`, each verified (size, checksum, Parquet footer) on first use."""
        out = []
        for i, part in enumerate(self.manifest["parts"]):
            rel = part["files"].get(table)
            if rel is not None:
                verify_part_file(self.path, part, table, deep=True, manifest=self.manifest)
                out.append(self.path / rel)
        return out

    def check_files(self) -> None:
        """Cheap check of every listed file (exists, recorded size); checksums wait for `files()`."""
        for part in self.manifest["parts"]:
            for table in part["files"]:
                verify_part_file(self.path, part, table, deep=False)

    @property
    def note(self) -> str | None:
        """One line for analyses of a run that is incomplete or was repaired, else None."""
        m = self.manifest
        parts, tokens = len(m["parts"]), self.n_tokens
        repairs = m.get("repairs") or []
        if repairs:
            dropped = sum(len(r.get("dropped_parts", [])) for r in repairs)
            state = ("and was captured again with --resume since" if m.get("status") == "complete" else
                     "and lacks those tokens until `workbench capture ... --resume` captures them again")
            what = f"{dropped} damaged part(s) dropped" if dropped else "its damaged manifest was reset"
            return (f"note: run {self.path} was repaired ({what}) {state}; "
                    f"results cover {parts} parts, {tokens} tokens")
        if m.get("status") != "complete":
            return (f"note: run {self.path} is still running or was interrupted (status {m.get('status')!r}); "
                    f"results cover its {parts} completed parts, {tokens} tokens")
        return None

    def has(self, table: str) -> bool:
        return bool(self.files(table))

    def table(self, name: str) -> pl.LazyFrame:
        files = self.files(name)
        if not files:
            if name in SCHEMAS:
                return pl.from_arrow(SCHEMAS[name].empty_table()).lazy()
            asked = {"dump_experts": ("expert_stats", "dump"), "dump_hidden": ("hidden", "dump_layers")}.get(name)
            spec = asked and (self.manifest.get("probes", {}).get(asked[0]) or {}).get(asked[1])
            if spec:
                raise WorkbenchError(f"run {self.path} dumped {spec} but no token reached them, so {name!r} is empty"
                                     " (check the experts' load: workbench analyze stats)")
            raise WorkbenchError(f"run {self.path} has no {name!r} table")
        return pl.scan_parquet([str(f) for f in files])

    def read_note(self) -> None:
        """Print `note` (if any) to stderr: analyses and exports call it once per run."""
        import sys

        if self.note:
            print(self.note, file=sys.stderr)

    # The tables under the names a notebook user expects.
    @property
    def tokens(self) -> pl.LazyFrame:
        return self.table("tokens")

    @property
    def routing(self) -> pl.LazyFrame:
        return self.table("routing")

    @property
    def expert_stats(self) -> pl.LazyFrame:
        return self.table("expert_stats")

    @property
    def hidden(self) -> pl.LazyFrame:
        return self.table("hidden")

    @property
    def attention(self) -> pl.LazyFrame:
        return self.table("attention")

    @property
    def model_info(self) -> dict:
        return self.manifest["model"]

    @property
    def n_tokens(self) -> int:
        """Tokens in the run's committed parts."""
        return n_tokens(self.manifest)

    @property
    def info(self) -> _manifest.Manifest:
        """The manifest, typed (workbench.manifest.Manifest); `manifest` stays the JSON object."""
        return _manifest.Manifest.from_json(self.manifest)

    @property
    def moe_layers(self) -> list[int]:
        return list(self.manifest["model"]["moe_layers"])

    @property
    def n_experts(self) -> int:
        return int(self.manifest["model"]["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self.manifest["model"]["top_k"])

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def label_columns(self) -> list[str]:
        return list(self.manifest.get("label_columns", []))

    def __repr__(self) -> str:
        m = self.manifest
        tables = [t for t in TABLES if self.has(t)]
        return (f"Run({str(self.path)!r}, model={m['model']['spec']!r}, status={m.get('status')}, "
                f"tokens={self.n_tokens}, tables={tables})")


def open_run(path: str | Path) -> Run:
    """Open a run folder (complete or not: a killed capture is readable up to its last part).

    Raises DamagedRun, naming the part, when a listed file is missing or has the wrong size."""
    p = Path(path)
    if not p.is_dir():
        raise WorkbenchError(f"run folder {path} does not exist")
    run = Run(p, read_manifest(p))
    check_links(p, run.manifest)
    with reading(run):  # a run being replaced (capture --overwrite) is refused in one sentence, not half-read
        run.check_files()
    return run


_VERIFIED: dict[tuple, bool] = {}  # (file, size, mtime, checksum) already verified in this process
_VERIFIED_LOCK = threading.Lock()


def _same_type(have: pa.DataType, want: pa.DataType) -> bool:
    """Equal up to what a Parquet round trip changes: list field names, large offsets, dictionary encoding."""
    if pa.types.is_dictionary(have):
        have = have.value_type
    if pa.types.is_null(have):  # an all-null column (imported runs have no weights)
        return True
    nested = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    if any(t(have) for t in nested) and any(t(want) for t in nested):
        return _same_type(have.value_type, want.value_type)
    strings = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if any(t(have) for t in strings) and any(t(want) for t in strings):
        return True
    return have.equals(want)


def schema_problem(schema: pa.Schema, table: str) -> str | None:
    """Why a part's columns are not those of `table` (SCHEMAS), or None (extra columns are allowed)."""
    want = SCHEMAS.get(table)
    if want is None:
        return None
    for field in want:
        i = schema.get_field_index(field.name)
        if i < 0:
            return f"lacks the column {field.name!r} of the {table} table"
        if not _same_type(schema.field(i).type, field.type):
            return f"has column {field.name!r} of type {schema.field(i).type} instead of {field.type}"
    return None


def expected_rows(manifest: dict | None, part: dict, table: str) -> tuple[int, bool] | None:
    """(rows, exact) the manifest implies for `table` of `part`: tokens, tokens x MoE layers, or an upper bound
    (tokens x layers x slots ...); None when the manifest does not say enough. A part's footer must agree
    before any of its data is decoded (a small file can declare, and decompress to, billions of rows)."""
    tokens = part.get("tokens")
    model = (manifest or {}).get("model") if isinstance(manifest, dict) else None
    if not isinstance(tokens, int) or tokens < 0:
        return None
    if table == "tokens":
        return tokens, False  # a generation capture lists the last generated token without routing it
    if not isinstance(model, dict):
        return None

    def num(key, default=0):
        v = model.get(key, default)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else default

    moe = model.get("moe_layers")
    n_moe = len(moe) if isinstance(moe, list) else 0
    n_layers = max(num("n_layers"), n_moe, 1)
    experts, shared, top_k = num("n_experts", 1), num("shared_experts"), num("top_k", 1)
    if table == "routing" and n_moe:
        return tokens * n_moe, True
    if table in ("expert_stats", "dump_experts") and n_moe:
        return tokens * n_moe * (max(experts, top_k) + shared + 1), False
    if table in ("hidden", "dump_hidden"):
        return tokens * (n_layers + 1), False
    if table == "attention":  # documents x layers x heads: a head has at least 2 hidden channels
        return tokens * n_layers * max(num("hidden_size", 4096) // 2, 1), False
    return tokens * n_layers * (max(experts, top_k) + shared + 1), False


def _list_values_problem(meta, manifest: dict | None, table: str = "") -> str | None:
    """List cells hold at most top_k (routing experts, weights), n_experts (logits) or, elsewhere, max(experts,
    hidden size) values a row: the footer's value counts say so before any page is decompressed."""
    model = (manifest or {}).get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict):
        return None
    sizes = [model.get(k) for k in ("n_experts", "top_k", "hidden_size")]
    sizes = [int(v) for v in sizes if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    if not sizes:
        return None
    top_k, n_exp = model.get("top_k"), model.get("n_experts")
    for j in range(meta.num_columns):
        col = meta.schema.column(j)
        if col.max_repetition_level == 0:
            continue
        per_row = max(sizes) + int(model.get("shared_experts") or 0) + 1
        name = col.path.split(".")[0]
        if table == "routing" and name in ("experts", "weights") and isinstance(top_k, int) and top_k > 0:
            per_row = top_k  # a null list (no weights recorded) counts one value
        elif table == "routing" and name == "logits" and isinstance(n_exp, int) and n_exp > 0:
            per_row = n_exp
        cap = meta.num_rows * per_row
        n = sum(meta.row_group(i).column(j).num_values for i in range(meta.num_row_groups))
        if n > cap:
            return (f"declares {n} values in its list column {col.path} for {meta.num_rows} rows (at most "
                    f"{per_row} a row fit this model)")
    return None


def part_problem(root: Path, part: dict, table: str, deep: bool = True, manifest: dict | None = None) -> str | None:
    """Why one listed part file cannot be trusted (missing, not a regular file, a link out of the run, wrong
    size, checksum, unreadable, row count or columns unlike the manifest's), or None."""
    rel = part["files"][table]
    f = root / rel
    try:
        lst = f.lstat()
        st = f.stat() if stat.S_ISLNK(lst.st_mode) else lst
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISLNK(lst.st_mode) and not is_inside(f, root):
        return "is a symbolic link out of the run folder"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block every reader, a device stream forever
        return "is not a regular file"
    want = (part.get("bytes") or {}).get(table)
    if want is not None and st.st_size != want:
        return f"has {st.st_size} bytes instead of {want} (truncated or overwritten)"
    if not deep:
        return None
    digest = (part.get("checksums") or {}).get(table)
    key = (str(f), st.st_size, st.st_mtime_ns, digest, part.get("tokens"))
    with _VERIFIED_LOCK:
        if key in _VERIFIED:
            return None
    try:
        if digest is not None and file_checksum(f) != digest:
            return "does not match its checksum (altered or bit rot)"
        meta = pq.read_metadata(f)
        why = schema_problem(meta.schema.to_arrow_schema(), table)
        if why:
            return why
        rows = expected_rows(manifest, part, table)
        if rows is not None and (meta.num_rows > rows[0] or (rows[1] and meta.num_rows != rows[0])):
            return (f"holds {meta.num_rows} rows where the manifest's {part.get('tokens')} tokens allow "
                    f"{'exactly' if rows[1] else 'at most'} {rows[0]}")
        why = _list_values_problem(meta, manifest, table)
        if why:
            return why
    except OSError as e:
        return f"cannot be read ({e.strerror})" if e.strerror else "is not a readable Parquet file"
    except Exception:  # pyarrow raises ArrowInvalid & co. for a broken footer
        return "is not a readable Parquet file"
    with _VERIFIED_LOCK:
        _VERIFIED[key] = True
    return None


def damaged_message(root, rel: str, why: str) -> str:
    return (f"run {root} is damaged: part file {rel} {why}; `workbench check {root} --repair` drops it "
            "so that `workbench capture ... --resume` captures it again")


def verify_part_file(root: Path, part: dict, table: str, deep: bool = True, manifest: dict | None = None) -> None:
    """The one place that turns a damaged part into a user-facing error."""
    why = part_problem(root, part, table, deep, manifest)
    if why:
        raise DamagedRun(damaged_message(root, part["files"][table], why))
