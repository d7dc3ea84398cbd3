"""`workbench export`: argument parser and run."""

from __future__ import annotations

from .common import subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "export", "export routing and analysis tables",
                  "Write a run's tables (and analysis tables) as Parquet, CSV or JSON, with a SCHEMA.md that "
                  "describes every column, into a new folder.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--format", choices=["parquet", "csv", "json"], default="parquet", help="file format (default parquet)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--what", default="all", help="comma list of tables/analyses, or 'all' (default)")


def run(args) -> None:
    from ..export import export_command

    export_command(args.run, args.out, fmt=args.format, what=args.what)
