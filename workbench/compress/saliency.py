"""Expert saliency: one score per (layer, expert), higher = keep. Pruning removes the lowest.

- frequency: routed slots per expert (tokens that selected it) in the run.
- reap: REAP (Lasby et al., arXiv 2510.13999), router-weighted expert activation pruning:
  S_j = (1 / |X_j|) * sum over tokens x in X_j of g_j(x) * ||f_j(x)||_2, with X_j the tokens routed to
  expert j, g_j(x) the routing weight the model applied and f_j(x) the expert's output before it.
  The mean (not the sum) over X_j is the paper's normalisation; an expert no token reached scores 0.
  Read from the run's `expert_stats` table (`weight`, `out_l2` per routed slot) when it has one, else
  computed with the model on the run's documents (reap_from_model).
- attribution: the magnitude of the causal effect on the loss of zeroing the expert (workbench.attribution;
  first-order estimate, or exact zeroing), nats per token: the experts whose removal changes the loss least
  go first.
- random: seeded uniform scores (the control every paper uses).

Every function returns a polars frame layer (Int16), expert (Int16), score (Float64), with every expert
of every MoE layer of the run (missing experts score 0, e.g. never routed).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from ..errors import WorkbenchError

CRITERIA = ("frequency", "reap", "attribution", "random")
_SCHEMA = {"layer": pl.Int16, "expert": pl.Int16, "score": pl.Float64}


def _grid(layers, n_experts: int) -> pl.DataFrame:
    return pl.DataFrame({"layer": np.repeat(np.asarray(layers, np.int64), n_experts),
                         "expert": np.tile(np.arange(n_experts), len(layers))}).cast({"layer": pl.Int16,
                                                                                     "expert": pl.Int16})


def _on_grid(run, df: pl.DataFrame) -> pl.DataFrame:
    g = _grid(run.moe_layers, run.n_experts)
    return (g.join(df.cast({"layer": pl.Int16, "expert": pl.Int16}), on=["layer", "expert"], how="left")
            .with_columns(pl.col("score").fill_null(0.0).cast(pl.Float64)).select("layer", "expert", "score")
            .sort("layer", "expert"))


def frequency(run) -> pl.DataFrame:
    """Routed slots per (layer, expert) in the run's routing table (prefill and decode tokens)."""
    if not run.has("routing"):
        raise WorkbenchError(f"run {run.path} has no routing table; capture it with --probes routing")
    df = (run.routing.select("layer", "experts").explode("experts").rename({"experts": "expert"})
          .filter(pl.col("expert") >= 0).group_by("layer", "expert").agg(pl.len().cast(pl.Float64).alias("score"))
          .collect())
    return _on_grid(run, df)


def reap(run) -> pl.DataFrame:
    """REAP saliency from `expert_stats` (module docstring): mean over routed slots of weight * out_l2."""
    if not run.has("expert_stats"):
        raise WorkbenchError(f"run {run.path} has no expert_stats table, which REAP needs (routing weight and "
                             "expert output norm per token); capture with --probes routing,experts, or give the "
                             "model to compute it on the run's documents")
    lf = run.expert_stats
    names = lf.collect_schema().names()
    missing = [c for c in ("weight", "out_l2") if c not in names]
    if missing:
        raise WorkbenchError(f"run {run.path}: expert_stats lacks {', '.join(missing)}; recapture with --probes "
                             "routing,experts")
    df = (lf.filter(pl.col("expert") >= 0)  # the shared expert (-1) is never pruned
          .group_by("layer", "expert")
          .agg((pl.col("weight").cast(pl.Float64) * pl.col("out_l2").cast(pl.Float64)).mean().alias("score"))
          .collect())
    return _on_grid(run, df)


_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "topk_weights")


