"""Capture: run text through a model with probes attached and stream what they see into a run.

Flow per batch: build the padded batch -> probes see the forward through hooks -> their device
tensors are copied to pinned host memory without blocking (the next forward starts at once) ->
a writer thread turns them into Arrow tables and writes a part every `part_tokens` tokens.
Batches are deterministic for (data, settings), which is what makes `resume` exact.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from .data import Dataset, load_dataset
from .errors import WorkbenchError
from .models.loading import MoEModel, load_model, seeded
from .store import Run, RunWriter, open_run

PROBE_NAMES = ("routing", "experts", "hidden", "attention")


@dataclass
class Sequence:
    doc_id: int
    ids: np.ndarray  # int32 token ids
    src: np.ndarray  # int32 index of the source record of each token


def build_sequences(ds: Dataset, tokenizer, seq_len: int | None = None, max_tokens: int | None = None,
                    max_len: int = 2048) -> list[Sequence]:
    """One sequence per record (truncated to max_len), or the token stream packed into seq_len chunks."""
    texts = [r["text"] for r in ds.records]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    seqs: list[Sequence] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    if seq_len is None:
        long = [len(ids) for ids in enc if len(ids) > max_len]
        if long:  # said out loud, with counts: a silent cut changes what the run measures
            import warnings

            from .errors import WorkbenchWarning

            warnings.warn(f"{len(long)} of {len(enc)} documents of {ds.name} are longer than the model's context of "
                          f"{max_len} tokens and were cut ({sum(long) - max_len * len(long):,} of "
                          f"{sum(map(len, enc)):,} tokens dropped); pass --seq-len {max_len} to capture them whole, "
                          f"packed into {max_len}-token sequences", WorkbenchWarning, stacklevel=3)
        for i, ids in enumerate(enc):
            ids = np.asarray(ids[:max_len], np.int32)
            if budget <= 0:
                break
            if len(ids) > budget:
                ids = ids[: int(budget)]
            if len(ids) == 0:
                continue
            seqs.append(Sequence(i, ids, np.full(len(ids), i, np.int32)))
            budget -= len(ids)
    else:
        eos = tokenizer.eos_token_id
        stream, src = [], []
        for i, ids in enumerate(enc):
            piece = list(ids) + ([eos] if eos is not None else [])
            stream.extend(piece)
            src.extend([i] * len(piece))
            if len(stream) >= budget:
                break
        n = int(min(len(stream), budget))
        stream_a, src_a = np.asarray(stream[:n], np.int32), np.asarray(src[:n], np.int32)
        for j, start in enumerate(range(0, n, seq_len)):
            seqs.append(Sequence(j, stream_a[start:start + seq_len], src_a[start:start + seq_len]))
    if not seqs:
        raise WorkbenchError(f"dataset {ds.name} produced no tokens")
    return seqs


class _Decoder:
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


def make_probes(names, logits: bool = False, model: MoEModel | None = None, **options) -> list:
    """The probes `names` with their options; with `model`, each checks its settings against it
    (before a capture touches its run folder)."""
    from .probes.routing import RoutingProbe

    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in PROBE_NAMES]
    if bad:
        raise WorkbenchError(f"unknown probe {bad[0]!r}; choose from {', '.join(PROBE_NAMES)}")
    probes = []
    for n in names:
        if n == "routing":
            probes.append(RoutingProbe(logits=logits))
        elif n == "experts":
            from .probes.experts import ExpertsProbe

            probes.append(ExpertsProbe(dump=options.get("dump_experts"), dump_format=options.get("dump_format", "fp16")))
        elif n == "hidden":
            from .probes.hidden import HiddenProbe

            probes.append(HiddenProbe(dump_layers=options.get("dump_hidden"), dump_format=options.get("dump_format", "fp16")))
        elif n == "attention":
            from .probes.attention import AttentionProbe

            probes.append(AttentionProbe())
    if model is not None:
        for p in probes:
            p.check(model)
    return probes


def _lower_priority() -> None:
    """Encoder threads yield the CPU to the main thread, whose kernel launches keep the GPU busy."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class _Writer:
    """Background thread: host arrays -> Arrow tables -> a Parquet part every `part_tokens` tokens."""

    def __init__(self, writer: RunWriter, probes, decoder: _Decoder, labels: pa.Table | None, part_tokens: int):
        self.writer, self.probes, self.decoder, self.labels = writer, probes, decoder, labels
        self.part_tokens = part_tokens
        self.q: queue.Queue = queue.Queue(maxsize=4)  # bounds host memory
        self.buf: dict[str, list[pa.Table]] = {}
        self.buf_tokens = 0
        self.last_batch = writer.next_batch
        self.error: BaseException | None = None
        workers = max(1, min(8, ((os.cpu_count() or 2) - 2) // 2))  # leave cores to the thread launching kernels
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wb-parquet",
                                       initializer=_lower_priority)
        self.pending: list[tuple] = []
        self.max_pending = workers  # parts in flight: bounds host memory with the queue below
        self.blocked_s = 0.0
        self.thread = threading.Thread(target=self._loop, daemon=True)
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
        for probe, arrs in zip(self.probes, arrays):
            host = {k: v.numpy() for k, v in arrs.items()}
            for name, table in probe.to_table(host, meta).items():
                self.buf.setdefault(name, []).append(table)
        cols = {"doc_id": pa.array(meta.doc, pa.int64()), "pos": pa.array(meta.pos, pa.int32()),
                "token_id": pa.array(token_ids, pa.int32()), "token": self.decoder(token_ids),
                "phase": pa.array([meta.phase] * len(token_ids), pa.string())}
        tok = pa.table(cols)
        if self.labels is not None and self.labels.num_columns:
            lab = self.labels.take(pa.array(src))
            for name in lab.column_names:
                if name not in cols:
                    tok = tok.append_column(name, lab.column(name))
        self.buf.setdefault("tokens", []).append(tok)
        self.buf_tokens += len(token_ids)
        self.last_batch = batch_end
        if self.buf_tokens >= self.part_tokens or final_flag:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered part to an encoder thread; commit finished parts in order.

        Parquet encoding (zstd, nested lists) is the slowest step of capture: 2M expert_stats rows
        or 16M logits a batch take one core longer than the forward itself. Arrow releases the GIL,
        so parts encode side by side on a few cores while the manifest still lists them in order.
        """
        if not self.buf_tokens:
            return
        tables = {name: pa.concat_tables(ts, promote_options="default") for name, ts in self.buf.items()}
        idx = self.writer.reserve_part()
        futs = {name: self.pool.submit(self.writer.write_table_file, idx, name, t) for name, t in tables.items()}
        self.pending.append((idx, futs, self.last_batch, self.buf_tokens))
        self.buf, self.buf_tokens = {}, 0
        self._commit(keep=self.max_pending)

    def _commit(self, keep: int) -> None:
        while self.pending and (len(self.pending) > keep or all(f.done() for f in self.pending[0][1].values())):
            idx, futs, batch_end, n_tokens = self.pending.pop(0)
            self.writer.commit_part(idx, {name: f.result() for name, f in futs.items()}, batch_end, n_tokens)

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        try:
            if self.error:
                raise self.error
            self.flush()
            self._commit(keep=0)
        finally:
            self.pool.shutdown(wait=True)


@contextlib.contextmanager
def _attached(mm: MoEModel, probe_list, writer: _Writer, bar):
    """Probes on for the block; on success the writer drains and commits its last parts, on any
    failure (Ctrl-C included) it stops without committing more, so the run stays resumable."""
    try:
        for p in probe_list:
            p.attach(mm)
        yield
        writer.close()
    except BaseException:
        writer.q.put(None)
        writer.thread.join(timeout=60)
        writer.pool.shutdown(wait=True, cancel_futures=True)
        writer.writer.discard_uncommitted()  # parts written but never listed: nothing half-done stays
        writer.writer.release()
        raise
    finally:
        for p in probe_list:
            p.detach()
        bar.close()


class _Pipeline:
    """Probes + async device->host copies + the writer; used by both capture and generation capture."""

    def __init__(self, mm: MoEModel, probes, writer: _Writer):
        self.mm, self.probes, self.writer = mm, probes, writer
        self.cuda = mm.device.type == "cuda"

    def begin(self, ctx) -> None:
        for p in self.probes:
            p.begin(ctx)

    def end(self, ctx, token_ids: np.ndarray, src: np.ndarray, batch_end: int, lengths: np.ndarray,
            final: bool = False) -> None:
        from .probes.base import BatchMeta

        arrays = []
        for p in self.probes:
            dev = p.harvest()
            if self.cuda:
                host = {}
                for k, t in dev.items():
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    host[k] = h
                arrays.append(host)
            else:
                arrays.append({k: t.detach() for k, t in dev.items()})
            p.ctx = None
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        meta = BatchMeta(doc=ctx.doc, pos=ctx.pos, doc_ids=ctx.doc_ids, lengths=lengths, phase=ctx.phase)
        self.writer.put((event, arrays, meta, token_ids, src, batch_end, final))


def _to_device(arr: np.ndarray, device) -> torch.Tensor:
    """Host -> device without a pageable copy: that one waits for the GPU queue to drain, which would
    expose the CPU time between two forwards once per batch."""
    t = torch.from_numpy(arr)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _batch_context(seqs: list[Sequence], pad_id: int, device) -> tuple:
    from .probes.base import BatchContext

    lengths = np.array([len(s.ids) for s in seqs])
    S = int(lengths.max())
    ids = np.full((len(seqs), S), pad_id, np.int64)
    mask = np.zeros((len(seqs), S), np.int64)
    for b, s in enumerate(seqs):
        ids[b, : len(s.ids)] = s.ids
        mask[b, : len(s.ids)] = 1
    flat_valid = np.flatnonzero(mask.reshape(-1))
    doc = np.repeat(np.array([s.doc_id for s in seqs], np.int64), lengths)
    pos = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
    input_ids = _to_device(ids, device)
    attn = _to_device(mask, device)
    ctx = BatchContext(input_ids=input_ids, attention_mask=attn,
                       valid=_to_device(flat_valid, device), doc_ids=np.array([s.doc_id for s in seqs]),
                       pos=pos, doc=doc)
    token_ids = np.concatenate([s.ids for s in seqs]).astype(np.int32)
    src = np.concatenate([s.src for s in seqs]).astype(np.int32)
    return ctx, token_ids, src, lengths


def _labels_table(ds: Dataset) -> pa.Table:
    rows = [{k: v for k, v in r.items() if k != "text"} for r in ds.records]
    if not any(rows):
        return pa.table({})
    return pa.Table.from_pylist(rows)


def capture(model, data, out, probes=("routing",), logits: bool = False, batch_size: int = 8,
            max_tokens: int | None = None, seq_len: int | None = None, device: str | None = None,
            dtype: str | None = None, resume: bool = False, overwrite: bool = False,
            interventions: dict | None = None, part_tokens: int = 65536, progress: bool = True,
            max_len: int | None = None, **probe_options) -> Run:
    """Capture `data` on `model` into the run folder `out`; returns the opened run.

    model: a MoEModel or a spec (hub id, folder, `demo`). data: bundled name, file path or list.
    """
    mm = model if isinstance(model, MoEModel) else load_model(model, device=device, dtype=dtype)
    if batch_size < 1:
        raise WorkbenchError("--batch-size must be at least 1")
    if seq_len is not None and seq_len < 1:
        raise WorkbenchError("--seq-len must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise WorkbenchError("--max-tokens must be at least 1")
    ds = load_dataset(data)
    layers = probe_options.pop("layers", None)
    pm = only_layers(mm, layers)  # what the probes see: the selected MoE layers (all by default)
    probe_list = make_probes(probes, logits=logits, model=pm, **probe_options)
    cap = max_len or int(getattr(mm.model.config, "max_position_embeddings", 2048) or 2048)
    seqs = build_sequences(ds, mm.tokenizer, seq_len=seq_len, max_tokens=max_tokens, max_len=min(cap, 8192))
    inter = _describe_interventions(mm, interventions)
    settings = {"probes": {p.table: p.settings() for p in probe_list}, "batch_size": batch_size,
                "seq_len": seq_len, "max_tokens": max_tokens, "max_len": cap}
    if layers is not None:  # only when asked, so runs captured before --layers existed still resume
        settings["layers"] = pm.moe_layers
    identity = {"model": {k: mm.describe()[k] for k in ("spec", "model_type", "file_hashes")},
                "data": ds.sha256, "settings": settings, "interventions": inter,
                "dtype": str(next(mm.model.parameters()).dtype)}
    manifest = {
        "identity": identity,
        # model.moe_layers = the MoE layers this run holds; model_moe_layers = all of the model's
        "model": mm.describe() if layers is None else {**pm.describe(), "model_moe_layers": mm.moe_layers},
        "dataset": ds.describe(),
        "label_columns": ds.label_columns + (["src_doc"] if seq_len else []),
        "probes": settings["probes"],
        "settings": settings,
        "interventions": inter,
        "dtype": identity["dtype"],
        "device": str(mm.device),
        "versions": _versions(),
    }
    labels = _labels_table(ds)
    if seq_len:
        labels = labels.append_column("src_doc", pa.array(np.arange(len(ds.records)), pa.int64())) \
            if labels.num_columns else pa.table({"src_doc": pa.array(np.arange(len(ds.records)), pa.int64())})
    from . import distributed

    if distributed.wanted(out):  # under torchrun / accelerate launch: this rank's share of the batches
        return distributed.capture_dp(mm, out, manifest, seqs, batch_size, probe_list, labels, resume, overwrite,
                                      interventions, part_tokens, progress, probe_model=pm)
    w = RunWriter(out, manifest, resume=resume, overwrite=overwrite)
    if w.already_complete:
        return open_run(out)
    batches = [seqs[i:i + batch_size] for i in range(0, len(seqs), batch_size)]
    start = w.next_batch
    total = sum(len(s.ids) for s in seqs)
    writer = _Writer(w, probe_list, _Decoder(mm.tokenizer), labels, part_tokens)
    pipe = _Pipeline(mm, probe_list, writer)
    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
    bar = _progress(total, w.tokens_done, progress, f"capture {Path(out).name}")
    steer_cm = mm.steer(**interventions) if interventions else contextlib.nullcontext()
    with _attached(pm, probe_list, writer, bar), steer_cm, torch.inference_mode():
        if mm.layerwise:  # one decoder layer at a time over chunks of batches (workbench/layerwise.py)
            from .layerwise import forward_layerwise

            forward_layerwise(mm, pipe, batches, range(start, len(batches)), pad, bar)
        for bi in range(len(batches) if mm.layerwise else start, len(batches)):
            ctx, token_ids, src, lengths = _batch_context(batches[bi], pad, mm.device)
            pipe.begin(ctx)
            mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
            pipe.end(ctx, token_ids, src, bi + 1, lengths, final=bi == len(batches) - 1)
            bar.update(len(token_ids))
    w.finish(writer_wait_s=round(writer.blocked_s, 3))
    return open_run(out)


def capture_generate(model, prompts, out, max_new_tokens: int = 32, probes=("routing",), logits: bool = False,
                     do_sample: bool = False, seed: int = 0, overwrite: bool = False,
                     interventions: dict | None = None, progress: bool = True, **gen_kwargs) -> Run:
    """Generate a continuation of each prompt and capture routing of prefill and every decode step.

    Rows carry `phase` = prefill (prompt tokens) or decode (generated tokens fed back). The last
    generated token is never fed to the model, so it has a `tokens` row only in the returned text.
    """
    mm = model if isinstance(model, MoEModel) else load_model(model)
    ds = load_dataset(prompts)
    probe_list = make_probes(probes, logits=logits, model=mm)
    from .probes.base import BatchContext

    inter = _describe_interventions(mm, interventions)
    settings = {"probes": {p.table: p.settings() for p in probe_list}, "generate": True,
                "max_new_tokens": max_new_tokens, "do_sample": do_sample, "seed": seed}
    identity = {"model": {k: mm.describe()[k] for k in ("spec", "model_type", "file_hashes")},
                "data": ds.sha256, "settings": settings, "interventions": inter}
    manifest = {"identity": identity, "model": mm.describe(), "dataset": ds.describe(),
                "label_columns": ds.label_columns, "probes": settings["probes"], "settings": settings,
                "interventions": inter, "dtype": str(next(mm.model.parameters()).dtype),
                "device": str(mm.device), "versions": _versions()}
    w = RunWriter(out, manifest, overwrite=overwrite)
    if w.already_complete:
        return open_run(out)
    writer = _Writer(w, probe_list, _Decoder(mm.tokenizer), _labels_table(ds), part_tokens=1 << 62)
    pipe = _Pipeline(mm, probe_list, writer)
    state = {"doc": 0, "past": 0, "step": 0, "ids": None}

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        n = ids.shape[-1]
        dev = ids.device
        ctx = BatchContext(input_ids=ids, attention_mask=torch.ones_like(ids),
                           valid=torch.arange(n, device=dev), doc_ids=np.array([state["doc"]]),
                           pos=np.arange(state["past"], state["past"] + n, dtype=np.int32),
                           doc=np.full(n, state["doc"], np.int64),
                           phase="prefill" if state["step"] == 0 else "decode")
        state["ctx"], state["ids"] = ctx, ids[0].detach().cpu().numpy().astype(np.int32)
        pipe.begin(ctx)

    def post(module, args, kwargs, output):
        ctx = state["ctx"]
        n = ctx.n_valid
        pipe.end(ctx, state["ids"], np.full(n, state["doc"], np.int32), state["doc"] + 1, np.array([n]))
        state["past"] += n
        state["step"] += 1

    handles = [mm.model.register_forward_pre_hook(pre, with_kwargs=True),
               mm.model.register_forward_hook(post, with_kwargs=True)]
    steer_cm = mm.steer(**interventions) if interventions else contextlib.nullcontext()
    generations = []
    bar = _progress(len(ds.records), 0, progress, "generate", unit="prompt")
    try:
        with _attached(mm, probe_list, writer, bar), steer_cm, torch.inference_mode():
            for i, rec in enumerate(ds.records):
                state.update(doc=i, past=0, step=0)
                ids = torch.tensor([mm.tokenize(rec["text"])], device=mm.device)
                with seeded(seed + i) if do_sample else contextlib.nullcontext():
                    gen = mm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                            do_sample=do_sample, pad_token_id=mm.tokenizer.pad_token_id, **gen_kwargs)
                generations.append(mm.tokenizer.decode(gen[0, ids.shape[1]:]))
                bar.update(1)
    finally:
        for h in handles:
            h.remove()
    w.finish(generations=generations)
    return open_run(out)


def _describe_interventions(mm, interventions) -> dict:
    if not interventions:
        return {}
    from .probes.interventions import describe_interventions

    return describe_interventions(mm, interventions)


def _progress(total, initial, enabled, desc, unit="tok"):
    """`unit` names what `total` counts (tokens for captures, prompts for generation)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit=unit, desc=desc, dynamic_ncols=True)


def only_layers(mm: MoEModel, layers) -> MoEModel:
    """A view of `mm` whose probes see only the MoE layers `layers` (decoder-layer indices, e.g. from
    `--layers 1,3` or `0-2`); the forward and interventions still run the whole model."""
    if layers is None:
        return mm
    if isinstance(layers, str):
        from .options import layer_list

        try:
            layers = layer_list(layers)
        except Exception as e:  # argparse.ArgumentTypeError: one sentence already
            raise WorkbenchError(f"--layers: {e}") from None
    sel = sorted({int(x) for x in layers})
    if not sel:
        raise WorkbenchError("--layers names no layer")
    moe = mm.moe_layers
    bad = [i for i in sel if i not in moe]
    if bad:
        raise WorkbenchError(f"--layers: layer {bad[0]} is not an MoE layer of this model (MoE layers: "
                             f"{', '.join(map(str, moe))})")
    import dataclasses

    return dataclasses.replace(mm, layers=[layer for layer in mm.layers if layer.index in sel])


def _versions() -> dict:
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
