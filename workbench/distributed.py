"""Data-parallel capture under `torchrun` / `accelerate launch` (torch.distributed; no launcher of ours).

Every rank loads the whole model (on `cuda:LOCAL_RANK`, or the CPU) and captures its own share of the
batches into the one run folder:

- Split: the batches not yet in the run, in order, dealt round-robin (`todo[rank::world]`). Batches
  are a pure function of (data, settings), so every rank computes the same list without talking.
- Parts: each rank writes its own part files (`part-NNNNNN`, indices `base + rank + world * k`, so
  ranks never collide), fsynced and renamed as in a single-process capture, and lists each finished
  part in its own `ranks/rank-R.json` (atomic rename). A part records the global batches it holds.
- Manifest: rank 0 is its only writer. Whenever rank 0 commits a part it merges every rank file into
  `manifest.json` (atomic rename); at the end, after a barrier, it merges once more and marks the run
  complete. A reader therefore always sees a valid manifest listing only whole parts.
- Resume (any world size, 1 included): rank 0 first folds the rank files of the killed attempt into
  the manifest, then the usual resume drops unlisted files; the batches listed nowhere are dealt anew.
  The rows equal those of one uninterrupted process: same batches, same padding, same model.

The process group (gloo: only a few small control messages travel) is created here when the launcher's
environment (`WORLD_SIZE` > 1) asks for one and none exists yet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch

from .errors import WorkbenchError
from .pipeline import run_batches
from .safefs import remove_file, remove_tree
from .store import MANIFEST, PartFiles, RunWriter, atomic_write_bytes, lock_run, read_manifest, write_manifest

RANKS_DIR = "ranks"
_RANK_FILE = re.compile(r"^\.?rank-\d+\.json(\.tmp)?$")


def _drop_ranks(path: Path) -> None:
    """Remove the ranks/ folder: only the rank files it holds, never through a link (workbench.safefs)."""
    remove_tree(path, RANKS_DIR, keep=lambda n: not _RANK_FILE.match(n))


def world() -> tuple[int, int]:
    """(rank, world size) from an initialised process group, else from the launcher's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_device(device: str | None) -> str | None:
    """Under a launcher with GPUs, each rank takes its own (cuda:LOCAL_RANK); else `device` unchanged."""
    _, ws = world()
    if ws > 1 and torch.cuda.is_available() and (device is None or device == "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def wanted(out) -> bool:
    """Data-parallel path: under a launcher, or to resume a run a launcher started."""
    if world()[1] > 1:
        return True
    with contextlib.suppress(Exception):
        return "distributed" in read_manifest(out, validate=False)
    return False


def _init() -> tuple[int, int]:
    rank, ws = world()
    if ws > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="gloo")
        rank, ws = world()
    return rank, ws


def _bcast(obj, rank: int, ws: int):
    if ws == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier(ws: int) -> None:
    if ws > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------- manifest merge

def _rank_files(path: Path) -> list[Path]:
    d = path / RANKS_DIR
    return sorted(d.glob("rank-*.json")) if d.is_dir() else []


def _rank_parts(path: Path) -> list[dict]:
    parts = []
    for f in _rank_files(path):
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            parts.extend(json.loads(f.read_text())["parts"])
    return parts


def merged_parts(base: list[dict], extra: list[dict]) -> list[dict]:
    """base + extra without duplicates (a part is its files), ordered by first batch."""
    seen, out = set(), []
    for p in base + extra:
        key = tuple(sorted(p["files"].values()))
        if key not in seen:
            seen.add(key)
            out.append(p)
    return sorted(out, key=lambda p: (_batches(p)[0] if _batches(p) else p["batch_end"], p["index"]))


def _batches(part: dict) -> list[int]:
    return part.get("batches") or []


def done_batches(parts: list[dict]) -> set[int]:
    """Batches a run already holds; parts of a single-process capture hold 0 .. batch_end-1."""
    done: set[int] = set()
    for p in parts:
        done.update(p["batches"] if "batches" in p else range(p["batch_end"]))
    return done


def fold_rank_files(path: Path) -> None:
    """Resume: list the parts a killed attempt's ranks finished, then forget their rank files."""
    if not (path / MANIFEST).exists() or not _rank_files(path):
        return
    lock = lock_run(path)
    try:
        m = read_manifest(path)
        m["parts"] = merged_parts(m["parts"], _rank_parts(path))
        write_manifest(path, m)
        _drop_ranks(path)
    finally:
        lock.close()


# ------------------------------------------------------------------------------------------ writer

