"""Cost of a replayed forward (recorded routes forced at every MoE layer) against the plain forward.

    python benchmarks/replay_overhead.py --out benchmarks/results/replay_overhead_cpu.json
    python benchmarks/replay_overhead.py --model olmoe_like --device cuda --dtype bfloat16 \\
        --batch 8 --seq 2048 --out benchmarks/results/replay_overhead_h100.json

Cases, run round-robin (A B C D A B C D ...) so load drift on a shared machine hits all alike:
- plain: the model's forward, no hook;
- watch: the replay hooks attached, nothing forced (what recording the router's own choice costs);
- replay_ids_weights: recorded expert ids and weights forced at every MoE layer (`workbench replay` on a
  capture);
- replay_ids_only: ids forced, weights from the model's router scores restricted to them (an engine import);
- replay_ids_weights_margins: ids + weights, and each decision's router margin recorded (what the replayed
  forward of `workbench replay` does).
The routes are the model's own (captured once), so the experts do the same work in every case and the
difference is the replay machinery; like `replay`, they are handed over as host tensors each forward.
Reported: per case the median ms and the interquartile range over --repeats rounds, and per replay case
the median of the per-round ratios to plain (with min and max).
`end_to_end` times `workbench.replay` itself (two forwards per batch plus KL and tables) per token
against the plain forward per token, for scale.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # random weights, for machines without the demo model's shapes of interest
    "olmoe_like": dict(model_type="olmoe", num_hidden_layers=16, hidden_size=2048, intermediate_size=1024,
                       num_experts=64, num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=16,
                       vocab_size=50304, norm_topk_prob=False),
}


def build(spec: str, device: str, dtype: str):
    from workbench.models.loading import load_model, wrap_model

    if spec not in SHAPES:
        return load_model(spec, device=device, dtype=dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.tiny import byte_tokenizer

    kw = dict(SHAPES[spec])
    cfg = AutoConfig.for_model(kw.pop("model_type"), max_position_embeddings=4096, **kw)
    torch.manual_seed(0)
    impl = "eager" if device == "cpu" else "grouped_mm"
    with torch.device(device):  # random weights made where they run (a CPU init of 7B parameters takes minutes)
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl, dtype=getattr(torch, dtype))
    return wrap_model(model, byte_tokenizer(), spec=spec)


def q(v, p):
    v = sorted(v)
    i = (len(v) - 1) * p
    lo, hi = int(i), min(int(i) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (i - lo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    from workbench.probes.interventions import forced_routes

    torch.set_num_threads(args.threads)
    mm = build(args.model, args.device, args.dtype)
    dev = mm.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(mm.model.config.vocab_size, 5000), (args.batch, args.seq), generator=gen).to(dev)
    cuda = dev.type == "cuda"
    rows = torch.arange(ids.numel())

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with forced_routes(mm) as fr, torch.inference_mode():  # the model's own routes, kept on the host
        fr.set(None)
        mm.model(input_ids=ids, use_cache=False)
        own = {layer: fr.own[layer].cpu() for layer in fr.layers}
        seen_w = {}
        hs = [lay.router.register_forward_hook(lambda m, a, o, i=lay.index: seen_w.__setitem__(i, o[1].float().cpu()))
              for lay in mm.layers]
        mm.model(input_ids=ids, use_cache=False)
        for h in hs:
            h.remove()
    with_w = {layer: (rows, own[layer], seen_w[layer]) for layer in own}
    ids_only = {layer: (rows, own[layer], None) for layer in own}

    def plain():
        with torch.inference_mode():
            mm.model(input_ids=ids, use_cache=False)

    def replayed(routes, margins=False):
        def fn():
            with forced_routes(mm, margins=margins) as fr, torch.inference_mode():
                fr.set(routes)
                mm.model(input_ids=ids, use_cache=False)
        return fn

    cases = {"plain": plain, "watch": replayed(None), "replay_ids_weights": replayed(with_w),
             "replay_ids_only": replayed(ids_only), "replay_ids_weights_margins": replayed(with_w, True)}
    for fn in cases.values():  # warm-up
        fn()
        sync()
    ts = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts[k].append(time.perf_counter() - t)
    res = {k: {"median_ms": round(statistics.median(v) * 1e3, 2), "q25_ms": round(q(v, 0.25) * 1e3, 2),
               "q75_ms": round(q(v, 0.75) * 1e3, 2)} for k, v in ts.items()}
    for k in ("watch", "replay_ids_weights", "replay_ids_only", "replay_ids_weights_margins"):
        r = [a / b for a, b in zip(ts[k], ts["plain"])]
        res[k]["ratio_to_plain"] = {"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                                    "max": round(max(r), 3)}
    print(json.dumps(res, indent=1))

    # end to end: workbench.replay on a capture of the same tokens (fewer rounds: it is slow by design)
    import workbench as wb

    e2e = None
    if not cuda or args.batch * args.seq <= 8192:
        with tempfile.TemporaryDirectory() as tmp:
            texts = [mm.tokenizer.decode(r[: args.seq // 2]) for r in ids.cpu().tolist()]
            run = wb.capture(mm, texts, Path(tmp) / "run", batch_size=args.batch, progress=False)
            n = run.tokens.select("pos").collect().height
            t_rep, t_plain = [], []
            for _ in range(3):
                t = time.perf_counter()
                wb.replay(mm, run, progress=False)
                sync()
                t_rep.append((time.perf_counter() - t) / n)
                t = time.perf_counter()
                plain()
                sync()
                t_plain.append((time.perf_counter() - t) / ids.numel())
            e2e = {"tokens": n, "replay_us_per_token": round(statistics.median(t_rep) * 1e6, 1),
                   "plain_forward_us_per_token": round(statistics.median(t_plain) * 1e6, 1),
                   "ratio": round(statistics.median(t_rep) / statistics.median(t_plain), 2)}
            print("end to end", e2e)

    import transformers

    out = {"benchmark": "replay_overhead", "device": str(dev),
           "device_name": torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine()),
           "threads": args.threads if not cuda else None, "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "model": args.model,
           "dtype": args.dtype, "experts_implementation": getattr(mm.model.config, "_experts_implementation", None),
           "moe_layers": len(mm.moe_layers), "experts": mm.n_experts, "top_k": mm.top_k,
           "batch": args.batch, "seq": args.seq, "repeats": args.repeats, "forward": res, "end_to_end": e2e,
           "note": "cases interleaved round-robin; ratio = median of per-round ratios to plain (min, max)"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
