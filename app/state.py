"""What the app knows about its run: cached per-run aggregates and analysis results.

Pages never compute on the request thread what they can reuse: every aggregate is computed once per
run (first request, or the warm-up thread) and kept in memory. Analyses run on one background worker
(two CPU cores are shared with the model service), so a page renders at once with a "computing"
notice and fills in when the result lands.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from ..analysis.registry import ANALYSES
from ..errors import WorkbenchError
from ..plots import polish_all
from ..store import TABLES, Run, open_run, reading

log = logging.getLogger("workbench.app")

# What a user must capture or pass for each analysis; shown instead of an error when it cannot run.
CAPTURE_HINTS = {name: s.capture_hint for name, s in ANALYSES.items() if s.capture_hint}
TABLE_HINTS = {
    "expert_stats": "add `experts` to --probes (workbench capture ... --probes routing,experts)",
    "hidden": "add `hidden` to --probes (workbench capture ... --probes routing,hidden)",
    "attention": "add `attention` to --probes (workbench capture ... --probes routing,attention)",
    "routing": "capture with the routing probe (the default): workbench capture MODEL --data DATA --out RUN",
    "tokens": "capture with workbench capture MODEL --data DATA --out RUN",
}


@dataclass
class Unavailable:
    """Why a page cannot show something, and what to do about it (rendered as a notice, not an error)."""

    message: str
    hint: str = ""
    kind: str = "missing"  # missing | unavailable | failed


@dataclass
class Job:
    future: Future
    started: float = field(default_factory=time.time)
    progress: dict | None = None  # the latest streaming pass: desc, done, total, chunks (common.report_progress)
    running: float | None = None  # when the worker took it up (until then it waits behind other jobs)
    pool: str = "cpu"  # which worker runs it: "cpu" (analyses) or "model" (closed loops, one at a time)


def approx_bytes(obj, _depth: int = 0) -> int:
    """Rough memory held by a cached value: frames, arrays, analysis results, plotly figures, containers."""
    if _depth > 6 or obj is None:
        return 0
    if isinstance(obj, (pl.DataFrame, pl.Series)):
        return int(obj.estimated_size())
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, (int, float, bool)):
        return 8
    tables = getattr(obj, "tables", None)
    if isinstance(tables, dict):  # AnalysisResult
        return sum(approx_bytes(t, _depth + 1) for t in tables.values()) + approx_bytes(getattr(obj, "meta", None), _depth + 1)
    data = getattr(obj, "data", None)
    if data is not None and hasattr(obj, "layout") and isinstance(data, tuple):  # a plotly figure: its traces' arrays
        total = 0
        for tr in data:
            for attr in ("x", "y", "z", "text", "customdata", "hovertext", "values", "labels"):
                v = getattr(tr, attr, None) if attr in getattr(tr, "_valid_props", ()) else None
                total += _seq_bytes(v)
        return total
    if isinstance(obj, dict):
        return sum(approx_bytes(k, _depth + 1) + approx_bytes(v, _depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set)):
        return sum(approx_bytes(v, _depth + 1) for v in obj)
    return 64


def _seq_bytes(v) -> int:
    if v is None:
        return 0
    if isinstance(v, np.ndarray):
        return int(v.nbytes)
    if isinstance(v, (list, tuple)):
        return sum(_seq_bytes(x) if isinstance(x, (list, tuple, np.ndarray)) else 16 for x in v)
    return 16


class BoundedCache:
    """A thread-safe LRU mapping bounded by entries and by (approximate) bytes, for everything the dashboard
    keeps per request-chosen key: a client choosing new keys (a Compare matching, placement options, a
    document) can only displace older entries, never grow the server's memory. `on_evict(key, value)` is told."""

    def __init__(self, max_entries: int, max_bytes: int, sizeof=approx_bytes, on_evict=None):
        from collections import OrderedDict

        self.max_entries, self.max_bytes = int(max_entries), int(max_bytes)
        self._sizeof, self._on_evict = sizeof, on_evict
        self._d: OrderedDict = OrderedDict()
        self._sizes: dict = {}
        self._lock = threading.RLock()
        self.nbytes = 0

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._d

    def __len__(self) -> int:
        with self._lock:
            return len(self._d)

    def get(self, key, default=None):
        with self._lock:
            if key not in self._d:
                return default
            self._d.move_to_end(key)
            return self._d[key]

    def __getitem__(self, key):
        with self._lock:
            self._d.move_to_end(key)
            return self._d[key]

    def __setitem__(self, key, value) -> None:
        size = self._sizeof(value)
        evicted = []
        with self._lock:
            if key in self._d:
                self.nbytes -= self._sizes.pop(key)
                del self._d[key]
            self._d[key] = value
            self._sizes[key] = size
            self.nbytes += size
            # the newest entry stays even when alone over the byte budget (it is what was just asked for)
            while len(self._d) > 1 and (len(self._d) > self.max_entries or self.nbytes > self.max_bytes):
                k, v = self._d.popitem(last=False)
                self.nbytes -= self._sizes.pop(k)
                evicted.append((k, v))
        if self._on_evict is not None:
            for k, v in evicted:
                self._on_evict(k, v)

    def pop(self, key, default=None):
        with self._lock:
            if key not in self._d:
                return default
            self.nbytes -= self._sizes.pop(key)
            return self._d.pop(key)

    def keys(self) -> list:
        with self._lock:
            return list(self._d)


