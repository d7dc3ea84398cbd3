"""`workbench prune / merge / evaluate`: argument parser and run."""

from __future__ import annotations

from .common import FMT, import_torch_holding_sigint


def add_parser(sub, argv=None) -> None:
    from ..compress import commands as _compress  # [compress]: prune, merge, evaluate (arguments live there)

    for name in ("prune", "merge", "evaluate"):
        _compress.add_parser(sub, name, FMT)


def run(args) -> None:
    import_torch_holding_sigint()
    from ..compress.commands import RUN

    RUN[args.command](args)
