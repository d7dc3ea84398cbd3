"""`workbench attribute`: argument parser and run."""

from __future__ import annotations

from .. import options as opt
from .common import EXAMPLES, FMT, import_torch_holding_sigint


def add_parser(sub, argv=None) -> None:
    p = sub.add_parser("attribute", help="which experts cause the loss on DATA: first-order estimate, exact zeroing",
                       epilog=EXAMPLES["attribute"], formatter_class=FMT, description="Attribute the mean token NLL of DATA (or NLL(DATA) - NLL(control)) to every "
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


def run(args) -> None:
    import_torch_holding_sigint()  # attribution imports torch at once
    from ..attribution import attribute_command

    attribute_command(args.model, args.data, where=args.where, control=args.control, control_where=args.control_where,
                      limit=args.limit, exact=args.exact, max_tokens=args.max_tokens, seq_len=args.seq_len,
                      batch_size=args.batch_size, out=args.out, device=args.device, dtype=args.dtype)
