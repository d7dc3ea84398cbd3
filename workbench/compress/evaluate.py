"""`workbench evaluate MODEL [MODEL ...] --data DATA`: what a compressed checkpoint costs on held-out text.

Per model, on the same token sequences (tokenised by the first model's tokenizer):
- perplexity: exp(mean next-token NLL over every predicted token);
- agreement: share of positions whose argmax next token equals the first model's;
- kl: mean KL(first || model) of the next-token distributions (nats; when the first model's
  log-probabilities fit in memory, else null);
- routing, in the base model's expert ids (a pruned / merged checkpoint's pruning.json or merging.json
  maps its experts back): overlap = share of the first model's chosen experts that the model also
  chose (a merged expert counts for every expert merged into it), and removed_mass = share of the first
  model's routing weight that fell on experts the model no longer has (the cost a run predicts).
Models load one at a time, so any number fits in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..errors import WorkbenchError

_REF_BYTES = 1 << 30  # the first model's fp32 log-probs are kept for the KL only below this size


def origins(info: dict | None, n_experts: int, moe_layers) -> dict[int, list[list[int]]]:
    """{layer: [original expert ids of new expert i]} from pruning.json / merging.json (identity without)."""
    out = {}
    for layer in moe_layers:
        if info is None:
            out[layer] = [[e] for e in range(n_experts)]
            continue
        d = info["layers"].get(str(layer))
        if d is None:
            raise WorkbenchError(f"{info.get('file', 'pruning.json')} does not describe MoE layer {layer}")
        groups = d.get("groups") or [[e] for e in d["kept"]]
        out[layer] = [list(map(int, g)) for g in groups]
    return out


def _router_out(out):
    """(index, weights) of a router's output."""
    from ..models.hooks import RouterOut

    r = RouterOut.of(out)
    return r.index, r.weights


class _Routing:
    """Router forward hooks: the chosen experts and their weights per layer, for the real tokens only."""

    def __init__(self, mm):
        self.mm, self.hooks, self.cur = mm, None, {}

    def __enter__(self):
        self.hooks = self.mm.hooks({f"L{lay.index}.router": self._hook(lay.index) for lay in self.mm.layers})
        return self

    def _hook(self, layer):
        def hook(module, args, out):
            idx, w = _router_out(out)
            self.cur[layer] = (idx.detach().reshape(-1, idx.shape[-1]).cpu(),
                               w.detach().reshape(-1, w.shape[-1]).float().cpu())
        return hook

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.hooks.remove()


def _load(spec, device, dtype):
    from ..models.loading import MoEModel, load_model

    if isinstance(spec, MoEModel):
        return spec
    if dtype is None and (device is None or str(device) == "cpu"):
        dtype = "float32"  # one precision for every model: a bf16 checkpoint beside the fp32 demo would add noise
    return load_model(str(spec), device=device, dtype=dtype)


def _name(spec) -> str:
    from ..models.loading import MoEModel

    if isinstance(spec, MoEModel):
        return spec.spec
    return str(spec)


def _info_of(spec) -> dict | None:
    from ..models.loading import MoEModel
    from .prune import load_info

    if isinstance(spec, MoEModel):
        return getattr(spec, "compress_info", None) or (load_info(spec.path) if spec.path and
                                                        Path(spec.path).is_dir() else None)
    p = Path(str(spec)).expanduser()
    return load_info(p) if p.is_dir() else None


