"""Experts probe: each routed (and shared) expert's down_proj output statistics, per token and slot.

transformers 5 fuses the experts (3-D weights, no per-expert module), so there is nothing to hook.
Instead we register an experts implementation ("workbench_probe", via `ExpertsInterface`) that
computes exactly what the model computes and, on the per-slot down_proj output it already holds,
the statistics (max |y|, argmax channel, ||y||_2, before the routing weight) with one fused pass.

Two paths, chosen per device:
- loop (CPU default): the same per-expert loop and ops as the family's `eager` implementation,
  so logits are bit-identical to `eager`.
- grouped (CUDA default): the same sort + grouped GEMM as transformers' `grouped_mm`; the stats
  kernel reads the [T*K, H] GEMM output once and scatters through the sort permutation.

Shared experts are seen with forward hooks on the shared module (its output is the down_proj
output) and on Qwen2-MoE's shared gate (weight = sigmoid of it; 1.0 without a gate).
Whatever routing weights the experts module receives (e.g. edited by an intervention pre-hook)
are what the output uses and what `weight` records.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from ..errors import WorkbenchError
from ..models.hooks import register
from .base import BatchMeta, Probe, ProbeDidNotFire, to_ctx
from .kernels import row_stats

IMPL_NAME = "workbench_probe"
_ATTR = "_workbench_experts_probe"


# --------------------------------------------------------------------------------------------- spec

def parse_dump_spec(spec, mm=None) -> list[tuple[int, int]]:
    """'L1:E68,L3:E82' -> [(1, 68), (3, 82)]; checked against the model when given."""
    try:
        from .interventions import parse_spec
    except ImportError:  # interventions not installed yet: same grammar, minimal checks
        parse_spec = None
    if parse_spec is not None:
        return parse_spec(spec, mm, what="--dump-experts")
    out = []
    for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
        m = re.fullmatch(r"[Ll](\d+)\s*:\s*[Ee](-?\d+)", item)
        if not m:
            raise WorkbenchError(f"malformed expert {item!r} in --dump-experts: write L<layer>:E<expert>, e.g. L1:E68")
        out.append((int(m.group(1)), int(m.group(2))))
    return list(dict.fromkeys(out))


def _check_dump(mm, pairs):
    moe = set(mm.moe_layers)
    for layer, e in pairs:
        if layer not in moe:
            raise WorkbenchError(f"--dump-experts: layer {layer} is not an MoE layer (MoE layers: {sorted(moe)})")
        if e == -1 and mm.layer(layer).shared is None:
            raise WorkbenchError(f"--dump-experts: layer {layer} has no shared expert (E-1)")
        if not -1 <= e < mm.n_experts:
            raise WorkbenchError(f"--dump-experts: expert {e} is out of range 0..{mm.n_experts - 1}")


# --------------------------------------------------------------------------------- implementation

def _linear(x, w, b, transposed: bool):
    # Same ops as the families' eager code: `x @ W (+ b)` for transposed (gpt-oss), F.linear otherwise.
    if transposed:
        y = x @ w
        return y + b if b is not None else y
    y = F.linear(x, w)
    return y + b if b is not None else y


def _apply_gate(mod, h):
    if getattr(mod, "has_gate", True):
        return mod._apply_gate(h)
    return mod.act_fn(h)


def _up_weights(mod):
    if getattr(mod, "has_gate", True):
        return mod.gate_up_proj, getattr(mod, "gate_up_proj_bias", None) if getattr(mod, "has_bias", False) else None
    return mod.up_proj, getattr(mod, "up_proj_bias", None) if getattr(mod, "has_bias", False) else None


def _down_bias(mod):
    return getattr(mod, "down_proj_bias", None) if getattr(mod, "has_bias", False) else None


def _loop_forward(mod, hidden, top_k_index, top_k_weights, rec):
    """The eager loop, op for op, plus stats of each expert's output before its weight."""
    n_exp = mod.num_experts
    final = torch.zeros_like(hidden)
    T, K = top_k_index.shape
    stats = None
    if rec is not None:
        stats = [torch.zeros(T, K, dtype=torch.float32, device=hidden.device),
                 torch.zeros(T, K, dtype=torch.int32, device=hidden.device),
                 torch.zeros(T, K, dtype=torch.float32, device=hidden.device)]
    wu, bu = _up_weights(mod)
    bd = _down_bias(mod)
    tr = getattr(mod, "is_transposed", False)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=n_exp + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = e[0]
        if e == n_exp:
            continue
        pos, tok = torch.where(mask[e])
        x = hidden[tok]
        h = _linear(x, wu[e], bu[e] if bu is not None else None, tr)
        h = _apply_gate(mod, h)  # default gate = eager's `act(gate) * up` on chunk(2), same ops
        y = _linear(h, mod.down_proj[e], bd[e] if bd is not None else None, tr)
        if stats is not None:
            mx, arg, l2, _, _ = row_stats(y)
            stats[0][tok, pos], stats[1][tok, pos], stats[2][tok, pos] = mx, arg, l2
            rec.dump_rows(int(e), y, tok, pos, top_k_weights[tok, pos])
        if getattr(mod, "has_post_expert_norm", False):
            y = mod.post_expert_norm(y)
        y = y * top_k_weights[tok, pos, None]
        final.index_add_(0, tok, y.to(final.dtype))
    return final, stats


