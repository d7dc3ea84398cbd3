"""Causal attribution: how much each (layer, expert) matters for the loss on a text set.

Frequency maps say which experts fire; this says which matter. Two measures of the same quantity,
the change of the objective when an expert's contribution is dropped (routing unchanged, the
`zero` intervention of the super-experts paper):

- exact: run the model with `steer(zero=L:E)` and take objective(zeroed) - objective(baseline).
  One forward per expert; the layers before the zeroed one are replayed from a cached baseline
  (their output cannot change), which roughly halves the cost.
- estimate: first order, all experts from one backward pass per batch. With w the routing weight of a
  slot (token t routed to expert e in layer l), the objective with e zeroed is
  L(w=0) ~ L - sum over e's slots of dL/dw * w. The hook multiplies each experts module's routing
  weights by a leaf s = 1 (after any steering hooks), so autograd gives dL/ds = dL/dw * w per slot.
  The routing of later layers stays differentiable (their weights move with the hidden state); a
  change of which experts are selected (top-k is a step) is what the estimate cannot see.

objective = mean token NLL of `data` (next-token cross-entropy), or with `control` the contrast
mean NLL(data) - mean NLL(control): positive effects are experts that `data` needs more than the
control does. Effects are in nats per token; positive = dropping the expert hurts.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from .errors import WorkbenchError
from .models.hooks import ExpertsCall, RouterOut, decoder_layers
from .probes.interventions import format_spec, parse_spec


@dataclass
class Batch:
    ids: torch.Tensor  # [B, S] long
    mask: torch.Tensor  # [B, S] long (1 = real token)
    scale: float  # objective = sum over batches of scale * (sum of token NLLs of the batch)


def _sequences(mm, data, seq_len, max_tokens) -> list[np.ndarray]:
    """Token id sequences from texts, a dataset name/file, a Dataset, a run, or lists of ids."""
    from .capture import build_sequences
    from .data import Dataset, load_dataset
    from .store import Run

    if isinstance(data, Run):
        from .analysis.common import doc_token_ids

        seqs, budget = [], max_tokens or float("inf")
        for ids in doc_token_ids(data).values():
            ids = ids[: int(min(len(ids), budget))]
            if len(ids) >= 2:
                seqs.append(ids)
                budget -= len(ids)
            if budget <= 0:
                break
        return seqs
    if isinstance(data, str):
        data = load_dataset(data)
    if not isinstance(data, Dataset):
        data = list(data)
        if data and not isinstance(data[0], (str, dict)):  # token id sequences
            return [np.asarray(s, np.int64) for s in data if len(s) >= 2]
        data = Dataset(name="<texts>", records=[r if isinstance(r, dict) else {"text": r} for r in data], sha256="",
                       source="")
    if not data.records:
        raise WorkbenchError("no texts to attribute on")
    cap = min(int(getattr(mm.model.config, "max_position_embeddings", 2048) or 2048), 8192)
    return [s.ids.astype(np.int64) for s in build_sequences(data, mm.tokenizer, seq_len=seq_len, max_tokens=max_tokens,
                                                            max_len=cap) if len(s.ids) >= 2]


def make_batches(mm, data, control=None, seq_len: int | None = 128, max_tokens: int | None = 1024,
                 batch_size: int = 4) -> list[Batch]:
    """The objective as batches: data with weight +1/n_pred, control (if any) with -1/n_pred."""
    from .steering import right_padded

    out = []
    for sign, d in ((1.0, data), (-1.0, control)):
        if d is None:
            continue
        seqs = _sequences(mm, d, seq_len, max_tokens)
        n_pred = sum(len(s) - 1 for s in seqs)
        if n_pred == 0:
            raise WorkbenchError("no text has two or more tokens, so there is nothing to predict")
        seqs = sorted(seqs, key=len, reverse=True)
        for i in range(0, len(seqs), batch_size):
            ids, mask = right_padded(mm, seqs[i:i + batch_size])
            out.append(Batch(ids, mask, sign / n_pred))
    return out


def _nll_sum(logits: torch.Tensor, b: Batch) -> torch.Tensor:
    x = logits[:, :-1]
    x = x if x.dtype == torch.float64 else x.float()  # fp32 at least; a float64 model (tests) stays exact
    lp = torch.nn.functional.cross_entropy(x.transpose(1, 2), b.ids[:, 1:].to(logits.device), reduction="none")
    return (lp * b.mask[:, 1:].to(lp.device)).sum()


def objective(mm, batches: list[Batch], interventions: dict | None = None) -> float:
    """The objective (nats per token; a contrast when there is a control), optionally under interventions."""
    total = 0.0
    cm = mm.steer(**interventions) if interventions else contextlib.nullcontext()
    with torch.inference_mode(), cm:
        for b in batches:
            logits = mm.model(input_ids=b.ids.to(mm.device), attention_mask=b.mask.to(mm.device), use_cache=False).logits
            total += b.scale * float(_nll_sum(logits, b).double())
    return total


# ---------------------------------------------------------------------------------------------
# First-order estimate


def _leaf_hook(store: list, layer: int):
    """Experts pre-hook: the routing weights times a leaf of ones (recorded with the indices)."""
    def hook(module, args, kwargs):
        call = ExpertsCall.of(module, args, kwargs, "attribution")
        # w * s with s = 1 a leaf: dL/ds = dL/dw * w per slot, and w keeps its own graph (later layers'
        # routing weights still depend on this layer's output, a path a detached copy would cut)
        s = torch.ones_like(call.weights, requires_grad=True)
        store.append((layer, call.index.detach(), s))
        return call.with_weights(call.weights * s)
    return hook


def estimate(mm, batches: list[Batch], progress: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """(effect [L, E], slots [L, E], objective): first-order effect of zeroing each expert, the number of
    (token, slot)s routed to it, and the baseline objective. Rows follow mm.moe_layers."""
    from tqdm.auto import tqdm

    pos = {lay: i for i, lay in enumerate(mm.moe_layers)}
    eff = np.zeros((len(pos), mm.n_experts), np.float64)
    slots = np.zeros((len(pos), mm.n_experts), np.int64)
    total = 0.0
    store: list = []
    hooks = mm.hooks({f"L{lay.index}.experts.in": _leaf_hook(store, lay.index) for lay in mm.layers})
    try:
        for b in tqdm(batches, desc="attribution (estimate)", disable=not progress, leave=False):
            store.clear()
            with torch.enable_grad():
                logits = mm.model(input_ids=b.ids.to(mm.device), attention_mask=b.mask.to(mm.device),
                                  use_cache=False).logits
                loss = b.scale * _nll_sum(logits, b)
                grads = torch.autograd.grad(loss, [s[2] for s in store], allow_unused=True)
            total += float(loss.detach().double())
            real = b.mask.reshape(-1).bool()
            for (layer, idx, w), g in zip(store, grads):
                idx = idx.reshape(-1, idx.shape[-1]).cpu().long()
                contrib = torch.zeros_like(w) if g is None else g.detach()  # = dL/dw * w (w the slot's weight)
                contrib = contrib.reshape(idx.shape).double().cpu()
                keep = real if idx.shape[0] == real.numel() else torch.ones(idx.shape[0], dtype=torch.bool)
                row = pos[layer]
                e_all = idx[keep].reshape(-1)
                ok = (e_all >= 0) & (e_all < mm.n_experts)  # zero-compute experts (ids >= E) have no row
                eff[row] -= np.bincount(e_all[ok].numpy(), weights=contrib[keep].reshape(-1)[ok].numpy(),
                                        minlength=mm.n_experts)
                slots[row] += np.bincount(e_all[ok].numpy(), minlength=mm.n_experts)
    finally:
        hooks.remove()
    return eff, slots, total


# ---------------------------------------------------------------------------------------------
# Exact ablation


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer whose output cannot change: returns the cached baseline output."""

    def __init__(self, out, orig):
        super().__init__()
        self.out = out
        if hasattr(orig, "attention_type"):
            self.attention_type = orig.attention_type

    def forward(self, *args, **kwargs):
        return self.out


