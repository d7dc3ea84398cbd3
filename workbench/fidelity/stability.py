"""Stability: how many routing decisions flip when only the numerics change.

The same tokens run under a reference setting (the first value of every `--vary` axis) and under each
variant (by default one axis changed at a time; `product=True` for every combination). Axes: dtype
(float32, bfloat16, float16), batch (sequences a forward: changes padding and kernel shapes), experts
(the experts implementation: eager, grouped_mm, batched_mm) and device (cpu, cuda).

Per variant and MoE layer:
- flipped: the token's top-k set differs from the reference's (the free forward: a flip at layer l changes
  the inputs of l+1, so flips carry forward);
- first: it differs even when every layer routes as the reference did (the reference routes are replayed,
  so layer l sees inputs made by the reference routing up to l-1 and only its own numerics differ);
- inherited = flipped and not first: the flip came from upstream.
With each decision's reference router margin (k-th minus (k+1)-th selection score) the flip rate is
reported per margin bin, and the (layer, expert) pairs most often involved (an expert that left or
entered the top-k of a flipped decision).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..errors import WorkbenchError
from .common import Seq, forward, make_batches, same_set, versions, write_result
from .margins import NEAR_TIE, experts_involved, flip_rate_by_margin

AXES = ("dtype", "batch", "experts", "device")
DTYPES = ("float32", "bfloat16", "float16")
EXAMPLE = "e.g. --vary dtype=float32,bfloat16 --vary batch=1,8 --vary experts=eager,grouped_mm"


@dataclass
class StabilityResult:
    layers: pl.DataFrame  # variant x layer: flip / first / inherited rates
    margins: pl.DataFrame  # variant x margin bin: decisions, flips, rates
    experts: pl.DataFrame  # variant x kind x (layer, expert): times involved in a flip
    decisions: pl.DataFrame  # token x layer: reference margin and, per variant, flipped / first
    summary: dict
    out: Path | None = None

    def __repr__(self) -> str:
        parts = [f"{v['name']}: {v['flip_rate']:.4%} flipped ({v['first_rate']:.4%} first)"
                 for v in self.summary["variants"]]
        return f"StabilityResult({self.summary['tokens']} tokens; " + "; ".join(parts) + ")"


def parse_vary(vary) -> dict[str, list]:
    """["dtype=float32,bfloat16", "batch=1,8"] (or a dict) -> {"dtype": [...], "batch": [1, 8]}, validated."""
    if vary is None:
        return {}
    items = vary.items() if isinstance(vary, dict) else []
    if not isinstance(vary, dict):
        if isinstance(vary, str):
            vary = [vary]
        parsed = []
        for s in vary:
            axis, eq, vals = str(s).partition("=")
            if not eq or not vals.strip():
                raise WorkbenchError(f"malformed --vary {s!r}: write AXIS=V1,V2 with AXIS one of {', '.join(AXES)}; "
                                     f"{EXAMPLE}")
            parsed.append((axis.strip(), [v.strip() for v in vals.split(",") if v.strip()]))
        items = parsed
    out: dict[str, list] = {}
    for axis, vals in items:
        if axis not in AXES:
            raise WorkbenchError(f"unknown --vary axis {axis!r}; choose from {', '.join(AXES)}")
        if axis in out:
            raise WorkbenchError(f"--vary {axis} is given twice; list its values once, e.g. {axis}=a,b")
        vals = list(vals) if isinstance(vals, (list, tuple)) else [vals]
        if axis == "batch":
            try:
                vals = [int(v) for v in vals]
            except (TypeError, ValueError):
                raise WorkbenchError(f"--vary batch takes whole numbers, got {vals}") from None
            if any(v < 1 for v in vals):
                raise WorkbenchError("--vary batch sizes must be at least 1")
        elif axis == "dtype":
            vals = [str(v).replace("torch.", "") for v in vals]
            vals = [{"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(v, v) for v in vals]
            bad = [v for v in vals if v not in DTYPES]
            if bad:
                raise WorkbenchError(f"--vary dtype: unknown dtype {bad[0]!r}; choose from {', '.join(DTYPES)}")
        else:
            vals = [str(v) for v in vals]
        if len(set(vals)) != len(vals):
            raise WorkbenchError(f"--vary {axis} repeats a value: {vals}")
        out[axis] = vals
    return out


def variants(axes: dict[str, list], base: dict, product: bool = False) -> tuple[dict, list[dict]]:
    """The reference (first value of each axis, `base` elsewhere) and the variants to compare with it."""
    ref = dict(base, **{a: v[0] for a, v in axes.items()})
    out = []
    if product:
        names = list(axes)
        for combo in itertools.product(*(axes[a] for a in names)):
            cfg = dict(ref, **dict(zip(names, combo)))
            if cfg != ref:
                out.append(cfg)
    else:
        for a, vals in axes.items():
            for v in vals[1:]:
                out.append(dict(ref, **{a: v}))
    if not out:
        raise WorkbenchError(f"nothing to compare: give an axis at least two values, {EXAMPLE}")
    return ref, out


def _name(cfg: dict, ref: dict) -> str:
    diff = [f"{a}={cfg[a]}" for a in AXES if cfg.get(a) != ref.get(a)]
    return ",".join(diff) or "reference"


class _Models:
    """Models for each setting: loaded from the spec (one at a time), or copies of a given MoEModel."""

    def __init__(self, model):
        from ..models.loading import MoEModel

        self.given = model if isinstance(model, MoEModel) else None
        self.spec = None if self.given is not None else str(model)
        self.current = None
        self.key = None
        if self.given is not None:
            self.saved_impl = _impl(self.given)

    def get(self, cfg: dict):
        from ..models.loading import check_device, load_model, wrap_model

        key = (cfg["device"], cfg["dtype"])
        check_device(cfg["device"])
        if self.given is not None:
            g = self.given
            if key == (str(g.device), _dtype_name(g)):
                mm = g
            elif self.key == key:
                mm = self.current
            else:
                import torch

                self.current = None  # free the previous copy first
                net = copy.deepcopy(g.model).to(device=cfg["device"], dtype=getattr(torch, cfg["dtype"]))
                mm = wrap_model(net, g.tokenizer, spec=g.spec, path=g.path)
        elif self.key == key:
            mm = self.current
        else:
            self.current = None
            mm = load_model(self.spec, device=cfg["device"], dtype=cfg["dtype"],
                            experts_implementation=cfg["experts"] or "auto")
        self.current, self.key = mm, key
        if cfg["experts"]:
            try:
                mm.model.set_experts_implementation(cfg["experts"])
            except (ValueError, KeyError, AttributeError) as e:
                raise WorkbenchError(f"--vary experts={cfg['experts']}: {str(e).splitlines()[0]}") from None
        return mm

    def restore(self) -> None:
        if self.given is not None and self.saved_impl:
            try:
                self.given.model.set_experts_implementation(self.saved_impl)
            except Exception:  # noqa: BLE001 - best effort: leave the caller's model as it was
                pass


def _check_settings(cfgs: list[dict]) -> None:
    from ..models.loading import check_device

    for cfg in cfgs:
        check_device(cfg["device"])
    try:
        from transformers.integrations.moe import ExpertsInterface

        known = {"eager", *ExpertsInterface._global_mapping}
    except (ImportError, AttributeError):  # another transformers layout: let the model refuse it
        return
    bad = sorted({c["experts"] for c in cfgs if c["experts"] and c["experts"] not in known})
    if bad:
        raise WorkbenchError(f"--vary experts: unknown experts implementation {bad[0]!r}; choose from "
                             f"{', '.join(sorted(known))}")


def _impl(mm) -> str | None:
    return getattr(mm.model.config, "_experts_implementation", None)


def _dtype_name(mm) -> str:
    return str(next(mm.model.parameters()).dtype).replace("torch.", "")


def _routing(mm, seqs: list[Seq], batch_size: int, ref: np.ndarray | None, margins: bool, bar, what: str):
    """Own top-k [T, L, K] of the free forward; with `ref`, also under the replayed reference routes; with
    margins, the router margins [T, L]."""
    import torch

    from ..probes.interventions import forced_routes

    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
    L = len(mm.moe_layers)
    T = sum(len(s.ids) for s in seqs)
    own = np.zeros((T, L, mm.top_k), np.int16)
    rep = np.zeros_like(own) if ref is not None else None
    mar = np.zeros((T, L), np.float32) if margins else None
    o = 0
    bar.set_description(what)
    with forced_routes(mm, margins=margins) as fr, torch.inference_mode():
        for b in make_batches(seqs, batch_size, pad):
            n = len(b.rows)
            f = forward(mm, fr, b, None)
            for j, layer in enumerate(mm.moe_layers):
                own[o:o + n, j] = f.own[layer]
                if margins:
                    mar[o:o + n, j] = f.margin[layer]
            if ref is not None:
                rows = torch.from_numpy(b.rows)
                routes = {layer: (rows, torch.from_numpy(ref[o:o + n, j].astype(np.int64)), None)
                          for j, layer in enumerate(mm.moe_layers)}
                r = forward(mm, fr, b, routes)
                for j, layer in enumerate(mm.moe_layers):
                    rep[o:o + n, j] = r.own[layer]
            o += n
            bar.update(n)
    return own, rep, mar


def stability(model, data, vary=None, out=None, max_tokens: int | None = 2048, seq_len: int | None = None,
              limit: int | None = None, product: bool = False, overwrite: bool = False,
              progress: bool = True) -> StabilityResult:
    """Flip rates of routing decisions under other numerics (see the module docstring).

    model: a spec (`demo`, folder, hub id; loaded once per device and dtype) or a MoEModel (copied per
    device and dtype; its experts implementation is restored afterwards). data: a bundled dataset name, a
    file or a list of texts. vary: ["dtype=float32,bfloat16", "batch=1,8", ...] or a dict; the first value
    of each axis is the reference. Axes left out keep float32, batch 8, the loader's experts
    implementation and cuda when available (a given MoEModel: its own dtype and device).
    """
    from tqdm.auto import tqdm

    from ..capture import build_sequences
    from ..data import load_dataset, subset

    axes = parse_vary(vary)
    if max_tokens is not None and max_tokens < 1:
        raise WorkbenchError("--max-tokens must be at least 1")
    if out is not None and (Path(out) / "stability.json").exists() and not overwrite:
        raise WorkbenchError(f"--out {out} already holds a stability result; pass --overwrite to replace it")
    ds = load_dataset(data)
    if limit is not None:
        ds = subset(ds, limit=limit)
    models = _Models(model)
    if models.given is not None:
        g = models.given
        base = {"dtype": _dtype_name(g), "batch": 8, "experts": None, "device": str(g.device)}
    else:
        import torch

        base = {"dtype": "float32", "batch": 8, "experts": None, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    ref_cfg, var_cfgs = variants(axes, base, product)
    _check_settings([ref_cfg, *var_cfgs])  # every setting refused (if at all) before the first model runs
    try:
        mm = models.get(ref_cfg)
        if mm.family.rule == "generic":
            raise WorkbenchError(f"stability replays routes with the family's routing rule, which is unknown for "
                                 f"{mm.family.model_type} (a generic model)")
        ref_cfg["experts"] = ref_cfg["experts"] or _impl(mm)
        cap = int(getattr(mm.model.config, "max_position_embeddings", 2048) or 2048)
        built = build_sequences(ds, mm.tokenizer, seq_len=seq_len, max_tokens=max_tokens, max_len=min(cap, 8192))
        seqs = [Seq(s.doc_id, s.ids.astype(np.int64)) for s in built]
        T = sum(len(s.ids) for s in seqs)
        layers = list(mm.moe_layers)
        bar = tqdm(total=T * (1 + 2 * len(var_cfgs)), disable=not progress, unit="tok", dynamic_ncols=True)
        ref_own, _, margin = _routing(mm, seqs, int(ref_cfg["batch"]), None, True, bar, "stability: reference")
        results = []
        for cfg in var_cfgs:
            cfg = dict(cfg, experts=cfg["experts"] or ref_cfg["experts"])
            name = _name(cfg, ref_cfg)
            vm = models.get(cfg)
            own, rep, _ = _routing(vm, seqs, int(cfg["batch"]), ref_own, False, bar, f"stability: {name}")
            results.append((name, cfg, own, rep))
        bar.close()
    finally:
        models.restore()

    doc = np.concatenate([np.full(len(s.ids), s.doc_id, np.int64) for s in seqs])
    pos = np.concatenate([np.arange(len(s.ids), dtype=np.int32) for s in seqs])
    L = len(layers)
    dec = {"doc_id": np.repeat(doc, L), "pos": np.repeat(pos, L),
           "layer": pl.Series(np.tile(np.asarray(layers, np.int16), T), dtype=pl.Int16),
           "margin": margin.reshape(-1)}
    layer_rows, margin_tabs, expert_tabs, summ = [], [], [], []
    for name, cfg, own, rep in results:
        flipped = ~same_set(own, ref_own)
        first = ~same_set(rep, ref_own)
        inherited = flipped & ~first
        dec[f"flipped[{name}]"] = flipped.reshape(-1)
        dec[f"first[{name}]"] = first.reshape(-1)
        for j, layer in enumerate(layers):
            layer_rows.append({"variant": name, "layer": layer, "decisions": T,
                               "flipped": int(flipped[:, j].sum()), "first": int(first[:, j].sum()),
                               "inherited": int(inherited[:, j].sum()),
                               "flip_rate": float(flipped[:, j].mean()), "first_rate": float(first[:, j].mean()),
                               "inherited_rate": float(inherited[:, j].mean())})
        margin_tabs.append(flip_rate_by_margin(margin, {"flipped": flipped, "first": first})
                           .with_columns(pl.lit(name).alias("variant")))
        for kind, f, other in (("flipped", flipped, own), ("first", first, rep)):
            expert_tabs.append(experts_involved(ref_own, other, f, layers, mm.n_experts)
                               .with_columns(pl.lit(name).alias("variant"), pl.lit(kind).alias("kind")))
        fm = margin[first]
        summ.append({"name": name, "settings": {a: cfg[a] for a in AXES}, "decisions": int(flipped.size),
                     "flipped": int(flipped.sum()), "first": int(first.sum()), "inherited": int(inherited.sum()),
                     "flip_rate": float(flipped.mean()), "first_rate": float(first.mean()),
                     "inherited_rate": float(inherited.mean()),
                     "first_flips_near_tie": float((fm < NEAR_TIE).mean()) if fm.size else None,
                     "largest_first_flip_margin": float(fm.max()) if fm.size else None,
                     "first_flip_layer": (int(layers[int(np.flatnonzero(first.any(0))[0])]) if first.any() else None)})
    layers_df = pl.DataFrame(layer_rows).with_columns(pl.col("layer").cast(pl.Int16))
    margins_df = pl.concat(margin_tabs).select("variant", pl.exclude("variant"))
    experts_df = pl.concat(expert_tabs).select("variant", "kind", pl.exclude("variant", "kind"))
    decisions_df = pl.DataFrame(dec)
    summary = {"kind": "stability", "model": mm.spec, "model_type": mm.model.config.model_type,
               "data": ds.name, "tokens": T, "layers": layers, "top_k": mm.top_k,
               "reference": {a: ref_cfg[a] for a in AXES}, "variants": summ,
               "near_tie_below": NEAR_TIE, "reference_near_ties": int((margin < NEAR_TIE).sum()),
               "reference_min_margin": float(margin.min()), "versions": versions()}
    res = StabilityResult(layers_df, margins_df, experts_df, decisions_df, summary)
    if out is not None:
        res.out = write_result(out, "stability", {"layers": layers_df, "margins": margins_df, "experts": experts_df,
                                                  "decisions": decisions_df}, summary, overwrite)
    return res
