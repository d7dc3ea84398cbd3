"""`workbench app`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from ..errors import WorkbenchError
from .common import say, subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "app", "serve the Dash dashboard for one or more runs",
                  "Serve the dashboard (overview, experts, locality, multilingual, behaviour, atlas, and with --model "
                  "the Steering lab) for one or more runs on a local port.")
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder(s), or a folder of runs (e.g. demo_out/runs)")
    p.add_argument("--model", help="model for the Steering lab (hub id, folder or 'demo')")
    p.add_argument("--device", help="device for --model (default: cuda when available, else cpu)")
    p.add_argument("--dtype", type=opt.dtype, help="dtype for --model, e.g. bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=opt.port, default=8050, help="port (default 8050)")
    p.add_argument("--allow-remote", action="store_true",
                   help="confirm a non-loopback --host: anyone who reaches it can use the dashboard (no login)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (e.g. a reverse proxy's); repeatable")
    p.add_argument("--debug", action="store_true",
                   help="Flask's development server with the Werkzeug debugger (runs code for whoever opens it)")


def run(args) -> None:
    say("starting the dashboard" + (f" and loading the model {args.model}" if args.model else "") + " ...")
    from ..app import serve

    if (args.device or args.dtype) and not args.model:
        raise WorkbenchError("--device and --dtype apply to --model; name the model too")
    serve(args.run, model=args.model, host=args.host, port=args.port, debug=args.debug, device=args.device,
          dtype=args.dtype, allow_remote=args.allow_remote, allowed_hosts=args.allow_host)