# Bounds of the per-run caches whose keys a request chooses (documents, analysis variants such as placement
# options); the fixed aggregates and one result per analysis are bounded by the analyses there are.
MAX_DOCS, MAX_DOC_BYTES = 64, 256 << 20
MAX_VARIANTS, MAX_VARIANT_BYTES = 8, 512 << 20


def analysis_available(name: str) -> bool:
    from ..analysis import MODULES

    mod = MODULES.get(name, name.replace("-", "_"))
    try:
        return importlib.util.find_spec(f"workbench.analysis.{mod}") is not None
    except ModuleNotFoundError:
        return False


class RunData:
    """One run, its cached aggregates and analyses. Thread-safe; shared by every browser session."""

    def __init__(self, run: Run | str, analysis_options: dict | None = None):
        self.run = run if isinstance(run, Run) else open_run(run)
        self.analysis_options = dict(analysis_options or {})
        self._cache: dict = {}
        self._locks: dict = {}
        self._guard = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._pool = Worker("workbench-analysis")
        self._doc_cache = BoundedCache(MAX_DOCS, MAX_DOC_BYTES)
        self._variants = BoundedCache(MAX_VARIANTS, MAX_VARIANT_BYTES, on_evict=self._forget_variant)
        self._model_pool: Worker | None = None  # jobs that run the live model: never queued behind a CPU analysis

    # -- small cached aggregates, computed on the calling thread ------------------------------------
    def _cached(self, key, fn):
        if key in self._cache:
            return self._cache[key]
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # two first requests for the same key compute it once
            if key not in self._cache:
                with reading(self.run):  # a capture --overwrite of this run is refused meanwhile, not mixed in
                    self._cache[key] = fn()
        return self._cache[key]

    def tables_present(self) -> list[str]:
        return [t for t in TABLES if self.run.has(t)]

    def summary(self) -> dict:
        return self._cached("summary", self._summary)

    def _summary(self) -> dict:
        run = self.run
        sizes = {}
        for t in TABLES:
            files = run.files(t)
            if files:
                rows = sum(_parquet_rows(f) for f in files)
                sizes[t] = {"rows": rows, "bytes": sum(f.stat().st_size for f in files), "parts": len(files)}
        n_docs = 0
        if run.has("tokens"):
            n_docs = int(run.tokens.select(pl.col("doc_id").n_unique()).collect().item())
        labels = {}
        for c in run.label_columns:
            try:
                vc = run.tokens.group_by(c).agg(pl.len()).sort("len", descending=True).head(12).collect()
                labels[c] = [(str(v), int(n)) for v, n in vc.iter_rows()]
            except Exception:  # a label column a part lacks: skip, the overview is best-effort
                continue
        return {"tokens": self.run.n_tokens, "docs": n_docs, "tables": sizes,
                "labels": labels}

    def docs(self) -> pl.DataFrame:
        """One row per document: doc_id, n_tokens, its labels and the first characters of its text."""
        return self._cached("docs", self._docs)

    def _docs(self) -> pl.DataFrame:
        cols = [c for c in self.run.label_columns]
        lf = self.run.tokens
        names = set(lf.collect_schema().names())
        cols = [c for c in cols if c in names]
        head = (lf.filter(pl.col("pos") < 48).sort("doc_id", "pos").group_by("doc_id", maintain_order=True)
                .agg(pl.col("token").str.join("").str.slice(0, 60).alias("preview")))
        per = lf.group_by("doc_id").agg(pl.len().alias("n_tokens"), *[pl.col(c).first() for c in cols])
        return per.join(head, on="doc_id", how="left").sort("doc_id").collect()

    def doc_routing(self, doc_id: int) -> tuple[pl.DataFrame, dict]:
        """Tokens of one document and, per MoE layer, the experts and weights of each token.

        Returns (tokens frame sorted by pos, {layer: (experts [T,K] int, weights [T,K] float)}).
        """
        key = ("doc", int(doc_id))
        hit = self._doc_cache.get(key)
        if hit is not None:
            return hit
        run = self.run
        with reading(run):
            return self._doc_routing(run, key, doc_id)

    def _doc_routing(self, run, key, doc_id):
        toks = (run.tokens.filter(pl.col("doc_id") == int(doc_id)).select("pos", "token", "token_id", "phase")
                .sort("pos").collect())
        rt = (run.routing.filter(pl.col("doc_id") == int(doc_id)).select("pos", "layer", "experts", "weights")
              .sort("layer", "pos").collect())
        per_layer = {}
        k = run.top_k
        pos_index = {p: i for i, p in enumerate(toks["pos"].to_list())}
        for (layer,), g in rt.group_by("layer", maintain_order=True):
            ex = np.full((toks.height, k), -1, np.int32)
            w = np.zeros((toks.height, k), np.float32)
            idx = np.array([pos_index.get(p, -1) for p in g["pos"].to_list()])
            ok = idx >= 0
            ex[idx[ok]] = g["experts"].list.to_array(k).to_numpy()[ok]
            w[idx[ok]] = g["weights"].list.to_array(k).to_numpy()[ok]
            per_layer[int(layer)] = (ex, w)
        out = (toks, per_layer)
        self._doc_cache[key] = out  # documents are cheap to reload: a bounded LRU (entries and bytes)
        return out

    # -- analyses, computed on the background worker ---------------------------------------------------
    def analysis(self, name: str, wait: float = 0.0, variant: str | None = None, options: dict | None = None,
                 lock=None, start: bool = True):
        """AnalysisResult, Unavailable, or None while it is being computed (or not started, if not `start`).

        `variant` names a second cached result of the same analysis with extra `options` (e.g. the
        pruning evaluation, which needs the live model: pass the model service's `lock`).
        """
        key = variant or name
        if ("analysis", key) in self._cache:
            return self._cache[("analysis", key)]
        if not analysis_available(name):
            return Unavailable(f"The {name} analysis is not available yet in this version of the workbench.",
                               kind="unavailable")
        with self._guard:
            job = self._jobs.get(key)
            if job is None:
                if not start:
                    return None
                pool = self._pool
                if lock is not None:  # a closed-loop job waits for the model, not for the CPU analyses
                    pool = self._model_pool = self._model_pool or Worker("workbench-model")
                job = self._jobs[key] = Job(pool.submit(self._compute, name, key, options or {}, lock),
                                            pool="model" if lock is not None else "cpu")
        if wait > 0:
            try:
                job.future.result(timeout=wait)
            except Exception:
                pass
        if job.future.done():
            return self._cache.get(("analysis", key))
        return None

    def started(self, key: str) -> float | None:
        job = self._jobs.get(key)
        return job.started if job else None

    def running(self, key: str) -> float | None:
        """When the job for `key` started running (None while it waits in the queue, or with no job)."""
        job = self._jobs.get(key)
        return job.running if job else None

    def behind(self, key: str) -> str | None:
        """The job that the queued job `key` waits behind on its worker (None if it runs, or waits for nothing)."""
        job = self._jobs.get(key)
        if job is None or job.running is not None or job.future.done():
            return None
        for k, j in list(self._jobs.items()):
            if k != key and j.pool == job.pool and j.running is not None and not j.future.done():
                return k
        return None

    def put(self, key: str, result, figures: dict | None = None) -> None:
        """Hand in a result computed elsewhere (the demo's comparison), shown as if computed here."""
        self._cache[("figures", key)] = figures or {}
        self._cache[("analysis", key)] = result

    def progress(self, key: str) -> dict | None:
        """How far a running computation's current pass over the run is: desc, done, total, chunks, fraction."""
        job = self._jobs.get(key)
        return job.progress if job and not job.future.done() else None

    def _compute(self, name: str, key: str, options: dict, lock):
        t0 = time.perf_counter()
        try:
            from ..analysis import analyze, module

            mod = module(name)
            opts = {**self.analysis_options.get(name, {}), **options}
            from ..analysis.common import report_progress

            with self._guard:  # the submitter stores the Job under this lock after submit(): wait for it
                job = self._jobs.get(key)

            def began():  # for a closed-loop job: once it holds the model
                if job is not None:
                    job.running = time.time()

            def on_progress(desc, done, total, chunks):
                if job is not None:
                    job.progress = {"desc": desc, "done": done, "total": total, "chunks": chunks,
                                    "fraction": done / total if total else None}

            # stored in the run folder: a restarted dashboard reads it instead of recomputing
            # (a separate name: `key` is this result's cache slot in self._cache)
            pkey = None
            if "model" in opts:
                pkey = {**{k: v for k, v in opts.items() if k != "model"}, "model": self.run.model_info.get("spec")}
            with report_progress(on_progress):
                if lock is not None:
                    with lock:
                        began()
                        result = analyze(name, self.run, store_key=pkey, **opts)
                else:
                    began()
                    result = analyze(name, self.run, store_key=pkey, **opts)
            try:
                figs = mod.figures(result) if hasattr(mod, "figures") else {}
                polish_all(name, figs)  # one colour per label, log ratios, titled axes (workbench.plots)
            except WorkbenchError:
                figs = {}
            self._cache[("figures", key)] = figs
            self._cache[("analysis", key)] = result
        except WorkbenchError as e:
            self._cache[("analysis", key)] = Unavailable(str(e), CAPTURE_HINTS.get(name, ""))
        except Exception as e:  # a bug in an analysis must not take the dashboard down
            log.error("analysis %s failed:\n%s", key, traceback.format_exc())
            self._cache[("analysis", key)] = Unavailable(f"The {name} analysis failed: {type(e).__name__}: {e}",
                                                         kind="failed")
        self._cache[("seconds", key)] = time.perf_counter() - t0
        out = self._cache[("analysis", key)]
        if key != name:  # a variant chosen by a request (e.g. placement options): bounded, oldest dropped
            self._variants[key] = (out, self._cache.get(("figures", key)))
        return out

    def _forget_variant(self, key, _value) -> None:
        """An evicted variant: its result, figures, timing and finished job go (a later request recomputes)."""
        with self._guard:
            for k in (("analysis", key), ("figures", key), ("seconds", key)):
                self._cache.pop(k, None)
            job = self._jobs.get(key)
            if job is not None and job.future.done():
                self._jobs.pop(key, None)

    def figures(self, name: str) -> dict:
        return self._cache.get(("figures", name), {})

    def seconds(self, name: str) -> float | None:
        return self._cache.get(("seconds", name))

    def warm(self, names) -> None:
        """Queue analyses so they are ready before anyone opens their pages."""
        for n in names:
            self.analysis(n)

    def computed_analyses(self) -> dict:
        """name (or variant) -> AnalysisResult for every analysis already computed successfully."""
        from ..analysis import AnalysisResult

        return {k[1]: v for k, v in list(self._cache.items())
                if isinstance(k, tuple) and k[0] == "analysis" and isinstance(v, AnalysisResult)}

    def close(self) -> None:
        self._pool.shutdown()
        if self._model_pool is not None:
            self._model_pool.shutdown()


def _parquet_rows(path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


class Worker:
    """One daemon thread running submitted calls in order; returns concurrent.futures.Future objects.

    Daemon, unlike ThreadPoolExecutor's workers, so Ctrl-C on `workbench app` does not wait for a
    long analysis or generation to finish.
    """

    def __init__(self, name: str):
        import queue

        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        self._q.put((fut, fn, args))
        return fut

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # delivered to whoever polls the future
                fut.set_exception(e)

    def shutdown(self) -> None:
        self._q.put(None)
