"""Cost of steering hooks on CPU: plain forward vs ban / force / boost / zero, and the redone rule alone.

    python benchmarks/steering_overhead.py --out benchmarks/results/steering_overhead_cpu.json

Random weights, fp32, eager experts, small shapes so it runs on a laptop-class CPU in about a minute:
an OLMoE-like (64 experts, top-8) and a DeepSeek-V3-like (64 experts in 8 groups, top-6) model of
4 layers, hidden 256, one batch of 4 x 256 tokens. `route_only` times the redone routing rule alone on
[16384, 64] logits. Medians of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "olmoe_like": dict(model_type="olmoe", num_experts=64, num_experts_per_tok=8, norm_topk_prob=False),
    "deepseek_v3_like": dict(model_type="deepseek_v3", n_routed_experts=64, num_experts_per_tok=6, n_group=8,
                             topk_group=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=32,
                             q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                             routed_scaling_factor=2.5, norm_topk_prob=True),
}


def build(shape: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.loading import wrap_model
    from workbench.models.tiny import _spread_router, byte_tokenizer

    kw = dict(SHAPES[shape])
    mt = kw.pop("model_type")
    cfg = AutoConfig.for_model(mt, num_hidden_layers=4, hidden_size=256, intermediate_size=256,
                               moe_intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                               vocab_size=320, max_position_embeddings=1024, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    _spread_router(model, 0)
    return wrap_model(model, byte_tokenizer())


def timeit(fns: dict, repeats: int) -> dict:
    """Median ms per case; cases run round-robin so load drift on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t)
    return {k: round(statistics.median(v) * 1e3, 2) for k, v in ts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    from workbench.probes.interventions import route, router_params

    torch.set_num_threads(1)  # the benchmark machine is shared; one thread gives steadier numbers
    results = {}
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(0))
    for shape in SHAPES:
        mm = build(shape)
        layers = mm.moe_layers
        cases = {
            "plain": {},
            "ban_1_per_layer": {"ban": [(lyr, 3) for lyr in layers]},
            "force_1_per_layer": {"force": [(lyr, 3) for lyr in layers]},
            "boost_1_per_layer": {"boost": {(lyr, 3): 0.5 for lyr in layers}},
            "zero_1_per_layer": {"zero": [(lyr, 3) for lyr in layers]},
        }
        fwds = {}
        for name, inter in cases.items():
            def fwd(inter=inter):
                with torch.inference_mode(), mm.steer(**inter):
                    mm.model(input_ids=ids, use_cache=False)
            fwds[name] = fwd
        p = router_params(mm, mm.layer(layers[0]))
        logits = torch.randn(16384, mm.n_experts, generator=torch.Generator().manual_seed(1))
        ban = torch.zeros(mm.n_experts, dtype=torch.bool)
        ban[3] = True
        forward = timeit(fwds, args.repeats)
        with torch.inference_mode():
            routing = timeit({"plain": lambda: route(p, logits), "ban": lambda: route(p, logits, ban=ban)},
                             args.repeats)
        results[shape] = {"forward_ms": forward, "route_only_ms_16384x64": routing,
                          "tokens": int(ids.numel()), "moe_layers": len(layers), "experts": mm.n_experts,
                          "top_k": mm.top_k}
        print(shape, json.dumps(results[shape]))
    import transformers

    out = {"benchmark": "steering_overhead", "device": "cpu", "threads": 1, "machine": platform.processor() or
           platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "repeats": args.repeats, "results": results,
           "note": "shared 2-core machine: differences under ~15% are noise"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
