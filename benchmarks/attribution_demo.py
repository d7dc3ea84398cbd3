"""Attribution on the bundled demo model: first-order estimate vs exact zeroing for all 512 experts (CPU).

    .venv/bin/python benchmarks/attribution_demo.py [--tokens 256] [--out benchmarks/results/attribution_demo.json]

Objective: mean token NLL of calibration text (documents interleaved by domain, packed in 128-token
sequences). The estimate is one forward + backward per batch; the exact effect is one forward per
expert with `steer(zero=L:E)` (layers before the zeroed one replayed from the baseline). Records
the Spearman rank correlation over all (layer, expert), and Pearson, top-10 overlap and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/attribution_demo.json")
    a = ap.parse_args()
    import torch

    import workbench as wb
    from workbench import attribution as A
    from workbench.data import load_dataset, subset

    mm = wb.load_model("demo", device="cpu")
    ds = subset(load_dataset("calibration"), interleave="domain", limit=64)
    batches = A.make_batches(mm, ds, seq_len=a.seq_len, max_tokens=a.tokens, batch_size=4)
    t0 = time.perf_counter()
    eff, slots, base = A.estimate(mm, batches)
    t_est = time.perf_counter() - t0
    experts = [(lay, e) for lay in mm.moe_layers for e in range(mm.n_experts)]
    t0 = time.perf_counter()
    ex = A.exact(mm, batches, experts, progress=True)
    t_exact = time.perf_counter() - t0
    from scipy.stats import pearsonr, spearmanr

    rows = {lay: i for i, lay in enumerate(mm.moe_layers)}
    est = np.array([eff[rows[int(lay)], int(e)] for lay, e in ex.select("layer", "expert").iter_rows()])
    exa = ex["exact"].to_numpy()
    rho = float(spearmanr(est, exa).statistic)
    r = float(pearsonr(est, exa).statistic)
    top_est = set(np.argsort(-est)[:10].tolist())
    top_exa = set(np.argsort(-exa)[:10].tolist())
    live = slots.reshape(-1) > 0
    rho_live = float(spearmanr(est[live], exa[live]).statistic)
    out = {"model": "demo", "experts": len(experts), "experts_reached": int(live.sum()),
           "tokens": int(sum(int(b.mask.sum()) for b in batches)), "seq_len": a.seq_len, "objective": "mean token NLL",
           "baseline_nll": base, "spearman": rho, "spearman_reached_only": rho_live, "pearson": r,
           "top10_overlap": len(top_est & top_exa), "seconds_estimate": t_est, "seconds_exact_all": t_exact,
           "largest_exact": float(exa.max()), "mean_abs_exact": float(np.abs(exa).mean()),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
