"""What a user waits for: `wb.capture` end to end (texts in, run out) vs a plain forward loop on the GPU.

    python benchmarks/capture_e2e.py --shape olmoe --tokens 1572864 --out benchmarks/results/capture_e2e_olmoe_h100.json

A  plain: the same batches, tokenised and padded beforehand and already on the device, one forward each,
   synchronised at the end (the fastest loop a user could write; no probe, nothing written).
B  `wb.capture(mm, texts, out, ...)`: tokenising, packing, hooks, device->host copies, Parquet parts,
   checksums, manifest; from the call to the returned run (the GPU synchronised at both ends).
Per repetition the configurations rotate, A B A C A ...: each capture between two plain loops;
overhead = B / mean(A before, A after) - 1, reported as median, min, max over the repetitions.

Each loop's forward calls are timestamped, so a capture's time splits into its steady rate (seconds per
batch from batch `skip` on, against the plain loop's) and a fixed cost (e2e - n x steady rate: start,
first batch, drain after the last forward), reported apart.

--profile: one capture with the host work of each stage timed (batch building on the worker thread,
begin/forward call/end on the main thread, waiting for the next batch, router hooks, the writer's
table building, Parquet encoding) and a check for device synchronisations inside a plain forward.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from capture_overhead import SHAPES, _summary, build, texts


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


class Stamps:
    """Timestamps of the model's forward calls."""

    def __init__(self, model):
        self.model, self.t = model, []
        inner = model.forward

        def forward(*a, **kw):
            self.t.append(time.perf_counter())
            return inner(*a, **kw)

        model.forward = forward

    def close(self):
        del self.model.forward

    def rate(self, skip):
        t = self.t[skip:]
        return (t[-1] - t[0]) / (len(t) - 1)


def plain_batches(mm, data, n_tokens, seq_len, bs):
    from workbench.data import load_dataset
    from workbench.pipeline import batch_context, build_sequences

    seqs = build_sequences(load_dataset(data), mm.tokenizer, seq_len=seq_len, max_tokens=n_tokens)
    pad = mm.tokenizer.pad_token_id or 0
    return [batch_context(seqs[i:i + bs], pad, mm.device)[0] for i in range(0, len(seqs), bs)]


def plain(mm, ctxs, skip):
    """(e2e seconds, steady seconds per batch)."""
    dev = mm.device
    with torch.inference_mode():
        _sync(dev)
        st = Stamps(mm.model)
        t0 = time.perf_counter()
        try:
            for c in ctxs:
                mm.model(input_ids=c.input_ids, attention_mask=c.attention_mask, use_cache=False)
            _sync(dev)
        finally:
            st.close()
        t1 = time.perf_counter()
    return t1 - t0, st.rate(skip)


def capture(mm, data, n_tokens, names, logits, seq_len, bs, root, skip, keep=False, part_tokens=65536):
    import workbench as wb

    out = Path(root) / f"run_{'_'.join(names)}_{int(logits)}"
    if out.exists():
        shutil.rmtree(out)
    dev = mm.device
    _sync(dev)
    st = Stamps(mm.model)
    t0 = time.perf_counter()
    try:
        wb.capture(mm, data, out, probes=names, logits=logits, seq_len=seq_len, batch_size=bs, max_tokens=n_tokens,
                   overwrite=True, progress=False, part_tokens=part_tokens)
        _sync(dev)
    finally:
        st.close()
    t1 = time.perf_counter()
    m = json.loads((out / "manifest.json").read_text())
    res = {"e2e": t1 - t0, "rate": st.rate(skip), "start": st.t[0] - t0, "tail": t1 - st.t[-1],
           "n": len(st.t), "tokens": sum(p["tokens"] for p in m["parts"]), "writer_wait_s": m.get("writer_wait_s")}
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return res, out


def routing_exact(mm, ctx0, run_dir) -> dict:
    """Rows of the first batch in the run vs the routers' own top-k of a plain forward: differing rows."""
    import pyarrow.parquet as pq

    seen = {}
    hs = [layer.router.register_forward_hook(
        lambda mod, a, out, i=layer.index: seen.__setitem__(i, out[2].reshape(-1, out[2].shape[-1]).cpu()))
        for layer in mm.layers]
    try:
        with torch.inference_mode():
            mm.model(input_ids=ctx0.input_ids, attention_mask=ctx0.attention_mask, use_cache=False)
    finally:
        for h in hs:
            h.remove()
    t = pq.read_table(sorted((Path(run_dir) / "routing").glob("part-*.parquet"))[0]).to_pandas()
    n_docs = ctx0.input_ids.shape[0]
    t = t[t.doc_id < n_docs].sort_values(["doc_id", "pos", "layer"])
    got = np.stack(t.experts.to_numpy()).reshape(-1, len(mm.layers), len(t.experts.iloc[0]))
    want = torch.stack([seen[i] for i in mm.moe_layers], 1).numpy()
    diff = int((got != want).any(-1).sum())
    return {"rows": int(got.shape[0] * got.shape[1]), "rows_differing": diff}


