"""Peak host memory of a capture, normal path vs `--layerwise`, on the CPU.

    python benchmarks/layerwise_memory.py --out benchmarks/results/layerwise_memory_cpu.json

A random qwen3_moe checkpoint (default 8 layers, hidden 384, 16 experts: ~28 MB of weights a layer in
fp32) is written once; each mode then runs in a fresh process (so peaks do not mix) that loads the
model and captures routing + expert statistics. Reported: peak RSS above the process's RSS after
imports, tokens/s, and the weights' size (whole model, one layer). Layerwise peak should be about one
layer + the activations + the embeddings, the normal path's the whole model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
import workbench as wb
from workbench.layerwise import load_layerwise
from workbench.models.loading import load_model
torch.set_num_threads(int(sys.argv[4]))
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
base = rss_mb()
mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
mm = load_layerwise(ckpt, offload_folder=out + "_off") if mode == "layerwise" else load_model(ckpt)
load_s = time.perf_counter() - t
texts = ["the quick brown fox jumps over the lazy dog " * 10] * 16
t = time.perf_counter()
run = wb.capture(mm, texts, out, probes=["routing", "experts"], batch_size=8, progress=False)
cap_s = time.perf_counter() - t
n = sum(p["tokens"] for p in run.manifest["parts"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"mode": mode, "peak_rss_above_imports_mb": round(peak - base), "load_s": round(load_s, 1),
                  "capture_s": round(cap_s, 1), "tokens": n, "tok_s": round(n / cap_s)}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    from workbench.models.tiny import make_tiny

    root = Path(tempfile.mkdtemp(prefix="wb_lwmem_"))
    ckpt = make_tiny("qwen3_moe", root / "ckpt", layers=args.layers, experts=args.experts, top_k=4,
                     hidden=args.hidden)
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    from safetensors import safe_open

    layer0 = 0
    for f in ckpt.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            layer0 += sum(s.get_slice(k).get_shape().numel() if hasattr(s.get_slice(k).get_shape(), "numel") else
                          int(torch.Size(s.get_slice(k).get_shape()).numel()) for k in s.keys()
                          if k.startswith("model.layers.0.")) * 4
    res = {"benchmark": "layerwise_memory", "model": f"qwen3_moe random, {args.layers} layers, hidden {args.hidden}, "
           f"{args.experts} experts, fp32", "weights_mb": round(weights / 2**20), "one_layer_mb": round(layer0 / 2**20),
           "device": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "modes": []}
    for mode in ("normal", "layerwise"):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        r = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt), str(root / mode), str(args.threads)],
                           capture_output=True, text=True, env=env)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode or not line:
            raise SystemExit(r.stderr[-3000:])
        res["modes"].append(json.loads(line[-1]))
        print(line[-1], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
