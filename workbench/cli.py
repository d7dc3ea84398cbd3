"""`workbench` command line (documented in the README); every command's work lives in its module.

Errors a user can cause are WorkbenchError: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from .analysis.registry import ANALYSES as _SPECS, cli_analyses
from .errors import WorkbenchError

from . import options as opt

# Analysis subcommands: (help, description), from the registry (which imports nothing heavy, so
# `workbench --help` does not import numpy/polars/numba; a module's options load only when named).
ANALYSES = {name: (spec.summary, spec.description) for name, spec in cli_analyses().items()}

_EXAMPLES = {
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

_FMT = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit code 2), not the usage block."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_intervention_args(p: argparse.ArgumentParser, with_zero: bool = True) -> None:
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


def _interventions(args) -> dict:
    return {k: getattr(args, k) for k in ("ban", "force", "boost", "zero", "scale") if getattr(args, k, None)}


def _version() -> str:
    from . import __version__

    return __version__


def _sub(sub, name: str, help: str, description: str):
    return sub.add_parser(name, help=help, description=description, epilog=_EXAMPLES.get(name), formatter_class=_FMT)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser. With `argv`, only the analysis that argv names gets its options (importing
    one analysis module, not six), which keeps `--help` and argument errors fast."""
    ap = _Parser(prog="workbench", description="MoE Workbench: capture, analyse and steer the routing of "
                 "Mixture-of-Experts transformers models.", epilog=_EXAMPLES["workbench"], formatter_class=_FMT)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    ap.add_argument("--threads", type=opt.at_least(1), metavar="N",
                    help="torch CPU threads (default: the cores free for this process, from its CPU affinity, "
                         "cgroup quota and the load average; or WORKBENCH_THREADS)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(sub, "demo", "the main job: bundled model + datasets -> run, analyses, report, app",
             "Capture the bundled demo model on the bundled datasets, run every analysis, write an HTML report "
             "and serve the dashboard. Fully offline; a second run reuses what is already complete.")
    p.add_argument("--out", default="demo_out", help="demo folder (default: ./demo_out)")
    p.add_argument("--no-serve", action="store_true", help="stop after writing the report")
    p.add_argument("--port", type=opt.port, default=8050, help="dashboard port (default 8050)")
    p.add_argument("--quick", action="store_true", help="smaller datasets (for a fast look and CI)")

    p = _sub(sub, "capture", "capture routing (and more) of MODEL on DATA into a run folder",
             "Run DATA through MODEL with probes attached and stream what they see into Parquet tables in the "
             "run folder --out (routing always; expert outputs, hidden states and attention sinks on request). "
             "A killed capture resumes with --resume.")
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo' (the bundled model)")
    p.add_argument("--data", required=True, help="bundled dataset name or a .txt/.jsonl/.parquet file (UTF-8)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--probes", default="routing", help="comma list of routing,experts,hidden,attention (default routing)")
    p.add_argument("--layers", type=opt.layer_list, metavar="LAYERS",
                   help="record only these MoE layers (decoder-layer indices), e.g. 1,3 or 0-2 (default: all)")
    p.add_argument("--logits", action="store_true", help="also store fp32 router logits [E] per token and layer")
    p.add_argument("--margin", action="store_true", help="also store each decision's router margin (k-th minus "
                                                         "(k+1)-th score): how close it was to a tie")
    p.add_argument("--where", action="append", type=opt.where, metavar="COL=V[,V]",
                   help="keep records whose label COL is one of the values (repeatable: all must hold)")
    p.add_argument("--limit", type=opt.at_least(1), metavar="N", help="keep the first N records (after --where)")
    p.add_argument("--interleave", type=opt.column, metavar="COL",
                   help="order records round-robin over COL's values, so --limit and --max-tokens keep every "
                        "value (e.g. domain)")
    p.add_argument("--max-tokens", type=opt.at_least(1), metavar="N", help="stop after N tokens in all")
    p.add_argument("--batch-size", type=opt.at_least(1), default=8, metavar="B", help="sequences a forward (default 8)")
    p.add_argument("--seq-len", type=opt.seq_len, metavar="S",
                   help="pack the token stream into consecutive S-token sequences (nothing is cut)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", type=opt.dtype, help="float32, bfloat16, float16 or auto (default: the model's; "
                                                   "float32 for demo on CPU)")
    p.add_argument("--resume", action="store_true", help="finish a killed capture of the same model and data")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--dump-experts", metavar="SPEC", type=opt.expert_spec(False),
                   help="store full down_proj outputs of these experts (needs the experts probe)")
    p.add_argument("--dump-hidden", metavar="LAYERS", type=opt.layer_list,
                   help="store full residual vectors after these layers, e.g. 1,3 (needs the hidden probe)")
    p.add_argument("--dump-format", choices=["fp16", "int8"], default="fp16", help="dump precision (default fp16)")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run the model's own code")
    p.add_argument("--part-tokens", type=opt.at_least(1), default=65536, metavar="N",
                   help="tokens per Parquet part, the unit of resume (default 65536)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device-map", metavar="MAP", help="split the model over GPUs / CPU / disk with accelerate: "
                                                     "auto, balanced, balanced_low_0 or sequential")
    p.add_argument("--max-memory", metavar="DEV=SIZE,...", help="memory per device for --device-map, e.g. "
                                                                "0=70GiB,cpu=200GiB (what does not fit goes to disk)")
    p.add_argument("--offload-folder", metavar="DIR", help="where --device-map / --layerwise keep offloaded weights")
    p.add_argument("--layerwise", action="store_true", help="run the data through one decoder layer at a time, "
                                                           "loading only that layer (models bigger than the machine)")
    _add_intervention_args(p)

    p = _sub(sub, "analyze", "run an analysis on a run",
             "Run one analysis on a run folder: its summary goes to the terminal, its main table to --out, "
             "its figures to --figures.")
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    named = argv[1] if argv and len(argv) > 1 and argv[0] == "analyze" else None
    for name, (short, desc) in ANALYSES.items():
        ap_an = asub.add_parser(name, help=short, description=desc, epilog=_SPECS[name].epilog(), formatter_class=_FMT)
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

    p = _sub(sub, "steer", "compare baseline and steered continuations of a prompt",
             "Generate a continuation of --prompt twice, plainly and with the interventions, and show both "
             "with the routing changes they caused.")
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=opt.at_least(1, 100_000), default=24, metavar="N",
                   help="tokens to generate (default 24)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=opt.seed, default=0, help="sampling seed (default 0)")
    p.add_argument("--temperature", type=opt.between(0, 100, lo_open=True), default=1.0,
                   help="sampling temperature, > 0 (default 1.0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", type=opt.dtype, help="float32, bfloat16, float16 or auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_intervention_args(p)

    p = _sub(sub, "app", "serve the Dash dashboard for one or more runs",
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

    p = _sub(sub, "export", "export routing and analysis tables",
             "Write a run's tables (and analysis tables) as Parquet, CSV or JSON, with a SCHEMA.md that "
             "describes every column, into a new folder.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--format", choices=["parquet", "csv", "json"], default="parquet", help="file format (default parquet)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--what", default="all", help="comma list of tables/analyses, or 'all' (default)")

    p = _sub(sub, "check", "verify every part of a run (sizes, checksums, Parquet); --repair drops damaged parts",
             "Verify every part file a run lists: present, of the recorded size and checksum, readable Parquet. "
             "With --repair, unlist the first damaged part and every later one (and delete their files) so "
             "`workbench capture ... --resume` captures them again. Exit code 2 when damage is found and not repaired.")
    p.add_argument("run", metavar="RUN", help="run folder")
    p.add_argument("--repair", action="store_true", help="drop damaged parts so --resume captures them again")

    p = _sub(sub, "tiny", "write a tiny random-weight checkpoint (offline)",
             "Write a tiny random-weight checkpoint of a real MoE architecture with a byte-level tokenizer, "
             "for tests and quick experiments. Same arguments, same files.")
    p.add_argument("model_type", metavar="MODEL_TYPE", help="a transformers model type, e.g. qwen3_moe, mixtral, olmoe")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layers", type=opt.at_least(1, 256), default=4, help="decoder layers (default 4)")
    p.add_argument("--experts", type=opt.at_least(1, 1024), default=8, help="routed experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=opt.at_least(1, 1024), default=2, help="experts per token (default 2)")
    p.add_argument("--hidden", type=opt.at_least(8, 8192), default=64, help="hidden size, a multiple of 8 (default 64)")
    p.add_argument("--seed", type=opt.seed, default=0, help="weight seed (default 0)")

    p = _sub(sub, "import", "import routing recorded by vLLM or SGLang as a run",
             "Turn routing a serving engine recorded (vLLM enable_return_routed_experts, SGLang "
             "--enable-return-routed-experts or its expert distribution dump) into a run every id-only "
             "analysis reads.")
    p.add_argument("engine", choices=["vllm", "sglang", "sglang-dump"], help="which engine wrote SOURCE")
    p.add_argument("source", metavar="SOURCE", help="vllm/sglang: a .json/.jsonl of request outputs; "
                                                    "sglang-dump: a .pt dump or a folder of them")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", metavar="MODEL_OR_CONFIG", help="the served model: 'demo', a folder, a config.json "
                                                              "(gives dense/MoE layers, experts, top-k)")
    p.add_argument("--tokens", metavar="JSONL", help="per-request input_ids/output_ids and labels when SOURCE lacks them")
    p.add_argument("--physical-to-logical", metavar="FILE", help="the placement (SGLang's expert-location JSON/.pt) "
                   "for releases that report physical ids: SGLang 0.5.7-0.5.9, vLLM 0.14-0.15 under EPLB")
    p.add_argument("--engine-version", metavar="X.Y.Z", help="the engine release that served (e.g. 0.5.10): says "
                   "whether its expert ids are physical or logical")
    p.add_argument("--routed-start", type=opt.at_least(0), metavar="N", help="rows the engine skipped at the front "
                   "(the request's routed_experts_prompt_start / routed_experts_start_len) when SOURCE lacks it")
    p.add_argument("--experts", type=opt.at_least(1), help="routed experts per layer when no --model is given")
    p.add_argument("--resume", action="store_true", help="finish a killed import of the same input")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    p = sub.add_parser("compare", help="compare two runs: changed routing decisions, load, specialisation",
                       epilog=_EXAMPLES["compare"], formatter_class=_FMT, description="Compare run B with run A: per layer the share of tokens whose experts changed, "
                       "top-k overlap, routing JSD, load shift per expert, specialisation shift per label, and each "
                       "changed decision; runs of different data get load, balance and specialisation side by side. "
                       "--match weights|routing first matches B's experts to A's (checkpoints).")
    p.add_argument("run_a", metavar="RUN_A", help="the reference run")
    p.add_argument("run_b", metavar="RUN_B", help="the run compared with RUN_A")
    p.add_argument("--out", metavar="DIR", help="write every table (Parquet) and figure (HTML) here")
    p.add_argument("--match", choices=["none", "weights", "routing"], default="none",
                   help="match B's experts to A's first: by weights (checkpoints) or routing (same tokens)")
    p.add_argument("--distribution", choices=["weights", "logits"], default="weights",
                   help="routing distribution for the JSD: renormalised top-k weights, or softmax of the logits")
    p.add_argument("--labels", type=opt.text_of(opt.columns),
                   help="comma list of label columns (default: the shared ones with <= 50 values)")
    p.add_argument("--weak", type=opt.between(0, 1), default=0.5,
                   help="matches below this similarity are flagged weak (default 0.5)")
    p.add_argument("--max-changes", type=opt.at_least(1), default=200_000,
                   help="rows kept in the changes table (default 200000)")

    p = sub.add_parser("attribute", help="which experts cause the loss on DATA: first-order estimate, exact zeroing",
                       epilog=_EXAMPLES["attribute"], formatter_class=_FMT, description="Attribute the mean token NLL of DATA (or NLL(DATA) - NLL(control)) to every "
                       "(layer, expert): the first-order effect of zeroing it from one backward pass, and with "
                       "--exact the effect measured by zeroing experts one by one.")
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("--data", required=True, help="bundled dataset name or a .txt/.jsonl/.parquet file")
    p.add_argument("--where", action="append", type=opt.text_of(opt.where), metavar="COL=V[,V]",
                   help="keep records whose label matches")
    p.add_argument("--control", metavar="DATA", help="contrast: attribute NLL(data) - NLL(control)")
    p.add_argument("--control-where", action="append", type=opt.text_of(opt.where), metavar="COL=V[,V]",
                   help="--where for the control")
    p.add_argument("--limit", type=opt.at_least(1), help="keep the first N records (after --where)")
    p.add_argument("--exact", metavar="N|all|SPEC", help="also zero experts one by one: the N largest estimates, "
                                                         "all, or a SPEC")
    p.add_argument("--max-tokens", type=opt.at_least(1), default=1024,
                   help="tokens of DATA (and of the control) evaluated")
    p.add_argument("--seq-len", type=opt.seq_len_or_zero, default=128,
                   help="pack into S-token sequences (0 = one per record)")
    p.add_argument("--batch-size", type=opt.at_least(1), default=4, help="sequences a forward (default 4)")
    p.add_argument("--out", help="the table (.parquet, .csv or .json)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", type=opt.dtype, help="float32, bfloat16, float16 or auto")

    _sub(sub, "datasets", "list the bundled datasets", "List the bundled datasets with their sizes and label columns.")
    from .fidelity import commands as _fid  # [fidelity]: replay, stability (arguments live there)

    p = sub.add_parser("replay", help=_fid.REPLAY_HELP, description=_fid.REPLAY_DESCRIPTION,
                       epilog=_fid.REPLAY_EXAMPLES, formatter_class=_FMT)
    _fid.add_replay_arguments(p)
    p = sub.add_parser("stability", help=_fid.STABILITY_HELP, description=_fid.STABILITY_DESCRIPTION,
                       epilog=_fid.STABILITY_EXAMPLES, formatter_class=_FMT)
    _fid.add_stability_arguments(p)
    from .compress import commands as _compress  # [compress]: prune, merge, evaluate (arguments live there)

    for name in ("prune", "merge", "evaluate"):
        _compress.add_parser(sub, name, _FMT)
    p = _sub(sub, "docs", "build the documentation site and open it in a browser",
             "Build the documentation (mkdocs, from the checkout's docs/; needs the docs extra) into ./site and "
             "serve it on 127.0.0.1 until Ctrl-C.")
    p.add_argument("--port", type=opt.port, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--out", help="site folder (default: <checkout>/site)")
    p.add_argument("--no-build", action="store_true", help="serve the site already built")
    p.add_argument("--no-open", action="store_true", help="do not open a browser")
    p.add_argument("--build-only", action="store_true", help="build, then stop")
    return ap


def _analysis_module(name: str):
    import importlib

    return importlib.import_module(f"workbench.analysis.{name.replace('-', '_')}")


def _analysis_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"workbench.analysis.{name.replace('-', '_')}") is not None


def cmd_capture(args) -> None:
    from .data import load_dataset, subset

    # Everything that can be checked without the model is checked before it loads.
    data = load_dataset(args.data)
    if args.where or args.limit or args.interleave:
        data = subset(data, where=dict(args.where or []), limit=args.limit, interleave=args.interleave)
    opts = {"dump_format": args.dump_format}
    if args.dump_experts:
        opts["dump_experts"] = args.dump_experts
    if args.dump_hidden:
        opts["dump_hidden"] = args.dump_hidden
    if args.layers is not None:
        opts["layers"] = args.layers
    if getattr(args, "margin", False):
        opts["margin"] = True
    _precheck_layers(args.model, args)
    _say(f"loading the model {args.model} ...")  # torch and the weights: seconds before the progress bar
    _import_torch_holding_sigint()
    from .capture import capture, check_probe_options
    from .models.loading import load_model

    check_probe_options([s.strip() for s in args.probes.split(",") if s.strip()], args.logits, **opts)  # before loading

    from .distributed import local_device

    if args.layerwise:
        from .layerwise import load_layerwise

        mm = load_layerwise(args.model, device=_device(args.device), dtype=args.dtype,
                            offload_folder=args.offload_folder, trust_remote_code=args.trust_remote_code)
    else:
        mm = load_model(args.model, device=local_device(_device(args.device)), dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, device_map=args.device_map,
                        max_memory=args.max_memory, offload_folder=args.offload_folder)
    run = capture(mm, data, args.out, probes=[s.strip() for s in args.probes.split(",") if s.strip()],
                  logits=args.logits, batch_size=args.batch_size, max_tokens=args.max_tokens, seq_len=args.seq_len,
                  resume=args.resume, overwrite=args.overwrite, interventions=_interventions(args) or None,
                  progress=not args.no_progress, part_tokens=args.part_tokens, **opts)
    n = run.n_tokens
    print(f"captured {n} tokens x {len(run.moe_layers)} MoE layers of {run.model_info['model_type']} into {run.path}")


def cmd_tiny(args) -> None:
    _import_torch_holding_sigint()
    from .models.tiny import make_tiny

    out = make_tiny(args.model_type, args.out, layers=args.layers, experts=args.experts, top_k=args.top_k,
                    hidden=args.hidden, seed=args.seed)
    print(f"wrote a tiny {args.model_type} ({args.layers} layers, {args.experts} experts, top-{args.top_k}) to {out}")


def cmd_datasets(args) -> None:
    from .data import bundled_datasets, load_dataset

    for name, path in bundled_datasets().items():
        ds = load_dataset(name)
        print(f"{name:24s} {len(ds.records):7d} records  {path.stat().st_size / 1e6:7.2f} MB  "
              f"labels: {', '.join(ds.label_columns) or '-'}")


def cmd_analyze(args) -> None:
    if not _analysis_available(args.analysis):
        raise WorkbenchError(f"the {args.analysis} analysis is not available in this version")
    from .analysis import analyze_command, common, module

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


_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def _precheck_layers(model: str, args) -> None:
    """Layer and expert numbers in SPECs and layer lists against the model's config.json, before torch
    loads (seconds instead of a minute on a busy machine). Only what the config alone decides: a hub
    id, or whether a layer is dense, is checked after loading, as before."""
    import json
    import re
    from pathlib import Path

    folder = Path(os.environ.get("WORKBENCH_DEMO_MODEL") or Path(__file__).resolve().parent / "assets" / "demo_model") \
        if model == "demo" else Path(model).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    cfg = cfg.get("text_config") or cfg if isinstance(cfg, dict) else {}
    n_layers = cfg.get("num_hidden_layers")
    n_exp = next((cfg[k] for k in _EXPERT_KEYS if isinstance(cfg.get(k), int)), None)
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


def cmd_steer(args) -> None:
    if not _interventions(args):  # before torch loads: this needs no model
        raise WorkbenchError("give at least one intervention: --ban, --force, --boost, --zero or --scale")
    _precheck_layers(args.model, args)
    _say(f"loading the model {args.model} ...")
    _import_torch_holding_sigint()
    from .steering import steer_command

    steer_command(args.model, args.prompt, _interventions(args), max_new_tokens=args.max_new_tokens,
                  sample=args.sample, seed=args.seed, temperature=args.temperature, device=args.device,
                  dtype=args.dtype, as_json=args.json)


def _say(msg: str) -> None:
    """A status line for a person waiting at a terminal ("loading the model ..."), shown at once on stderr
    (stdout stays the command's output); not written to a pipe or file, where errors stay one line."""
    if sys.stderr.isatty():
        print(f"workbench: {msg}", file=sys.stderr, flush=True)


def cmd_app(args) -> None:
    _say("starting the dashboard" + (f" and loading the model {args.model}" if args.model else "") + " ...")
    from .app import serve

    if (args.device or args.dtype) and not args.model:
        raise WorkbenchError("--device and --dtype apply to --model; name the model too")
    serve(args.run, model=args.model, host=args.host, port=args.port, debug=args.debug, device=args.device,
          dtype=args.dtype, allow_remote=args.allow_remote, allowed_hosts=args.allow_host)


def cmd_export(args) -> None:
    from .export import export_command

    export_command(args.run, args.out, fmt=args.format, what=args.what)


def cmd_check(args) -> None:
    from .check import check_command

    check_command(args.run, repair=args.repair)


def cmd_demo(args) -> None:
    _say("starting the demo (importing torch) ...")
    _import_torch_holding_sigint()
    from .demo import run_demo

    run_demo(out=args.out, serve=not args.no_serve, port=args.port, quick=args.quick)


def cmd_compare(args) -> None:
    from .analysis.compare import compare_command, options_from_args

    args.other = args.run_b
    options = options_from_args(args)
    del options["other"]
    compare_command(args.run_a, args.run_b, out=args.out, **options)


def cmd_attribute(args) -> None:
    _import_torch_holding_sigint()  # attribution imports torch at once
    from .attribution import attribute_command

    attribute_command(args.model, args.data, where=args.where, control=args.control, control_where=args.control_where,
                      limit=args.limit, exact=args.exact, max_tokens=args.max_tokens, seq_len=args.seq_len,
                      batch_size=args.batch_size, out=args.out, device=args.device, dtype=args.dtype)


def _device(d):
    if d:
        return d
    import torch

    return "cuda" if torch.cuda.is_available() else None


def cmd_import(args) -> None:
    from .importers import import_routed_experts

    run = import_routed_experts(args.source, args.out, engine=args.engine, model=args.model, tokens=args.tokens,
                                physical_to_logical=args.physical_to_logical, n_experts=args.experts,
                                resume=args.resume, overwrite=args.overwrite, engine_version=args.engine_version,
                                routed_start=args.routed_start)
    info = run.manifest.get("import", {})
    if "windows" in info and "tokens" not in info:  # a counts-only dump
        dropped = info.get("empty_windows_dropped")
        print(f"imported {info['windows']} windows of expert counts x {len(run.moe_layers)} MoE layers from "
              f"{args.engine} into {run.path}" + (f" ({dropped} empty buffer slots dropped)" if dropped else ""))
        return
    print(f"imported {info.get('tokens', 0)} tokens of {info.get('documents', 0)} sequences x "
          f"{len(run.moe_layers)} MoE layers from {args.engine} into {run.path}")


COMMANDS = {"import": cmd_import, "capture": cmd_capture, "tiny": cmd_tiny, "datasets": cmd_datasets, "analyze": cmd_analyze,
            "steer": cmd_steer, "app": cmd_app, "export": cmd_export, "demo": cmd_demo,
            "check": cmd_check}

def cmd_docs(args) -> None:
    from .docs_site import docs_command

    docs_command(out=args.out, port=args.port, no_build=args.no_build, no_open=args.no_open,
                 build_only=args.build_only)


COMMANDS.update(compare=cmd_compare, attribute=cmd_attribute)


def cmd_compress(args) -> None:
    _import_torch_holding_sigint()
    from .compress.commands import RUN

    RUN[args.command](args)


COMMANDS.update(prune=cmd_compress, merge=cmd_compress, evaluate=cmd_compress)
COMMANDS.update(docs=cmd_docs)


def cmd_fidelity(args) -> None:
    _import_torch_holding_sigint()
    from .fidelity import commands

    (commands.replay_cli if args.command == "replay" else commands.stability_cli)(args)


COMMANDS.update(replay=cmd_fidelity, stability=cmd_fidelity)


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
        from .threads import configure

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
        from .store import io_error, os_errno

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


def _import_torch_holding_sigint() -> None:
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

    from .errors import WorkbenchWarning

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


if __name__ == "__main__":
    sys.exit(main())
