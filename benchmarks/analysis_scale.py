"""Wall time and peak RSS of each analysis on synthetic runs of 1e7, 1e8 (, 1e9) routed slots.

    python benchmarks/analysis_scale.py --slots 1e7,1e8 --work /tmp/scale [--out benchmarks/results/analysis_scale.json]

64 experts, top-8, 16 MoE layers; expert_stats at 1e8 (and below). Each analysis runs in a fresh
process (`/usr/bin/time`-style peak RSS from resource.getrusage of the child); then the persisted
result is loaded again (the dashboard's warm path). The load average is recorded: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANALYSES = {"stats": {}, "lrc": {"m": [4, 16, 64, 256], "n_boot": 100}, "multilingual": {},
            "behavior": {"label": "domain", "target": "code", "permutations": 200},
            "atlas": {"labels": ["lang"], "max_tokens": 2000}, "super-experts": {}}

CHILD = """
import json, sys, time, resource
from workbench.store import open_run
from workbench.analysis import analyze
run = open_run(sys.argv[1]); opts = json.loads(sys.argv[3])
t = time.perf_counter(); r = analyze(sys.argv[2], run, reuse=sys.argv[4] == "1", **opts)
print(json.dumps({"s": time.perf_counter() - t, "reused": bool(r.meta.get("reused")),
                  "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def _child(run, name, opts, reuse) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(run), name, json.dumps(opts), "1" if reuse else "0"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="1e7,1e8")
    ap.add_argument("--work", default="/tmp/analysis_scale")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_scale.json"))
    ap.add_argument("--only", default=",".join(ANALYSES))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic_run import write_synthetic_run

    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    for s in [float(x) for x in a.slots.split(",")]:
        path = Path(a.work) / f"run_{s:.0e}"
        rec = res["runs"].setdefault(f"{s:.0e}", {})
        if not (path / "manifest.json").exists():
            t = time.perf_counter()
            write_synthetic_run(path, slots=s, expert_stats=s <= 1e8, progress=False)
            rec["generate_s"] = round(time.perf_counter() - t, 1)
        for name in a.only.split(","):
            first = _child(path, name, ANALYSES[name], reuse=False)
            warm = _child(path, name, ANALYSES[name], reuse=True)
            rec[name] = {"first": first, "warm": warm, "load_avg": os.getloadavg()}
            print(s, name, rec[name], flush=True)
            res["machine"] = {"cpus": os.cpu_count(), "note": "shared with ~8 engineers; see load_avg per row"}
            out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
