"""Routing probe: a forward hook on each MoE router records the experts the model itself chose.

Routers in transformers 5 return (logits[T,E], top_k_weights[T,K], top_k_index[T,K]); we keep
index and weights exactly as returned (their order is the model's), never a top-k recomputed
from logits (families differ in how they pick and weigh).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from .base import BatchMeta, Probe, ProbeDidNotFire, list_array, to_ctx

MARGIN_DOC = ("router margin of each decision: the k-th minus the (k+1)-th selection score in the family's score "
              "space (softmax probability, logit, or sigmoid + bias); small = a near-tie that rounding can flip")


class RoutingProbe(Probe):
    table = "routing"

    def __init__(self, logits: bool = False, margin: bool = False) -> None:
        super().__init__()
        self.logits = logits
        self.margin = margin  # opt-in `margin` column; off, runs are written exactly as before
        self._params: dict = {}
        self._seen: dict[int, tuple] = {}
        self.layers: list[int] = []

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
        for layer in mm.layers:
            self.handles.append(layer.router.register_forward_hook(self._hook(layer.index)))

    def _hook(self, index: int):
        def hook(module, args, out):
            ctx = self.ctx
            if ctx is None:
                return
            logits, weights, idx = (to_ctx(t, ctx) for t in out[:3])
            v = ctx.valid
            if idx.shape[0] != ctx.input_ids.numel():  # defensive: a router that did not flatten
                idx, weights, logits = (t.reshape(-1, t.shape[-1]) for t in (idx, weights, logits))
            rec = (idx.index_select(0, v).to(torch.int16), weights.index_select(0, v).to(torch.float32))
            if self.logits:
                rec = rec + (logits.index_select(0, v).to(torch.float32),)
            if self.margin:
                from .interventions import routing_margin

                m = routing_margin(self._params[index], logits.index_select(0, v),
                                   getattr(module, "e_score_correction_bias", None))
                rec = rec + (m.to(torch.float32),)
            self._seen[index] = rec
            self.fired.add(index)
        return hook

    def harvest(self) -> dict[str, torch.Tensor]:
        missing = [i for i in self.layers if i not in self._seen]
        if missing:
            raise ProbeDidNotFire(f"router hooks of layers {missing} did not fire; the MoE block was replaced or bypassed")
        recs = [self._seen[i] for i in self.layers]
        out = {"experts": torch.stack([r[0] for r in recs], 1),  # [Tv, L, K]
               "weights": torch.stack([r[1] for r in recs], 1)}
        if self.logits:
            out["logits"] = torch.stack([r[2] for r in recs], 1)  # [Tv, L, E]
        if self.margin:
            out["margin"] = torch.stack([r[-1] for r in recs], 1)  # [Tv, L]
        self._seen = {}
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
