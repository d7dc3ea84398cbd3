"""`workbench` command line (documented in the README); every command's work lives in its module.

Errors a user can cause are WorkbenchError: printed as one line, exit code 2, no traceback.

A package: `COMMANDS` maps each command to a callable that imports `workbench.cli.<module>` and calls its
`run(args)`; each command module also has `add_parser(sub, argv)`. Command modules import nothing heavy
at the top, so building the parser (and `workbench --help`) stays fast.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

from .. import options as opt
from ..analysis.registry import cli_analyses
from ..errors import WorkbenchError
from .common import EXAMPLES, FMT, Parser, version

# command -> module under workbench.cli (with add_parser(sub, argv) and run(args)); the order of --help
TABLE = {
    "demo": "demo",
    "capture": "capture",
    "analyze": "analyze",
    "steer": "steer",
    "app": "app",
    "export": "export",
    "check": "check",
    "tiny": "tiny",
    "import": "import_",
    "compare": "compare",
    "attribute": "attribute",
    "datasets": "datasets",
    "replay": "fidelity",
    "stability": "fidelity",
    "prune": "compress",
    "merge": "compress",
    "evaluate": "compress",
    "docs": "docs",
}

# Analysis subcommands of `workbench analyze`: (help, description), from the analysis registry
ANALYSES = {name: (spec.summary, spec.description) for name, spec in cli_analyses().items()}


class _Command:
    """Runs `workbench.cli.<module>.run(args)`, importing the module on first use."""

    def __init__(self, module: str):
        self.module = module

    def __call__(self, args) -> None:
        importlib.import_module(f"{__name__}.{self.module}").run(args)


COMMANDS = {name: _Command(module) for name, module in TABLE.items()}


def build_parser(argv: list[str] | None = None):
    """The full parser. With `argv`, only the analysis that argv names gets its options (importing
    one analysis module, not six), which keeps `--help` and argument errors fast."""
    ap = Parser(prog="workbench", description="MoE Workbench: capture, analyse and steer the routing of "
                "Mixture-of-Experts transformers models.", epilog=EXAMPLES["workbench"], formatter_class=FMT)
    ap.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    ap.add_argument("--threads", type=opt.at_least(1), metavar="N",
                    help="torch CPU threads (default: the cores free for this process, from its CPU affinity, "
                         "cgroup quota and the load average; or WORKBENCH_THREADS)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(TABLE.values()):  # a module serving several commands adds them all at once
        importlib.import_module(f"{__name__}.{module}").add_parser(sub, argv)
    return ap


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv_given = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # arguments first: no heavy import before they are known to be good
        args, extra = build_parser(argv).parse_known_args(argv)
        if extra:  # named by the (sub)command they were given to, not by the top-level parser
            prog = " ".join(["workbench", args.command] + ([args.analysis] if args.command == "analyze" else []))
            print(f"{prog}: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)", file=sys.stderr)
            return 2
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return e.code if isinstance(e.code, int) else 2
    except WorkbenchError as e:  # an analysis module refusing its options while the parser is built
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted", file=sys.stderr)
        return _interrupted(argv_given)
    try:
        from ..threads import configure

        configure(getattr(args, "threads", None))  # before torch starts its thread pools
        _quiet_libraries()
        COMMANDS[args.command](args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (completed parts are kept; use --resume)" if args.command == "capture" else ""
        print(f"workbench: interrupted{hint}", file=sys.stderr)
        return _interrupted(argv_given)
    except BrokenPipeError:  # `workbench ... | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush cannot raise again
        return 0
    except OSError as e:  # a target the user named is read-only, forbidden or full
        from ..store import io_error, os_errno

        if os_errno(e) not in _USER_OS_ERRORS:
            raise

        print(f"workbench: error: {io_error(e, e.filename or '')}", file=sys.stderr)
        return 2
    except BaseException as e:  # a Rust panic inside polars/pyarrow (pyo3's PanicException is a BaseException)
        if type(e).__name__ != "PanicException":
            raise
        first = (str(e).strip().splitlines() or ["no message"])[0][:200]
        print(f"workbench: error: reading failed inside a library (Rust panic: {first}); if the run was being "
              "replaced or repaired meanwhile, run the command again, else `workbench check RUN` names damage",
              file=sys.stderr)
        return 2
    return 0


def _interrupted(argv_given: bool) -> int:
    """Exit code 130 after Ctrl-C, whatever the interrupt hit.

    A KeyboardInterrupt raised inside code that runs through `exec` of a string (dataclasses build their
    methods so, during imports) marks the interpreter as "interrupted, unhandled", and CPython then kills
    itself with SIGINT at exit even though we handled it and returned 130. As a process entry (no argv given)
    we therefore leave with os._exit after flushing; called in-process (tests, notebooks) we just return.
    """
    if argv_given:
        return 130
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


def _quiet_libraries() -> None:
    """Library chatter off, our own warnings on one line each; imports nothing heavy."""
    import logging
    import warnings

    from ..errors import WorkbenchWarning

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("default", category=WorkbenchWarning)  # each distinct warning once
    plain = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, WorkbenchWarning):
            print(f"workbench: warning: {message}", file=sys.stderr)
        else:
            plain(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process callers): tell it directly
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
