"""The run store: a folder of Parquet part files plus `manifest.json`, readable without this package.

Crash safety: every part is written under a temporary name, fsynced and renamed; the manifest,
rewritten the same way, lists a part only after all of that part's tables are on disk. A reader
(or `--resume`) trusts the manifest, so a capture killed at any instant leaves a consistent run.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import RunMismatch, WorkbenchError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

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


def _dictionary_columns(table: pa.Table) -> list[str]:
    """Dictionary-encode keys and strings only: on float columns it costs 3-4x the write time for nothing."""
    return [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_string(f.type)]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(path: Path, manifest: dict) -> None:
    _atomic_write_bytes(Path(path) / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
    _fsync_dir(Path(path))


def read_manifest(path: str | Path) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise WorkbenchError(f"{path} is not a workbench run (no {MANIFEST})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        raise WorkbenchError(f"{p} is damaged (not valid JSON)") from None


class RunWriter:
    """Appends parts to a run folder. One part = consecutive batches, all tables at once."""

    def __init__(self, path: str | Path, manifest: dict, resume: bool = False, overwrite: bool = False,
                 identity_keys: tuple[str, ...] = ("identity",)):
        self.path = Path(path)
        existing = self.path / MANIFEST
        if self.path.exists() and not self.path.is_dir():
            raise WorkbenchError(f"--out {self.path} exists and is not a folder")
        if existing.exists() and not overwrite:
            old = read_manifest(self.path)
            same = all(old.get(k) == manifest.get(k) for k in identity_keys)
            if old.get("status") == "complete" and same:
                self.manifest = old  # nothing to do: a finished capture of the same thing
                self.already_complete = True
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
        else:
            if self.path.exists() and any(self.path.iterdir()) and not existing.exists() and not overwrite:
                raise WorkbenchError(f"--out {self.path} is a non-empty folder that is not a run; use another path")
            if overwrite and self.path.exists():
                self._clear()
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = dict(manifest, schema_version=SCHEMA_VERSION, status="running", parts=[],
                                 created=time.strftime("%Y-%m-%dT%H:%M:%S"))
            write_manifest(self.path, self.manifest)
        self.already_complete = False

    def _clear(self) -> None:
        import shutil

        for t in TABLES + ("dump_experts", "dump_hidden"):
            shutil.rmtree(self.path / t, ignore_errors=True)
        (self.path / MANIFEST).unlink(missing_ok=True)

    def _drop_orphans(self) -> None:
        """Remove part files a killed capture wrote after its last manifest update."""
        listed = {f for part in self.manifest["parts"] for f in part["files"].values()}
        for f in self.path.glob("*/*.parquet"):
            if str(f.relative_to(self.path)) not in listed:
                f.unlink()
        for f in self.path.glob("*/.*.tmp"):
            f.unlink()

    @property
    def next_batch(self) -> int:
        parts = self.manifest["parts"]
        return parts[-1]["batch_end"] if parts else 0

    @property
    def tokens_done(self) -> int:
        return sum(p["tokens"] for p in self.manifest["parts"])

    def write_part(self, tables: dict[str, pa.Table], batch_end: int, n_tokens: int) -> None:
        idx = self.reserve_part()
        self.commit_part(idx, self.write_part_files(idx, tables), batch_end, n_tokens)

    def reserve_part(self) -> int:
        """The index of the next part; parts may then be written concurrently and committed in order."""
        self._reserved = max(getattr(self, "_reserved", 0), len(self.manifest["parts"]))
        self._reserved += 1
        return self._reserved - 1

    def write_table_file(self, idx: int, name: str, table: pa.Table) -> str:
        """Write (thread-safe) table `name` of part `idx`; nothing lists it until `commit_part`."""
        d = self.path / name
        d.mkdir(exist_ok=True)
        rel = f"{name}/part-{idx:06d}.parquet"
        tmp = d / f".part-{idx:06d}.parquet.tmp"
        flat = [f.name for f in table.schema if not pa.types.is_nested(f.type)]
        # statistics of list columns (logits, dumped vectors) cost a third of the write and serve no filter
        pq.write_table(table, tmp, compression="zstd", use_dictionary=_dictionary_columns(table),
                       write_statistics=flat)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / rel)
        _fsync_dir(d)
        return rel

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
        self.manifest["parts"].append({"index": idx, "batch_end": batch_end, "tokens": n_tokens, "files": files})
        write_manifest(self.path, self.manifest)

    def update(self, **fields) -> None:
        self.manifest.update(fields)
        write_manifest(self.path, self.manifest)

    def finish(self, **fields) -> None:
        self.manifest.update(fields, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_manifest(self.path, self.manifest)


@dataclass
class Run:
    """A captured run: `run.routing`, `run.tokens`, ... are lazy polars frames of the listed parts."""

    path: Path
    manifest: dict

    def files(self, table: str) -> list[Path]:
        return [self.path / p["files"][table] for p in self.manifest["parts"] if table in p["files"]]

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
                f"tokens={sum(p['tokens'] for p in m['parts'])}, tables={tables})")


def open_run(path: str | Path) -> Run:
    """Open a run folder (complete or not: a killed capture is readable up to its last part)."""
    p = Path(path)
    if not p.is_dir():
        raise WorkbenchError(f"run folder {path} does not exist")
    return Run(p, read_manifest(p))
