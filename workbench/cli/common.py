"""What the command modules share: the parser class, the examples shown under --help, argument helpers
and the checks that run before torch is imported. Imports nothing heavy."""

from __future__ import annotations

import argparse
import os
import sys

from .. import options as opt
from ..errors import WorkbenchError

EXAMPLES = {
    "workbench": """examples:
  workbench demo                                   the bundled model and datasets -> runs, report, app
  workbench capture demo --data calibration --out runs/cal --probes routing,experts
  workbench analyze stats runs/cal --out stats.parquet
  workbench steer demo --prompt "The capital of France is" --ban L3:E5
  workbench app runs/cal

Errors you can fix print one line and exit with code 2. Documentation: the README.""",
    "demo": """examples:
  workbench demo                     full demo, then serve the dashboard on http://127.0.0.1:8050
  workbench demo --quick --no-serve  a fast look, report only""",
    "capture": """examples:
  workbench capture demo --data calibration --out runs/cal
  workbench capture demo --data multilingual --where lang=en,de --limit 200 --out runs/ende
  workbench capture ./my-model --data prompts.jsonl --probes routing,experts --layers 0-3 --out runs/mine
  workbench capture demo --data prompts.txt --seq-len 512 --out runs/packed --resume

DATA: a bundled dataset name (see `workbench datasets`), or a .txt (one document per line),
.jsonl (one JSON object per line with a string "text"; other fields become labels) or .parquet
file with a "text" column. Files must be UTF-8. Documents longer than the model's context are cut
with a warning; --seq-len packs the text into sequences instead, so nothing is cut.""",
    "analyze": """examples:
  workbench analyze stats runs/cal --labels domain --out stats.csv
  workbench analyze super-experts runs/cal --figures figs/
  workbench analyze lrc runs/cal --m 4,16,64 --seq-len 512
  workbench analyze ANALYSIS --help      the options of one analysis""",
    "steer": """examples:
  workbench steer demo --prompt "def fib(n):" --ban L3:E5,L4:E1
  workbench steer demo --prompt "Once upon a time" --boost L2:E7=1.0 --json
SPEC: L<layer>:E<expert>[,...] (E-1 = the shared expert); --boost and --scale take SPEC=value.""",
    "app": """examples:
  workbench app runs/cal
  workbench app demo_out/runs --model demo      with the Steering lab""",
    "export": """examples:
  workbench export runs/cal --format csv --out exported/
  workbench export runs/cal --what routing,tokens --out exported/""",
    "tiny": """examples:
  workbench tiny qwen3_moe --out tiny-qwen
  workbench tiny mixtral --layers 2 --experts 4 --top-k 2 --out tiny-mixtral""",
    "datasets": "example:\n  workbench datasets",
    "docs": "examples:\n  workbench docs\n  workbench docs --build-only --out /tmp/site",
    "check": """examples:
  workbench check runs/cal             verify every part the manifest lists
  workbench check runs/cal --repair    drop damaged parts, then finish with capture --resume""",
    "import": """examples:
  workbench import vllm out.jsonl --out runs/v --model CONFIG
  workbench import sglang-dump DUMP_DIR --out runs/d --model CONFIG""",
    "compare": """examples:
  workbench compare runs/base runs/banned --out cmp/
  workbench compare runs/ckpt1 runs/ckpt2 --match weights""",
    "attribute": """examples:
  workbench attribute demo --data calibration --where domain=code --max-tokens 512
  workbench attribute demo --data calibration --control calibration --control-where domain=prose --exact 5""",
}

FMT = argparse.RawDescriptionHelpFormatter


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the usage block."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_intervention_args(p: argparse.ArgumentParser, with_zero: bool = True) -> None:
    p.add_argument("--ban", metavar="SPEC", type=opt.expert_spec(False),
                   help="experts never selected (re-routed to the next best), e.g. L3:E54,L4:E38")
    p.add_argument("--force", metavar="SPEC", type=opt.expert_spec(False), help="experts always selected")
    p.add_argument("--boost", metavar="SPEC", type=opt.expert_spec(True),
                   help="soft promotion: SPEC[=lambda] adds lambda*std(logits) (default 0.5)")
    if with_zero:
        p.add_argument("--zero", metavar="SPEC", type=opt.expert_spec(False),
                       help="routing unchanged, contribution dropped (pruning); E-1 = shared")
    p.add_argument("--scale", metavar="SPEC", type=opt.expert_spec(True),
                   help="routing unchanged, weight times s: SPEC=s")


def interventions_of(args) -> dict:
    return {k: getattr(args, k) for k in ("ban", "force", "boost", "zero", "scale") if getattr(args, k, None)}


def version() -> str:
    from .. import __version__

    return __version__


def subparser(sub, name: str, help: str, description: str):
    return sub.add_parser(name, help=help, description=description, epilog=EXAMPLES.get(name), formatter_class=FMT)


EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def precheck_layers(model: str, args) -> None:
    """Layer and expert numbers in SPECs and layer lists against the model's config.json, before torch
    loads (seconds instead of a minute on a busy machine). Only what the config alone decides: a hub
    id, or whether a layer is dense, is checked after loading, as before."""
    import json
    import re
    from pathlib import Path

    folder = Path(os.environ.get("WORKBENCH_DEMO_MODEL") or Path(__file__).resolve().parent.parent / "assets" / "demo_model") \
        if model == "demo" else Path(model).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    cfg = cfg.get("text_config") or cfg if isinstance(cfg, dict) else {}
    n_layers = cfg.get("num_hidden_layers")
    n_exp = next((cfg[k] for k in EXPERT_KEYS if isinstance(cfg.get(k), int)), None)
    if not isinstance(n_layers, int):
        return
    for flag in ("ban", "force", "boost", "zero", "scale", "dump_experts"):
        spec = getattr(args, flag, None)
        what = "--" + flag.replace("_", "-")
        for layer, expert in re.findall(r"L\s*(\d+)\s*:\s*E\s*(-1|\d+)", spec or "", re.IGNORECASE):
            layer, expert = int(layer), int(expert)
            if layer >= n_layers:
                raise WorkbenchError(f"layer {layer} in {what} does not exist: the model has {n_layers} decoder "
                                     f"layers (0-{n_layers - 1})")
            if n_exp is not None and expert >= n_exp:
                raise WorkbenchError(f"expert {expert} in {what} is out of range: layer {layer} has experts "
                                     f"0-{n_exp - 1}")
    for flag in ("layers", "dump_hidden"):
        bad = [x for x in (getattr(args, flag, None) or []) if x >= n_layers]
        if bad:
            raise WorkbenchError(f"--{flag.replace('_', '-')}: layer {bad[0]} does not exist (the model has "
                                 f"{n_layers} layers)")


def say(msg: str) -> None:
    """A status line for a person waiting at a terminal ("loading the model ..."), shown at once on stderr
    (stdout stays the command's output); not written to a pipe or file, where errors stay one line."""
    if sys.stderr.isatty():
        print(f"workbench: {msg}", file=sys.stderr, flush=True)


def default_device(d):
    if d:
        return d
    import torch

    return "cuda" if torch.cuda.is_available() else None


def import_torch_holding_sigint() -> None:
    """Import torch and transformers with Ctrl-C held until they are in (commands call it once their cheap checks pass).

    A SIGINT landing inside torch's C++ start-up aborts the process (pybind11 `terminate`, exit -6, a core
    message instead of our one line); held here, it is raised as KeyboardInterrupt the moment the imports end.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401  (signals belong to the main thread; nothing to hold elsewhere)
        return
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt
