"""`workbench import`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "import", "import routing recorded by vLLM or SGLang as a run",
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


def run(args) -> None:
    from ..importers import import_routed_experts

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
