"""`workbench tiny`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import import_torch_holding_sigint, subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "tiny", "write a tiny random-weight checkpoint (offline)",
                  "Write a tiny random-weight checkpoint of a real MoE architecture with a byte-level tokenizer, "
                  "for tests and quick experiments. Same arguments, same files.")
    p.add_argument("model_type", metavar="MODEL_TYPE", help="a transformers model type, e.g. qwen3_moe, mixtral, olmoe")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", type=opt.at_least(1, 256), default=4, help="decoder layers (default 4)")
    p.add_argument("--experts", type=opt.at_least(1, 1024), default=8, help="routed experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=opt.at_least(1, 1024), default=2, help="experts per token (default 2)")
    p.add_argument("--hidden", type=opt.at_least(8, 8192), default=64, help="hidden size, a multiple of 8 (default 64)")
    p.add_argument("--seed", type=opt.seed, default=0, help="weight seed (default 0)")


def run(args) -> None:
    import_torch_holding_sigint()
    from ..models.tiny import make_tiny

    out = make_tiny(args.model_type, args.out, layers=args.layers, experts=args.experts, top_k=args.top_k,
                    hidden=args.hidden, seed=args.seed)
    print(f"wrote a tiny {args.model_type} ({args.layers} layers, {args.experts} experts, top-{args.top_k}) to {out}")
