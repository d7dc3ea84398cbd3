"""Scaling benchmarks on one GPU: the full Qwen3-30B-A3B shape (48 layers, 128 experts, top-8, bf16,
random weights), captured three ways.

    python benchmarks/scale_gpu.py --out benchmarks/results/scale_qwen3_30b_h200.json

- full: the whole model on the GPU; tokens/s of the plain forward, routing capture, routing+experts
  capture (capture per batch = slope between n1 and n2 batches, so fixed setup is excluded) and the
  peak GPU memory of each.
- split: the last `--cpu-layers` decoder layers moved to host memory and the model dispatched with
  accelerate (`device_map` GPU + CPU; offloaded layers stream to the GPU each forward): plain vs
  routing+experts capture on the same split model, and rows checked equal to the single-device run.
- layerwise: `--layerwise-layers` layers of the same shape saved as safetensors, loaded with every
  decoder layer on disk, captured one layer at a time; tokens/s and peak GPU memory next to the same
  checkpoint fully on the GPU (per-layer figures scale to 48 layers; the disk here holds 64 GB).
`--tiny` dry-runs everything on the CPU with a toy shape (numbers meaningless).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

QWEN3_30B = dict(model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, moe_intermediate_size=768,
                 intermediate_size=6144, num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                 num_key_value_heads=4, head_dim=128, vocab_size=151936, norm_topk_prob=True)
TINY = dict(QWEN3_30B, num_hidden_layers=4, hidden_size=64, moe_intermediate_size=32, intermediate_size=64,
            num_experts=8, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=512)
DEV = "cuda"


def sync():
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset():
    if DEV.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEV.startswith("cuda") else None


def config(shape: dict, layers: int | None = None):
    from transformers import AutoConfig

    kw = dict(shape)
    mt = kw.pop("model_type")
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return AutoConfig.for_model(mt, max_position_embeddings=4096, tie_word_embeddings=False, **kw)


def build(cfg):
    from transformers import AutoModelForCausalLM

    from workbench.models.loading import wrap_model
    from workbench.models.tiny import byte_tokenizer

    torch.manual_seed(0)
    with torch.device(DEV):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return wrap_model(model.eval(), byte_tokenizer(), spec="random-qwen3-30b-a3b")


def texts(n_tokens: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ,.ETAOINSHRDLU0123456789", dtype=np.uint8)
    chars = alphabet[rng.integers(0, len(alphabet), n_tokens)].tobytes().decode()
    return [chars[i:i + 4000] for i in range(0, len(chars), 4000)]


def plain_tps(mm, data, n, seq_len, bs) -> float:
    from workbench.capture import _batch_context, build_sequences
    from workbench.data import load_dataset

    seqs = build_sequences(load_dataset(data), mm.tokenizer, seq_len=seq_len, max_tokens=n * seq_len * bs)
    ctxs = [_batch_context(seqs[i:i + bs], 0, mm.device)[0] for i in range(0, len(seqs), bs)]
    with torch.inference_mode():
        mm.model(input_ids=ctxs[0].input_ids, attention_mask=ctxs[0].attention_mask, use_cache=False)
        sync()
        t = time.perf_counter()
        for c in ctxs:
            mm.model(input_ids=c.input_ids, attention_mask=c.attention_mask, use_cache=False)
        sync()
    return n * seq_len * bs / (time.perf_counter() - t)


def capture_run(mm, data, n, probes, seq_len, bs, out, **kw) -> float:
    import workbench as wb

    sync()
    t = time.perf_counter()
    wb.capture(mm, data, out, probes=probes, seq_len=seq_len, batch_size=bs, max_tokens=n * seq_len * bs,
               overwrite=True, progress=False, **kw)
    sync()
    return time.perf_counter() - t


def capture_tps(mm, data, n1, n2, probes, seq_len, bs, root, **kw) -> float:
    """Steady-state tokens/s: (n2 - n1) batches over t(n2) - t(n1)."""
    t1 = capture_run(mm, data, n1, probes, seq_len, bs, Path(root) / "a", **kw)
    t2 = capture_run(mm, data, n2, probes, seq_len, bs, Path(root) / "b", **kw)
    return (n2 - n1) * seq_len * bs / (t2 - t1)


def rows(path, table):
    """Rows of a run table as a sorted Arrow table (pyarrow only: polars may be absent here)."""
    import pyarrow.parquet as pq

    m = json.loads((Path(path) / "manifest.json").read_text())
    import pyarrow as pa

    t = pa.concat_tables([pq.read_table(Path(path) / p["files"][table]) for p in m["parts"]])
    keys = [("doc_id", "ascending"), ("pos", "ascending"), ("layer", "ascending")]
    if "slot" in t.column_names:
        keys.append(("slot", "ascending"))
    return t.sort_by(keys)


def bench_full(args, res, root, data):
    cfg = config(args.shape)
    mm = build(cfg)
    n_params = sum(p.numel() for p in mm.model.parameters())
    out = {"layers": cfg.num_hidden_layers, "params_b": round(n_params / 1e9, 2)}
    peak_reset()
    out["plain_tok_s"] = round(plain_tps(mm, data, args.n2 - args.n1, args.seq_len, args.bs))
    out["plain_peak_gib"] = peak_gib()
    capture_run(mm, data, 1, ["routing", "experts"], args.seq_len, args.bs, Path(root) / "w")  # warm
    for name, probes in (("routing", ["routing"]), ("routing_experts", ["routing", "experts"])):
        peak_reset()
        out[f"{name}_tok_s"] = round(capture_tps(mm, data, args.n1, args.n2, probes, args.seq_len, args.bs, root))
        out[f"{name}_peak_gib"] = peak_gib()
        out[f"{name}_overhead"] = round(out["plain_tok_s"] / out[f"{name}_tok_s"] - 1, 4)
    print("full", json.dumps(out), flush=True)
    res["full"] = out
    # reference rows for the split check (a small capture)
    capture_run(mm, data, 2, ["routing", "experts"], args.seq_len, args.bs, Path(root) / "ref_rows")
    return mm


def bench_split(args, res, root, data, mm):
    from accelerate import dispatch_model

    from workbench.models.hooks import decoder_layers
    from workbench.models.loading import wrap_model

    layers = decoder_layers(mm.model)
    n = len(layers)
    k = min(args.cpu_layers, n - 1)
    dm = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    for i in range(n):
        dm[f"model.layers.{i}"] = "cpu" if i >= n - k else 0
        if i >= n - k:
            layers[i].to("cpu")
    if not DEV.startswith("cuda"):
        dm = {key: ("cpu" if v == 0 else v) for key, v in dm.items()}
    gc.collect()
    torch.cuda.empty_cache() if DEV.startswith("cuda") else None
    model = dispatch_model(mm.model, device_map=dm, main_device=DEV if DEV.startswith("cuda") else "cpu")
    sm = wrap_model(model, mm.tokenizer, spec="random-qwen3-30b-a3b-split")
    out = {"cpu_layers": k, "gpu_layers": n - k}
    peak_reset()
    out["plain_tok_s"] = round(plain_tps(sm, data, args.split_n, args.seq_len, args.bs))
    out["plain_peak_gib"] = peak_gib()
    capture_run(sm, data, 1, ["routing", "experts"], args.seq_len, args.bs, Path(root) / "w")
    peak_reset()
    out["routing_experts_tok_s"] = round(capture_tps(sm, data, 1, 1 + args.split_n, ["routing", "experts"],
                                                     args.seq_len, args.bs, root, part_tokens=args.seq_len * args.bs))
    out["routing_experts_peak_gib"] = peak_gib()
    out["capture_overhead_vs_split_plain"] = round(out["plain_tok_s"] / out["routing_experts_tok_s"] - 1, 4)
    if "full" in res:
        out["split_plain_vs_single_gpu_plain"] = round(res["full"]["plain_tok_s"] / out["plain_tok_s"], 2)
    capture_run(sm, data, 2, ["routing", "experts"], args.seq_len, args.bs, Path(root) / "split_rows")
    eq = {}
    for t in ("routing", "expert_stats"):
        a, b = rows(Path(root) / "ref_rows", t), rows(Path(root) / "split_rows", t)
        eq[t] = a.equals(b)
        if not eq[t]:  # bf16 on another path may round differently: report how many rows differ
            ea, eb = a.column("experts" if t == "routing" else "expert"), b.column("experts" if t == "routing" else "expert")
            eq[f"{t}_expert_ids_equal"] = ea.equals(eb)
    out["rows_equal_single_gpu"] = eq
    print("split", json.dumps(out), flush=True)
    res["split"] = out


def bench_layerwise(args, res, root, data):
    from workbench.layerwise import load_layerwise
    from workbench.models.tiny import byte_tokenizer

    cfg = config(args.shape, layers=args.layerwise_layers)
    ckpt = Path(root) / "ckpt"
    mm = build(cfg)
    t = time.perf_counter()
    mm.model.save_pretrained(ckpt, max_shard_size="4GB")
    byte_tokenizer().save_pretrained(ckpt)
    out = {"layers": cfg.num_hidden_layers, "save_s": round(time.perf_counter() - t, 1)}
    n = args.layerwise_batches
    peak_reset()
    out["gpu_resident_routing_experts_tok_s"] = round(
        capture_tps(mm, data, 1, 1 + n, ["routing", "experts"], args.seq_len, args.bs, root,
                    part_tokens=args.seq_len * args.bs))
    out["gpu_resident_peak_gib"] = peak_gib()
    del mm
    gc.collect()
    torch.cuda.empty_cache() if DEV.startswith("cuda") else None
    peak_reset()
    t = time.perf_counter()
    lw = load_layerwise(str(ckpt), device=DEV, offload_folder=str(Path(root) / "offload"))
    out["layerwise_load_s"] = round(time.perf_counter() - t, 1)
    out["after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2) if DEV.startswith("cuda") else None
    peak_reset()
    tt = capture_run(lw, data, n, ["routing", "experts"], args.seq_len, args.bs, Path(root) / "lw")
    out["layerwise_routing_experts_tok_s"] = round(n * args.seq_len * args.bs / tt)
    out["layerwise_tokens"] = n * args.seq_len * args.bs
    out["layerwise_peak_gib"] = peak_gib()
    out["note"] = ("layerwise wall time includes reading every layer from disk once per chunk "
                   f"(chunk = all {n} batches here); tokens/s for 48 layers ~ this x {cfg.num_hidden_layers}/48")
    print("layerwise", json.dumps(out), flush=True)
    res["layerwise"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--what", default="full,split,layerwise")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--n1", type=int, default=4, help="a multiple of the 4-batch part (equal tails cancel)")
    ap.add_argument("--n2", type=int, default=12)
    ap.add_argument("--cpu-layers", type=int, default=8)
    ap.add_argument("--split-n", type=int, default=3)
    ap.add_argument("--layerwise-layers", type=int, default=6)
    ap.add_argument("--layerwise-batches", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    global DEV
    if args.tiny or not torch.cuda.is_available():
        DEV = "cpu"
    args.shape = TINY if args.tiny else QWEN3_30B
    import transformers

    what = args.what.split(",")
    res = {"benchmark": "scale_gpu", "shape": "qwen3-30b-a3b" if not args.tiny else "tiny",
           "config": args.shape, "tokens_per_batch": args.seq_len * args.bs, "dtype": "bfloat16",
           "date": time.strftime("%Y-%m-%d %H:%M"),
           "device": torch.cuda.get_device_name() if DEV.startswith("cuda") else platform.processor(),
           "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()}}
    root = tempfile.mkdtemp(prefix="wb_scale_")
    n_tok = max(args.n2, args.layerwise_batches + 1, args.split_n + 1) * args.seq_len * args.bs + 10000
    data = texts(n_tok)

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(res, indent=1))

    try:
        mm = None
        if "full" in what:
            mm = bench_full(args, res, root, data)
            save()
        if "split" in what and mm is not None:
            bench_split(args, res, root, data, mm)
            save()
        del mm
        gc.collect()
        if DEV.startswith("cuda"):
            torch.cuda.empty_cache()
        if "layerwise" in what:
            shutil.rmtree(Path(root) / "a", ignore_errors=True)
            bench_layerwise(args, res, root, data)
            save()
    finally:
        shutil.rmtree(root, ignore_errors=True)
        save()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