class RankWriter:
    """One rank's part sink (`pipeline.PartSink`): its own part files and rank file; rank 0 also merges
    every rank file into the manifest.

    `batch_end` from the writer counts this rank's own batches (`mine`); parts record global ids."""

    def __init__(self, path: Path, rank: int, ws: int, base: int, mine: list[int], run: RunWriter | None):
        self.path, self.rank, self.ws, self.base, self.mine, self.run = path, rank, ws, base, mine, run
        self.parts: list[dict] = []
        self.k = 0
        self.start = 0
        self._reserved: list[int] = []
        (path / RANKS_DIR).mkdir(exist_ok=True)
        self.file = path / RANKS_DIR / f"rank-{rank}.json"
        self._files = run if run is not None else PartFiles(path)  # checksummed part files, as the store writes them

    next_batch = 0

    @property
    def tokens_done(self) -> int:
        return 0

    def reserve_part(self) -> int:
        idx = self.base + self.rank + self.ws * self.k
        self.k += 1
        self._reserved.append(idx)
        return idx

    def write_table_file(self, idx: int, name: str, table) -> str:
        return self._files.write_table_file(idx, name, table)

    def commit_part(self, idx: int, files: dict[str, str], batch_end: int, n_tokens: int) -> None:
        batches = self.mine[self.start:batch_end]
        self.start = batch_end
        part = {"index": idx, "batch_end": batches[-1] + 1, "batches": batches, "tokens": n_tokens,
                "files": files, "rank": self.rank}
        part.update(self._files.take_checksums(files))
        self.parts.append(part)
        self._reserved.remove(idx)
        atomic_write_bytes(self.file, json.dumps({"rank": self.rank, "parts": self.parts}).encode())
        if self.run is not None:  # rank 0: the manifest's only writer
            self.merge()

    def merge(self, **fields) -> None:
        m = self.run.manifest
        m["parts"] = merged_parts(m["parts"], _rank_parts(self.path))
        m.update(fields)
        write_manifest(self.path, m)

    def discard_uncommitted(self) -> None:
        for idx in self._reserved:
            for f in [*self.path.glob(f"*/part-{idx:06d}.parquet"), *self.path.glob(f"*/.part-{idx:06d}.parquet.tmp")]:
                remove_file(self.path, f.relative_to(self.path))  # never through a linked folder
        self._reserved.clear()

    def release(self) -> None:
        if self.run is not None:
            self.run.release()


# ------------------------------------------------------------------------------------------ schedule

class DataParallel:
    """Capture schedule under a launcher: this rank runs its share of the batches not yet in the run
    (round-robin), into its own parts; rank 0 keeps the manifest (see the module's docstring)."""

    materialize = True  # every rank needs the whole batch list to take its share

    def __init__(self, mm):
        if mm.layerwise:
            raise WorkbenchError("--layerwise runs in one process; under torchrun / accelerate launch use "
                                 "--device-map, or one --layerwise capture per machine")
        self.rank, self.ws = _init()
        self.store: RunWriter | None = None
        self.sink: RankWriter | None = None

    def describe(self, path) -> str:
        return f"capture {Path(path).name} (rank {self.rank}/{self.ws})"

    def open(self, out, manifest: dict, resume: bool, overwrite: bool) -> RankWriter | None:
        """Rank 0 opens the run (folding a killed attempt's rank files on resume) and tells every rank
        which batches are done; None when the run is already complete."""
        rank, ws, path = self.rank, self.ws, Path(out)
        manifest = dict(manifest, distributed={"world_size": ws, "backend": "gloo", "split": "round-robin"})
        state: dict = {}
        if rank == 0:
            try:
                if resume:
                    fold_rank_files(path)
                self.store = RunWriter(path, manifest, resume=resume, overwrite=overwrite)
                if self.store.already_complete:
                    state = {"complete": True}
                else:
                    self.store.clear_previous()  # overwrite: clear the old run before any rank writes
                    _drop_ranks(path)
                    self.store.manifest["distributed"] = manifest["distributed"]
                    write_manifest(path, self.store.manifest)
                    parts = self.store.manifest["parts"]
                    state = {"done": sorted(done_batches(parts)),
                             "base": max([p["index"] for p in parts], default=-1) + 1}
            except WorkbenchError as e:
                state = {"error": str(e), "kind": type(e).__name__}
        state = _bcast(state, rank, ws)
        if "error" in state:
            if self.store is not None:
                self.store.release()
            raise WorkbenchError(state["error"])
        if state.get("complete"):
            _barrier(ws)
            return None
        self.done = set(state["done"])
        self.sink = RankWriter(path, rank, ws, state["base"], [], self.store)
        return self.sink

    def plan(self, batches: list) -> tuple[list, int]:
        """(batch count the sink records, sequences) of this rank's share, and its tokens."""
        self.n_batches = len(batches)
        todo = [b for b in range(len(batches)) if b not in self.done]
        self.sink.mine = todo[self.rank::self.ws]
        return ([(li + 1, batches[bi]) for li, bi in enumerate(self.sink.mine)],
                sum(len(s.ids) for b in self.sink.mine for s in batches[b]))

    def run(self, pipe, todo, pad, bar) -> None:
        run_batches(pipe, todo, pad, bar)

    def finish(self, writer) -> None:
        _barrier(self.ws)  # every rank's parts are listed in its rank file
        if self.rank == 0:
            self.sink.merge()
            missing = set(range(self.n_batches)) - done_batches(self.store.manifest["parts"])
            if missing:
                raise WorkbenchError(f"batches {sorted(missing)[:5]} were captured by no rank; run again with --resume")
            self.store.finish(writer_wait_s=round(writer.blocked_s, 3))
            _drop_ranks(self.sink.path)
        _barrier(self.ws)


def shard_tokens(parts: list[dict]) -> dict[int, int]:
    """Tokens each rank captured (for reports and benchmarks)."""
    out: dict[int, int] = {}
    for p in parts:
        r = int(p.get("rank", 0))
        out[r] = out.get(r, 0) + int(p["tokens"])
    return dict(sorted(out.items()))