def reap_from_model(run, model, max_tokens: int | None = 4096, progress: bool = False) -> pl.DataFrame:
    """REAP without an expert_stats table: the run's documents (one at a time, no padding) through the
    model; a pre-hook on each experts module takes the tokens routed to each expert and runs that expert on
    them (the module's own forward, weight 1) for ||f_j(x)||_2, times the routing weight it received."""
    import torch
    from tqdm.auto import tqdm

    from ..analysis.common import doc_token_ids

    mm = model
    E = mm.n_experts
    num = {lay: np.zeros(E) for lay in mm.moe_layers}
    cnt = {lay: np.zeros(E) for lay in mm.moe_layers}

    def hook(layer):
        def pre(module, args, kwargs):
            if len(args) >= 3:
                h, idx, w = args[0], args[1], args[2]
            else:
                h = args[0] if args else kwargs["hidden_states"]
                idx = args[1] if len(args) > 1 else kwargs[next(n for n in _INDEX_NAMES if n in kwargs)]
                w = kwargs[next(n for n in _WEIGHT_NAMES if n in kwargs)]
            h = h.reshape(-1, h.shape[-1])
            idx, w = idx.reshape(h.shape[0], -1), w.reshape(h.shape[0], -1)
            for e in idx.unique().tolist():
                if not 0 <= e < E:
                    continue  # zero-compute experts (ids >= E) have no weights
                t, k = (idx == e).nonzero(as_tuple=True)
                one = torch.ones(len(t), 1, dtype=w.dtype, device=w.device)
                y = module.forward(h[t], torch.full((len(t), 1), e, dtype=idx.dtype, device=idx.device), one)
                num[layer][e] += float((w[t, k].double() * y.double().norm(dim=-1)).sum())
                cnt[layer][e] += len(t)
        return pre

    handles = [lay.experts.register_forward_pre_hook(hook(lay.index), with_kwargs=True) for lay in mm.layers]
    budget = max_tokens or float("inf")
    try:
        with torch.inference_mode():
            for ids in tqdm(list(doc_token_ids(run).values()), desc="REAP", disable=not progress, leave=False):
                if budget <= 0:
                    break
                ids = ids[: int(min(len(ids), budget))]
                budget -= len(ids)
                mm.model(input_ids=torch.as_tensor(np.asarray(ids, np.int64)[None], device=mm.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = [(lay, e, num[lay][e] / cnt[lay][e] if cnt[lay][e] else 0.0) for lay in mm.moe_layers for e in range(E)]
    return _on_grid(run, pl.DataFrame(rows, schema=_SCHEMA, orient="row"))


def random_scores(run, seed: int = 0) -> pl.DataFrame:
    """Uniform [0, 1) scores from numpy's default_rng(seed), layer-major, expert order."""
    g = _grid(run.moe_layers, run.n_experts)
    rng = np.random.default_rng(seed)
    return g.with_columns(pl.Series("score", rng.random(g.height), dtype=pl.Float64))


def attribution(run, model, exact: bool = False, max_tokens: int | None = 2048, progress: bool = False,
                signed: bool = False) -> pl.DataFrame:
    """|effect| on the mean token NLL of the run's documents of zeroing each expert (workbench.attribution):
    the first-order estimate, or with exact=True one zeroed forward per expert (slow on big models).

    The magnitude, as Taylor-importance pruning (Molchanov et al.) ranks: an expert whose zeroing lowers the
    calibration loss still changes the model. signed=True keeps the sign (then the lowest scores are the
    experts whose removal looks helpful; on the demo model that removes heavily used experts and costs more
    than random removal, see docs/guides/compress.md)."""
    from ..attribution import analyze

    res = analyze(run, model=model, exact_experts="all" if exact else None, max_tokens=max_tokens,
                  progress=progress)
    col = pl.col("exact" if exact else "estimate")
    return _on_grid(run, res.tables["experts"].select("layer", "expert", (col if signed else col.abs()).alias("score")))


def scores(run, by: str, model=None, seed: int = 0, exact: bool = False, max_tokens: int | None = 2048,
           progress: bool = False, signed: bool = False) -> pl.DataFrame:
    """The saliency table of criterion `by` (one of CRITERIA)."""
    if by == "frequency":
        return frequency(run)
    if by == "reap":
        if not run.has("expert_stats") and model is not None:
            return reap_from_model(run, model, max_tokens=max_tokens, progress=progress)
        return reap(run)
    if by == "random":
        return random_scores(run, seed)
    if by == "attribution":
        if model is None:
            raise WorkbenchError("--by attribution runs the model on the run's documents: give the model")
        return attribution(run, model, exact=exact, max_tokens=max_tokens, progress=progress, signed=signed)
    raise WorkbenchError(f"unknown criterion {by!r}; choose one of {', '.join(CRITERIA)}")


__all__ = ["CRITERIA", "attribution", "frequency", "random_scores", "reap", "reap_from_model", "scores"]