@contextlib.contextmanager
def _replaying(decoder_layers, cached, upto: int):
    saved = {i: decoder_layers[i] for i in range(upto)}
    try:
        for i in range(upto):
            decoder_layers[i] = _Replay(cached[i], saved[i])
        yield
    finally:
        for i, m in saved.items():
            decoder_layers[i] = m


def exact(mm, batches: list[Batch], experts, progress: bool = False, replay: bool = True) -> pl.DataFrame:
    """objective(expert zeroed) - objective(baseline) for each (layer, expert) in `experts`, by running the
    model with `steer(zero=...)`. Experts no token of the batches reaches get exactly 0 without a run.
    Returns layer, expert, exact."""
    from tqdm.auto import tqdm

    experts = [(int(a), int(b)) for a, b in parse_spec(experts, mm, "experts")]
    layers = decoder_layers(mm)
    # baseline per batch, with every decoder layer's output cached and the experts each layer used
    cache, base, used = [], [], {}
    rec = []

    def keep(i):
        def hook(module, args, out):
            rec[-1][i] = out.detach() if torch.is_tensor(out) else out
        return hook

    def seen(layer):
        def hook(module, args, out):
            used.setdefault(layer, set()).update(RouterOut.of(out).index.reshape(-1).tolist())
        return hook

    sites = {f"L{i}.residual": keep(i) for i in range(len(layers))}
    hooks = mm.hooks({**sites, **{f"L{lay.index}.router": seen(lay.index) for lay in mm.layers}})
    try:
        with torch.inference_mode():
            for b in batches:
                rec.append({})
                logits = mm.model(input_ids=b.ids.to(mm.device), attention_mask=b.mask.to(mm.device),
                                  use_cache=False).logits
                base.append(b.scale * float(_nll_sum(logits, b).double()))
                cache.append(rec[-1])
    finally:
        hooks.remove()
    # padding can reach a router (pad tokens are routed too); count only real tokens' experts
    if any(int(b.mask.min()) == 0 for b in batches):
        used = None

    def run(upto, inter):
        total = 0.0
        with torch.inference_mode(), mm.steer(**inter) if inter else contextlib.nullcontext():
            for b, c in zip(batches, cache):
                with _replaying(layers, c, upto if replay else 0):
                    logits = mm.model(input_ids=b.ids.to(mm.device), attention_mask=b.mask.to(mm.device),
                                      use_cache=False).logits
                total += b.scale * float(_nll_sum(logits, b).double())
        return total

    if replay:  # replaying must reproduce the baseline exactly, else run every layer
        last = max(mm.moe_layers)
        ref = sum(base)
        if abs(run(last, None) - ref) > 1e-6 * max(1.0, abs(ref)):
            replay = False
    base_total = sum(base)
    rows = []
    for layer, e in tqdm(experts, desc="attribution (exact)", disable=not progress, leave=False):
        if used is not None and e not in used.get(layer, ()):
            rows.append((layer, e, 0.0))
            continue
        rows.append((layer, e, run(layer, {"zero": format_spec([(layer, e)])}) - base_total))
    return pl.DataFrame(rows, schema={"layer": pl.Int16, "expert": pl.Int16, "exact": pl.Float64}, orient="row")


