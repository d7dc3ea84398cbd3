"""The `prune`, `merge` and `evaluate` commands: their arguments and what they run.

Imports nothing heavy at module level (the CLI builds every parser on each call); the work is
imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

from .. import options as opt
from ..errors import WorkbenchError

EXAMPLES = {
    "prune": """examples:
  workbench capture demo --data calibration --probes routing,experts --out runs/cal
  workbench prune demo --run runs/cal --ratio 0.25 --by reap --out pruned/reap25
  workbench prune demo --run runs/cal --ratio 0.5 --by frequency --protect super-experts --out pruned/f50
  workbench prune demo --run runs/cal --ratio 0.25 --by attribution --per-layer global --out pruned/a25

The checkpoint loads with AutoModelForCausalLM.from_pretrained; pruning.json says what was removed and
gives the same plan as a run-time --ban SPEC.""",
    "merge": """examples:
  workbench merge demo --run runs/cal --ratio 0.25 --out merged/out25
  workbench merge demo --run runs/cal --ratio 0.25 --similarity weight --router average --out merged/w25""",
    "evaluate": """examples:
  workbench evaluate demo pruned/reap25 merged/out25 --data heldout.jsonl
  workbench evaluate demo pruned/reap25 --data calibration --max-tokens 4096 --out eval.csv""",
}

HELP = {
    "prune": ("remove the least salient experts: a smaller checkpoint plus pruning.json",
              "Remove a share of every MoE layer's routed experts, ranked by a saliency criterion computed from a "
              "run of the model (frequency, REAP, attribution or random), optionally protecting super experts, "
              "and write a Hugging Face checkpoint with the expert weights, router rows and config cut to match."),
    "merge": ("merge similar experts (M-SMoE / HC-SMoE style): a smaller checkpoint plus merging.json",
              "Group every MoE layer's experts around its most frequently routed ones by output or weight "
              "similarity, average each group weighted by routing frequency, and write a Hugging Face checkpoint."),
    "evaluate": ("perplexity, next-token agreement and routing of models against the first one",
                 "Evaluate models on held-out text: perplexity, agreement of the argmax next token and KL with the "
                 "first model, and how much of the first model's routing each keeps (compressed checkpoints are "
                 "mapped back to the base model's expert ids through their pruning.json / merging.json)."),
}


def _common_write(p, what: str) -> None:
    p.add_argument("--out", required=True, help=f"folder of the {what} checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--device", help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--dtype", type=opt.dtype, default="auto", help="dtype of the written weights (default: as stored)")


def add_prune(p) -> None:
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("--run", required=True, help="a capture of MODEL (routing; expert_stats for reap and super experts)")
    p.add_argument("--ratio", required=True, type=opt.between(0, 1, hi_open=True),
                   help="share of each layer's routed experts to remove, e.g. 0.25")
    p.add_argument("--by", default="reap", choices=["frequency", "reap", "attribution", "random"],
                   help="saliency criterion (default reap); the lowest scores are removed")
    p.add_argument("--protect", metavar="super-experts|SPEC",
                   help="never remove these: 'super-experts' (found in the run), a SPEC, or both comma-joined")
    p.add_argument("--per-layer", default="uniform", choices=["uniform", "global"],
                   help="uniform: the ratio in every layer; global: one budget, lowest scores across layers")
    p.add_argument("--seed", type=opt.seed, default=0, help="seed of --by random (default 0)")
    p.add_argument("--exact", action="store_true",
                   help="--by attribution: zero each expert (slow) instead of the first-order estimate")
    p.add_argument("--max-tokens", type=opt.at_least(2), default=2048, help="tokens for --by attribution")
    _common_write(p, "pruned")


def add_merge(p) -> None:
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("--run", required=True, help="a capture of MODEL (its routing gives the frequencies)")
    p.add_argument("--ratio", required=True, type=opt.between(0, 1, hi_open=True),
                   help="share of each layer's experts merged away, e.g. 0.25")
    p.add_argument("--similarity", default="output", choices=["output", "weight"],
                   help="group by mean expert output on the run's tokens (HC-SMoE, default) or by weights")
    p.add_argument("--router", default="dominant", choices=["dominant", "average"],
                   help="router row of a merged expert: the dominant expert's (default) or the frequency-weighted "
                        "average of its group's")
    p.add_argument("--protect", metavar="super-experts|SPEC",
                   help="never merge these into others, nor others into them")
    p.add_argument("--max-tokens", type=opt.at_least(1), default=512,
                   help="calibration tokens for --similarity output (default 512)")
    _common_write(p, "merged")


def add_evaluate(p) -> None:
    p.add_argument("models", metavar="MODEL", nargs="+", help="models to compare; the first is the reference")
    p.add_argument("--data", required=True, help="held-out text: a bundled dataset name or a .txt/.jsonl/.parquet file")
    p.add_argument("--max-tokens", type=opt.at_least(2), default=8192, help="tokens of DATA evaluated (default 8192)")
    p.add_argument("--seq-len", type=opt.seq_len_or_zero, default=256,
                   help="pack the text into S-token sequences (0 = one per record; default 256)")
    p.add_argument("--batch-size", type=opt.at_least(1), default=8, help="sequences a forward (default 8)")
    p.add_argument("--out", help="the models table (.parquet, .csv or .json)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", type=opt.dtype,
                   help="float32, bfloat16, ... (default: float32 on CPU, the model's own on a GPU)")


ADD = {"prune": add_prune, "merge": add_merge, "evaluate": add_evaluate}


def add_parser(sub, name: str, formatter_class=None):
    """Add command `name` to argparse subparsers `sub` (the CLI calls this for prune, merge, evaluate)."""
    kw = {"formatter_class": formatter_class} if formatter_class else {}
    p = sub.add_parser(name, help=HELP[name][0], description=HELP[name][1], epilog=EXAMPLES[name], **kw)
    ADD[name](p)
    return p


def _refuse_existing(out, overwrite: bool) -> None:
    out = Path(out)
    if (out / "config.json").exists() and not overwrite:
        raise WorkbenchError(f"--out {out} already holds a model; choose another folder or pass --overwrite")


def run_prune(args) -> None:
    from ..probes.interventions import parse_spec
    from ..store import open_run
    from .prune import prune

    run = open_run(args.run)  # before the model loads: a wrong path fails in a second
    _refuse_existing(args.out, args.overwrite)
    mm, info = prune(args.model, run, args.ratio, args.by, args.out, args.protect, args.per_layer, args.seed,
                     args.exact, args.max_tokens, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    extra = f"; {len(parse_spec(info['ban_after_load']))} more stay in the weights, banned by ban_after_load" \
        if info["ban_after_load"] else ""
    prot = f", protecting {info['protected']}" if info["protected"] else ""
    print(f"pruned {info['n_experts_before'] - info['n_experts_after']} of {info['n_experts_before']} experts per layer "
          f"(by {args.by}{prot}){extra}; wrote {args.out} with pruning.json")
    print(("exact: " if info["equals_ban"] else "note: ") + info["exactness"])


def run_merge(args) -> None:
    from ..store import open_run
    from .merge import merge

    run = open_run(args.run)
    _refuse_existing(args.out, args.overwrite)
    mm, info = merge(args.model, run, args.ratio, args.similarity, args.router, args.out, args.protect,
                     args.max_tokens, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    print(f"merged {info['n_experts_before']} experts into {info['n_experts_after']} per layer (similarity "
          f"{args.similarity}, router rows: {args.router}); wrote {args.out} with merging.json")


def run_evaluate(args) -> None:
    from ..analysis import write_table
    from ..data import load_dataset
    from .evaluate import evaluate

    load_dataset(args.data)  # a bad --data fails before any model loads
    res = evaluate(args.models, args.data, max_tokens=args.max_tokens, seq_len=args.seq_len or None,
                   batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    print(res.summary)
    if args.out:
        write_table(res.table, args.out)
        print(f"wrote {res.table.height} rows to {args.out}")


RUN = {"prune": run_prune, "merge": run_merge, "evaluate": run_evaluate}

__all__ = ["add_parser", "RUN"]
