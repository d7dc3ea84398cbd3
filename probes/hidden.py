"""Hidden probe: massive activations in the residual stream, max |h| and its channel after each layer.

A forward hook on every decoder layer reads its output (the residual stream after the layer) and
runs the fused row-stats kernel on it; `dump_layers` also keeps the full vectors (fp16, or int8
with a per-row scale) in a `dump_hidden` table.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import torch

from ..errors import WorkbenchError
from .base import BatchMeta, Probe, ProbeDidNotFire, to_ctx
from .kernels import row_stats


def parse_layers(spec, n_layers: int) -> list[int]:
    """'1,3' or '1-3' or [1, 3] -> sorted decoder-layer indices, checked against the model."""
    if spec is None:
        return []
    items = spec if isinstance(spec, (list, tuple)) else [s.strip() for s in str(spec).split(",") if s.strip()]
    out: set[int] = set()
    for it in items:
        m = re.fullmatch(r"[Ll]?(\d+)(?:\s*-\s*[Ll]?(\d+))?", str(it).strip())
        if not m:
            raise WorkbenchError(f"malformed --dump-hidden {spec!r}: write layer numbers, e.g. 1,3 or 0-2")
        a = int(m.group(1))
        out.update(range(a, int(m.group(2) or a) + 1))
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise WorkbenchError(f"--dump-hidden: layer {bad[0]} does not exist (the model has {n_layers} layers)")
    return sorted(out)


class HiddenProbe(Probe):
    table = "hidden"
    tables = ("dump_hidden",)

    def __init__(self, dump_layers: str | None = None, dump_format: str = "fp16") -> None:
        super().__init__()
        if dump_format not in ("fp16", "int8"):
            raise WorkbenchError(f"unknown dump format {dump_format!r}; use fp16 or int8")
        self.dump_spec, self.dump_format = dump_layers, dump_format
        self.layers: list[int] = []
        self.dump: list[int] = []
        self._seen: dict[int, tuple] = {}
        self._dumps: dict[int, tuple] = {}

    def settings(self) -> dict:
        return {"dump_layers": self.dump_spec, "dump_format": self.dump_format}

    def check(self, mm) -> None:
        from ..models.hooks import decoder_layers

        parse_layers(self.dump_spec, len(decoder_layers(mm.model)))

    def attach(self, mm) -> None:
        from ..models.hooks import decoder_layers, register

        decs = decoder_layers(mm.model)
        self.layers = list(range(len(decs)))
        self.dump = parse_layers(self.dump_spec, len(decs))
        for i in self.layers:
            self.handles.append(register(mm, f"L{i}.residual", self._hook(i)))

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self._seen, self._dumps = {}, {}

    def _hook(self, index: int):
        def hook(module, args, out):
            ctx = self.ctx
            if ctx is None:
                return
            h = out[0] if isinstance(out, (tuple, list)) else out
            h = to_ctx(h.reshape(-1, h.shape[-1]), ctx)
            if h.shape[0] != ctx.valid.shape[0]:
                h = h.index_select(0, ctx.valid)
            copy = self.dump_format if index in self.dump else None
            mx, arg, _, cp, scale = row_stats(h, copy=copy)
            self._seen[index] = (mx, arg)
            if copy:
                self._dumps[index] = (cp, scale)
            self.fired.add(index)
        return hook

    def harvest(self) -> dict[str, torch.Tensor]:
        missing = [i for i in self.layers if i not in self._seen]
        if missing:
            raise ProbeDidNotFire(f"decoder layers {missing} did not run")
        out = {"maxabs": torch.stack([self._seen[i][0] for i in self.layers], 1),
               "argmax": torch.stack([self._seen[i][1] for i in self.layers], 1)}
        for i in self.dump:
            cp, scale = self._dumps[i]
            out[f"dump_{i}"] = cp
            if scale is not None:
                out[f"dump_scale_{i}"] = scale
        self._seen, self._dumps = {}, {}
        return out

    def to_table(self, arrays: dict[str, np.ndarray], meta: BatchMeta) -> dict[str, pa.Table]:
        mx, arg = arrays["maxabs"], arrays["argmax"]
        tv, nl = mx.shape
        tables = {"hidden": pa.table({
            "doc_id": pa.array(np.repeat(meta.doc.astype(np.int64), nl), pa.int64()),
            "pos": pa.array(np.repeat(meta.pos.astype(np.int32), nl), pa.int32()),
            "layer": pa.array(np.tile(np.asarray(self.layers, np.int16), tv), pa.int16()),
            "maxabs": pa.array(mx.reshape(-1), pa.float32()),
            "argmax": pa.array(arg.reshape(-1).astype(np.int32), pa.int32()),
        })}
        if self.dump:
            parts = []
            for i in self.dump:
                v = arrays[f"dump_{i}"]
                flat = pa.array(v.reshape(-1), pa.float16() if self.dump_format == "fp16" else pa.int8())
                cols = {"doc_id": pa.array(meta.doc.astype(np.int64), pa.int64()),
                        "pos": pa.array(meta.pos.astype(np.int32), pa.int32()),
                        "layer": pa.array(np.full(tv, i, np.int16), pa.int16()),
                        "values": pa.FixedSizeListArray.from_arrays(flat, v.shape[1])}
                if self.dump_format == "int8":
                    cols["scale"] = pa.array(arrays[f"dump_scale_{i}"].astype(np.float32), pa.float32())
                parts.append(pa.table(cols))
            tables["dump_hidden"] = pa.concat_tables(parts)
        return tables
