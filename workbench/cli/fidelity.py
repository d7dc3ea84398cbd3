"""`workbench replay / stability`: argument parser and run."""

from __future__ import annotations

from .common import FMT, import_torch_holding_sigint


def add_parser(sub, argv=None) -> None:
    from ..fidelity import commands as _fid  # [fidelity]: replay, stability (arguments live there)

    p = sub.add_parser("replay", help=_fid.REPLAY_HELP, description=_fid.REPLAY_DESCRIPTION,
                       epilog=_fid.REPLAY_EXAMPLES, formatter_class=FMT)
    _fid.add_replay_arguments(p)
    p = sub.add_parser("stability", help=_fid.STABILITY_HELP, description=_fid.STABILITY_DESCRIPTION,
                       epilog=_fid.STABILITY_EXAMPLES, formatter_class=FMT)
    _fid.add_stability_arguments(p)


def run(args) -> None:
    import_torch_holding_sigint()
    from ..fidelity import commands

    (commands.replay_cli if args.command == "replay" else commands.stability_cli)(args)
