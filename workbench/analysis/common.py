"""Shared readers: routing as dense numpy arrays, the layout every fast analysis wants."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from ..errors import WorkbenchError


@dataclass
class RoutingArrays:
    """Routing of a run, token-major: one row per (doc, pos), one column block per MoE layer.

    experts[t, l, k] is the k-th expert (model's order) token t chose in MoE layer layers[l].
    """

    doc: np.ndarray  # [T] int64
    pos: np.ndarray  # [T] int32
    layers: list[int]
    experts: np.ndarray  # [T, L, K] int16
    weights: np.ndarray  # [T, L, K] float32
    n_experts: int

    @property
    def doc_bounds(self) -> np.ndarray:
        """Start offsets of each document's rows, plus the end (rows are sorted by doc, pos)."""
        change = np.flatnonzero(np.diff(self.doc)) + 1
        return np.concatenate([[0], change, [len(self.doc)]])


def nonfinite_note(run, n: int, where: str) -> str:
    """One sentence about routing weights that are NaN or infinite (a diverged model or a damaged import):
    said once per run and process, so sums and means that come out NaN/inf do not do so silently."""
    import sys

    msg = (f"note: run {run.path} holds {n} NaN or infinite routing weight(s) ({where}); expert counts are "
           "unaffected, weight sums and means that include them are NaN or inf")
    key = (str(run.path), run.manifest.get("created"))
    if key not in _NONFINITE_SAID:
        _NONFINITE_SAID.add(key)
        print(msg, file=sys.stderr)
    return msg


_NONFINITE_SAID: set = set()


def weights_note(run) -> str | None:
    """None when the run's routing carries weights; otherwise one sentence naming where it came from
    (serving engines record expert ids only, so an imported run's `weights` are null)."""
    probe = ((run.manifest.get("probes") or {}).get("routing") or {})
    if probe.get("weights", True) is not False:
        return None
    src = run.manifest.get("source")
    return f"run {run.path.name} has no routing weights" + (f" (imported from {src})" if src else "")


def routing_arrays(run, phase: str | None = None, docs=None) -> RoutingArrays:
    """Load `routing/` into dense arrays sorted by (doc_id, pos); optional phase / doc filter."""
    lf = run.routing
    if phase is not None:
        keep = run.tokens.filter(pl.col("phase") == phase).select("doc_id", "pos")
        lf = lf.join(keep, on=["doc_id", "pos"], how="semi")
    if docs is not None:
        lf = lf.filter(pl.col("doc_id").is_in(list(docs)))
    df = lf.select("doc_id", "pos", "layer", "experts", "weights").sort("doc_id", "pos", "layer").collect()
    layers = sorted(run.moe_layers)
    nl = len(layers)
    if df.height == 0:
        raise WorkbenchError(f"run {run.path} has no routing rows")
    if df.height % nl:
        raise WorkbenchError(f"run {run.path}: routing rows are not a whole number of tokens x {nl} layers")
    t = df.height // nl
    k = run.top_k
    ex = df["experts"].list.to_array(k).to_numpy().reshape(t, nl, k).astype(np.int16)
    w = df["weights"].list.to_array(k).to_numpy().reshape(t, nl, k).astype(np.float32)
    bad = int(w.size - np.isfinite(w).sum())
    if bad and not np.isnan(w).all():  # all-NaN: an imported run without weights (weights_note says so)
        nonfinite_note(run, bad, "in its routing table")
    doc = df["doc_id"].to_numpy()[::nl]
    pos = df["pos"].to_numpy()[::nl]
    return RoutingArrays(doc=doc, pos=pos, layers=layers, experts=ex, weights=w, n_experts=run.n_experts)


def doc_labels(run, columns, phase: str | None = None) -> pl.DataFrame:
    """One row per document: doc_id, n_tokens, and each label column's value on the doc's first token.

    Labels come per record, so every token of a document carries the same value; packed runs
    (`--seq-len`) can mix records in one sequence, and then the first token decides.
    """
    columns = [columns] if isinstance(columns, str) else list(columns)
    lf = run.tokens
    have = lf.collect_schema().names()
    missing = [c for c in columns if c not in have]
    if missing:
        labels = ", ".join(c for c in have if c not in ("doc_id", "pos", "token_id", "token", "phase")) or "none"
        raise WorkbenchError(f"run {run.path} has no label column {missing[0]!r} (labels: {labels})")
    if phase is not None:
        lf = lf.filter(pl.col("phase") == phase)
    return (lf.sort("doc_id", "pos").group_by("doc_id", maintain_order=True)
            .agg(pl.len().alias("n_tokens"), *[pl.col(c).first() for c in columns]).collect())


def doc_token_ids(run, docs=None, phase: str | None = "prefill") -> dict[int, np.ndarray]:
    """doc_id -> the document's token ids in position order (what a loop re-feeds to a model)."""
    lf = run.tokens
    if phase is not None:
        lf = lf.filter(pl.col("phase") == phase)
    if docs is not None:
        lf = lf.filter(pl.col("doc_id").is_in([int(d) for d in docs]))
    df = lf.select("doc_id", "pos", "token_id").sort("doc_id", "pos").collect()
    out = {}
    for d, ids in df.group_by("doc_id", maintain_order=True).agg(pl.col("token_id")).iter_rows():
        out[int(d)] = np.asarray(ids, np.int64)
    return out


# --------------------------------------------------------------------------------------------------
# Streaming: routing in bounded chunks. Every analysis reads through this, so peak memory follows the
# chunk size (tokens per chunk), not the run.

DEFAULT_CHUNK_TOKENS = 1 << 18  # 262,144 tokens: ~0.2 GB of routing arrays at 16 layers x top-8
_chunk_tokens: int | None = None


def chunk_tokens_setting() -> int | None:
    """What set_chunk_tokens set (None: the default), so a caller can put it back."""
    return _chunk_tokens


def set_chunk_tokens(n: int | None) -> None:
    """Tokens per chunk for every streaming analysis in this process (None: back to the default).

    Also settable with the environment variable WORKBENCH_CHUNK_TOKENS."""
    global _chunk_tokens
    if n is not None and int(n) < 1:
        raise WorkbenchError("the chunk size must be at least 1 token")
    _chunk_tokens = None if n is None else int(n)


def chunk_tokens(n: int | None = None) -> int:
    """The chunk size in effect: the argument, else set_chunk_tokens, else $WORKBENCH_CHUNK_TOKENS."""
    import os

    if n is None:
        n = _chunk_tokens
    if n is None:
        env = os.environ.get("WORKBENCH_CHUNK_TOKENS")
        try:
            n = int(float(env)) if env else DEFAULT_CHUNK_TOKENS
        except ValueError:
            raise WorkbenchError(f"WORKBENCH_CHUNK_TOKENS={env!r} is not a number of tokens") from None
    if int(n) < 1:
        raise WorkbenchError("the chunk size must be at least 1 token")
    return int(n)


_progress_sink = __import__("threading").local()


class report_progress:
    """While active in this thread, streaming readers call `callback(desc, done, total, chunks)` after each
    chunk (done/total in the reader's unit: tokens or rows; chunks read so far). The dashboard shows it
    while a first computation runs.

        with report_progress(lambda desc, done, total, chunks: print(desc, done / total)):
            stats.analyze(run)
    """

    def __init__(self, callback):
        self.callback = callback

    def __enter__(self):
        self._prev = getattr(_progress_sink, "cb", None)
        _progress_sink.cb = self.callback
        return self

    def __exit__(self, *exc):
        _progress_sink.cb = self._prev
        return False


def progress_update(desc: str, done: int, total: int, chunks: int) -> None:
    """Tell the active report_progress callback (if any) how far a streaming pass is."""
    cb = getattr(_progress_sink, "cb", None)
    if cb is not None:
        try:
            cb(desc, int(done), int(total), int(chunks))
        except Exception:  # a display callback must never break an analysis
            pass


@dataclass
class RoutingChunk:
    """One chunk of routing (rows sorted by doc_id, pos) and the tokens/ columns asked for, row-aligned."""

    ra: RoutingArrays
    tokens: pl.DataFrame | None


def _part_tokens(run, part: dict, columns, phase) -> pl.DataFrame | None:
    f = part["files"].get("tokens")
    if f is None:
        return None
    cols = ["doc_id", "pos"] + [c for c in columns if c not in ("doc_id", "pos")]
    if phase is not None and "phase" not in cols:
        cols.append("phase")
    df = pl.read_parquet(run.path / f, columns=cols)
    if phase is not None:
        df = df.filter(pl.col("phase") == phase)
    return df.unique(["doc_id", "pos"], keep="first", maintain_order=True)


def _sorted_rows(doc, pos, lay) -> bool:
    """Rows already in (doc_id, pos, layer) order (non-decreasing)."""
    if len(doc) < 2:
        return True
    dd, dp, dl = np.diff(doc), np.diff(pos.astype(np.int64)), np.diff(lay)
    return bool(((dd > 0) | ((dd == 0) & ((dp > 0) | ((dp == 0) & (dl >= 0))))).all())


def iter_routing(run, phase: str | None = None, docs=None, token_columns=(), chunk_tokens_: int | None = None,
                 progress: bool = False, desc: str = "reading routing"):
    """Yield RoutingChunk of at most `chunk_tokens` tokens each, part by part, batch by batch.

    A document may span two chunks (a part boundary or a batch boundary): consumers merge partial
    results by document or by key, so nothing needs a whole document in memory. The tokens frame
    (when token_columns or phase are given) comes from the same part's tokens/ file.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    layers = sorted(run.moe_layers)
    nl, k = len(layers), run.top_k
    lay_ref = np.asarray(layers, np.int64)
    step = chunk_tokens(chunk_tokens_) * nl
    run.files("routing")  # verifies the part files (a damaged one is named in one sentence)
    parts = [p for p in run.manifest["parts"] if "routing" in p["files"]]
    if not parts:
        raise WorkbenchError(f"run {run.path} has no routing rows")
    doc_set = None if docs is None else np.asarray(sorted({int(d) for d in docs}), np.int64)
    need_tok = bool(token_columns) or phase is not None
    if need_tok:
        run.files("tokens")
    total = sum(int(p.get("tokens", 0)) for p in parts)
    no_weights = weights_note(run) is not None
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not progress, dynamic_ncols=True)
    done = n_chunks = 0
    progress_update(desc, 0, total, 0)
    for part in parts:
        pf = pq.ParquetFile(run.path / part["files"]["routing"])
        tok = _part_tokens(run, part, token_columns, phase) if need_tok else None
        cols = ["doc_id", "pos", "layer", "experts", "weights"]
        batches = pf.iter_batches(batch_size=step, columns=cols)
        for b in batches:
            doc = b.column("doc_id").to_numpy().astype(np.int64)
            pos = b.column("pos").to_numpy().astype(np.int32)
            lay = b.column("layer").to_numpy().astype(np.int64)
            ex_col, w_col = b.column("experts"), b.column("weights")
            lens = pc.list_value_length(ex_col).to_numpy(zero_copy_only=False)
            if len(lens) and (lens.min() != k or lens.max() != k):
                raise WorkbenchError(f"run {run.path}: routing rows must each hold top_k={k} experts")
            ex = np.asarray(ex_col.flatten().to_numpy(zero_copy_only=False), np.int16).reshape(-1, k)
            w = np.asarray(w_col.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, k)
            if w.size and not np.isfinite(w).all() and not (no_weights or np.isnan(w).all()):
                nonfinite_note(run, int(w.size - np.isfinite(w).sum()), f"first in {part['files']['routing']}")
            if not _sorted_rows(doc, pos, lay):  # captures write sorted parts: check in one pass, sort if not
                order = np.lexsort((lay, pos, doc))
                doc, pos, lay, ex, w = doc[order], pos[order], lay[order], ex[order], w[order]
            if len(doc) % nl or not (lay.reshape(-1, nl) == lay_ref).all():
                raise WorkbenchError(f"run {run.path}: routing rows are not whole tokens x MoE layers {layers}"
                                     " in one part (or a batch cut a token)")
            d1, p1 = doc[::nl], pos[::nl]
            keep = None
            if doc_set is not None:
                keep = np.isin(d1, doc_set)
            tframe = None
            if tok is not None:
                keys = pl.DataFrame({"doc_id": d1, "pos": p1})
                tframe = keys.join(tok, on=["doc_id", "pos"], how="left", maintain_order="left")
                if phase is not None:
                    hit = tframe["phase"].is_not_null().to_numpy()
                    keep = hit if keep is None else keep & hit
            ex, w = ex.reshape(-1, nl, k), w.reshape(-1, nl, k)
            if keep is not None and not keep.all():
                d1, p1, ex, w = d1[keep], p1[keep], ex[keep], w[keep]
                if tframe is not None:
                    tframe = tframe.filter(pl.Series(keep))
            bar.update(len(doc) // nl)
            done += len(doc) // nl
            n_chunks += 1
            progress_update(desc, min(done, total), total, n_chunks)
            if len(d1) == 0:
                continue
            yield RoutingChunk(RoutingArrays(doc=d1, pos=p1, layers=layers, experts=ex, weights=w,
                                             n_experts=run.n_experts), tframe)
    bar.close()


def prefetched(make_iter, depth: int = 1):
    """Iterate `make_iter()` in a worker thread, `depth` items ahead: the next chunk is decoded (pyarrow and
    numpy release the GIL) while the caller computes on this one. Progress reports go to the caller's
    report_progress callback; a worker error is raised here; closing the generator stops the worker."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    cb = getattr(_progress_sink, "cb", None)
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            with report_progress(cb):
                for item in make_iter():
                    if not put((item, None)):
                        return
            put((end, None))
        except BaseException as e:  # handed to the caller
            put((end, e))

    t = threading.Thread(target=work, name="prefetch", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        t.join()


def routing_keys(run, phase: str | None = None) -> pl.DataFrame:
    """(doc_id, pos) of every routed token, sorted (phase-filtered): 12 bytes a token, no routing lists."""
    first = min(run.moe_layers)
    lf = run.routing.filter(pl.col("layer") == first).select("doc_id", "pos")
    if phase is not None:
        lf = lf.join(run.tokens.filter(pl.col("phase") == phase).select("doc_id", "pos"), on=["doc_id", "pos"],
                     how="semi")
    return lf.unique(maintain_order=False).sort("doc_id", "pos").collect()


def merge_by_doc(doc_ids: list, arrays: list[list]):
    """Concatenate per-chunk per-document arrays, sum the partial rows of a document cut by a chunk
    boundary, and sort by doc_id (the order of the dense reader). arrays: one list per field."""
    doc = np.concatenate(doc_ids) if doc_ids else np.zeros(0, np.int64)
    outs = [np.concatenate(a) if a else None for a in arrays]
    uniq, inv = np.unique(doc, return_inverse=True)
    if len(uniq) == len(doc) and (len(doc) < 2 or np.all(np.diff(doc) > 0)):
        return doc, outs
    merged = []
    for a in outs:
        m = np.zeros((len(uniq),) + a.shape[1:], a.dtype)
        np.add.at(m, inv, a)
        merged.append(m)
    return uniq, merged


def per_doc_counts(run, phase: str | None = None, importance: bool = False, chunk: int | None = None,
                   progress: bool = False, desc: str = "routing per document"):
    """Stream the run into per-document (layer, expert) sums.

    Returns (doc ids [D] sorted, tokens per doc [D], selection counts [D, L, E] float64, importance
    sums [D, L, E] float64 or None, layers). importance: the selected experts' routing weights
    renormalised to sum 1 per token (uniform 1/K when they sum to 0). Exact: counts add; a document
    cut by a chunk boundary adds two partial float sums (the dense order differs by rounding only).
    """
    docs, nts, cnts, imps = [], [], [], []
    layers = sorted(run.moe_layers)
    e = run.n_experts
    for ch in iter_routing(run, phase=phase, chunk_tokens_=chunk, progress=progress, desc=desc):
        ra = ch.ra
        bounds = ra.doc_bounds
        ntok = np.diff(bounds)
        d = len(ntok)
        t, nl, k = ra.experts.shape
        di = np.repeat(np.arange(d), ntok)
        ex = ra.experts.astype(np.int64)
        ok = (ex >= 0) & (ex < e)
        idx = (di[:, None, None] * nl + np.arange(nl)[None, :, None]) * e + ex
        cnts.append(np.bincount(idx[ok], minlength=d * nl * e).reshape(d, nl, e).astype(np.float64))
        if importance:
            w = ra.weights.astype(np.float64)
            s = w.sum(-1, keepdims=True)
            w = np.where(s > 0, w / np.where(s > 0, s, 1.0), 1.0 / k)
            imps.append(np.bincount(idx[ok], weights=w[ok], minlength=d * nl * e).reshape(d, nl, e))
        docs.append(ra.doc[bounds[:-1]])
        nts.append(ntok.astype(np.int64))
    if not docs:
        raise WorkbenchError(f"run {run.path} has no routing rows" + (f" in phase {phase!r}" if phase else ""))
    fields = [nts, cnts] + ([imps] if importance else [])
    doc, out = merge_by_doc(docs, fields)
    return doc, out[0], out[1], (out[2] if importance else None), layers
