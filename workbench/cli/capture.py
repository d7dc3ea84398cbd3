"""`workbench capture`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import add_intervention_args, default_device, import_torch_holding_sigint, interventions_of, precheck_layers, say, subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "capture", "capture routing (and more) of MODEL on DATA into a run folder",
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
    add_intervention_args(p)


def run(args) -> None:
    from ..data import load_dataset, subset

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
    precheck_layers(args.model, args)
    say(f"loading the model {args.model} ...")  # torch and the weights: seconds before the progress bar
    import_torch_holding_sigint()
    from ..capture import capture, check_probe_options
    from ..models.loading import load_model

    check_probe_options([s.strip() for s in args.probes.split(",") if s.strip()], args.logits, **opts)  # before loading

    from ..distributed import local_device

    if args.layerwise:
        from ..layerwise import load_layerwise

        mm = load_layerwise(args.model, device=default_device(args.device), dtype=args.dtype,
                            offload_folder=args.offload_folder, trust_remote_code=args.trust_remote_code)
    else:
        mm = load_model(args.model, device=local_device(default_device(args.device)), dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code, device_map=args.device_map,
                        max_memory=args.max_memory, offload_folder=args.offload_folder)
    run = capture(mm, data, args.out, probes=[s.strip() for s in args.probes.split(",") if s.strip()],
                  logits=args.logits, batch_size=args.batch_size, max_tokens=args.max_tokens, seq_len=args.seq_len,
                  resume=args.resume, overwrite=args.overwrite, interventions=interventions_of(args) or None,
                  progress=not args.no_progress, part_tokens=args.part_tokens, **opts)
    n = run.n_tokens
    print(f"captured {n} tokens x {len(run.moe_layers)} MoE layers of {run.model_info['model_type']} into {run.path}")