# ---------------------------------------------------------------------------------------------
# Both, as a table


def _spearman(a, b) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(spearmanr(a, b).statistic)


def _choose_exact(mm, table: pl.DataFrame, which) -> list[tuple[int, int]]:
    if which is None or which is False or which == 0:
        return []
    if which == "all":
        return [(int(a), int(b)) for a, b in table.select("layer", "expert").iter_rows()]
    if isinstance(which, int):
        top = table.sort(pl.col("estimate").abs(), descending=True).head(which)
        return [(int(a), int(b)) for a, b in top.select("layer", "expert").iter_rows()]
    return [(int(a), int(b)) for a, b in parse_spec(which, mm, "--exact")]


def attribute(mm, data, control=None, exact_experts=None, seq_len: int | None = 128, max_tokens: int | None = 1024,
              batch_size: int = 4, progress: bool = True):
    """Attribution of the objective (module docstring) to every (layer, expert) of `mm`.

    data / control: texts, a dataset name or file, a run (its documents' tokens), or token id lists.
    exact_experts: None (estimate only), "all", an int N (the N largest |estimate|), or a SPEC / list.
    Returns an AnalysisResult: table `experts` (layer, expert, slots, estimate, exact, rank_estimate,
    rank_exact; rank 1 = dropping it hurts most), summary, meta (objective, tokens, spearman).
    """
    from .analysis import AnalysisResult

    batches = make_batches(mm, data, control, seq_len, max_tokens, batch_size)
    eff, slots, base = estimate(mm, batches, progress)
    lays = mm.moe_layers
    tab = pl.DataFrame({"layer": pl.Series(np.repeat(lays, mm.n_experts), dtype=pl.Int16),
                        "expert": pl.Series(np.tile(np.arange(mm.n_experts), len(lays)), dtype=pl.Int16),
                        "slots": slots.reshape(-1), "estimate": eff.reshape(-1)})
    chosen = _choose_exact(mm, tab, exact_experts)
    rho = None
    if chosen:
        ex = exact(mm, batches, chosen, progress)
        tab = tab.join(ex, on=["layer", "expert"], how="left")
        both = tab.filter(pl.col("exact").is_not_null())
        rho = _spearman(both["estimate"], both["exact"])
    else:
        tab = tab.with_columns(pl.lit(None, pl.Float64).alias("exact"))
    tab = tab.with_columns(pl.col("estimate").rank("ordinal", descending=True).cast(pl.Int32).alias("rank_estimate"),
                           pl.col("exact").rank("ordinal", descending=True).cast(pl.Int32).alias("rank_exact"))
    n_tok = int(sum(int(b.mask.sum()) for b in batches if b.scale > 0))
    n_ctl = int(sum(int(b.mask.sum()) for b in batches if b.scale < 0))
    what = "mean NLL(data) - mean NLL(control)" if control is not None else "mean token NLL"
    top = tab.sort("estimate", descending=True).head(5)
    lines = [f"attribution of {what} = {base:.4f} nats ({n_tok} tokens" + (f", control {n_ctl}" if n_ctl else "")
             + f") to {len(lays)} layers x {mm.n_experts} experts (effect of zeroing each; positive = it helps)",
             "largest estimated effects: " + ", ".join(f"L{r['layer']}:E{r['expert']} {r['estimate']:+.4f}"
                                                       for r in top.iter_rows(named=True))]
    if chosen:
        lines.append(f"exact zeroing of {len(chosen)} experts: Spearman rank correlation with the estimate "
                     + (f"{rho:.3f}" if rho is not None else "n/a (constant)"))
    meta = {"objective": what, "baseline": base, "tokens": n_tok, "control_tokens": n_ctl, "spearman": rho,
            "n_exact": len(chosen), "n_experts": mm.n_experts}
    return AnalysisResult("attribution", {"experts": tab}, "experts", "\n".join(lines), meta)


