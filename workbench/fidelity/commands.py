"""The `replay` and `stability` commands: their arguments and what they print (argparse only at import, so
`workbench --help` stays fast)."""

from __future__ import annotations

REPLAY_HELP = "force a run's recorded routes on a model: per-layer agreement, next-token KL, loss both ways"
REPLAY_DESCRIPTION = (
    "Teacher-forced replay of RUN's tokens on MODEL with the recorded experts forced at every recorded MoE "
    "layer (recorded weights when the run has them, else the model's router scores restricted to the recorded "
    "experts). Reports per layer the share of tokens whose own top-k equals the recorded one, and per token the "
    "KL and log-probability change between own and replayed routing. RUN may be a capture or a vLLM / SGLang "
    "import; interventions a run was captured with are not re-applied.")
REPLAY_EXAMPLES = """examples:
  workbench replay demo runs/cal --out runs/cal/fidelity/replay
  workbench replay ./my-model runs/vllm-import --out fid/vllm --weights model

Writes layers.parquet (layer, agreement, overlap, agreement_free, overlap_free), tokens.parquet (kl,
logprob_own, logprob_replayed, dlogprob, layers_changed, first_changed_layer) and replay.json."""

STABILITY_HELP = "how many routing decisions flip under other dtypes, batch sizes, experts kernels, devices"
STABILITY_DESCRIPTION = (
    "Run DATA under a reference setting (the first value of each --vary axis) and under each variant; per MoE "
    "layer the share of flipped routing decisions, first flips (with the reference routes replayed upstream) "
    "told apart from inherited ones, the flip rate per router-margin bin and the (layer, expert) pairs most "
    "involved.")
STABILITY_EXAMPLES = """examples:
  workbench stability demo calibration --vary dtype=float32,bfloat16 --vary batch=1,8 --out fid/stab
  workbench stability ./my-model prompts.txt --vary experts=eager,grouped_mm --vary device=cpu,cuda --out fid/s

AXES: dtype (float32, bfloat16, float16), batch (sequences a forward), experts (eager, grouped_mm,
batched_mm), device (cpu, cuda). Each variant changes one axis (--product: every combination)."""


def add_replay_arguments(p) -> None:
    from .. import options as opt

    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("run", metavar="RUN", help="run folder (a capture or an engine import)")
    p.add_argument("--out", required=True, help="folder for the result tables")
    p.add_argument("--weights", choices=["auto", "recorded", "model"], default="auto",
                   help="routing weights of the forced experts: recorded (when the run has them), the model's own "
                        "router scores restricted to them, or auto (recorded when present; default)")
    p.add_argument("--batch-size", type=opt.at_least(1), metavar="B",
                   help="sequences a forward (default: the run's capture batch size)")
    p.add_argument("--max-tokens", type=opt.at_least(1), metavar="N", help="replay only the first N tokens")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", type=opt.dtype, help="float32, bfloat16, float16 or auto")
    p.add_argument("--overwrite", action="store_true", help="replace a replay result already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_stability_arguments(p) -> None:
    from .. import options as opt

    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("data", metavar="DATA", help="bundled dataset name or a .txt/.jsonl/.parquet file")
    p.add_argument("--vary", action="append", required=True, metavar="AXIS=V1,V2",
                   help="an axis and its values, the first being the reference (repeatable)")
    p.add_argument("--out", required=True, help="folder for the result tables")
    p.add_argument("--product", action="store_true", help="every combination of the values, not one axis at a time")
    p.add_argument("--max-tokens", type=opt.at_least(1), default=2048, metavar="N", help="tokens of DATA (default 2048)")
    p.add_argument("--seq-len", type=opt.seq_len, metavar="S", help="pack the text into S-token sequences")
    p.add_argument("--limit", type=opt.at_least(1), metavar="N", help="keep the first N records")
    p.add_argument("--overwrite", action="store_true", help="replace a stability result already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def replay_cli(args) -> None:
    from ..models.loading import load_model
    from ..store import open_run
    from .replay import replay

    run = open_run(args.run)  # a bad RUN is refused before the model loads
    mm = load_model(args.model, device=_device(args.device), dtype=args.dtype)
    res = replay(mm, run, out=args.out, weights=args.weights, batch_size=args.batch_size, max_tokens=args.max_tokens,
                 overwrite=args.overwrite, progress=not args.no_progress)
    print(format_replay(res.summary, res.layers))
    print(f"wrote {res.out}")


def format_replay(s: dict, layers) -> str:
    first = s["first_disagreeing_layer"]
    lines = [f"replayed {s['tokens']:,} tokens of {s['run']} on {s['model']} (weights: {s['weights']}): agreement "
             f"{s['agreement']:.2%} (free forward {s['agreement_free']:.2%})"
             + (f", first disagreement at layer {first}" if first is not None else ""),
             f"loss own {s['loss_own']:.4f} -> replayed {s['loss_replayed']:.4f}; next-token KL mean "
             f"{s['kl_mean']:.3g}, max {s['kl_max']:.3g}"
             + ("; logits bit-identical to the plain forward" if s["logits_bit_identical"] else "")]
    if s.get("margin_median_disagreeing") is not None:
        lines.append(f"disagreeing decisions: median router margin {s['margin_median_disagreeing']:.3g} (agreeing "
                     f"{s['margin_median_agreeing']:.3g}); {s['disagreements_near_tie']:.0%} within "
                     f"{s['near_tie_below']:g} of a tie")
    if s.get("interventions_in_run"):
        lines.append(f"the run was captured with {s['interventions_in_run']} (not re-applied)")
    lines.append("per layer: " + "  ".join(f"L{r['layer']} {r['agreement']:.2%}" for r in layers.iter_rows(named=True)))
    return "\n".join(lines)


def stability_cli(args) -> None:
    from .stability import parse_vary, stability

    axes = parse_vary(args.vary)  # refused before the model loads
    res = stability(args.model, args.data, vary=axes, out=args.out, max_tokens=args.max_tokens, seq_len=args.seq_len,
                    limit=args.limit, product=args.product, overwrite=args.overwrite, progress=not args.no_progress)
    print(format_stability(res.summary))
    print(f"wrote {res.out}")


def format_stability(s: dict) -> str:
    ref = ", ".join(f"{k}={v}" for k, v in s["reference"].items())
    lines = [f"{s['tokens']:,} tokens x {len(s['layers'])} MoE layers of {s['model']}; reference {ref}; "
             f"{s['reference_near_ties']} decisions within {s['near_tie_below']:g} of a tie"]
    for v in s["variants"]:
        near = v["first_flips_near_tie"]
        lines.append(f"  {v['name']:28s} flipped {v['flip_rate']:.4%} ({v['flipped']:,}); first {v['first_rate']:.4%}, "
                     f"inherited {v['inherited_rate']:.4%}"
                     + (f"; {near:.0%} of first flips were near-ties" if near is not None else ""))
    return "\n".join(lines)


def _device(d):
    if d:
        return d
    import torch

    return "cuda" if torch.cuda.is_available() else None