def sync_points(mm, ctx) -> list[str]:
    """Where a plain forward makes the host wait for the device (torch's sync debug mode)."""
    out = collections.Counter()
    with warnings.catch_warnings(record=True) as w, torch.inference_mode():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask, use_cache=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for x in w:
        out[f"{Path(x.filename).name}:{x.lineno}: {str(x.message)[:80]}"] += 1
    return [f"{n}x {k}" for k, n in out.most_common(12)]


def profile(mm, data, n_tokens, seq_len, bs, root, logits):
    """Host seconds per batch in each stage of one capture."""
    from workbench import pipeline
    from workbench.probes.routing import RoutingProbe
    from workbench.store import PartFiles

    acc = collections.defaultdict(float)
    cnt = collections.Counter()
    patched = []

    def wrap(owner, name, key):
        orig = getattr(owner, name)

        def f(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[key] += time.perf_counter() - t
                cnt[key] += 1
        setattr(owner, name, f)
        patched.append((owner, name, orig))

    wrap(pipeline, "batch_context", "worker: batch_context (pad, pinned H2D)")
    wrap(pipeline.ProbePipeline, "begin", "main: begin")
    wrap(pipeline.ProbePipeline, "end", "main: end (harvest, pinned D2H, queue)")
    wrap(pipeline.PartWriter, "put", "main: writer queue put")
    wrap(pipeline.PartWriter, "_process", "writer: to_table + token columns")
    wrap(PartFiles, "write_table_file", "encoders: parquet + fsync + checksum")
    fwd = type(mm.model).forward

    class Timed(type(mm.model)):  # the model's class, with the call timed (Stamps wraps the instance)
        def forward(self, *a, **k):
            t = time.perf_counter()
            try:
                return fwd(self, *a, **k)
            finally:
                acc["main: model call (host, hooks included)"] += time.perf_counter() - t
    cls = mm.model.__class__
    mm.model.__class__ = Timed
    orig_hook = RoutingProbe._hook

    def hook_factory(self, index):
        h = orig_hook(self, index)

        def timed(*a):
            t = time.perf_counter()
            r = h(*a)
            acc["main: routing hooks"] += time.perf_counter() - t
            return r
        return timed
    RoutingProbe._hook = hook_factory
    orig_iter = pipeline._Ahead.__iter__

    def it(self):
        g = orig_iter(self)
        while True:
            t = time.perf_counter()
            try:
                x = next(g)
            except StopIteration:
                return
            finally:
                acc["main: waiting for the next batch"] += time.perf_counter() - t
            yield x
    pipeline._Ahead.__iter__ = it
    try:
        res, _ = capture(mm, data, n_tokens, ["routing"], logits, seq_len, bs, root, skip=2)
    finally:
        RoutingProbe._hook = orig_hook
        pipeline._Ahead.__iter__ = orig_iter
        mm.model.__class__ = cls
        for owner, name, orig in reversed(patched):
            if owner is mm.model:
                mm.model.__dict__.pop("forward", None)
            else:
                setattr(owner, name, orig)
    n = res["n"]
    return {"batches": n, "ms_per_batch": {k: round(v / n * 1e3, 3) for k, v in sorted(acc.items())},
            "capture": {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--tokens", type=int, default=1572864)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--configs", default="routing;routing+logits")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, to dry-run the script on CPU")
    args = ap.parse_args()
    import capture_overhead

    capture_overhead.DEVICE = args.device
    if args.layers:
        SHAPES[args.shape] = dict(SHAPES[args.shape], num_hidden_layers=args.layers)
    import transformers

    t = time.perf_counter()
    mm = build(args.shape, args.tiny)
    print(f"built {args.shape} ({mm.n_layers} layers) in {time.perf_counter() - t:.1f} s", flush=True)
    data = texts(args.tokens + 10000)
    ctxs = plain_batches(mm, data, args.tokens, args.seq_len, args.batch_size)
    root = tempfile.mkdtemp(prefix="wb_e2e_")
    specs = args.configs.split(";")
    # "routing@nosi": the capture with Python's default GIL switch interval (pipeline.SWITCH_INTERVAL off)
    parsed = {sp: (sp.split("@")[0].replace("+logits", "").split(","), sp.split("@")[0].endswith("+logits"))
              for sp in specs}
    plain(mm, ctxs[:3], 0)  # warm
    warm_tokens = 2 * args.seq_len * args.batch_size
    for sp, (names, lg) in parsed.items():
        _, run_dir = capture(mm, data, warm_tokens, names, lg, args.seq_len, args.batch_size, root, 0, keep=True)
    exact = routing_exact(mm, ctxs[0], run_dir) if args.device == "cuda" or args.tiny else None
    extra = {}
    if args.profile:
        if args.device == "cuda":
            extra["sync_points_plain_forward"] = sync_points(mm, ctxs[0])
        extra["profile"] = profile(mm, data, min(args.tokens, 48 * args.seq_len * args.batch_size), args.seq_len,
                                   args.batch_size, root, False)
        print(json.dumps(extra, indent=1), flush=True)
    per = {sp: collections.defaultdict(list) for sp in specs}
    machine = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
               "cpus": os.cpu_count(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()}}

    def summarise():
        results = []
        for sp in specs:
            d = per[sp]
            if not d["e2e"]:
                continue
            results.append({
                "config": sp, "e2e_overhead": _summary(d["e2e"]), "steady_overhead": _summary(d["steady"]),
                "fixed_extra_s": _summary(d["fixed"]), "e2e_overhead_reps": [round(x, 4) for x in d["e2e"]],
                "steady_overhead_reps": [round(x, 4) for x in d["steady"]],
                "capture_s": d["capture_s"], "plain_s": d["plain_s"], "start_s": d["start"], "tail_s": d["tail"],
                "plain_noise_reps": [round(x, 4) for x in d["noise"]], "writer_wait_s": d["wait"]})
        res = {"benchmark": "capture_e2e", "shape": args.shape, "layers": mm.n_layers, "config": SHAPES[args.shape],
               "tokens": args.tokens, "batches": len(ctxs), "tokens_per_batch": args.seq_len * args.batch_size,
               "dtype": "bfloat16", "reps": args.reps, "skip": args.skip, "date": time.strftime("%Y-%m-%d %H:%M"),
               **machine, "method": "A B A C A per repetition, configurations rotated; e2e = wb.capture call to "
               "return (texts in, run out) vs a pre-tokenised plain loop on the device; steady = per-batch rate "
               "of forward calls from batch skip on; fixed = capture e2e - n x its steady rate, minus the same "
               "for the plain loop", "routing_exactness": exact, "results": results, **extra}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
        return res

    n = len(ctxs)
    for r in range(args.reps):
        order = specs[r % len(specs):] + specs[:r % len(specs)]
        a2 = plain(mm, ctxs, args.skip)
        for sp in order:
            names, lg = parsed[sp]
            a1 = a2
            from workbench import pipeline

            si = pipeline.SWITCH_INTERVAL
            pipeline.SWITCH_INTERVAL = None if sp.endswith("@nosi") else si
            try:
                b, _ = capture(mm, data, args.tokens, names, lg, args.seq_len, args.batch_size, root, args.skip)
            finally:
                pipeline.SWITCH_INTERVAL = si
            a2 = plain(mm, ctxs, args.skip)
            base_e2e, base_rate = (a1[0] + a2[0]) / 2, (a1[1] + a2[1]) / 2
            d = per[sp]
            d["e2e"].append(b["e2e"] / base_e2e - 1)
            d["steady"].append(b["rate"] / base_rate - 1)
            d["fixed"].append((b["e2e"] - n * b["rate"]) - (base_e2e - n * base_rate))
            d["capture_s"].append(round(b["e2e"], 3))
            d["plain_s"].append(round(base_e2e, 3))
            d["start"].append(round(b["start"], 3))
            d["tail"].append(round(b["tail"], 3))
            d["noise"].append(a2[0] / a1[0] - 1)
            d["wait"].append(b["writer_wait_s"])
            print(f"rep {r} {sp:16s} plain {a1[0]:7.3f}/{a2[0]:7.3f} s capture {b['e2e']:7.3f} s "
                  f"e2e {d['e2e'][-1]:+.2%} steady {d['steady'][-1]:+.2%} fixed {d['fixed'][-1]:+.3f} s "
                  f"(start {b['start']:.3f} tail {b['tail']:.3f})", flush=True)
        summarise()
    res = summarise()
    shutil.rmtree(root, ignore_errors=True)
    for row in res["results"]:
        print(row["config"], "e2e", row["e2e_overhead"], "steady", row["steady_overhead"],
              "fixed", row["fixed_extra_s"])
    print("exact", exact)


if __name__ == "__main__":
    main()
