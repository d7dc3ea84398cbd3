"""Routing probe: a forward hook on each MoE router records the experts the model itself chose.

Routers in transformers 5 return (logits[T,E], top_k_weights[T,K], top_k_index[T,K]); we keep
index and weights exactly as returned (their order is the model's), never a top-k recomputed
from logits (families differ in how they pick and weigh).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ..models.hooks import RouterOut, register
from .base import BatchMeta, Probe, ProbeDidNotFire, list_array, to_ctx

MARGIN_DOC = ("router margin of each decision: the k-th minus the (k+1)-th selection score in the family's score "
              "space (logit, i.e. log-probability, for softmax routers; sigmoid + bias for DeepSeek-V3); small = a "
              "near-tie that rounding can flip")


class RoutingProbe(Probe):
    table = "routing"

    def __init__(self, logits: bool = False, margin: bool = False) -> None:
        super().__init__()
        self.logits = logits
        self.margin = margin  # opt-in `margin` column; off, runs are written exactly as before
        self._params: dict = {}
        self._seen: tuple | None = None  # this batch's buffers: experts [T, L, K], weights [T, L, K], logits [T, L, E]
        self._margin: dict[int, torch.Tensor] = {}  # layer -> [Tv] margins of this batch
        self.layers: list[int] = []
        self._slot: dict[int, int] = {}

    def settings(self) -> dict:
        return {"logits": self.logits, **({"margin": True} if self.margin else {})}

    def check(self, mm) -> None:
        if self.margin and mm.family.rule == "generic":
            from ..errors import WorkbenchError

            raise WorkbenchError(f"--margin needs the family's routing rule, which is unknown for "
                                 f"{mm.family.model_type} (a generic model)")

    def attach(self, mm) -> None:
        self.layers = mm.moe_layers
        if self.margin:
            from .interventions import router_params

            self._params = {layer.index: router_params(mm, layer) for layer in mm.layers}
        self._slot = {i: s for s, i in enumerate(self.layers)}
        for layer in mm.layers:
            self.handles.append(register(mm, f"L{layer.index}.router", self._hook(layer.index)))

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self._seen, self._margin = None, {}

    def _buffers(self, idx: torch.Tensor, logits: torch.Tensor) -> tuple:
        """One device buffer per column for all layers of the batch: each hook fills its layer's slice (one
        cast-and-copy kernel a column) and the pipeline copies each buffer to the host once a batch."""
        t, nl, k = idx.shape[0], len(self.layers), idx.shape[-1]
        bufs = (torch.empty((t, nl, k), dtype=torch.int16, device=idx.device),
                torch.empty((t, nl, k), dtype=torch.float32, device=idx.device))
        if self.logits:
            bufs = bufs + (torch.empty((t, nl, logits.shape[-1]), dtype=torch.float32, device=idx.device),)
        return bufs

    def _hook(self, index: int):
        slot = self._slot[index]

        def hook(module, args, out):
            ctx = self.ctx
            if ctx is None:
                return
            r = RouterOut.of(out)
            logits, weights, idx = (to_ctx(t, ctx) for t in (r.logits, r.weights, r.index))
            if idx.shape[0] != ctx.input_ids.numel():  # defensive: a router that did not flatten
                idx, weights, logits = (t.reshape(-1, t.shape[-1]) for t in (idx, weights, logits))
            if self._seen is None:
                self._seen = self._buffers(idx, logits)
            self._seen[0][:, slot].copy_(idx)
            self._seen[1][:, slot].copy_(weights)
            if self.logits:
                self._seen[2][:, slot].copy_(logits)
            if self.margin:
                from .interventions import routing_margin

                m = routing_margin(self._params[index], logits.index_select(0, ctx.valid),
                                   getattr(module, "e_score_correction_bias", None))
                self._margin[index] = m.to(torch.float32)
            self.fired.add(index)
        return hook

    def harvest(self) -> dict[str, torch.Tensor]:
        missing = [i for i in self.layers if i not in self.fired]
        if missing:
            raise ProbeDidNotFire(f"router hooks of layers {missing} did not fire; the MoE block was replaced or bypassed")
        bufs, self._seen = self._seen, None
        if not self.ctx.extra.get("all_valid"):  # padding: keep the valid tokens' rows
            v = self.ctx.valid.to(bufs[0].device)
            bufs = tuple(b.index_select(0, v) for b in bufs)
        out = {"experts": bufs[0], "weights": bufs[1]}  # [Tv, L, K]
        if self.logits:
            out["logits"] = bufs[2]  # [Tv, L, E]
        if self.margin:
            out["margin"] = torch.stack([self._margin[i].to(bufs[0].device) for i in self.layers], 1)  # [Tv, L]
            self._margin = {}
        return out

    def to_table(self, arrays: dict[str, np.ndarray], meta: BatchMeta) -> dict[str, pa.Table]:
        ex, w = arrays["experts"], arrays["weights"]
        tv, nl, k = ex.shape
        cols = {
            "doc_id": pa.array(np.repeat(meta.doc, nl), pa.int64()),
            "pos": pa.array(np.repeat(meta.pos, nl), pa.int32()),
            "layer": pa.array(np.tile(np.asarray(self.layers, np.int16), tv), pa.int16()),
            "experts": list_array(ex.reshape(tv * nl, k), pa.int16()),
            "weights": list_array(w.reshape(tv * nl, k), pa.float32()),
        }
        if self.logits:
            lg = arrays["logits"]
            cols["logits"] = list_array(lg.reshape(tv * nl, lg.shape[-1]), pa.float32())
        if self.margin:
            cols["margin"] = pa.array(arrays["margin"].reshape(tv * nl), pa.float32())
        return {"routing": pa.table(cols)}
