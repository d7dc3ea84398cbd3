"""Attention probe: per layer and head, the mean attention mass every valid query puts on position 0.

The model's attention output is computed by its own implementation (eager or sdpa), untouched: we
register a wrapper implementation (`workbench_sink_<orig>`, same mask function as the original)
that calls the original and then computes, from the same query/key/mask, only what the sink needs:
p0 = exp(s_0 - logsumexp_j s_j) per query, in query chunks, so the full [S, S] attention is never
materialised (sdpa and flash never return it anyway). gpt-oss's learned sinks join the softmax
denominator exactly where the wrapped implementation uses them (eager).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import torch

from ..errors import WorkbenchError
from .base import BatchMeta, Probe, ProbeDidNotFire

_PREFIX = "workbench_sink_"
_ATTR = "_workbench_attention_probe"
SUPPORTED = ("eager", "sdpa")
_CHUNK_BYTES = 256 << 20


def _original(module, orig: str):
    if orig == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise WorkbenchError(f"{type(module).__name__} has no eager attention function to wrap")
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[orig]


def _make_wrapper(orig: str):
    def sink_attention(module, query, key, value, attention_mask, *args, **kwargs):
        out = _original(module, orig)(module, query, key, value, attention_mask, *args, **kwargs)
        probe = getattr(module, _ATTR, None)
        if probe is not None and probe.ctx is not None:
            sinks = kwargs.get("s_aux") if orig == "eager" else None  # sdpa ignores learned sinks
            probe._record(module, query, key, attention_mask, kwargs.get("scaling"), sinks)
        return out

    sink_attention.__name__ = f"sink_attention_{orig}"
    return sink_attention


def register_implementations() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for orig in SUPPORTED:
        name = _PREFIX + orig
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_wrapper(orig))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[orig])


def sink_share(query, key, attention_mask, scaling, q_valid, sinks=None) -> torch.Tensor:
    """Mean over valid queries of the softmax mass on key 0, per (batch, head): [B, Hq] float32.

    query [B, Hq, Sq, D], key [B, Hkv, Sk, D] (GQA groups broadcast), attention_mask None (causal,
    aligned to the end), bool (True = attend) or additive float [B, 1|Hq, Sq, >=Sk]; q_valid [B, Sq].
    """
    b, hq, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    g = hq // hkv
    scale = float(scaling) if scaling is not None else d ** -0.5
    kt = key.float().transpose(-1, -2)[:, :, None]  # [B, Hkv, 1, D, Sk]
    qg = query.float().reshape(b, hkv, g, sq, d)
    chunk = max(1, min(sq, _CHUNK_BYTES // max(1, b * hq * sk * 4)))
    acc = torch.zeros(b, hq, dtype=torch.float32, device=query.device)
    for s0 in range(0, sq, chunk):
        s1 = min(sq, s0 + chunk)
        s = torch.matmul(qg[:, :, :, s0:s1], kt).reshape(b, hq, s1 - s0, sk) * scale
        if attention_mask is None:
            qi = torch.arange(s0, s1, device=s.device)[:, None] + (sk - sq)
            s = s.masked_fill(torch.arange(sk, device=s.device)[None, :] > qi, float("-inf"))
        else:
            m = attention_mask[:, :, s0:s1, :sk]
            s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.float()
        if sinks is not None:
            sk_col = sinks.float().reshape(1, hq, 1, 1).expand(b, hq, s1 - s0, 1)
            lse = torch.logsumexp(torch.cat([s, sk_col], -1), -1)
        else:
            lse = torch.logsumexp(s, -1)
        p0 = torch.exp(s[..., 0] - lse)
        keep = q_valid[:, None, s0:s1]
        acc += torch.where(keep & torch.isfinite(p0), p0, 0.0).sum(-1)
    n = q_valid.sum(1).clamp(min=1).to(torch.float32)
    return acc / n[:, None]


class AttentionProbe(Probe):
    table = "attention"

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[int] = []
        self._seen: dict[int, torch.Tensor] = {}
        self._restore: list[tuple] = []
        self._mods: list = []

    def attach(self, mm) -> None:
        from ..models.hooks import decoder_layers

        register_implementations()
        decs = decoder_layers(mm.model)
        cfgs = {}
        for i, dec in enumerate(decs):
            attn = getattr(dec, "self_attn", None) or getattr(dec, "attention", None)
            if attn is None or not hasattr(attn, "config"):
                raise WorkbenchError(f"cannot find the attention module of decoder layer {i}")
            cfgs[id(attn.config)] = attn.config
            attn._workbench_layer = i
            setattr(attn, _ATTR, self)
            self._mods.append(attn)
        self.layers = list(range(len(decs)))
        for cfg in cfgs.values():
            orig = cfg._attn_implementation
            if orig not in SUPPORTED:
                self._mods_clear()
                raise WorkbenchError(
                    f"the attention probe needs eager or sdpa attention, not {orig!r}; reload the model with "
                    "attn_implementation='sdpa'")
            self._restore.append((cfg, orig))
            cfg._attn_implementation_internal = _PREFIX + orig

    def _mods_clear(self):
        for m in self._mods:
            if hasattr(m, _ATTR):
                delattr(m, _ATTR)
        self._mods = []

    def detach(self) -> None:
        super().detach()
        for cfg, orig in self._restore:
            cfg._attn_implementation_internal = orig
        self._restore.clear()
        self._mods_clear()

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self._seen = {}

    def _record(self, module, query, key, mask, scaling, sinks):
        ctx = self.ctx
        if ctx.phase != "prefill" or query.shape[2] != ctx.attention_mask.shape[1]:
            return  # decode steps: one query per forward, not a sink statistic of the prompt
        i = module._workbench_layer
        self._seen[i] = sink_share(query, key, mask, scaling, ctx.attention_mask.bool(), sinks)
        self.fired.add(i)

    def harvest(self) -> dict[str, torch.Tensor]:
        if not self._seen:
            if self.ctx is not None and self.ctx.phase != "prefill":
                return {}
            raise ProbeDidNotFire("no attention layer reported; the attention implementation was replaced")
        missing = [i for i in self.layers if i not in self._seen]
        if missing:
            raise ProbeDidNotFire(f"attention of layers {missing} did not run")
        out = {"sink_share": torch.stack([self._seen[i] for i in self.layers], 1)}  # [B, L, H]
        self._seen = {}
        return out

    def to_table(self, arrays: dict[str, np.ndarray], meta: BatchMeta) -> dict[str, pa.Table]:
        if "sink_share" not in arrays:
            return {}
        s = arrays["sink_share"]
        b, nl, nh = s.shape
        return {"attention": pa.table({
            "doc_id": pa.array(np.repeat(np.asarray(meta.doc_ids, np.int64), nl * nh), pa.int64()),
            "layer": pa.array(np.tile(np.repeat(np.asarray(self.layers, np.int16), nh), b), pa.int16()),
            "head": pa.array(np.tile(np.arange(nh, dtype=np.int16), b * nl), pa.int16()),
            "sink_share": pa.array(s.reshape(-1).astype(np.float32), pa.float32()),
        })}
