"""LRC speed on a synthetic 100M-routed-slot trace (16 layers x top-8 of 64 x 780k tokens, 512-token docs).

    .venv/bin/python benchmarks/lrc_speed.py [--tokens 780000] [--run runs/lrc_bench] [--out benchmarks/results/lrc_speed.json]

Measures `workbench.analysis.lrc.analyze` (SRP for all m at expert/layer/model level with bootstrap
intervals, SCH for every cache size per layer and model level on every 16th sequence) in a fresh
subprocess (wall time, peak RSS), and a straightforward per-token Python reference of the same
definitions on a slice, extrapolated linearly to the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

L, E, K, T_DOC = 16, 64, 8, 512
MS = (4, 16, 64, 256)


def synth_part(rng, n_docs: int) -> np.ndarray:
    """[n_docs*T_DOC, L, K] with local consistency: each doc/layer favours a set that drifts every ~32 tokens."""
    out = np.empty((n_docs * T_DOC, L, K), np.int16)
    step = 32
    for d in range(n_docs):
        for s in range(0, T_DOC, step):
            bias = (rng.random((L, E)) < 0.15) * rng.uniform(0.5, 2.0)
            scores = rng.random((step, L, E)) + bias[None]
            top = np.argpartition(-scores, K, axis=-1)[..., :K]
            srt = np.take_along_axis(scores, top, -1).argsort(-1)[..., ::-1]  # score order, like a router
            out[d * T_DOC + s: d * T_DOC + s + step] = np.take_along_axis(top, srt, -1)
    return out


def write_run(path: Path, tokens: int, seed: int = 0) -> None:
    import pyarrow as pa

    from workbench.probes.base import list_array
    from workbench.store import RunWriter

    rng = np.random.default_rng(seed)
    n_docs = tokens // T_DOC
    manifest = {"identity": {"bench": "lrc", "tokens": tokens, "seed": seed},
                "model": {"spec": "synthetic", "path": None, "model_type": "synthetic", "n_layers": L,
                          "moe_layers": list(range(L)), "n_experts": E, "top_k": K, "shared_experts": 0},
                "label_columns": []}
    w = RunWriter(path, manifest, overwrite=True)
    per_part = 128  # docs per part = 65,536 tokens, the capture default
    for p0 in range(0, n_docs, per_part):
        nd = min(per_part, n_docs - p0)
        ex = synth_part(rng, nd)
        t = nd * T_DOC
        doc = np.repeat(np.arange(p0, p0 + nd, dtype=np.int64), T_DOC)
        pos = np.tile(np.arange(T_DOC, dtype=np.int32), nd)
        w_ = rng.random((t, L, K)).astype(np.float32)
        routing = pa.table({"doc_id": pa.array(np.repeat(doc, L)), "pos": pa.array(np.repeat(pos, L)),
                            "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), t)),
                            "experts": list_array(ex.reshape(t * L, K), pa.int16()),
                            "weights": list_array(w_.reshape(t * L, K), pa.float32())})
        tok = pa.table({"doc_id": pa.array(doc), "pos": pa.array(pos), "token_id": pa.array(np.zeros(t, np.int32)),
                        "token": pa.array([""] * t, pa.string()), "phase": pa.array(["prefill"] * t)})
        w.write_part({"routing": routing, "tokens": tok}, batch_end=p0 + nd, n_tokens=t)
    w.finish()


# --- a straightforward per-token Python reference of the same definitions -------------------------------------

def ref_srp_hist(seq: np.ndarray, m: int) -> dict:
    """Per-token sliding windows in plain Python: {(layer, expert, f): windows}."""
    T = len(seq)
    hist: dict = {}
    counts: dict = {}
    for t in range(T):
        for l in range(L):
            for e in seq[t, l]:
                counts[(l, int(e))] = counts.get((l, int(e)), 0) + 1
        if t >= m:
            for l in range(L):
                for e in seq[t - m, l]:
                    counts[(l, int(e))] -= 1
        if t >= m - 1:
            for l in range(L):
                for e in range(E):
                    f = counts.get((l, e), 0)
                    hist[(l, e, f)] = hist.get((l, e, f), 0) + 1
    return hist


def ref_sch(req: np.ndarray, C: int, m: int) -> int:
    """One cache size, token by token, evicting the lowest (uses in the next m tokens, last use)."""
    T, R = req.shape
    cache: list = []
    seen: set = set()
    last: dict = {}
    hits, ts = 0, 0
    for t in range(T):
        row = [int(x) for x in req[t]]
        nseen = len(seen)
        for x in row:
            if x in cache:
                hits += 1
            elif x not in seen:
                hits += nseen < C
                nseen += 1
        fut: dict = {}
        for u in range(t, min(t + m, T)):
            for x in req[u]:
                fut[int(x)] = fut.get(int(x), 0) + 1
        for x in row:
            ts += 1
            last[x] = ts
            seen.add(x)
            fut[x] -= 1
            if x not in cache:
                cache.append(x)
                if len(cache) > C:
                    cache.remove(min((y for y in cache if y != x), key=lambda y: (fut.get(y, 0), last[y])))
    return hits


def measure_reference(run_path: Path) -> dict:
    from workbench.analysis.lrc import iter_sequences
    from workbench.store import open_run

    chunk = next(iter_sequences(open_run(run_path)))
    seqs = [chunk.experts[chunk.starts[i]:chunk.starts[i + 1]] for i in range(2)]
    t0 = time.perf_counter()
    for m in MS:
        ref_srp_hist(seqs[0], m)
    srp_per_seq = time.perf_counter() - t0
    req = (seqs[0].astype(np.int64) + (np.arange(L) * E)[None, :, None]).reshape(T_DOC, L * K)
    sizes = (K * L, 2 * K * L)
    t0 = time.perf_counter()
    for c in sizes:
        ref_sch(req[:128], c, 16)
    sch_per_seq_size = (time.perf_counter() - t0) / len(sizes) * (T_DOC / 128)
    return {"srp_seconds_per_sequence_all_m": srp_per_seq, "sch_seconds_per_sequence_per_cache_size": sch_per_seq_size}


_CHILD = """
import json, resource, time
from workbench.analysis import lrc
from workbench.store import open_run
run = open_run({run!r})
t0 = time.perf_counter()
res = lrc.analyze(run, progress=False, **{opts})
t1 = time.perf_counter()
print(json.dumps({{"seconds": t1 - t0, "sequences": res.meta["sequences"], "sch_sequences": res.meta["sch_sequences"],
  "expert_ci": res.meta["expert_ci"], "summary": res.summary,
  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}}))
