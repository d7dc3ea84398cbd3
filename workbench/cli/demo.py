"""`workbench demo`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import import_torch_holding_sigint, say, subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "demo", "the main job: bundled model + datasets -> run, analyses, report, app",
                  "Capture the bundled demo model on the bundled datasets, run every analysis, write an HTML report "
                  "and serve the dashboard. Fully offline; a second run reuses what is already complete.")
    p.add_argument("--out", default="demo_out", help="demo folder (default: ./demo_out)")
    p.add_argument("--no-serve", action="store_true", help="stop after writing the report")
    p.add_argument("--port", type=opt.port, default=8050, help="dashboard port (default 8050)")
    p.add_argument("--quick", action="store_true", help="smaller datasets (for a fast look and CI)")


def run(args) -> None:
    say("starting the demo (importing torch) ...")
    import_torch_holding_sigint()
    from ..demo import run_demo

    run_demo(out=args.out, serve=not args.no_serve, port=args.port, quick=args.quick)
