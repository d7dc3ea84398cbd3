"""The capture pipeline: named stages every capture schedule shares.

    texts -> iter_sequences (tokenise, pack) -> batch_context (pad, copy to the device)
          -> ProbePipeline (probes see the forward; one async device->host copy per tensor a batch)
          -> PartWriter (host arrays -> Arrow tables -> Parquet parts, on threads)
          -> a PartSink (the run store's RunWriter, or one data-parallel rank's files)

`capture.py` decides what to capture and which schedule runs the batches (one process, data-parallel
ranks, layer-major); this module knows nothing of schedules. `run_batches` is the one batch loop: host
work (tokenising, padding, pinned input copies) runs a few batches ahead on a worker thread, so the thread
that launches the GPU's kernels only calls the model between two batches.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch

from .data import Dataset
from .errors import WorkbenchError, WorkbenchWarning
from .probes.base import BatchContext, BatchMeta

__all__ = ["Sequence", "CutDocuments", "iter_sequences", "build_sequences", "labels_table", "TokenDecoder", "PartSink",
           "PartWriter", "ProbePipeline", "attached", "to_device", "batch_context", "run_batches",
           "progress_bar", "versions"]


# ------------------------------------------------------------------------------------------ sequences

@dataclass
class Sequence:
    doc_id: int
    ids: np.ndarray  # int32 token ids
    src: np.ndarray  # int32 index of the source record of each token


class CutDocuments:
    """Documents cut to the context, counted while the stream is read (said once, at the end)."""

    def __init__(self) -> None:
        self.docs = self.dropped = self.total_docs = self.total_tokens = 0
        self.name, self.max_len = "", 0

    def warn(self) -> None:
        name, max_len = self.name, self.max_len
        if self.docs:  # said out loud, with counts: a silent cut changes what the run measures
            warnings.warn(f"{self.docs} of {self.total_docs} documents of {name} are longer than the model's "
                          f"context of {max_len} tokens and were cut ({self.dropped:,} of {self.total_tokens:,} tokens "
                          f"dropped); pass --seq-len {max_len} to capture them whole, packed into {max_len}-token "
                          "sequences",
                          WorkbenchWarning, stacklevel=4)


def _encoded(texts: list[str], tokenizer, chunk_chars: int) -> Iterator[tuple[int, list[int]]]:
    """(record index, token ids) in order, tokenising ~chunk_chars characters at a time (a fast tokenizer
    encodes a list in parallel; each text is encoded on its own, so chunking changes no id)."""
    i = 0
    while i < len(texts):
        j, n = i, 0
        while j < len(texts) and (j == i or n < chunk_chars):
            n += len(texts[j])
            j += 1
        for k, ids in enumerate(tokenizer(texts[i:j], add_special_tokens=False)["input_ids"]):
            yield i + k, ids
        i = j


def iter_sequences(ds: Dataset, tokenizer, seq_len: int | None = None, max_tokens: int | None = None,
                   max_len: int = 2048, chunk_chars: int = 1 << 18,
                   cut: CutDocuments | None = None) -> Iterator[Sequence]:
    """`build_sequences`, one sequence at a time: tokenises as it goes, so a capture's first forward does
    not wait for the whole data set. Documents cut to `max_len` are warned about once the stream ends, or,
    given `cut`, only counted there (a stream read on a worker thread leaves the warning to its caller)."""
    texts = [r["text"] for r in ds.records]
    budget = max_tokens if max_tokens is not None else float("inf")
    any_seq = False
    if seq_len is None:
        counts = cut if cut is not None else CutDocuments()
        counts.name, counts.max_len = ds.name, max_len
        for i, ids in _encoded(texts, tokenizer, chunk_chars):
            counts.total_docs += 1
            counts.total_tokens += len(ids)
            if len(ids) > max_len:
                counts.docs += 1
                counts.dropped += len(ids) - max_len
            if budget <= 0:
                continue  # keep counting: the warning speaks of the whole data set, as it always did
            a = np.asarray(ids[:max_len], np.int32)
            if len(a) > budget:
                a = a[: int(budget)]
            if len(a) == 0:
                continue
            any_seq = True
            yield Sequence(i, a, np.full(len(a), i, np.int32))
            budget -= len(a)
        if cut is None:
            counts.warn()
    else:
        eos = tokenizer.eos_token_id
        tail_ids, tail_src = np.zeros(0, np.int32), np.zeros(0, np.int32)  # the stream not yet cut into sequences
        j = 0
        taken = 0
        pieces, srcs, held = [], [], 0
        for i, ids in _encoded(texts, tokenizer, chunk_chars):
            piece = np.asarray(list(ids) + ([eos] if eos is not None else []), np.int32)
            pieces.append(piece)
            srcs.append(np.full(len(piece), i, np.int32))
            taken += len(piece)
            held += len(piece)
            if taken >= budget:
                break
            if held >= 8 * seq_len:  # cut what we have into sequences
                tail_ids = np.concatenate([tail_ids, *pieces])
                tail_src = np.concatenate([tail_src, *srcs])
                pieces, srcs, held = [], [], 0
                whole = len(tail_ids) // seq_len * seq_len
                for start in range(0, whole, seq_len):
                    any_seq = True
                    yield Sequence(j, tail_ids[start:start + seq_len], tail_src[start:start + seq_len])
                    j += 1
                tail_ids, tail_src = tail_ids[whole:], tail_src[whole:]
        tail_ids = np.concatenate([tail_ids, *pieces])
        tail_src = np.concatenate([tail_src, *srcs])
        if taken > budget:  # the budget counts from the stream's start
            keep = len(tail_ids) - int(taken - budget)
            tail_ids, tail_src = tail_ids[:keep], tail_src[:keep]
        for start in range(0, len(tail_ids), seq_len):
            any_seq = True
            yield Sequence(j, tail_ids[start:start + seq_len], tail_src[start:start + seq_len])
            j += 1
    if not any_seq:
        raise WorkbenchError(f"dataset {ds.name} produced no tokens")


def build_sequences(ds: Dataset, tokenizer, seq_len: int | None = None, max_tokens: int | None = None,
                    max_len: int = 2048) -> list[Sequence]:
    """One sequence per record (truncated to max_len), or the token stream packed into seq_len chunks."""
    return list(iter_sequences(ds, tokenizer, seq_len=seq_len, max_tokens=max_tokens, max_len=max_len))


def labels_table(ds: Dataset, seq_len: int | None = None) -> pa.Table:
    """A record's label columns (and `src_doc` when sequences are packed), indexed by record."""
    rows = [{k: v for k, v in r.items() if k != "text"} for r in ds.records]
    labels = pa.Table.from_pylist(rows) if any(rows) else pa.table({})
    if seq_len:
        src = pa.array(np.arange(len(ds.records)), pa.int64())
        labels = labels.append_column("src_doc", src) if labels.num_columns else pa.table({"src_doc": src})
    return labels


