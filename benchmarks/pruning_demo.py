"""What each expert-removal criterion costs on the bundled demo model, on held-out text.

Calibration: the even records of the bundled `calibration` set, captured with routing + experts probes
(packed 256-token sequences, --cal-tokens). Held-out: the odd records (--eval-tokens, packed the same
way). For every criterion (frequency, REAP, attribution estimate, random seed 0) and ratio (12.5%, 25%,
50% of each layer's 64 experts), with and without super-expert protection, a real checkpoint is written
with `workbench.compress.prune.prune` and evaluated with `workbench.compress.evaluate.evaluate` against the
base model; merging (output similarity, dominant router rows) is added at the same ratios.

    python benchmarks/pruning_demo.py [--cal-tokens 16384] [--eval-tokens 8192] [--out benchmarks/results/pruning_demo_cpu.json]
    python benchmarks/pruning_demo.py --gap-only          # + pruned vs banned, with and without renormalisation
    python benchmarks/pruning_demo.py --attribution-only  # + attribution by |effect| and signed, estimate and exact

Times are single wall-clock measurements on the machine named in the result (not a speed benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATIOS = (0.125, 0.25, 0.5)
CRITERIA = ("frequency", "reap", "attribution", "random")


def split_calibration(folder: Path) -> tuple[Path, Path]:
    """Even records -> calibration file, odd records -> held-out file (same domains in both)."""
    recs = (ROOT / "datasets" / "calibration.jsonl").read_text().splitlines()
    cal, held = folder / "cal.jsonl", folder / "heldout.jsonl"
    cal.write_text("\n".join(recs[0::2]) + "\n")
    held.write_text("\n".join(recs[1::2]) + "\n")
    return cal, held


def renormalisation_gap(cal: Path, held: Path, tmp: Path, eval_tokens: int, cal_tokens: int) -> list[dict]:
    """Pruned checkpoint vs the same experts banned, on the demo as trained (norm_topk_prob true: equal) and on
    a copy whose config turns norm_topk_prob off (OLMoE's rule: softmax over all experts, no renormalisation),
    where removing router rows rescales the kept weights. REAP removal at each ratio, held-out perplexity."""
    import shutil

    from workbench.capture import capture
    from workbench.compress import prune as prune_mod
    from workbench.compress.evaluate import evaluate
    from workbench.models.loading import DEMO_MODEL_DIR, load_model
    from workbench.steering import perplexity

    variant = tmp / "demo_no_renorm"
    shutil.copytree(DEMO_MODEL_DIR, variant)
    cfg = json.loads((variant / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    (variant / "config.json").write_text(json.dumps(cfg, indent=2))
    texts = [json.loads(line)["text"] for line in held.read_text().splitlines()]
    rows = []
    for name, spec in (("demo (norm_topk_prob true)", "demo"), ("demo, norm_topk_prob false", str(variant))):
        mm = load_model(spec, dtype="float32")
        run = capture(mm, str(cal), tmp / f"gap_run_{len(rows)}", probes=["routing", "experts"], seq_len=256,
                      max_tokens=cal_tokens, progress=False)
        for ratio in RATIOS:
            out = tmp / f"gap_{len(rows)}"
            _, info = prune_mod.prune(spec, run, ratio, "reap", out, progress=False)
            base = perplexity(mm, texts, seq_len=256, max_tokens=eval_tokens, progress=False)["ppl"]
            ban = perplexity(mm, texts, {"ban": info["ban"]}, seq_len=256, max_tokens=eval_tokens, progress=False)
            ev = evaluate([spec, str(out)], texts, max_tokens=eval_tokens, seq_len=256, progress=False)
            pr = ev.tables["models"]["ppl"][1]
            rows.append({"model": name, "ratio": ratio, "ppl_base": base, "ppl_ban": ban["ppl"], "ppl_pruned": pr,
                         "pruned_over_ban": pr / ban["ppl"], "equals_ban_claimed": info["equals_ban"],
                         "tokens": ban["tokens"]})
            print(rows[-1])
    return rows


def attribution_rows(cal: Path, held: Path, tmp: Path, args) -> tuple[list[dict], dict]:
    """Attribution as a criterion, by |effect| (the default) and signed, from the first-order estimate
    (--attribution-tokens) and from exact zeroing (one forward per expert over --exact-tokens tokens). Same
    ratios and protection as the main table, evaluated on the same held-out text."""
    from workbench.capture import capture
    from workbench.compress import prune as prune_mod
    from workbench.compress.evaluate import evaluate
    from workbench.compress.saliency import scores as saliency
    from workbench.models.loading import load_model

    mm = load_model("demo")
    run = capture(mm, str(cal), tmp / "run", probes=["routing", "experts"], seq_len=256, max_tokens=args.cal_tokens,
                  progress=False)
    times, sc = {}, {}
    for exact, tokens in ((False, args.attribution_tokens), (True, args.exact_tokens)):
        t = time.perf_counter()
        signed = saliency(run, "attribution", model=mm, exact=exact, max_tokens=tokens, progress=True, signed=True)
        times[f"score_attribution_{'exact' if exact else 'estimate'}_s"] = time.perf_counter() - t
        name = "attribution-exact" if exact else "attribution"
        sc[name] = signed.with_columns(signed["score"].abs())
        sc[name + "-signed"] = signed
    times["exact_tokens"] = args.exact_tokens
    ses = prune_mod.super_experts(run)
    models, meta = ["demo"], [None]
    for ratio in RATIOS:
        for crit, s in sc.items():
            for protect in (None, "super-experts"):
                out = tmp / f"{crit}_{ratio}_{'se' if protect else 'none'}"
                _, info = prune_mod.prune("demo", run, ratio, "attribution", out, protect, progress=False, scores=s)
                got = {int(k): v["removed"] for k, v in info["layers"].items()}
                models.append(str(out))
                meta.append({"method": "prune", "criterion": crit, "ratio": ratio, "protect": protect or "none",
                             "super_experts_removed": sorted(f"L{a}:E{b}" for a, b in ses if b in got.get(a, [])),
                             "predicted_removed_mass": float(prune_mod.predicted_cost(run, got)["removed_mass"].mean())})
    res = evaluate(models, str(held), max_tokens=args.eval_tokens, seq_len=256, batch_size=8, progress=True)
    rows = []
    for m, r in zip(meta, res.tables["models"].iter_rows(named=True)):
        if m is not None:
            rows.append({**m, **{k: r[k] for k in ("n_experts", "params", "ppl", "ppl_ratio", "agreement", "kl",
                                                   "overlap", "removed_mass", "tokens")}})
    return rows, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cal-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--attribution-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pruning_demo_cpu.json"))
    ap.add_argument("--gap-only", action="store_true", help="only the renormalisation section, added to --out")
    ap.add_argument("--attribution-only", action="store_true",
                    help="only the attribution rows (|effect| and signed, estimate and exact), replacing those in --out")
    ap.add_argument("--exact-tokens", type=int, default=256, help="calibration tokens of exact attribution")
    args = ap.parse_args()
    if args.attribution_only:
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        from workbench import threads

        threads.ensure(int(os.environ.get("WORKBENCH_THREADS", "1")))
        result = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory(prefix="wb_pruning_exact_") as tmp:
            tmp = Path(tmp)
            cal, held = split_calibration(tmp)
            rows, times = attribution_rows(cal, held, tmp, args)
        result["rows"] = [r for r in result["rows"] if not str(r.get("criterion")).startswith("attribution")] + rows
        result["times"].update(times)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"added {len(rows)} attribution rows to {args.out}")
        return
    if args.gap_only:
        os.environ.setdefault("USE_HUB_KERNELS", "NO")
        from workbench import threads

        threads.ensure(int(os.environ.get("WORKBENCH_THREADS", "1")))
        result = json.loads(Path(args.out).read_text())
        with tempfile.TemporaryDirectory(prefix="wb_pruning_gap_") as tmp:
            tmp = Path(tmp)
            cal, held = split_calibration(tmp)
            t = time.perf_counter()
            result["renormalisation"] = renormalisation_gap(cal, held, tmp, args.eval_tokens, args.cal_tokens)
            result["times"]["renormalisation_s"] = time.perf_counter() - t
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"added the renormalisation section to {args.out}")
        return
    os.environ.setdefault("USE_HUB_KERNELS", "NO")

    import polars as pl
    import torch
    import transformers

    from workbench import threads
    from workbench.capture import capture
    from workbench.compress import merge as merge_mod
    from workbench.compress import prune as prune_mod
    from workbench.compress.evaluate import evaluate
    from workbench.models.loading import load_model

    threads.ensure(int(os.environ.get("WORKBENCH_THREADS", "1")))
    times: dict[str, float] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="wb_pruning_demo_") as tmp:
        tmp = Path(tmp)
        cal, held = split_calibration(tmp)
        t = time.perf_counter()
        mm = load_model("demo")
        run = capture(mm, str(cal), tmp / "run", probes=["routing", "experts"], seq_len=256,
                      max_tokens=args.cal_tokens, progress=False)
        times["capture_s"] = time.perf_counter() - t
        ses = prune_mod.super_experts(run)
        t = time.perf_counter()
        scores = {}
        from workbench.compress.saliency import scores as saliency

        for by in CRITERIA:
            t1 = time.perf_counter()
            scores[by] = saliency(run, by, model=mm, seed=0, max_tokens=args.attribution_tokens)
            times[f"score_{by}_s"] = time.perf_counter() - t1
        models, meta = ["demo"], [{"method": "base"}]
        t = time.perf_counter()
        n_ckpt = 0
        for ratio in RATIOS:
            for by in CRITERIA:
                for protect in (None, "super-experts"):
                    out = tmp / f"{by}_{ratio}_{'se' if protect else 'none'}"
                    removed = prune_mod.choose(scores[by], ratio, 64, 8, prune_mod.protected_experts(protect, run),
                                               normalise=by != "attribution")
                    _, info = prune_mod.prune("demo", run, ratio, by, out, protect, seed=0, progress=False,
                                              scores=scores[by])
                    got = {int(k): v["removed"] for k, v in info["layers"].items()}
                    assert got == removed
                    pred = prune_mod.predicted_cost(run, got)
                    models.append(str(out))
                    meta.append({"method": "prune", "criterion": by, "ratio": ratio, "protect": protect or "none",
                                 "super_experts_removed": sorted(f"L{a}:E{b}" for a, b in ses if b in got.get(a, [])),
                                 "predicted_removed_mass": float(pred["removed_mass"].mean())})
                    n_ckpt += 1
            out = tmp / f"merge_{ratio}"
            merge_mod.merge("demo", run, ratio, "output", "dominant", out, progress=False)
            models.append(str(out))
            meta.append({"method": "merge", "criterion": "merge-output", "ratio": ratio, "protect": "none",
                         "super_experts_removed": None, "predicted_removed_mass": None})
            n_ckpt += 1
        times["write_checkpoints_s"] = time.perf_counter() - t
        times["checkpoints"] = n_ckpt
        t = time.perf_counter()
        res = evaluate(models, str(held), max_tokens=args.eval_tokens, seq_len=256, batch_size=8, progress=True)
        times["evaluate_s"] = time.perf_counter() - t
        tab = res.tables["models"]
        for m, r in zip(meta, tab.iter_rows(named=True)):
            rows.append({**m, **{k: r[k] for k in ("n_experts", "params", "ppl", "ppl_ratio", "agreement", "kl",
                                                   "overlap", "removed_mass", "tokens")}})
    result = {
        "benchmark": "pruning_demo",
        "model": "demo (qwen3_moe, 8 layers x 64 experts, top-8, norm_topk_prob: pruning equals a ban)",
        "calibration": {"data": "datasets/calibration.jsonl, even records", "tokens": args.cal_tokens, "seq_len": 256},
        "heldout": {"data": "datasets/calibration.jsonl, odd records", "tokens": args.eval_tokens, "seq_len": 256},
        "attribution": {"score": "|effect| of zeroing (criterion 'attribution'); '-signed' rows keep the sign",
                        "estimate_tokens": args.attribution_tokens, "exact_tokens": args.exact_tokens},
        "super_experts": [f"L{a}:E{b}" for a, b in ses],
        "rows": rows,
        "times": times,
        "machine": {"platform": platform.platform(terse=True), "machine": platform.machine(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "polars": pl.__version__},
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    for r in rows:
        print(f"{r['method']:6s} {str(r.get('criterion', '')):12s} {str(r.get('ratio', '')):6s} "
              f"{str(r.get('protect', '')):14s} ppl {r['ppl']:.3f} x{r['ppl_ratio']:.3f} agree {r['agreement']:.3f}")


if __name__ == "__main__":
    main()
