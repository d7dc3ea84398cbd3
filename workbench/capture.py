"""Capture: run text through a model with probes attached and stream what they see into a run.

Flow per batch: build the padded batch -> probes see the forward through hooks -> their device
tensors are copied to pinned host memory without blocking (the next forward starts at once) ->
a writer thread turns them into Arrow tables and writes a part every `part_tokens` tokens.
Batches are deterministic for (data, settings), which is what makes `resume` exact.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import numpy as np
import torch

from .data import load_dataset
from .errors import WorkbenchError
from .manifest import Manifest
from .models.loading import MoEModel, load_model, seeded
from .pipeline import (CutDocuments, PartWriter, ProbePipeline, Sequence, TokenDecoder, attached, batch_context,
                       batched, build_sequences, iter_sequences, labels_table, progress_bar, run_batches, versions)
from .store import Run, RunWriter, open_run

PROBE_NAMES = ("routing", "experts", "hidden", "attention")

__all__ = ["capture", "capture_generate", "make_probes", "only_layers", "Sequence", "build_sequences",
           "Sequential", "PROBE_NAMES"]

_batch_context = batch_context  # the name older scripts and tests imported


def check_probe_options(names, logits: bool = False, **options) -> None:
    """Refuse, in one sentence, an option whose probe is not selected (it would be silently ignored)."""
    names = set(names)
    needs = [("dump_experts", "experts", "--dump-experts"), ("dump_hidden", "hidden", "--dump-hidden"),
             ("logits", "routing", "--logits"), ("margin", "routing", "--margin")]
    given = dict(options, logits=logits)
    for opt, probe, flag in needs:
        if given.get(opt) and probe not in names:
            raise WorkbenchError(f"{flag} needs the {probe} probe, which is not selected: add it to --probes "
                                 f"(e.g. --probes {','.join(sorted(names | {probe}))})")


def make_probes(names, logits: bool = False, model: MoEModel | None = None, **options) -> list:
    """The probes `names` with their options; with `model`, each checks its settings against it
    (before a capture touches its run folder)."""
    from .probes.routing import RoutingProbe

    names = list(dict.fromkeys(names))
    bad = [n for n in names if n not in PROBE_NAMES]
    if bad:
        raise WorkbenchError(f"unknown probe {bad[0]!r}; choose from {', '.join(PROBE_NAMES)}")
    check_probe_options(names, logits, **options)
    probes = []
    for n in names:
        if n == "routing":
            probes.append(RoutingProbe(logits=logits, margin=bool(options.get("margin", False))))
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


class Sequential:
    """Capture schedule of one process: the batches in order, into the run store; a resumed run goes on
    after its last listed part. Batches are built from a token stream while the forwards run."""

    materialize = False  # batches may come from a stream (tokenised on a worker thread)

    def __init__(self):
        self.store: RunWriter | None = None

    def describe(self, path) -> str:
        return f"capture {Path(path).name}"

    def open(self, out, manifest: dict, resume: bool, overwrite: bool) -> RunWriter | None:
        self.store = RunWriter(out, manifest, resume=resume, overwrite=overwrite)
        return None if self.store.already_complete else self.store

    def plan(self, batches) -> tuple:
        start = self.store.next_batch
        return ((bi + 1, b) for bi, b in enumerate(batches) if bi >= start), None

    def run(self, pipe, todo, pad, bar) -> None:
        run_batches(pipe, todo, pad, bar)

    def finish(self, writer) -> None:
        self.store.finish(writer_wait_s=round(writer.blocked_s, 3))


def _schedule(mm: MoEModel, out):
    """The one place a capture's schedule is chosen."""
    from . import distributed

    if distributed.wanted(out):  # under torchrun / accelerate launch: this rank's share of the batches
        return distributed.DataParallel(mm)
    if mm.layerwise:  # one decoder layer at a time over chunks of batches
        from .layerwise import LayerMajor

        return LayerMajor(mm)
    return Sequential()


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
    cut = CutDocuments()
    stream = iter_sequences(ds, mm.tokenizer, seq_len=seq_len, max_tokens=max_tokens, max_len=min(cap, 8192), cut=cut)
    first = next(stream)  # a data set without tokens is refused before the run folder is touched
    inter = _describe_interventions(mm, interventions)
    settings = {"probes": {p.table: p.settings() for p in probe_list}, "batch_size": batch_size,
                "seq_len": seq_len, "max_tokens": max_tokens, "max_len": cap}
    if layers is not None:  # only when asked, so runs captured before --layers existed still resume
        settings["layers"] = pm.moe_layers
    identity = {"model": {k: mm.describe()[k] for k in ("spec", "model_type", "file_hashes")},
                "data": ds.sha256, "settings": settings, "interventions": inter,
                "dtype": str(next(mm.model.parameters()).dtype)}
    manifest = Manifest.new(
        identity=identity,
        # model.moe_layers = the MoE layers this run holds; model_moe_layers = all of the model's
        model=mm.describe() if layers is None else {**pm.describe(), "model_moe_layers": mm.moe_layers},
        dataset=ds.describe(), label_columns=ds.label_columns + (["src_doc"] if seq_len else []),
        probes=settings["probes"], settings=settings, interventions=inter, dtype=identity["dtype"],
        device=str(mm.device), versions=versions()).to_json()
    schedule = _schedule(mm, out)
    sink = schedule.open(out, manifest, resume, overwrite)
    if sink is None:  # already complete
        stream.close()
        return open_run(out)
    seqs = itertools.chain([first], stream)
    batches = batched(seqs, batch_size)
    if schedule.materialize:
        batches = list(batches)
        cut.warn()
    todo, total = schedule.plan(batches)
    writer = PartWriter(sink, probe_list, TokenDecoder(mm.tokenizer), labels_table(ds, seq_len), part_tokens)
    pipe = ProbePipeline(mm, probe_list, writer)
    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
    estimated = total is None
    if estimated:  # a stream: tokens estimated from the characters, exact once it ends
        total = _estimate_tokens(ds, mm.tokenizer, max_tokens, sink.tokens_done)
    bar = progress_bar(total, sink.tokens_done, progress, schedule.describe(out))
    steer_cm = mm.steer(**interventions) if interventions else contextlib.nullcontext()
    with attached(pm, probe_list, writer, bar), steer_cm, torch.inference_mode():
        schedule.run(pipe, todo, pad, bar)
        if estimated:
            bar.total = bar.n
            bar.refresh()
    if not schedule.materialize:
        cut.warn()
    schedule.finish(writer)
    return open_run(out)


