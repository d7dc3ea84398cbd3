"""Wall time, CPU time and peak RSS of each analysis on synthetic runs of 1e7, 1e8 (, 1e9) routed slots,
and the server-side load time of each dashboard analysis page once the analyses are persisted.

    python benchmarks/analysis_scale.py --slots 1e7,1e8 --work /tmp/analysis_scale \\
        [--out benchmarks/results/analysis_scale_cpu.json] [--only stats,lrc] [--pages] [--threads 2 --tag _2threads]

64 experts, top-8, 16 MoE layers; expert_stats at 1e8 (and below). Each analysis runs in a fresh
process (peak RSS from the child's resource.getrusage; CPU seconds of the call alone); then the persisted result is
loaded again in another fresh process (the warm path of the CLI and of a restarted dashboard). Pages:
a fresh process builds the app (no warm-up), renders every section of the analysis until it is done
(first load: reads the stored result, builds figures) and renders it again (warm load). The machine
is shared: the load average (1 min) is recorded before and after every measurement, and CPU seconds
next to wall seconds (CPU time is what a quiet machine's wall time would be, roughly, for one thread).
--threads N sets WORKBENCH_THREADS=N for the analyses (stats decodes, sums and multiplies in worker
threads; BLAS itself stays at one thread a call, OMP_NUM_THREADS=1) and is recorded in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c = cpu(); t = time.perf_counter(); r = analyze(sys.argv[2], run, reuse=sys.argv[4] == "1", **opts)
print(json.dumps({"s": time.perf_counter() - t, "cpu_s": cpu() - c, "reused": bool(r.meta.get("reused")),
                  "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""

PAGE_CHILD = """
import json, sys, time, resource
from workbench.app import make_app
from workbench.app.analyses import SECTIONS, _body
name = sys.argv[2]
ctx = make_app(sys.argv[1], analysis_options=json.loads(sys.argv[3]), warm=()).workbench
secs = [s for s in SECTIONS.values() if s.analysis == name and not s.loop]
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
c = cpu(); t = time.perf_counter()
for s in secs:
    while not _body(ctx, s)[1]:
        time.sleep(0.02)
first = time.perf_counter() - t; first_cpu = cpu() - c
t = time.perf_counter()
for s in secs:
    assert _body(ctx, s)[1]
warm = time.perf_counter() - t
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"first_s": first, "first_cpu_s": first_cpu, "warm_s": warm, "sections": [s.key for s in secs], "rss_gb": ru.ru_maxrss / 1e6}))
"""


def _child(script, *args, threads: int = 1) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WORKBENCH_THREADS=str(threads))
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT)
    out = {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"rc {p.returncode}"} if p.returncode \
        else json.loads(p.stdout.strip().splitlines()[-1])
    out.update(process_s=round(time.perf_counter() - t, 2), load_before=load0, load_after=os.getloadavg()[0],
               threads=threads)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", default="1e7,1e8")
    ap.add_argument("--work", default="/tmp/analysis_scale")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "analysis_scale_cpu.json"))
    ap.add_argument("--only", default=",".join(ANALYSES))
    ap.add_argument("--pages", action="store_true", help="also time the dashboard pages of the persisted analyses")
    ap.add_argument("--no-analyses", action="store_true", help="pages only (analyses already persisted)")
    ap.add_argument("--threads", type=int, default=1, help="WORKBENCH_THREADS for the analyses (default 1)")
    ap.add_argument("--tag", default="", help="suffix of the row names (e.g. _2threads), to keep earlier rows")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from synthetic_run import write_synthetic_run

    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    import numpy
    import polars
    import pyarrow

    res["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                      "versions": {"numpy": numpy.__version__, "pyarrow": pyarrow.__version__,
                                   "polars": polars.__version__},
                      "note": "shared with ~8 engineers' jobs; see load_before/load_after per row"}
    for s in [float(x) for x in a.slots.split(",")]:
        path = Path(a.work) / f"run_{s:.0e}"
        rec = res["runs"].setdefault(f"{s:.0e}", {})
        if not (path / "manifest.json").exists():
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            write_synthetic_run(path, slots=s, expert_stats=s <= 1e8, progress=False)
            rec["generate"] = {"s": round(time.perf_counter() - t, 1), "load_before": load0,
                               "load_after": os.getloadavg()[0], "expert_stats": s <= 1e8}
        for name in a.only.split(","):
            if name == "super-experts" and s > 1e8:
                continue  # no expert_stats above 1e8
            r = rec.setdefault(name + a.tag, {})
            if not a.no_analyses:
                r["first"] = _child(CHILD, path, name, json.dumps(ANALYSES[name]), "0", threads=a.threads)
                r["warm"] = _child(CHILD, path, name, json.dumps(ANALYSES[name]), "1", threads=a.threads)
            if a.pages:
                r["page"] = _child(PAGE_CHILD, path, name, json.dumps({name: ANALYSES[name]}), threads=a.threads)
            print(s, name, r, flush=True)
            out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
