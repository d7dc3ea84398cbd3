"""Parquet part encoding: the store's writer with and without BYTE_STREAM_SPLIT on float columns.

    python benchmarks/parquet_encoding.py --out benchmarks/results/parquet_encoding_cpu.json

One batch of the OLMoE shape (16,384 tokens x 16 MoE layers, top-8 of 64): a routing part, the same
with fp32 router logits (bf16-valued, as a bf16 router returns them), and an expert_stats part.
Each table is written plain then split, back to back (ABAB), `--reps` times, one thread; we report
the median time ratio with its spread and the file sizes. Encoding is the host-side cost of capture.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workbench.probes.base import list_array
from workbench.store import SCHEMAS, _dictionary_columns, _float_encodings


def tables(T: int = 16384, L: int = 16, E: int = 64, K: int = 8) -> dict[str, pa.Table]:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    def routing(logits: bool) -> pa.Table:
        w = torch.softmax(torch.randn(T * L, K), -1).to(torch.bfloat16).float().numpy()
        cols = {"doc_id": pa.array(np.repeat(np.arange(T) // 2048, L)),
                "pos": pa.array(np.repeat(np.arange(T) % 2048, L).astype(np.int32)),
                "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), T)),
                "experts": list_array(rng.integers(0, E, (T * L, K)).astype(np.int16), pa.int16()),
                "weights": list_array(w, pa.float32())}
        if logits:
            cols["logits"] = list_array(torch.randn(T * L, E).to(torch.bfloat16).float().numpy(), pa.float32())
        return pa.table(cols)

    n = T * L * K
    es = {}
    for f in SCHEMAS["expert_stats"]:
        if pa.types.is_integer(f.type):
            es[f.name] = pa.array(rng.integers(0, 100, n).astype(f.type.to_pandas_dtype()))
        else:  # activation statistics: bf16-valued magnitudes
            es[f.name] = pa.array(torch.randn(n).abs().mul(3).to(torch.bfloat16).float().numpy()).cast(f.type)
    return {"routing": routing(False), "routing+logits": routing(True), "expert_stats": pa.table(es)}


def write(t: pa.Table, split: bool, path: Path) -> float:
    flat = [f.name for f in t.schema if not pa.types.is_nested(f.type)]
    kw = {"column_encoding": _float_encodings(t)} if split else {}
    s = time.perf_counter()
    pq.write_table(t, path, compression="zstd", use_dictionary=_dictionary_columns(t), write_statistics=flat, **kw)
    return time.perf_counter() - s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    ts = tables()
    times: dict = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.reps):
            for name, t in ts.items():
                for split in (False, True):
                    times.setdefault((name, split), []).append(write(t, split, Path(d) / f"{name}_{split}.parquet"))
        results = {}
        for name in ts:
            a, b = times[(name, False)], times[(name, True)]
            r = [y / x for x, y in zip(a, b)]
            results[name] = {"rows": ts[name].num_rows, "plain_s_median": round(statistics.median(a), 3),
                             "split_s_median": round(statistics.median(b), 3),
                             "time_ratio": {"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                                            "max": round(max(r), 3), "n": len(r)},
                             "plain_mb": round((Path(d) / f"{name}_False.parquet").stat().st_size / 1e6, 1),
                             "split_mb": round((Path(d) / f"{name}_True.parquet").stat().st_size / 1e6, 1)}
            print(name, results[name], flush=True)
    res = {"benchmark": "parquet_encoding", "method": "plain then split per table, interleaved, one thread",
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
           "load_before": load_before, "load_after": os.getloadavg()[0]},
           "versions": {"pyarrow": pa.__version__, "torch": torch.__version__, "python": platform.python_version()},
           "results": results}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
