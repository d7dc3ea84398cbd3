"""`workbench` command line. The contract is DESIGN.md's; every command's work lives in its module.

Errors a user can cause are WorkbenchError: printed as one line, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import WorkbenchError

ANALYSES = ("stats", "super-experts", "lrc", "multilingual", "behavior", "atlas", "placement")


def _add_intervention_args(p: argparse.ArgumentParser, with_zero: bool = True) -> None:
    p.add_argument("--ban", metavar="SPEC", help="experts never selected, e.g. L3:E54,L4:E38")
    p.add_argument("--force", metavar="SPEC", help="experts always selected")
    p.add_argument("--boost", metavar="SPEC", help="soft promotion: SPEC[=lambda] adds lambda*std(logits) (default 0.5)")
    if with_zero:
        p.add_argument("--zero", metavar="SPEC", help="routing unchanged, contribution dropped (pruning); E-1 = shared")
    p.add_argument("--scale", metavar="SPEC", help="routing unchanged, weight times s: SPEC=s")


def _interventions(args) -> dict:
    return {k: getattr(args, k) for k in ("ban", "force", "boost", "zero", "scale") if getattr(args, k, None)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="workbench", description="MoE Workbench: see and change what MoE experts do.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="the main job: bundled model + datasets -> run, analyses, report, app")
    p.add_argument("--out", default="demo_out", help="demo folder (default: ./demo_out)")
    p.add_argument("--no-serve", action="store_true", help="stop after writing the report")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--quick", action="store_true", help="smaller datasets (for a fast look and CI)")

    p = sub.add_parser("capture", help="capture routing (and more) of MODEL on DATA into a run folder")
    p.add_argument("model", metavar="MODEL", help="hub id, local folder, or 'demo'")
    p.add_argument("--data", required=True, help="bundled dataset name or a .txt/.jsonl/.parquet file")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--probes", default="routing", help="comma list of routing,experts,hidden,attention")
    p.add_argument("--logits", action="store_true", help="also store fp32 router logits [E] per token and layer")
    p.add_argument("--where", action="append", metavar="COL=V[,V]", help="keep records whose label matches")
    p.add_argument("--limit", type=int, help="keep the first N records (after --where)")
    p.add_argument("--interleave", metavar="COL", help="order records round-robin over COL's values, so --limit "
                                                       "and --max-tokens keep every value (e.g. domain)")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="pack the token stream into consecutive S-token sequences")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", help="float32, bfloat16, float16, auto")
    p.add_argument("--resume", action="store_true", help="finish a killed capture of the same model and data")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--dump-experts", metavar="SPEC", help="store full down_proj outputs of these experts")
    p.add_argument("--dump-hidden", metavar="LAYERS", help="store full residual vectors after these layers, e.g. 1,3")
    p.add_argument("--dump-format", choices=["fp16", "int8"], default="fp16")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--part-tokens", type=int, default=65536, help="tokens per Parquet part (the unit of resume)")
    p.add_argument("--no-progress", action="store_true")
    _add_intervention_args(p)

    p = sub.add_parser("analyze", help="run an analysis on a run")
    asub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for name in ANALYSES:
        ap_an = asub.add_parser(name, help=f"{name} analysis")
        ap_an.add_argument("run", metavar="RUN")
        ap_an.add_argument("--out", help="main table (.parquet, .csv or .json)")
        ap_an.add_argument("--figures", metavar="DIR", help="write figures as HTML (PNG too with kaleido)")
        _analysis_module(name).add_arguments(ap_an) if _analysis_available(name) else None

    p = sub.add_parser("steer", help="compare baseline and steered continuations of a prompt")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_intervention_args(p)

    p = sub.add_parser("app", help="serve the Dash dashboard for one or more runs")
    p.add_argument("run", metavar="RUN", nargs="+", help="run folder(s), or a folder of runs (e.g. demo_out/runs)")
    p.add_argument("--model", help="model for the Steering lab (hub id, folder or 'demo')")
    p.add_argument("--device", help="device for --model (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="dtype for --model, e.g. bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--allow-remote", action="store_true",
                   help="confirm a non-loopback --host: anyone who reaches it can use the dashboard (no login)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (e.g. a reverse proxy's); repeatable")
    p.add_argument("--debug", action="store_true",
                   help="Flask's development server with the Werkzeug debugger (runs code for whoever opens it)")

    p = sub.add_parser("export", help="export routing and analysis tables")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--format", choices=["parquet", "csv", "json"], default="parquet")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--what", default="all", help="comma list of tables/analyses, or 'all'")

    p = sub.add_parser("tiny", help="write a tiny random-weight checkpoint (offline)")
    p.add_argument("model_type", metavar="MODEL_TYPE")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("import", help="import routing recorded by vLLM or SGLang as a run")
    p.add_argument("engine", choices=["vllm", "sglang", "sglang-dump"], help="which engine wrote SOURCE")
    p.add_argument("source", metavar="SOURCE", help="vllm/sglang: a .json/.jsonl of request outputs; "
                                                    "sglang-dump: a .pt dump or a folder of them")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--model", metavar="MODEL_OR_CONFIG", help="the served model: 'demo', a folder, a config.json "
                                                              "(gives dense/MoE layers, experts, top-k)")
    p.add_argument("--tokens", metavar="JSONL", help="per-request input_ids/output_ids and labels when SOURCE lacks them")
    p.add_argument("--physical-to-logical", metavar="FILE", help="SGLang's expert-location JSON/.pt when it ran EPLB")
    p.add_argument("--experts", type=int, help="routed experts per layer when no --model is given")
    p.add_argument("--resume", action="store_true", help="finish a killed import of the same input")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    sub.add_parser("datasets", help="list the bundled datasets")
    return ap


def _analysis_module(name: str):
    import importlib

    return importlib.import_module(f"workbench.analysis.{name.replace('-', '_')}")


def _analysis_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"workbench.analysis.{name.replace('-', '_')}") is not None


def cmd_capture(args) -> None:
    from .capture import capture

    opts = {}
    if args.dump_experts:
        opts["dump_experts"] = args.dump_experts
    if args.dump_hidden:
        opts["dump_hidden"] = args.dump_hidden
    opts["dump_format"] = args.dump_format
    from .models.loading import load_model

    from .data import load_dataset, parse_where, subset

    data = load_dataset(args.data)
    if args.where or args.limit or args.interleave:
        data = subset(data, where=parse_where(args.where), limit=args.limit, interleave=args.interleave)
    mm = load_model(args.model, device=_device(args.device), dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    run = capture(mm, data, args.out, probes=[s.strip() for s in args.probes.split(",") if s.strip()],
                  logits=args.logits, batch_size=args.batch_size, max_tokens=args.max_tokens, seq_len=args.seq_len,
                  resume=args.resume, overwrite=args.overwrite, interventions=_interventions(args) or None,
                  progress=not args.no_progress, part_tokens=args.part_tokens, **opts)
    n = sum(p["tokens"] for p in run.manifest["parts"])
    print(f"captured {n} tokens x {len(run.moe_layers)} MoE layers of {run.model_info['model_type']} into {run.path}")


def cmd_tiny(args) -> None:
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
    from .analysis import run_cli

    run_cli(args.analysis, args)


def cmd_steer(args) -> None:
    from .steering import steer_cli

    steer_cli(args, _interventions(args))


def cmd_app(args) -> None:
    from .app import serve

    if (args.device or args.dtype) and not args.model:
        raise WorkbenchError("--device and --dtype apply to --model; name the model too")
    serve(args.run, model=args.model, host=args.host, port=args.port, debug=args.debug, device=args.device,
          dtype=args.dtype, allow_remote=args.allow_remote, allowed_hosts=args.allow_host)


def cmd_export(args) -> None:
    from .export import export_cli

    export_cli(args)


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(out=args.out, serve=not args.no_serve, port=args.port, quick=args.quick)


def _device(d):
    if d:
        return d
    import torch

    return "cuda" if torch.cuda.is_available() else None


def cmd_import(args) -> None:
    from .importers import import_routed_experts

    run = import_routed_experts(args.source, args.out, engine=args.engine, model=args.model, tokens=args.tokens,
                                physical_to_logical=args.physical_to_logical, n_experts=args.experts,
                                resume=args.resume, overwrite=args.overwrite)
    info = run.manifest.get("import", {})
    print(f"imported {info.get('tokens', 0)} tokens of {info.get('documents', 0)} sequences x "
          f"{len(run.moe_layers)} MoE layers from {args.engine} into {run.path}")


COMMANDS = {"import": cmd_import, "capture": cmd_capture, "tiny": cmd_tiny, "datasets": cmd_datasets, "analyze": cmd_analyze,
            "steer": cmd_steer, "app": cmd_app, "export": cmd_export, "demo": cmd_demo}


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        COMMANDS[args.command](args)
    except WorkbenchError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workbench: interrupted (completed parts are kept; use --resume)", file=sys.stderr)
        return 130
    return 0


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:
        pass


if __name__ == "__main__":
    sys.exit(main())
