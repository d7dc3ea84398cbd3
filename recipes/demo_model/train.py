"""Train the bundled demo model: a small fine-grained Qwen3-MoE on the pre-tokenized corpus (one GPU).

    python3 -m recipes.demo_model.train --data .device_carry/demo --out $OUT --steps 6000 --time-limit 480
    python3 -m recipes.demo_model.train --data .device_carry/demo --bench      # throughput check, no saving

Precision: weights live in bf16 for the forward/backward (the fused grouped_mm experts kernel is not
autocast-aware and wants one dtype), while AdamW updates fp32 master copies, so small updates are not
rounded away. The learning-rate schedule follows max(step fraction, time fraction), so a run cut short
by --time-limit still finishes its cosine decay. The checkpoint kept is the one with the best
validation loss (evaluated every --eval-every steps on a held-out 0.5% of the documents).
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from workbench.models.hooks import RouterOut

SEED = 0


def demo_config(vocab_size: int = 12288, eos_id: int = 0, pad_id: int = 1, **over):
    """8 layers x 64 experts (top-8, moe_intermediate 48): OLMoE-like granularity in ~24 M parameters."""
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, moe_intermediate_size=48,
              num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=64,
              num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
              max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
              router_aux_loss_coef=0.01, output_router_logits=False, bos_token_id=eos_id, eos_token_id=eos_id,
              pad_token_id=pad_id, initializer_range=0.02, attention_dropout=0.0)
    kw.update(over)
    return Qwen3MoeConfig(**kw)


def load_stream(path: Path) -> torch.Tensor:
    with lzma.open(path, "rb") as f:
        return torch.from_numpy(np.frombuffer(f.read(), dtype=np.uint16).astype(np.int64))


def lr_at(frac: float, peak: float, warmup_frac: float, floor: float = 0.1) -> float:
    if frac < warmup_frac:
        return peak * frac / warmup_frac
    p = min(1.0, (frac - warmup_frac) / max(1e-9, 1 - warmup_frac))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def evaluate(model, val: torch.Tensor, seq: int, batch: int = 32) -> float:
    model.eval()
    n = (val.numel() - 1) // seq
    x = val[: n * seq + 1]
    inp = x[:-1].view(n, seq)
    tgt = x[1:].view(n, seq)
    tot, cnt = 0.0, 0
    for i in range(0, n, batch):
        logits = model(input_ids=inp[i:i + batch]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tgt[i:i + batch].reshape(-1),
                                                 reduction="sum")
        tot += loss.item()
        cnt += tgt[i:i + batch].numel()
    model.train()
    return tot / cnt


def build_model(cfg, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.to(device=device, dtype=torch.bfloat16)


def expert_load(model, data: torch.Tensor, seq: int, batch: int = 16) -> list[list[int]]:
    """Tokens per expert per layer on `data` (counted from the router's own top-k indices)."""
    counts = [torch.zeros(model.config.num_experts, dtype=torch.long, device=data.device)
              for _ in range(model.config.num_hidden_layers)]
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, out, i=i):
            counts[i] += torch.bincount(RouterOut.of(out).index.reshape(-1), minlength=model.config.num_experts)
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    n = (data.numel() - 1) // seq
    with torch.no_grad():
        for i in range(0, n, batch):
            model(input_ids=data[: n * seq].view(n, seq)[i:i + batch])
    for h in hooks:
        h.remove()
    return [c.tolist() for c in counts]