def _estimate_tokens(ds, tokenizer, max_tokens: int | None, done: int) -> int:
    """The tokens a streamed capture will hold, from the characters and a sample's tokens per character."""
    texts = [r["text"] for r in ds.records]
    sample = "".join(texts[:64])[:20000]
    per_char = len(tokenizer(sample, add_special_tokens=False)["input_ids"]) / max(1, len(sample))
    est = int(per_char * sum(map(len, texts)))
    return max(done, min(est, max_tokens) if max_tokens else est)


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
    manifest = Manifest.new(identity=identity, model=mm.describe(), dataset=ds.describe(),
                            label_columns=ds.label_columns, probes=settings["probes"], settings=settings,
                            interventions=inter, dtype=str(next(mm.model.parameters()).dtype),
                            device=str(mm.device), versions=versions()).to_json()
    w = RunWriter(out, manifest, overwrite=overwrite)
    if w.already_complete:
        return open_run(out)
    writer = PartWriter(w, probe_list, TokenDecoder(mm.tokenizer), labels_table(ds), part_tokens=1 << 62)
    pipe = ProbePipeline(mm, probe_list, writer)
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
    bar = progress_bar(len(ds.records), 0, progress, "generate", unit="prompt")
    try:
        with attached(mm, probe_list, writer, bar), steer_cm, torch.inference_mode():
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