def top_experts(table: pl.DataFrame, n: int, by: str = "estimate") -> list[tuple[int, int]]:
    """[(layer, expert)] of the n largest effects (dropping them hurts the objective most)."""
    t = table.filter(pl.col(by).is_not_null()).sort(by, descending=True).head(n)
    return [(int(a), int(b)) for a, b in t.select("layer", "expert").iter_rows()]


def rank_for_behaviour(mm, target, control=None, n: int = 10, max_tokens: int | None = 2048) -> list[tuple[int, int]]:
    """The behaviour map's alternative to frequency: the n experts whose (estimated) removal raises the
    target prompts' NLL most relative to the control's. Prompts are whole texts (no packing)."""
    res = attribute(mm, target, control, None, seq_len=None, max_tokens=max_tokens, progress=False)
    return top_experts(res.table, n)


def behaviour_top(run, mm, target_docs, control_docs, n: int, max_tokens: int | None = 4096) -> list[tuple[int, int]]:
    """`rank_for_behaviour` on a run's documents (the behaviour map's fit prompts): target vs control."""
    from .analysis.common import doc_token_ids

    ids = doc_token_ids(run, [int(d) for d in target_docs] + [int(d) for d in control_docs])
    tgt = [ids[int(d)] for d in target_docs if int(d) in ids]
    ctl = [ids[int(d)] for d in control_docs if int(d) in ids]
    if not tgt:
        raise WorkbenchError("no target prompts to attribute on")
    return rank_for_behaviour(mm, tgt, ctl or None, n, max_tokens)


# ---------------------------------------------------------------------------------------------
# Analysis interface (workbench.analysis MODULES "attribution": the run's own tokens)


def analyze(run, model=None, control_label: str | None = None, exact_experts=None, max_tokens: int | None = 2048,
            batch_size: int = 4, progress: bool = False):
    """Attribution on a run's documents (their token ids). Needs the live model: `model` is a MoEModel
    or a spec; it is never loaded implicitly (an export of "all analyses" must not run a model).
    control_label="COL=VALUE": documents with that label are the control, the rest the data."""
    from .models.loading import MoEModel, load_model

    if model is None:
        raise WorkbenchError("attribution runs the model: pass model= (the app's experts page uses the live model)")
    mm = model if isinstance(model, MoEModel) else load_model(str(model))
    if list(mm.moe_layers) != list(run.moe_layers) or mm.n_experts != run.n_experts:
        raise WorkbenchError(f"model {mm.spec} is not the model of run {run.path} (MoE layers or experts differ)")
    data, control = run, None
    if control_label:
        from .analysis.common import doc_labels, doc_token_ids

        col, _, val = control_label.partition("=")
        lab = doc_labels(run, [col])
        is_c = lab[col].cast(pl.Utf8) == val
        if not is_c.any() or is_c.all():
            raise WorkbenchError(f"--control {control_label}: needs documents on both sides")
        ids = doc_token_ids(run)
        data = [ids[d] for d in lab.filter(~is_c)["doc_id"].to_list() if d in ids]
        control = [ids[d] for d in lab.filter(is_c)["doc_id"].to_list() if d in ids]
    return attribute(mm, data, control, exact_experts, seq_len=None, max_tokens=max_tokens, batch_size=batch_size,
                     progress=progress)


