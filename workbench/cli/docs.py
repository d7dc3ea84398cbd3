"""`workbench docs`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "docs", "build the documentation site and open it in a browser",
                  "Build the documentation (mkdocs, from the checkout's docs/; needs the docs extra) into ./site and "
                  "serve it on 127.0.0.1 until Ctrl-C.")
    p.add_argument("--port", type=opt.port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--out", help="site folder (default: <checkout>/site)")
    p.add_argument("--no-build", action="store_true", help="serve the site already built")
    p.add_argument("--no-open", action="store_true", help="do not open a browser")
    p.add_argument("--build-only", action="store_true", help="build, then stop")


def run(args) -> None:
    from ..docs_site import docs_command

    docs_command(out=args.out, port=args.port, no_build=args.no_build, no_open=args.no_open,
                 build_only=args.build_only)
