"""`workbench steer`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from ..errors import WorkbenchError
from .common import add_intervention_args, import_torch_holding_sigint, interventions_of, precheck_layers, say, subparser


def add_parser(sub, argv=None) -> None:
    p = subparser(sub, "steer", "compare baseline and steered continuations of a prompt",
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
    add_intervention_args(p)


def run(args) -> None:
    if not interventions_of(args):  # before torch loads: this needs no model
        raise WorkbenchError("give at least one intervention: --ban, --force, --boost, --zero or --scale")
    precheck_layers(args.model, args)
    say(f"loading the model {args.model} ...")
    import_torch_holding_sigint()
    from ..steering import steer_command

    steer_command(args.model, args.prompt, interventions_of(args), max_new_tokens=args.max_new_tokens,
                  sample=args.sample, seed=args.seed, temperature=args.temperature, device=args.device,
                  dtype=args.dtype, as_json=args.json)