def figures(result) -> dict:
    import plotly.graph_objects as go

    t = result.tables["experts"]
    figs = {}
    piv = t.pivot(on="expert", index="layer", values="estimate", sort_columns=True).sort("layer")
    cols = sorted([c for c in piv.columns if c != "layer"], key=int)
    z = piv.select(cols).to_numpy()
    lim = float(np.nanmax(np.abs(z))) if z.size and np.isfinite(z).any() else 1.0
    figs["attribution"] = go.Figure(go.Heatmap(z=z, x=cols, y=piv["layer"].to_list(), colorscale="RdBu_r", zmid=0,
                                               zmin=-lim, zmax=lim, colorbar={"title": "nats"}))
    figs["attribution"].update_layout(title="Estimated effect of zeroing each expert on the loss (positive = it helps)",
                                      xaxis_title="expert", yaxis_title="layer", xaxis_type="category",
                                      template="plotly_white")
    both = t.filter(pl.col("exact").is_not_null())
    if both.height:
        rho = result.meta.get("spearman")
        fig = go.Figure(go.Scatter(x=both["estimate"].to_list(), y=both["exact"].to_list(), mode="markers",
                                   text=[f"L{a}:E{b}" for a, b in both.select("layer", "expert").iter_rows()]))
        fig.update_layout(title="First-order estimate vs exact zeroing" + (f" (Spearman {rho:.3f})" if rho is not None
                                                                           else ""),
                          xaxis_title="estimate (nats)", yaxis_title="exact (nats)", template="plotly_white")
        figs["estimate_vs_exact"] = fig
    return figs


def add_arguments(p) -> None:
    p.add_argument("--model", help="model (default: the run's)")
    p.add_argument("--control", metavar="COL=VALUE", help="documents with this label are the control")
    p.add_argument("--exact", help="also zero experts one by one: N (largest estimates), 'all', or a SPEC")
    p.add_argument("--max-tokens", type=int, default=2048)


def options_from_args(a) -> dict:
    return dict(model=a.model, control_label=a.control, exact_experts=_exact_arg(a.exact), max_tokens=a.max_tokens,
                progress=True)


def _exact_arg(v):
    if v is None:
        return None
    if v == "all":
        return "all"
    if v.isdigit():
        return int(v)
    return v


def attribute_command(model: str, data: str, where=None, control: str | None = None, control_where=None,
                      limit: int | None = None, exact: str | None = None, max_tokens: int | None = 1024,
                      seq_len: int | None = 128, batch_size: int = 4, out: str | None = None,
                      device: str | None = None, dtype: str | None = None) -> None:
    """`workbench attribute MODEL --data DATA [--control DATA] [--exact N|all|SPEC] [--out FILE]`."""
    from .analysis import write_table
    from .data import load_dataset, parse_where, subset
    from .models.loading import load_model

    def data_of(name, where):
        ds = load_dataset(name)
        if where or limit:
            ds = subset(ds, where=parse_where(where), limit=limit)
        return ds

    target = data_of(data, where)
    contrast = data_of(control, control_where) if control else None
    if max_tokens is not None and max_tokens < 2:
        raise WorkbenchError("--max-tokens must be at least 2")
    device = device or ("cuda" if torch.cuda.is_available() else None)
    mm = load_model(model, device=device, dtype=dtype)
    res = attribute(mm, target, contrast, _exact_arg(exact), seq_len=seq_len or None,
                    max_tokens=max_tokens, batch_size=batch_size)
    print(res.summary)
    if out:
        write_table(res.table, out)
        print(f"wrote {res.table.height} rows to {out}")


__all__ = ["Batch", "analyze", "attribute", "estimate", "exact", "figures", "make_batches", "objective",
           "rank_for_behaviour", "top_experts"]
