"""`workbench analyze`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from ..analysis.registry import ANALYSES as SPECS, cli_analyses
from ..errors import WorkbenchError
from .common import FMT, subparser

ANALYSES = {n: (s.summary, s.description) for n, s in cli_analyses().items()}


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "analyze", "run an analysis on a run",
                  "Run one analysis on a run folder: its summary goes to the terminal, its main table to --out, "
                  "its figures to --figures.")
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    named = argv[1] if argv and len(argv) > 1 and argv[0] == "analyze" else None
    for name, (short, desc) in ANALYSES.items():
        ap_an = asub.add_parser(name, help=short, description=desc, epilog=SPECS[name].epilog(), formatter_class=FMT)
        ap_an.add_argument("run", metavar="RUN", help="run folder")
        ap_an.add_argument("--out", help="main table (.parquet, .csv or .json)")
        ap_an.add_argument("--figures", metavar="DIR", help="write figures as HTML (PNG too with kaleido)")
        ap_an.add_argument("--recompute", action="store_true",
                           help="ignore the result stored in RUN/analyses/ (computed once, reused while the run "
                                "and options are unchanged) and compute it again")
        ap_an.add_argument("--chunk-tokens", type=opt.at_least(1), metavar="N",
                           help="tokens read at a time (memory bound; default 262144 or $WORKBENCH_CHUNK_TOKENS)")
        if (argv is None or name == named) and _analysis_available(name):
            _analysis_module(name).add_arguments(ap_an)


def _analysis_module(name: str):
    import importlib

    return importlib.import_module(f"workbench.analysis.{name.replace('-', '_')}")


def _analysis_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"workbench.analysis.{name.replace('-', '_')}") is not None


def run(args) -> None:
    if not _analysis_available(args.analysis):
        raise WorkbenchError(f"the {args.analysis} analysis is not available in this version")
    from ..analysis import analyze_command, common, module

    before = common.chunk_tokens_setting()  # main() may run in a notebook or a test: leave the process as it was
    if getattr(args, "chunk_tokens", None) is not None:
        common.set_chunk_tokens(args.chunk_tokens)
    try:
        mod = module(args.analysis)
        options = mod.options_from_args(args) if hasattr(mod, "options_from_args") else {}
        analyze_command(args.analysis, args.run, options, out=args.out, figures=args.figures,
                        recompute=getattr(args, "recompute", False))
    finally:
        common.set_chunk_tokens(before)
