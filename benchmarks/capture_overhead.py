"""Capture overhead on the GPU: plain forward vs `workbench.capture` with probes, end to end.

    python benchmarks/capture_overhead.py --shape olmoe --out benchmarks/results/capture_olmoe_h200.json

Random weights in the shape of OLMoE-1B-7B (16 L, hidden 2048, 64 experts, top-8) or of 12 layers
of Qwen3-30B-A3B (128 experts, top-8), bf16, 8 x 2048 tokens a forward, the model's default
experts implementation (grouped_mm).

Why this method: two whole captures of n1 and n2 batches, differenced, moved by tens of percent between
repetitions (Qwen3 routing -4% to +28%) because each capture's start and drain (encoding the last
parts after the last forward) vary more than the effect. Now every measurement is one loop of N
batches with a timestamp at each forward call, and the cost per batch is the steady rate
(t[N-1] - t[k]) / (N-1-k) after the first k batches:
  A  plain forward over N batches (inputs already on the device, no sync between batches);
  B  the real capture pipeline (hooks, async pinned copies, writer threads, Parquet, manifest) over
     N batches, through `workbench.capture` itself (its model call is timestamped).
The host runs ahead of the GPU by a bounded launch queue and the writer's queue is bounded too, so
in steady state the forward calls come at the pace of the slowest of GPU, main thread and writer.
With one-batch parts the writer's slack is at most ~12 batches (queue 4 + parts in flight), so
k >= 12 lets a writer that cannot keep up show in the rate. `drain_s` (last forward to capture
returned) is reported too, the once-per-capture tail a long run amortises.
Per repetition the configurations rotate, A B A B ... A (a plain loop before and after each capture); overhead = B / mean(A, A') - 1,
reported as median with min/max over the repetitions; the noise floor is |A'/A - 1|.
gpu_only (probes + async copies, no writer; --gpu-only) splits GPU-side from host-side cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


SHAPES = {
    "olmoe": dict(model_type="olmoe", num_hidden_layers=16, hidden_size=2048, intermediate_size=1024,
                  num_experts=64, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16,
                  vocab_size=50304, norm_topk_prob=False),
    "qwen3": dict(model_type="qwen3_moe", num_hidden_layers=12, hidden_size=2048, moe_intermediate_size=768,
                  intermediate_size=6144, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True),
}


DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(shape: str, tiny: bool = False):
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.loading import wrap_model
    from workbench.models.tiny import byte_tokenizer

    kw = dict(SHAPES[shape])
    mt = kw.pop("model_type")
    if tiny:  # a CPU dry run of the script itself, numbers meaningless
        kw.update(num_hidden_layers=2, hidden_size=64, intermediate_size=32, moe_intermediate_size=32, vocab_size=512,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        kw = {k: v for k, v in kw.items() if k in SHAPES[shape] or k in ("head_dim",)}
    cfg = AutoConfig.for_model(mt, max_position_embeddings=4096, tie_word_embeddings=False, **kw)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.eval()
    return wrap_model(model, byte_tokenizer(), spec=f"random-{shape}")


def texts(n_tokens: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ,.ETAOINSHRDLU0123456789", dtype=np.uint8)
    chars = alphabet[rng.integers(0, len(alphabet), n_tokens)].tobytes().decode()
    return [chars[i:i + 4000] for i in range(0, len(chars), 4000)]


def batches(mm, n_batches: int, seq_len: int, batch_size: int):
    from workbench.data import load_dataset
    from workbench.pipeline import batch_context, build_sequences

    data = texts(n_batches * seq_len * batch_size + 1000)
    seqs = build_sequences(load_dataset(data), mm.tokenizer, seq_len=seq_len,
                           max_tokens=n_batches * seq_len * batch_size)
    out = []
    for i in range(0, len(seqs), batch_size):
        ctx, *_ = batch_context(seqs[i:i + batch_size], mm.tokenizer.pad_token_id, mm.device)
        out.append(ctx)
    return data, out


class _Stamps:
    """Timestamps of the model's forward calls (an instance attribute shadows the class's forward)."""

    def __init__(self, model):
        self.model, self.t = model, []
        inner = model.forward

        def forward(*a, **kw):
            self.t.append(time.perf_counter())
            return inner(*a, **kw)

        model.forward = forward

    def close(self):
        del self.model.forward

    def rate(self, skip: int) -> float:
        """Seconds per batch in steady state: forward calls skip .. last."""
        t = self.t[skip:]
        return (t[-1] - t[0]) / (len(t) - 1)


def plain_time(mm, ctxs, skip: int) -> float:
    with torch.inference_mode():
        st = _Stamps(mm.model)
        try:
            for c in ctxs:
                mm.model(input_ids=c.input_ids, attention_mask=c.attention_mask, use_cache=False)
            _sync()
        finally:
            st.close()
    return st.rate(skip)


def gpu_only_time(mm, ctxs, probe_names, logits=False) -> float:
    from workbench.capture import make_probes

    probes = make_probes(probe_names, logits=logits)
    for p in probes:
        p.attach(mm)
    try:
        with torch.inference_mode():
            def one(c):
                for p in probes:
                    p.begin(c)
                mm.model(input_ids=c.input_ids, attention_mask=c.attention_mask, use_cache=False)
                for p in probes:
                    for t in p.harvest().values():
                        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=DEVICE == "cuda")
                        h.copy_(t, non_blocking=True)
                    p.ctx = None
            for c in ctxs[:2]:
                one(c)
            _sync()
            t = time.perf_counter()
            for c in ctxs:
                one(c)
            _sync()
            return (time.perf_counter() - t) / len(ctxs)
    finally:
        for p in probes:
            p.detach()


def capture_time(mm, data, n_batches, probe_names, logits, seq_len, batch_size, root, part_tokens, skip):
    """(steady seconds per batch, drain seconds after the last forward call, forward loop waiting on the writer)."""
    import workbench as wb

    out = Path(root) / f"run_{'_'.join(probe_names)}_{int(logits)}_{n_batches}"
    _sync()
    st = _Stamps(mm.model)
    try:
        wb.capture(mm, data, out, probes=probe_names, logits=logits, seq_len=seq_len, batch_size=batch_size,
                   max_tokens=n_batches * seq_len * batch_size, overwrite=True, progress=False,
                   part_tokens=part_tokens)
        _sync()
        drain = time.perf_counter() - st.t[-1]
    finally:
        st.close()
    wait = json.loads((out / "manifest.json").read_text()).get("writer_wait_s")
    shutil.rmtree(out, ignore_errors=True)
    return st.rate(skip), drain, wait


def _summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = lambda f: xs[min(len(xs) - 1, int(round(f * (len(xs) - 1))))]  # noqa: E731
    return {"median": round(statistics.median(xs), 4), "min": round(xs[0], 4), "max": round(xs[-1], 4),
            "iqr": [round(q(0.25), 4), round(q(0.75), 4)], "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="olmoe")
    ap.add_argument("--batches", type=int, default=24, help="batches per measured loop (N)")
    ap.add_argument("--skip", type=int, default=12, help="first batches left out of the steady rate (k)")
    ap.add_argument("--part-batches", type=int, default=1, help="batches per Parquet part (1 = 16,384 tokens)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions (>= 5 for a median worth quoting)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--configs", default="routing;routing+logits;routing,experts")
    ap.add_argument("--gpu-only", action="store_true", help="also time probes + copies without the writer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes, to dry-run the script on CPU")
    args = ap.parse_args()
    if args.batches < args.skip + 4:
        ap.error("--batches must exceed --skip by at least 4")
    part_tokens = args.part_batches * args.seq_len * args.batch_size
    global DEVICE
    DEVICE = args.device
    import transformers

    mm = build(args.shape, args.tiny)
    impl = mm.model.config._experts_implementation
    data, ctxs = batches(mm, args.batches, args.seq_len, args.batch_size)
    ctxs = ctxs[:args.batches]
    plain_time(mm, ctxs[:4], skip=1)  # warm
    root = tempfile.mkdtemp(prefix="wb_bench_")
    specs = args.configs.split(";")
    parsed = {sp: (sp.replace("+logits", "").split(","), sp.endswith("+logits")) for sp in specs}
    gpu_only = {}
    for sp, (names, logits) in parsed.items():
        if args.gpu_only:
            gpu_only[sp] = gpu_only_time(mm, ctxs, names, logits)
        capture_time(mm, data, 2, names, logits, args.seq_len, args.batch_size, root, part_tokens, 0)  # warm
    per = {sp: {"overhead": [], "capture_ms": [], "plain_ms": [], "noise": [], "drain_s": [], "writer_wait_s": []}
           for sp in specs}
    targets = {"routing": 0.02, "routing+logits": 0.05, "routing,experts": 0.05}

    def summarise():
        all_noise = [abs(x) for d in per.values() for x in d["noise"]]
        noise_floor = {"median_abs": round(statistics.median(all_noise), 4), "max_abs": round(max(all_noise), 4)}
        plain_all = [x for d in per.values() for x in d["plain_ms"]]
        results = []
        for sp in specs:
            names, logits = parsed[sp]
            d = per[sp]
            if not d["overhead"]:
                continue
            ov = _summary(d["overhead"])
            row = {"config": sp, "probes": names, "logits": logits, "overhead": ov,
                   "overhead_reps": [round(x, 4) for x in d["overhead"]],
                   "capture_ms_per_batch": d["capture_ms"], "plain_ms_per_batch": d["plain_ms"],
                   "plain_noise_reps": [round(x, 4) for x in d["noise"]], "drain_s": d["drain_s"],
                   "forward_loop_waiting_on_writer_s": d["writer_wait_s"]}
            if sp in gpu_only:
                row["gpu_only_overhead"] = round(gpu_only[sp] / statistics.median(plain_all) * 1e3 - 1, 4)
            if sp in targets:
                t = targets[sp]
                row["target"] = t
                row["target_met"] = ov["median"] <= t
                row["missed_by"] = round(max(0.0, ov["median"] - t), 4)
                row["within_noise"] = abs(ov["median"]) <= noise_floor["max_abs"]
            results.append(row)
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            triton_version = None
        res = {
            "benchmark": "capture_overhead",
            "method": "steady per-batch rate of forward calls (batches skip..N-1) inside one loop; A B A' per "
                      "repetition, rotating configs",
            "shape": args.shape, "config": SHAPES[args.shape],
            "tokens_per_batch": args.seq_len * args.batch_size, "dtype": "bfloat16", "reps": args.reps,
            "batches": args.batches, "skip": args.skip, "part_batches": args.part_batches,
            "reps_done": len(per[specs[0]]["overhead"]), "experts_implementation_plain": impl,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "device": torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor(), "cpus": os.cpu_count(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
                         "python": platform.python_version()},
            "plain_ms_per_batch_median": round(statistics.median(plain_all), 2),
            "noise_floor": noise_floor, "results": results, "targets": targets,
        }
        if args.out:  # after every repetition: a run cut short still leaves its numbers
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))
        return res, results, noise_floor

    for r in range(args.reps):
        order = specs[r % len(specs):] + specs[:r % len(specs)]  # rotate: no configuration always runs first
        a2 = plain_time(mm, ctxs, args.skip)
        for sp in order:  # A B A B ... A: each capture between two plain loops, each plain loop shared
            names, logits = parsed[sp]
            a1 = a2
            b, drain, wait = capture_time(mm, data, args.batches, names, logits, args.seq_len, args.batch_size, root,
                                          part_tokens, args.skip)
            a2 = plain_time(mm, ctxs, args.skip)
            base = (a1 + a2) / 2
            d = per[sp]
            d["overhead"].append(b / base - 1)
            d["capture_ms"].append(round(b * 1e3, 2))
            d["plain_ms"].append(round(base * 1e3, 2))
            d["noise"].append(a2 / a1 - 1)
            d["drain_s"].append(round(drain, 3))
            d["writer_wait_s"].append(wait)
            print(f"rep {r} {sp:22s} plain {a1 * 1e3:7.1f}/{a2 * 1e3:7.1f} ms  capture {b * 1e3:7.1f} ms  "
                  f"{b / base - 1:+.2%}  drain {drain:.2f} s", flush=True)
        summarise()
    shutil.rmtree(root, ignore_errors=True)
    res, results, noise_floor = summarise()
    print(f"noise floor |A'/A-1|: median {noise_floor['median_abs']:.2%}, max {noise_floor['max_abs']:.2%}")
    print(f"{'config':22s} {'median':>8s} {'min':>8s} {'max':>8s} target")
    for r in results:
        o = r["overhead"]
        tgt = f"{r.get('target', 0):.0%} {'met' if r.get('target_met') else 'missed by %.1f pts' % (100 * r.get('missed_by', 0))}"
        print(f"{r['config']:22s} {o['median']:+8.2%} {o['min']:+8.2%} {o['max']:+8.2%} {tgt}")


if __name__ == "__main__":
    main()