# ------------------------------------------------------------------------------------------ batches

def to_device(arr: np.ndarray, device) -> torch.Tensor:
    """Host -> device without a pageable copy: that one waits for the GPU queue to drain, which would
    expose the CPU time between two forwards once per batch."""
    t = torch.from_numpy(arr)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pad_batch(seqs, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad sequences (anything with `.ids` and `.doc_id`) as capture batches them, on the host:
    (input ids [B, S], attention mask [B, S], lengths [B], doc [Tv], pos [Tv]) for the Tv valid tokens."""
    lengths = np.array([len(s.ids) for s in seqs])
    S = int(lengths.max())
    ids = np.full((len(seqs), S), pad_id, np.int64)
    mask = np.zeros((len(seqs), S), np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = s.ids
        mask[b, : len(s.ids)] = 1
    doc = np.repeat(np.array([s.doc_id for s in seqs], np.int64), lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    return ids, mask, lengths, doc, pos


def batch_context(seqs: list[Sequence], pad_id: int, device) -> tuple[BatchContext, np.ndarray, np.ndarray, np.ndarray]:
    """The padded batch on `device` plus its host-side rows: (ctx, token ids, source records, lengths)."""
    ids, mask, lengths, doc, pos = pad_batch(seqs, pad_id)
    flat_valid = np.flatnonzero(mask.reshape(-1))
    ctx = BatchContext(input_ids=to_device(ids, device), attention_mask=to_device(mask, device),
                       valid=to_device(flat_valid, device), doc_ids=np.array([s.doc_id for s in seqs]),
                       pos=pos, doc=doc)
    ctx.extra["all_valid"] = len(flat_valid) == ids.size  # no padding: probes may skip the valid-row gather
    token_ids = np.concatenate([s.ids for s in seqs]).astype(np.int32)
    src = np.concatenate([s.src for s in seqs]).astype(np.int32)
    return ctx, token_ids, src, lengths


def batched(seqs: Iterable[Sequence], batch_size: int) -> Iterator[list[Sequence]]:
    cur: list[Sequence] = []
    for s in seqs:
        cur.append(s)
        if len(cur) == batch_size:
            yield cur
            cur = []
    if cur:
        yield cur


class _Ahead:
    """Runs an iterator on a worker thread, `depth` items ahead (tokenising, padding and the pinned
    input copies then overlap the GPU's work on earlier batches). Errors surface on the consumer."""

    _END = object()

    def __init__(self, it: Iterator, depth: int = 3):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(it,), daemon=True, name="wb-batches")
        self.thread.start()

    def _loop(self, it) -> None:
        try:
            for x in it:
                while not self.stop.is_set():
                    try:
                        self.q.put((x, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.q.put((self._END, None))
        except BaseException as e:  # raised where the batch is wanted
            self.q.put((self._END, e))

    def __iter__(self):
        while True:
            x, err = self.q.get()
            if x is self._END:
                if err is not None:
                    raise err
                return
            yield x

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.q.get_nowait()
        self.thread.join(timeout=10)


# The forward waits for the device once per batch (transformers checks the attention mask's contents), and
# then the launching thread must get the GIL back from the writer and batch threads: at Python's default 5 ms
# switch interval that wait is ~1% of a batch. Lowered while a GPU capture runs; None leaves it alone.
SWITCH_INTERVAL: float | None = 0.0005


def run_batches(pipe: ProbePipeline, batches: Iterable[tuple[int, list[Sequence]]], pad: int, bar,
                ahead: bool = True) -> int:
    """The batch loop of every one-batch-at-a-time schedule: `batches` yields (the batch count the sink
    records once this batch is in, sequences); the last batch is marked final (the writer flushes its part).
    Returns the number of batches run.

    With `ahead`, batches are built (tokenised, padded, copied to the device) a few ahead on a worker
    thread, so between two forwards the main thread only hands the last one to the writer."""
    dev = pipe.mm.device
    built = ((bi, *batch_context(seqs, pad, dev)) for bi, seqs in batches)
    src = _Ahead(built) if ahead else None
    it = iter(src if src is not None else built)
    n = 0
    switch = sys.getswitchinterval()
    if pipe.cuda and SWITCH_INTERVAL:
        sys.setswitchinterval(min(switch, SWITCH_INTERVAL))
    try:
        cur = next(it, None)
        while cur is not None:
            batch_end, ctx, token_ids, srcs, lengths = cur
            pipe.begin(ctx)
            pipe.mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
            nxt = next(it, None)  # built ahead: here only to know whether this batch is the last
            pipe.end(ctx, token_ids, srcs, batch_end, lengths, final=nxt is None)
            bar.update(len(token_ids))
            n += 1
            cur = nxt
    finally:
        sys.setswitchinterval(switch)
        if src is not None:
            src.close()
    return n


# ------------------------------------------------------------------------------------------ writing

class TokenDecoder:
    """token id -> display string, cached (decoding one id at a time is slow for big vocabularies)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> pa.Array:
        uniq, inv = np.unique(ids, return_inverse=True)
        strs = []
        for u in uniq.tolist():
            s = self.cache.get(u)
            if s is None:
                s = self.cache[u] = self.tok.decode([u])
            strs.append(s)
        return pa.array(strs, pa.string()).take(pa.array(inv.reshape(-1)))


@runtime_checkable
class PartSink(Protocol):
    """Where a PartWriter's parts go: the run store's `RunWriter`, or one data-parallel rank's writer.

    Parts are reserved in order, their table files written concurrently, then committed in order."""

    @property
    def next_batch(self) -> int: ...

    @property
    def tokens_done(self) -> int: ...

    def reserve_part(self) -> int: ...

    def write_table_file(self, idx: int, name: str, table: pa.Table) -> str: ...

    def commit_part(self, idx: int, files: dict[str, str], batch_end: int, n_tokens: int) -> None: ...

    def discard_uncommitted(self) -> None: ...

    def release(self) -> None: ...


def _lower_priority() -> None:
    """Encoder threads yield the CPU to the main thread, whose kernel launches keep the GPU busy."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class PartWriter:
    """Background thread: host arrays -> Arrow tables -> a Parquet part every `part_tokens` tokens."""

    def __init__(self, sink: PartSink, probes, decoder: TokenDecoder, labels: pa.Table | None, part_tokens: int):
        self.writer, self.probes, self.decoder, self.labels = sink, probes, decoder, labels
        self.part_tokens = part_tokens
        self.q: queue.Queue = queue.Queue(maxsize=4)  # bounds host memory
        self.buf: list[tuple[int, int, dict[str, pa.Table]]] = []  # (batch_end, tokens, tables) a batch
        self.buf_tokens = 0
        self.error: BaseException | None = None
        workers = max(1, min(8, ((os.cpu_count() or 2) - 2) // 2))  # leave cores to the thread launching kernels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wb-parquet",
                                       initializer=_lower_priority)
        self.pending: list[tuple] = []
        self.max_pending = workers  # parts in flight: bounds host memory with the queue below
        self.blocked_s = 0.0
        self.thread = threading.Thread(target=self._loop, daemon=True, name="wb-writer")
        self.thread.start()

    def put(self, item) -> None:
        if self.error:
            raise self.error
        t = time.perf_counter()
        self.q.put(item)
        self.blocked_s += time.perf_counter() - t  # the forward loop waiting on the writer

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            if self.error:
                continue
            try:
                self._process(*item)
            except BaseException as e:  # surfaced on the main thread
                self.error = e

    def _process(self, event, arrays, meta, token_ids, src, batch_end, final_flag) -> None:
        if event is not None:
            event.synchronize()
        tables: dict[str, pa.Table] = {}
        for probe, arrs in zip(self.probes, arrays):
            host = {k: v.numpy() for k, v in arrs.items()}
            tables.update(probe.to_table(host, meta))
        cols = {"doc_id": pa.array(meta.doc, pa.int64()), "pos": pa.array(meta.pos, pa.int32()),
                "token_id": pa.array(token_ids, pa.int32()), "token": self.decoder(token_ids),
                "phase": pa.array([meta.phase] * len(token_ids), pa.string())}
        tok = pa.table(cols)
        if self.labels is not None and self.labels.num_columns:
            lab = self.labels.take(pa.array(src))
            for name in lab.column_names:
                if name not in cols:
                    tok = tok.append_column(name, lab.column(name))
        tables["tokens"] = tok
        self.buf.append((batch_end, len(token_ids), tables))
        self.buf_tokens += len(token_ids)
        if final_flag:
            self.flush(split=True)
        elif self.buf_tokens >= self.part_tokens:
            self.flush()

    def flush(self, split: bool = False) -> None:
        """Hand the buffered part to an encoder thread; commit finished parts in order.

        Parquet encoding (zstd, nested lists) is the slowest step of capture: 2M expert_stats rows
        or 16M logits a batch take one core longer than the forward itself. Arrow releases the GIL,
        so parts encode side by side on a few cores while the manifest still lists them in order.
        With `split` (the capture's last part, whose encoding no forward overlaps), its batches become up
        to one part per encoder thread, so the wait after the last forward is one batch's encoding, not a
        whole part's (the run lists the same rows; only its last parts are smaller).
        """
        if not self.buf_tokens:
            return
        groups = [self.buf]
        if split and len(self.buf) > 1 and self.max_pending > 1:
            k = min(len(self.buf), self.max_pending)
            bounds = np.linspace(0, len(self.buf), k + 1).round().astype(int)
            groups = [self.buf[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for group in groups:
            names = list(dict.fromkeys(n for _, _, ts in group for n in ts))
            tables = {n: pa.concat_tables([ts[n] for _, _, ts in group if n in ts], promote_options="default")
                      for n in names}
            idx = self.writer.reserve_part()
            futs = {n: self.pool.submit(self.writer.write_table_file, idx, n, t) for n, t in tables.items()}
            self.pending.append((idx, futs, group[-1][0], sum(n for _, n, _ in group)))
        self.buf, self.buf_tokens = [], 0
        self._commit(keep=self.max_pending)

    def _commit(self, keep: int) -> None:
        while self.pending and (len(self.pending) > keep or all(f.done() for f in self.pending[0][1].values())):
            idx, futs, batch_end, n_tokens = self.pending.pop(0)
            self.writer.commit_part(idx, {name: f.result() for name, f in futs.items()}, batch_end, n_tokens)

    def close(self) -> None:
        """Drain: the last batches become tables and parts, every part is committed."""
        self.q.put(None)
        self.thread.join()
        try:
            if self.error:
                raise self.error
            self.flush()
            self._commit(keep=0)
        finally:
            self.pool.shutdown(wait=True)

    def abandon(self) -> None:
        """After a failure: stop without committing more; part files never listed are removed."""
        self.q.put(None)
        self.thread.join(timeout=60)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.writer.discard_uncommitted()  # parts written but never listed: nothing half-done stays
        self.writer.release()


@contextlib.contextmanager
def attached(mm, probe_list, writer: PartWriter, bar):
    """Probes on for the block; on success the writer drains and commits its last parts, on any
    failure (Ctrl-C included) it stops without committing more, so the run stays resumable."""
    try:
        for p in probe_list:
            p.attach(mm)
        yield
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    finally:
        for p in probe_list:
            p.detach()
        bar.close()


class ProbePipeline:
    """Probes + async device->host copies + the writer; used by every capture schedule and generation."""

    def __init__(self, mm, probes, writer: PartWriter):
        self.mm, self.probes, self.writer = mm, probes, writer
        self.cuda = mm.device.type == "cuda"
        # device->host copies on their own stream: they overlap the next forward instead of queueing behind it
        self.copy_stream = torch.cuda.Stream(device=mm.device) if self.cuda else None

    def begin(self, ctx: BatchContext) -> None:
        for p in self.probes:
            p.begin(ctx)

    def end(self, ctx: BatchContext, token_ids: np.ndarray, src: np.ndarray, batch_end: int, lengths: np.ndarray,
            final: bool = False) -> None:
        """After the forward: start each probe's device->host copies (pinned, no wait) and queue the batch."""
        arrays = []
        harvested = []
        for p in self.probes:
            harvested.append(p.harvest())
            p.ctx = None
        event = None
        if self.cuda:
            cs = self.copy_stream
            cs.wait_stream(torch.cuda.current_stream(self.mm.device))  # the forward's results are ready
            with torch.cuda.stream(cs):
                for dev in harvested:
                    host = {}
                    for k, t in dev.items():
                        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                        h.copy_(t, non_blocking=True)
                        if t.device.type == "cuda":
                            t.record_stream(cs)  # its memory is not reused before the copy is done
                        host[k] = h
                    arrays.append(host)
                event = torch.cuda.Event()
                event.record(cs)
        else:
            arrays = [{k: t.detach() for k, t in dev.items()} for dev in harvested]
        meta = BatchMeta(doc=ctx.doc, pos=ctx.pos, doc_ids=ctx.doc_ids, lengths=lengths, phase=ctx.phase)
        self.writer.put((event, arrays, meta, token_ids, src, batch_end, final))


# ------------------------------------------------------------------------------------------ misc

def progress_bar(total, initial, enabled, desc, unit="tok"):
    """`unit` names what `total` counts (tokens for captures, prompts for generation)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


def versions() -> dict:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "workbench": _own_version()}


def _own_version() -> str:
    try:
        from importlib.metadata import version

        return version("moe-workbench")
    except Exception:
        return "dev"
