"""`workbench check`: argument parser and run."""

from __future__ import annotations

from .common import subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "check", "verify every part of a run (sizes, checksums, Parquet); --repair drops damaged parts",
                  "Verify every part file a run lists: present, of the recorded size and checksum, readable Parquet. "
                  "With --repair, unlist the first damaged part and every later one (and delete their files) so "
                  "`workbench capture ... --resume` captures them again. Exit code 2 when damage is found and not repaired.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--repair", action="store_true", help="drop damaged parts so --resume captures them again")


def run(args) -> None:
    from ..check import check_command

    check_command(args.run, repair=args.repair)