def evaluate(models, data, max_tokens: int | None = 8192, seq_len: int | None = 256, batch_size: int = 8,
             device=None, dtype=None, names=None, progress: bool = True):
    """Evaluate `models` (specs, folders or MoEModels; the first is the reference) on `data` (a dataset
    name or file, texts, or token id lists). Returns an AnalysisResult with tables `models` (one row each)
    and `layers` (routing per model and layer)."""
    from tqdm.auto import tqdm

    from ..analysis import AnalysisResult
    from ..attribution import make_batches

    models = list(models)
    if not models:
        raise WorkbenchError("give at least one model to evaluate")
    names = list(names) if names is not None else [_name(m) for m in models]
    if len(names) != len(models):
        raise WorkbenchError(f"{len(names)} names for {len(models)} models")
    rows, layer_rows = [], []
    batches = ref = None
    for i, spec in enumerate(tqdm(models, desc="evaluate", unit="model", disable=not progress or len(models) < 2)):
        mm = _load(spec, device, dtype)
        info = _info_of(spec)
        if batches is None:
            batches = make_batches(mm, data, None, seq_len, max_tokens, batch_size)
            n_pred = sum(int(b.mask[:, 1:].sum()) for b in batches)
            vocab = int(mm.model.config.vocab_size)
            ref = {"mm_layers": list(mm.moe_layers), "argmax": [], "logp": [] if n_pred * vocab * 4 < _REF_BYTES else None,
                   "sel": [], "w": [], "orig": origins(info, mm.n_experts, mm.moe_layers), "vocab": vocab}
        elif int(mm.model.config.vocab_size) != ref["vocab"]:
            raise WorkbenchError(f"{names[i]} has a vocabulary of {mm.model.config.vocab_size} tokens, the first model "
                                 f"{ref['vocab']}: next-token agreement needs the same tokenizer")
        same_layers = list(mm.moe_layers) == ref["mm_layers"]
        orig = origins(info, mm.n_experts, mm.moe_layers)
        nll = agree = 0.0
        kl = 0.0 if ref["logp"] is not None else None
        n_tok = 0
        cover = {lay: [0.0, 0.0, 0.0] for lay in ref["mm_layers"]}  # overlap sum, removed mass sum, tokens
        with torch.inference_mode(), _Routing(mm) as rec:
            for bi, b in enumerate(batches):
                rec.cur = {}
                logits = mm.model(input_ids=b.ids.to(mm.device), attention_mask=b.mask.to(mm.device),
                                  use_cache=False).logits[:, :-1].float()
                tgt = b.ids[:, 1:].to(logits.device)
                m = b.mask[:, 1:].bool().to(logits.device)
                lp = torch.log_softmax(logits, -1)[m]  # [n, V] real predicted positions
                nll += float(-lp.gather(1, tgt[m][:, None]).double().sum())
                top = lp.argmax(-1).cpu()
                n_tok += int(m.sum())
                if i == 0:
                    ref["argmax"].append(top)
                    if ref["logp"] is not None:
                        ref["logp"].append(lp.cpu())
                else:
                    agree += float((top == ref["argmax"][bi]).sum())
                    if kl is not None:
                        p_log = ref["logp"][bi].to(lp.device)
                        kl += float((p_log.exp() * (p_log - lp)).sum().double())
                real = b.mask.reshape(-1).bool()
                if i == 0:
                    ref["sel"].append({lay: rec.cur[lay][0][real] for lay in rec.cur})
                    ref["w"].append({lay: rec.cur[lay][1][real] for lay in rec.cur})
                elif same_layers:
                    for lay in ref["mm_layers"]:
                        _routing_cover(cover[lay], ref["sel"][bi][lay], ref["w"][bi][lay], ref["orig"][lay],
                                       rec.cur[lay][0][real], orig[lay])
        params = int(sum(p.numel() for p in mm.model.parameters()))
        row = {"model": names[i], "n_experts": int(mm.n_experts), "params": params,
               "criterion": (info or {}).get("criterion") or (info or {}).get("method"),
               "ppl": math.exp(nll / n_tok), "nll": nll / n_tok, "tokens": n_tok,
               "agreement": 1.0 if i == 0 else agree / n_tok,
               "kl": 0.0 if i == 0 else (kl / n_tok if kl is not None else None)}
        if i == 0:
            row.update(overlap=1.0, removed_mass=0.0)
        elif same_layers:
            row.update(overlap=float(np.mean([c[0] / c[2] for c in cover.values()])),
                       removed_mass=float(np.mean([c[1] / c[2] for c in cover.values()])))
            layer_rows += [{"model": names[i], "layer": lay, "overlap": c[0] / c[2], "removed_mass": c[1] / c[2]}
                           for lay, c in cover.items()]
        else:
            row.update(overlap=None, removed_mass=None)
        rows.append(row)
        del mm  # one model in memory at a time (a MoEModel passed in stays with its caller)
    tab = pl.DataFrame(rows, schema={"model": pl.Utf8, "n_experts": pl.Int64, "params": pl.Int64, "criterion": pl.Utf8,
                                     "ppl": pl.Float64, "nll": pl.Float64, "tokens": pl.Int64, "agreement": pl.Float64,
                                     "kl": pl.Float64, "overlap": pl.Float64, "removed_mass": pl.Float64})
    tab = tab.with_columns((pl.col("ppl") / tab["ppl"][0]).alias("ppl_ratio"))
    lay = pl.DataFrame(layer_rows, schema={"model": pl.Utf8, "layer": pl.Int16, "overlap": pl.Float64,
                                           "removed_mass": pl.Float64})
    lines = [f"evaluated {len(models)} model(s) on {tab['tokens'][0]} predicted tokens; reference: {names[0]}"]
    for r in tab.iter_rows(named=True):
        lines.append(f"  {r['model']}: ppl {r['ppl']:.4g} (x{r['ppl_ratio']:.3f}), agreement {r['agreement']:.3f}"
                     + (f", KL {r['kl']:.4g}" if r["kl"] is not None else "")
                     + (f", routing overlap {r['overlap']:.3f}" if r["overlap"] is not None else ""))
    return AnalysisResult("evaluate", {"models": tab, "layers": lay}, "models", "\n".join(lines),
                          {"reference": names[0], "seq_len": seq_len, "max_tokens": max_tokens})


def _members(orig: list[list[int]], width: int) -> torch.Tensor:
    """[n_new, width] bool: new expert i contains original expert e."""
    m = torch.zeros(len(orig), width, dtype=torch.bool)
    for i, g in enumerate(orig):
        m[i, g] = True
    return m


def _routing_cover(acc, sel0, w0, orig0, sel, orig) -> None:
    """Add, per token, the overlap of the model's chosen experts with the reference's (original ids) and the
    reference's routing weight on experts the model lacks."""
    width = 1 + max(max(max(g) for g in orig0), max(max(g) for g in orig))
    o0, o1 = _members(orig0, width), _members(orig, width)
    a = o0[sel0.long()].any(1)  # [T, width] the reference's choice in original ids
    b = o1[sel.long()].any(1)
    overlap = (a & b).sum(1) / a.sum(1)
    have = o1.any(0)
    lost = ~(o0 & have).any(1)  # [n0] reference experts the model has nothing of
    w = w0.double()
    mass = (w * lost[sel0.long()]).sum(1) / w.sum(1).clamp_min(1e-300)
    acc[0] += float(overlap.double().sum())
    acc[1] += float(mass.sum())
    acc[2] += int(sel0.shape[0])


__all__ = ["evaluate", "origins"]