def train(args) -> dict:
    device = args.device
    torch.manual_seed(SEED)
    data = Path(args.data)
    train_ids = load_stream(data / "tokens_train.u16.xz").to(device)
    val_ids = load_stream(data / "tokens_val.u16.xz").to(device)
    cfg = demo_config(**({"num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2} if args.tiny else {}))
    if args.tiny:
        val_ids = val_ids[: 4 * args.seq + 1]
    model = build_model(cfg, device)
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    decay = [m for m, p in zip(master, params) if p.ndim >= 2]
    no_decay = [m for m, p in zip(master, params) if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    n_params = sum(p.numel() for p in params)
    print(f"params {n_params / 1e6:.2f} M, train tokens {train_ids.numel() / 1e6:.1f} M, val {val_ids.numel()}",
          flush=True)
    gen = torch.Generator(device=device).manual_seed(SEED)
    offs = torch.arange(args.seq + 1, device=device)
    log, best, best_state = [], float("inf"), None
    t0 = time.time()
    tokens = 0
    step = 0
    while step < args.steps:
        frac = max(step / args.steps, (time.time() - t0) / args.time_limit)
        if frac >= 1.0:
            break
        lr = lr_at(frac, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        start = torch.randint(0, train_ids.numel() - args.seq - 1, (args.batch,), device=device, generator=gen)
        win = train_ids[start[:, None] + offs]
        out = model(input_ids=win[:, :-1], output_router_logits=True)
        logits = out.logits.float()
        ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), win[:, 1:].reshape(-1))
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
        loss = ce + cfg.router_aux_loss_coef * aux
        loss.backward()
        for m, p in zip(master, params):
            m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
            p.grad = None
        gnorm = torch.nn.utils.clip_grad_norm_(master, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)
        tokens += win[:, :-1].numel()
        step += 1
        if step % args.log_every == 0 or step == 1:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            el = time.time() - t0
            rec = {"step": step, "time_s": round(el, 1), "lr": lr, "loss": round(ce.item(), 4),
                   "aux": round(float(aux), 4), "grad_norm": round(float(gnorm), 3), "tok_per_s": round(tokens / el)}
            if step % args.eval_every == 0:
                v = evaluate(model, val_ids, args.seq)
                rec["val_loss"] = round(v, 4)
                if v < best:
                    best = v
                    best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                    rec["best"] = True
            log.append(rec)
            print(json.dumps(rec), flush=True)
        if args.bench and step >= args.steps:
            break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.time() - t0
    v = evaluate(model, val_ids, args.seq)
    final = {"step": step, "time_s": round(elapsed, 1), "val_loss": round(v, 4)}
    if v < best:
        best, best_state = v, None
        final["best"] = True
    log.append(final)
    print(json.dumps(final), flush=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    summary = {"params": n_params, "steps": step, "elapsed_s": round(elapsed, 1), "tokens_seen": tokens,
               "epochs": round(tokens / train_ids.numel(), 2), "best_val_loss": round(best, 4),
               "best_val_ppl": round(math.exp(best), 3), "tok_per_s": round(tokens / elapsed),
               "args": vars(args), "torch": torch.__version__, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
               "log": log}
    import transformers

    summary["transformers"] = transformers.__version__
    if not args.bench:
        summary["expert_load_val"] = expert_load(model, val_ids, args.seq)
        save(model, Path(args.out), summary)
    return summary


def save(model, out: Path, summary: dict) -> None:
    """bf16 safetensors shards <= 14 MB, the small files in one tar (the device returns at most 8 files)."""
    model_dir = out / "model"
    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(str(model_dir), max_shard_size="14MB")
    (model_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
    with tarfile.open(out / "small_files.tar", "w") as t:
        for f in sorted(model_dir.iterdir()):
            if f.suffix != ".safetensors":
                t.add(f, arcname=f.name)
    for f in sorted(model_dir.iterdir()):
        if f.suffix == ".safetensors":
            f.rename(out / f.name)
        else:
            f.unlink()
    model_dir.rmdir()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Train the demo MoE model on one GPU.")
    ap.add_argument("--data", default=".device_carry/demo")
    ap.add_argument("--out", default=os.environ.get("OUT", "train_out"))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds of training (schedule shrinks to fit)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--warmup", type=float, default=0.03, help="fraction of the run")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--experts-impl", default=None, help="experts implementation (default: transformers' default)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model on a sliver of data (tests the pipeline)")
    ap.add_argument("--bench", action="store_true", help="just measure throughput for --steps steps")
    args = ap.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    s = train(args)
    print(json.dumps({k: v for k, v in s.items() if k not in ("log", "expert_load_val")}))


if __name__ == "__main__":
    main()