"""


def timed_child(run_path: Path) -> dict:
    """Each configuration in a fresh process (peak RSS is per process); numba's cache is warmed first
    so compilation is not timed."""
    subprocess.run([sys.executable, "-c", "from workbench.analysis import lrc, _lrc_kernels"], check=True)
    out = {}
    for name, opts in (("srp_and_sch", {"policies": []}),
                       ("srp_sch_and_lru_lfu_belady", {}),
                       ("srp_only", {"with_sch": False})):
        p = subprocess.run([sys.executable, "-c", _CHILD.format(run=str(run_path), opts=repr(opts))], check=True,
                           capture_output=True, text=True)
        out[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, f"{out[name]['seconds']:.1f} s, peak {out[name]['peak_rss_gb']:.2f} GB", flush=True)
    main_ = out["srp_and_sch"]
    return dict(analyze_seconds=main_["seconds"], peak_rss_gb=main_["peak_rss_gb"], sequences=main_["sequences"],
                sch_sequences=main_["sch_sequences"], expert_ci=main_["expert_ci"], summary=main_["summary"],
                configurations=out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=780_288)  # 1524 docs x 512
    ap.add_argument("--run", default="runs/lrc_bench")
    ap.add_argument("--out", default="benchmarks/results/lrc_speed.json")
    ap.add_argument("--regen", action="store_true")
    args = ap.parse_args()
    run_path = Path(args.run)
    if args.regen or not (run_path / "manifest.json").exists():
        t0 = time.perf_counter()
        write_run(run_path, args.tokens)
        print(f"wrote synthetic run in {time.perf_counter() - t0:.1f} s")
    slots = (args.tokens // T_DOC) * T_DOC * L * K
    load_start = os.getloadavg()
    fast = timed_child(run_path)
    print(fast["summary"])
    ref = measure_reference(run_path)
    n_seq = fast["sequences"]
    n_sch = fast["sch_sequences"]
    # the same work done by the reference: SRP all m on every sequence; SCH at every model-level cache size
    # (L*E of them) and every per-layer cache size (E per layer) for each m, on the SCH sequences
    per_layer_factor = (L * E * (T_DOC * K)) / (L * E * (T_DOC * K * L))  # per-layer requests/cache sizes vs model
    ref_srp = ref["srp_seconds_per_sequence_all_m"] * n_seq
    ref_sch = ref["sch_seconds_per_sequence_per_cache_size"] * n_sch * L * E * len(MS) * (1 + per_layer_factor)
    try:
        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "")
    except OSError:
        model = ""
    import numba
    import polars

    load = os.getloadavg()
    result = {
        "benchmark": "lrc_speed",
        "routed_slots": slots, "layers": L, "experts": E, "top_k": K, "tokens": (args.tokens // T_DOC) * T_DOC,
        "sequence_tokens": T_DOC, "m": list(MS), "sch_every": 16,
        "fast": fast,
        "targets": {"seconds": 60, "memory_gb": 4},
        "meets_targets": fast["analyze_seconds"] <= 60 and fast["peak_rss_gb"] <= 4,
        "python_reference": dict(ref, extrapolated_srp_seconds=ref_srp, extrapolated_sch_seconds=ref_sch,
                                 note="measured on 1 sequence (SRP, all m) and 128 tokens x 2 cache sizes (SCH, m=16), "
                                      "extrapolated linearly to the same work as the fast run"),
        "speedup_vs_python_reference": (ref_srp + ref_sch) / fast["analyze_seconds"],
        "machine": {"cpu": model, "cores": os.cpu_count(), "load_avg_at_start": load_start, "load_avg_at_end": load, "python": platform.python_version(),
                    "numpy": np.__version__, "numba": numba.__version__, "polars": polars.__version__,
                    "note": "2-core machine shared with other engineers' processes; load average recorded"},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("meets_targets", "speedup_vs_python_reference")}, indent=1),
          f"\nanalyze {fast['analyze_seconds']:.1f} s, peak {fast['peak_rss_gb']:.2f} GB -> {args.out}")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    main()
