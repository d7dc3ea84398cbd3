"""Plain forward of the demo model on CPU: torch's default thread count vs the workbench's choice.

Two conditions: the machine as it is ("ambient", its load average recorded) and "loaded" (plus
--busy busy-loop processes). In each, the arms alternate ABAB (`--reps` rounds, each `--forwards`
forwards of one `--tokens`-token sequence) so drifting load hits both alike; median and spread
of tokens/s per arm. Writes benchmarks/results/threads_cpu.json.

    python benchmarks/threads.py [--reps 5] [--forwards 1] [--tokens 64] [--busy 2] [--out benchmarks/results/threads_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path


def _busy() -> None:
    while True:
        pass


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 1), "min": round(xs[0], 1), "max": round(xs[-1], 1),
            "q1": round(q[0], 1), "q3": round(q[2], 1), "n": len(xs)}


def measure(mm, ids, arms: dict[str, int], reps: int, forwards: int) -> dict:
    import torch

    out: dict[str, list[float]] = {a: [] for a in arms}
    with torch.inference_mode():
        torch.set_num_threads(max(arms.values()))
        mm.model(input_ids=ids)  # warm-up
        for _ in range(reps):
            for name, n in arms.items():  # ABAB
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                for _ in range(forwards):
                    mm.model(input_ids=ids)
                out[name].append(forwards * ids.shape[1] / (time.perf_counter() - t0))
            print("  " + ", ".join(f"{a}: {v[-1]:.0f} tok/s" for a, v in out.items()), flush=True)
    return {a: {"threads": arms[a], "tokens_per_s": _stats(v)} for a, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--forwards", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--busy", type=int, default=2)
    ap.add_argument("--conditions", default="ambient,loaded", help="which to (re)measure; others kept from --out")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads_cpu.json"))
    args = ap.parse_args()

    import torch

    from workbench import threads as th
    from workbench.models.loading import load_model

    torch_default = torch.get_num_threads()  # before anything sets it (run without OMP_NUM_THREADS)
    mm = load_model("demo", threads=None)
    ids = torch.randint(2, mm.model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    res = {"benchmark": "threads", "model": "demo (fp32, eager experts)", "tokens": args.tokens,
           "forwards_per_rep": args.forwards, "reps": args.reps, "machine": platform.machine(),
           "cpus_available": th.available_cpus(), "os_cpu_count": os.cpu_count(), "torch_default": torch_default,
           "torch": torch.__version__, "conditions": {}}
    old = Path(args.out)
    if old.exists():  # conditions not re-measured now are kept, with their own settings
        prev = json.loads(old.read_text()).get("conditions", {})
        res["conditions"].update({k: v for k, v in prev.items() if k not in args.conditions.split(",")})
    for cond in args.conditions.split(","):
        procs = []
        if cond == "loaded":
            procs = [mp.Process(target=_busy, daemon=True) for _ in range(args.busy)]
            for p in procs:
                p.start()
            time.sleep(2)
        try:
            load0 = os.getloadavg()[0]
            choice = th.default_threads()
            arms = {f"threads_{n}": n for n in sorted({1, torch_default, choice})}  # interleaved ABAB
            r = measure(mm, ids, arms, args.reps, args.forwards)
        finally:
            for p in procs:
                p.terminate()
                p.join()
        res["conditions"][cond] = {"tokens": args.tokens, "reps": args.reps, "busy_processes": len(procs), "loadavg_1min_start": round(load0, 2),
                                   "loadavg_1min_end": round(os.getloadavg()[0], 2),
                                   "workbench_choice": choice, "arms": r}
        print(cond, json.dumps(res["conditions"][cond]), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")  # after each condition: partial results survive


if __name__ == "__main__":
    main()
