"""`workbench compare`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import EXAMPLES, FMT


def add_parser(sub, argv=None) -> None:
    p = sub.add_parser("compare", help="compare two runs: changed routing decisions, load, specialisation",
                       epilog=EXAMPLES["compare"], formatter_class=FMT, description="Compare run B with run A: per layer the share of tokens whose experts changed, "
                       "top-k overlap, routing JSD, load shift per expert, specialisation shift per label, and each "
                       "changed decision; runs of different data get load, balance and specialisation side by side. "
                       "--match weights|routing first matches B's experts to A's (checkpoints).")
    p.add_argument("run_a", metavar="RUN_A", help="the reference run")
    p.add_argument("run_b", metavar="RUN_B", help="the run compared with RUN_A")
    p.add_argument("--out", metavar="DIR", help="write every table (Parquet) and figure (HTML) here")
    p.add_argument("--match", choices=["none", "weights", "routing"], default="none",
                   help="match B's experts to A's first: by weights (checkpoints) or routing (same tokens)")
    p.add_argument("--distribution", choices=["weights", "logits"], default="weights",
                   help="routing distribution for the JSD: renormalised top-k weights, or softmax of the logits")
    p.add_argument("--labels", type=opt.text_of(opt.columns),
                   help="comma list of label columns (default: the shared ones with <= 50 values)")
    p.add_argument("--weak", type=opt.between(0, 1), default=0.5,
                   help="matches below this similarity are flagged weak (default 0.5)")
    p.add_argument("--max-changes", type=opt.at_least(1), default=200_000,
                   help="rows kept in the changes table (default 200000)")


def run(args) -> None:
    from ..analysis.compare import compare_command, options_from_args

    args.other = args.run_b
    options = options_from_args(args)
    del options["other"]
    compare_command(args.run_a, args.run_b, out=args.out, **options)