def _grouped_mm(x, w, offs):
    if x.device.type == "cuda" or x.device.type == "cpu":
        fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        if fn is not None and not (x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0)):
            try:
                return fn(x.to(w.dtype), w, offs=offs)
            except (RuntimeError, NotImplementedError):
                pass  # dtype/alignment the kernel refuses: fall back below
    out = torch.zeros(x.shape[0], w.shape[2], device=x.device, dtype=w.dtype)
    start = 0
    for i, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end].to(w.dtype), w[i], out=out[start:end])
        start = end
    return out


def _grouped_linear(x, w, offs, b, transposed):
    out = _grouped_mm(x, w if transposed else w.transpose(-2, -1), offs)
    if b is not None:
        out.add_(b)
    return out


def _grouped_forward(mod, hidden, top_k_index, top_k_weights, rec):
    """transformers' grouped_mm path (sort by expert, two grouped GEMMs), stats fused on the way."""
    dev = hidden.device
    T, K = top_k_index.shape
    H = hidden.shape[-1]
    w = top_k_weights.reshape(-1)
    ids = top_k_index.reshape(-1)
    ids_g, perm = torch.sort(ids)
    x_g = hidden[perm // K]
    w_g = w[perm]
    hist_in = ids_g.float() if dev.type in ("cpu", "mps") else ids_g.int()
    counts = torch.histc(hist_in, bins=mod.num_experts, min=0, max=mod.num_experts - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    wu, bu = _up_weights(mod)
    bd = _down_bias(mod)
    tr = getattr(mod, "is_transposed", False)
    h = _grouped_linear(x_g, wu, offs, bu[ids_g] if bu is not None else None, tr)
    h = _apply_gate(mod, h)
    y = _grouped_linear(h, mod.down_proj, offs, bd[ids_g] if bd is not None else None, tr)
    stats = None
    if rec is not None:
        mx, arg, l2, _, _ = row_stats(y, out_index=perm, n_out=T * K)
        stats = [mx.view(T, K), arg.view(T, K), l2.view(T, K)]
        for e in rec.dump_experts_here():
            sel = (ids_g == e).nonzero()[:, 0]  # host sync, only on layers with dumps
            src = perm[sel]
            rec.dump_rows(e, y[sel], src // K, src % K, w[src])
    if getattr(mod, "has_post_expert_norm", False):
        y = mod.post_expert_norm(y)
    weighted = y * w_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.size(0), device=dev)
    weighted = weighted[inv]
    return weighted.view(T, K, H).sum(dim=1).to(hidden.dtype), stats


def probe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Registered as the `workbench_probe` experts implementation."""
    if getattr(self, "_is_expert_parallel", False):
        raise WorkbenchError("the experts probe does not support expert parallelism; capture on one device")
    rec = getattr(self, _ATTR, None)
    mode = rec.mode if rec is not None and rec.mode != "auto" else ("grouped" if hidden_states.is_cuda else "loop")
    fwd = _grouped_forward if mode == "grouped" else _loop_forward
    if rec is not None and rec.probe.ctx is None:
        rec = None  # a forward outside capture (e.g. the app): compute, record nothing
    out, stats = fwd(self, hidden_states, top_k_index, top_k_weights, rec)
    if rec is not None:
        rec.record(top_k_index, top_k_weights, stats)
    return out


_REGISTERED = False


def register_implementation() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers.integrations.moe import ExpertsInterface

        ExpertsInterface.register(IMPL_NAME, probe_experts_forward)
        _REGISTERED = True


def _set_impl(cfg, name):
    if hasattr(cfg, "_experts_implementation_internal"):
        cfg._experts_implementation_internal = name
    else:
        cfg._experts_implementation = name


# ------------------------------------------------------------------------------------------ probe

class _LayerRecorder:
    """Per-MoE-layer state living on the experts module while the probe is attached."""

    def __init__(self, probe: ExpertsProbe, index: int, mode: str, dumps: list[int]):
        self.probe, self.index, self.mode, self.dumps = probe, index, mode, dumps

    def dump_experts_here(self) -> list[int]:
        return [e for e in self.dumps if e >= 0]

    def dump_rows(self, e, y, tok, slot, weight):
        if e in self.dumps:
            self.probe._dump(self.index, e, y, tok, slot, weight)

    def record(self, idx, weights, stats):
        self.probe._record(self.index, idx, weights, stats)


class ExpertsProbe(Probe):
    """Fills `expert_stats` (and `dump_experts` with `dump=SPEC`). mode: auto | loop | grouped."""

    table = "expert_stats"
    tables = ("dump_experts",)

    def __init__(self, dump: str | None = None, dump_format: str = "fp16", mode: str = "auto") -> None:
        super().__init__()
        if dump_format not in ("fp16", "int8"):
            raise WorkbenchError(f"unknown dump format {dump_format!r}; use fp16 or int8")
        if mode not in ("auto", "loop", "grouped"):
            raise WorkbenchError(f"unknown experts probe mode {mode!r}; use auto, loop or grouped")
        self.dump_spec, self.dump_format, self.mode = dump, dump_format, mode
        self.dump_pairs = parse_dump_spec(dump) if dump else []
        self.layers: list[int] = []
        self.shared_layers: list[int] = []
        self._seen: dict[int, tuple] = {}
        self._shared: dict[int, list] = {}
        self._dumps: list[tuple] = []
        self._restore: list[tuple] = []
        self._vmap: torch.Tensor | None = None
        self.hidden_size = 0

    def settings(self) -> dict:
        return {"dump": self.dump_spec, "dump_format": self.dump_format, "mode": self.mode}

    # -- attach / detach
    def check(self, mm) -> None:
        if self.dump_pairs:
            _check_dump(mm, self.dump_pairs)

    def attach(self, mm) -> None:
        register_implementation()
        self.check(mm)
        self.layers = mm.moe_layers
        self.hidden_size = int(mm.model.config.hidden_size)
        mode = self.mode
        if mode == "auto" and not getattr(mm.model, "hf_device_map", None):
            mode = "grouped" if mm.device.type == "cuda" else "loop"
        # split by a device_map: "auto" stays, each layer picks the path of the device it runs on
        self.active_mode = mode
        cfgs = {}
        for layer in mm.layers:
            ex = layer.experts
            if not hasattr(ex, "config") or not hasattr(ex, "num_experts"):
                raise WorkbenchError(
                    f"the experts module of layer {layer.index} does not use transformers' experts "
                    "implementations, so the experts probe cannot see its outputs")
            cfgs[id(ex.config)] = ex.config
            dumps = [e for (li, e) in self.dump_pairs if li == layer.index]
            setattr(ex, _ATTR, _LayerRecorder(self, layer.index, mode, dumps))
            self.handles.append(_AttrHandle(ex, _ATTR))
            if layer.shared is not None:
                self.shared_layers.append(layer.index)
                self.handles.append(register(mm, f"L{layer.index}.shared.out", self._shared_hook(layer.index)))
                if layer.shared_gate is not None:
                    self.handles.append(register(mm, f"L{layer.index}.shared_gate.out", self._gate_hook(layer.index)))
        for cfg in cfgs.values():
            prev = getattr(cfg, "_experts_implementation", None)
            if prev not in (None, "eager", "grouped_mm", "batched_mm", IMPL_NAME):
                warnings.warn(f"experts implementation {prev!r} is replaced by the probe's {mode} path while capturing",
                              stacklevel=2)
            self._restore.append((cfg, prev))
            _set_impl(cfg, IMPL_NAME)

    def detach(self) -> None:
        super().detach()
        for cfg, prev in self._restore:
            _set_impl(cfg, prev)
        self._restore.clear()
        self.shared_layers = []

    def begin(self, ctx) -> None:
        super().begin(ctx)
        self._seen, self._shared, self._dumps, self._vmap = {}, {}, [], None

    # -- recording (called from the implementation and hooks, inside the forward)
    def _valid(self, t: torch.Tensor) -> torch.Tensor:
        v = self.ctx.valid
        t = to_ctx(t, self.ctx)
        if t.shape[0] == v.shape[0]:
            return t
        return t.index_select(0, v)

    def _record(self, index, idx, weights, stats):
        if self.ctx is None:
            return
        mx, arg, l2 = (self._valid(s) for s in stats)
        self._seen[index] = (self._valid(idx).to(torch.int16), self._valid(weights).to(torch.float32), mx, arg, l2)
        self.fired.add(index)

    def _shared_hook(self, index):
        def hook(module, args, out):
            if self.ctx is None:
                return
            y = out[0] if isinstance(out, tuple) else out
            y = to_ctx(y.reshape(-1, y.shape[-1]), self.ctx)
            mx, arg, l2, _, _ = row_stats(y)
            rec = self._shared.setdefault(index, [None, None])
            rec[0] = (self._valid(mx), self._valid(arg), self._valid(l2))
            if any(li == index and e == -1 for li, e in self.dump_pairs):
                tok = self.ctx.valid
                self._dump(index, -1, y.index_select(0, tok), tok, None, None)
        return hook

    def _gate_hook(self, index):
        def hook(module, args, out):
            if self.ctx is None:
                return
            g = torch.sigmoid(out.reshape(-1)).to(torch.float32)  # the model applies F.sigmoid to this
            self._shared.setdefault(index, [None, None])[1] = self._valid(g)
        return hook

    def _dump(self, index, e, y, tok, slot, weight):
        """Keep rows of token `tok` (flat batch index) that are not padding, as fp16 or int8."""
        if self.ctx is None:
            return
        y, tok = to_ctx(y, self.ctx), to_ctx(tok, self.ctx)
        slot = to_ctx(slot, self.ctx) if slot is not None else None
        weight = to_ctx(weight, self.ctx) if weight is not None else None
        if self._vmap is None:
            n = self.ctx.input_ids.numel()
            vm = torch.full((n,), -1, dtype=torch.int64, device=tok.device)
            vm[self.ctx.valid] = torch.arange(self.ctx.valid.shape[0], device=tok.device)
            self._vmap = vm
        vi = self._vmap[tok]
        keep = (vi >= 0).nonzero()[:, 0]
        y, vi = y[keep], vi[keep]
        if slot is None:  # shared expert: its gate (if any) is filled in at harvest
            slot = torch.full_like(vi, -1)
            weight = None
        else:
            slot, weight = slot[keep], weight[keep].to(torch.float32)
        _, _, _, cp, scale = row_stats(y, copy=self.dump_format)
        self._dumps.append((index, e, vi, slot, weight, cp, scale))

    # -- harvest / tables
    def harvest(self) -> dict[str, torch.Tensor]:
        missing = [i for i in self.layers if i not in self._seen]
        if missing:
            raise ProbeDidNotFire(
                f"the experts implementation of layers {missing} did not run; the MoE block was replaced or bypassed")
        recs = [self._seen[i] for i in self.layers]
        out = {k: torch.stack([r[j] for r in recs], 1) for j, k in enumerate(("experts", "weights", "maxabs", "argmax", "l2"))}
        if self.shared_layers:
            tv = out["experts"].shape[0]
            dev = out["experts"].device
            sm, sa, sl, sw = [], [], [], []
            for i in self.layers:
                rec = self._shared.get(i)
                if i in self.shared_layers and (rec is None or rec[0] is None):
                    raise ProbeDidNotFire(f"the shared expert of layer {i} did not run")
                if rec is None:  # layer without a shared expert in a model that has some: NaN row, dropped later
                    sm.append(torch.full((tv,), float("nan"), device=dev))
                    sa.append(torch.zeros(tv, dtype=torch.int32, device=dev))
                    sl.append(torch.full((tv,), float("nan"), device=dev))
                    sw.append(torch.full((tv,), float("nan"), device=dev))
                    continue
                sm.append(rec[0][0]), sa.append(rec[0][1]), sl.append(rec[0][2])
                sw.append(rec[1] if rec[1] is not None else torch.ones(tv, device=dev))
            out.update(shared_maxabs=torch.stack(sm, 1), shared_argmax=torch.stack(sa, 1),
                       shared_l2=torch.stack(sl, 1), shared_weight=torch.stack(sw, 1))
        if self._dumps:
            out.update(self._harvest_dumps())
        self._seen, self._shared, self._dumps = {}, {}, []
        return out

    def _harvest_dumps(self) -> dict[str, torch.Tensor]:
        parts = []
        for index, e, vi, slot, weight, cp, scale in self._dumps:
            if weight is None:  # shared: weight is its gate value for that token
                rec = self._shared.get(index)
                g = rec[1] if rec is not None and rec[1] is not None else None
                weight = g[vi] if g is not None else torch.ones(vi.shape[0], device=vi.device)
            n = vi.shape[0]
            parts.append((vi, torch.full((n,), index, dtype=torch.int16, device=vi.device),
                          torch.full((n,), e, dtype=torch.int16, device=vi.device), slot.to(torch.int16), weight,
                          cp, scale))
        cat = [torch.cat([p[j] for p in parts]) for j in range(6)]
        out = {"dump_tok": cat[0], "dump_layer": cat[1], "dump_expert": cat[2], "dump_slot": cat[3],
               "dump_weight": cat[4], "dump_values": cat[5]}
        if self.dump_format == "int8":
            out["dump_scale"] = torch.cat([p[6] for p in parts])
        return out

    def to_table(self, arrays: dict[str, np.ndarray], meta: BatchMeta) -> dict[str, pa.Table]:
        ex, w = arrays["experts"], arrays["weights"]
        mx, arg, l2 = arrays["maxabs"], arrays["argmax"], arrays["l2"]
        tv, nl, k = ex.shape
        slots = np.arange(k, dtype=np.int16)
        if "shared_maxabs" in arrays:
            ex = np.concatenate([ex, np.full((tv, nl, 1), -1, np.int16)], 2)
            w = np.concatenate([w, arrays["shared_weight"][..., None]], 2)
            mx = np.concatenate([mx, arrays["shared_maxabs"][..., None]], 2)
            arg = np.concatenate([arg, arrays["shared_argmax"][..., None]], 2)
            l2 = np.concatenate([l2, arrays["shared_l2"][..., None]], 2)
            slots = np.append(slots, np.int16(-1))
        ks = ex.shape[2]
        per_tok = nl * ks
        cols = {
            "doc_id": np.repeat(meta.doc.astype(np.int64), per_tok),
            "pos": np.repeat(meta.pos.astype(np.int32), per_tok),
            "layer": np.tile(np.repeat(np.asarray(self.layers, np.int16), ks), tv),
            "slot": np.tile(slots, tv * nl),
            "expert": ex.reshape(-1),
            "weight": w.reshape(-1).astype(np.float32, copy=False),
            "out_maxabs": mx.reshape(-1),
            "out_argmax": arg.reshape(-1).astype(np.int32, copy=False),
            "out_l2": l2.reshape(-1),
        }
        if "shared_maxabs" in arrays and len(self.shared_layers) < nl:
            keep = ~np.isnan(cols["out_maxabs"]) | (cols["slot"] >= 0)
            cols = {c: v[keep] for c, v in cols.items()}
        from ..store import SCHEMAS

        tables = {"expert_stats": pa.table({c: pa.array(v, SCHEMAS["expert_stats"].field(c).type)
                                            for c, v in cols.items()})}
        if "dump_tok" in arrays:
            tables["dump_experts"] = self._dump_table(arrays, meta)
        return tables

    def _dump_table(self, a, meta) -> pa.Table:
        vi = a["dump_tok"].astype(np.int64)
        vals = a["dump_values"]
        n, h = vals.shape if vals.ndim == 2 else (0, self.hidden_size)
        flat = pa.array(vals.reshape(-1), pa.float16() if self.dump_format == "fp16" else pa.int8())
        cols = {
            "doc_id": pa.array(meta.doc[vi].astype(np.int64), pa.int64()),
            "pos": pa.array(meta.pos[vi].astype(np.int32), pa.int32()),
            "layer": pa.array(a["dump_layer"], pa.int16()),
            "expert": pa.array(a["dump_expert"], pa.int16()),
            "slot": pa.array(a["dump_slot"], pa.int16()),
            "weight": pa.array(a["dump_weight"].astype(np.float32), pa.float32()),
            "values": pa.FixedSizeListArray.from_arrays(flat, h),
        }
        if self.dump_format == "int8":
            cols["scale"] = pa.array(a["dump_scale"].astype(np.float32), pa.float32())
        return pa.table(cols)


class _AttrHandle:
    """Removes an attribute on detach, like a hook handle."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def remove(self):
        if hasattr(self.obj, self.name):
            delattr(self.obj, self.name)


def dequantize(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """Dump rows back to float32: int8 * scale, or fp16 as is."""
    v = np.asarray(values, dtype=np.float32)
    return v if scale is None else v * np.asarray(scale, np.float32)[:, None]
