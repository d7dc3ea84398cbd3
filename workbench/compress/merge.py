"""Expert merging into a real checkpoint, M-SMoE / HC-SMoE style (no retraining).

Per MoE layer, keeping n = E - round(ratio * E) experts:
1. dominant experts: the n most frequently routed in the run (M-SMoE's "dominant by frequency");
   protected experts are always dominant and absorb nobody.
2. grouping: every other expert joins the dominant expert it is most similar to, by cosine similarity of
   - "output" (HC-SMoE): the expert's mean output over calibration tokens (every expert evaluated on the
     same tokens, the run's documents, through the experts module itself), or
   - "weight": its flattened expert weights (all expert-indexed tensors of the experts module).
3. merging: each group's expert tensors become their frequency-weighted average,
   W = sum_i f_i W_i / sum_i f_i (f_i = routed slots in the run; a group nobody was routed to averages
   uniformly). No neuron permutation alignment (M-SMoE's weight matching) is done.
4. router: "dominant" (default) keeps the dominant expert's router row (and its bias / correction bias)
   and drops the others, as M-SMoE and REAP's merging do: tokens that chose a merged-away expert now go
   wherever the router sends them among the survivors. "average" gives the merged expert the
   frequency-weighted average of its group's router rows.

The checkpoint is written like a pruned one, with merging.json (groups in original expert ids, the
frequencies, the similarity and router choices). A merged model is never the base model with a ban:
`workbench evaluate` measures it.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from ..errors import WorkbenchError
from ..models.hooks import register
from ..probes.interventions import format_spec
from .prune import router_facts, n_remove_for, protected_experts, rewrite_experts, save_checkpoint

SIMILARITY = ("output", "weight")
ROUTER = ("dominant", "average")


def weight_features(mm, layer) -> torch.Tensor:
    """[E, D] flattened expert-indexed tensors of the layer's experts module (float64)."""
    E = mm.n_experts
    parts = [t.detach().reshape(E, -1).double().cpu() for t in list(layer.experts.parameters()) + list(layer.experts.buffers())
             if t.ndim >= 1 and t.shape[0] == E]
    return torch.cat(parts, 1)


def output_features(mm, layer, hidden: torch.Tensor) -> torch.Tensor:
    """[E, H] mean output of every expert over `hidden` [T, H] (the experts module's own code, weight 1)."""
    T = hidden.shape[0]
    out = []
    with torch.inference_mode():
        ones = torch.ones(T, 1, dtype=hidden.dtype, device=hidden.device)
        for e in range(mm.n_experts):
            idx = torch.full((T, 1), e, dtype=torch.long, device=hidden.device)
            y = layer.experts(hidden, idx, ones)
            out.append(y.double().mean(0).cpu())
    return torch.stack(out)


def experts_inputs(mm, token_ids: list, max_tokens: int = 512) -> dict[int, torch.Tensor]:
    """{layer: [T, H]} inputs of each MoE layer's experts module on the given token sequences."""
    got: dict[int, list] = {lay.index: [] for lay in mm.layers}

    def keep(layer):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            got[layer].append(h.detach().reshape(-1, h.shape[-1]))
        return hook

    hs = [register(mm, f"L{lay.index}.experts.in", keep(lay.index)) for lay in mm.layers]
    n = 0
    try:
        with torch.inference_mode():
            for ids in token_ids:
                if n >= max_tokens:
                    break
                ids = list(ids)[: max_tokens - n]
                mm.model(input_ids=torch.as_tensor([ids], device=mm.device), use_cache=False)
                n += len(ids)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v)[:max_tokens] for k, v in got.items() if v}


def group(freq: np.ndarray, sim: np.ndarray, n_keep: int, protect: set[int] = frozenset()) -> list[list[int]]:
    """M-SMoE grouping of one layer: [[dominant, members...], ...] sorted by dominant id.

    freq [E]: routed slots; sim [E, E]: similarity (higher = closer). Dominants: protected experts, then
    the most frequent (ties: lower id). Each other expert joins its most similar non-protected dominant
    (ties: lower id).
    """
    E = len(freq)
    if len(protect) > n_keep:
        raise WorkbenchError(f"{len(protect)} protected experts in a layer that keeps only {n_keep}")
    order = sorted(range(E), key=lambda e: (e not in protect, -freq[e], e))
    dom = sorted(order[:n_keep])
    takers = [d for d in dom if d not in protect]
    if not takers and n_keep < E:
        raise WorkbenchError("every kept expert is protected, so the removed ones have nowhere to merge")
    groups = {d: [d] for d in dom}
    for e in range(E):
        if e in groups:
            continue
        best = max(takers, key=lambda d: (sim[e, d], -d))
        groups[best].append(e)
    return [groups[d] for d in dom]


def _cosine(x: torch.Tensor) -> np.ndarray:
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return (x @ x.T).numpy()


def merge(model, run, ratio: float, similarity: str = "output", router: str = "dominant", out=None, protect=None,
          max_tokens: int = 512, dtype="auto", device=None, overwrite: bool = False, progress: bool = True):
    """Merge `model`'s experts (module docstring) using the run's frequencies; with `out`, save the checkpoint
    and merging.json. Returns (MoEModel merged, info)."""
    from tqdm.auto import tqdm

    from ..analysis.common import doc_token_ids
    from ..models.loading import MoEModel, load_model
    from ..store import Run, open_run
    from .saliency import frequency

    if similarity not in SIMILARITY:
        raise WorkbenchError(f"unknown similarity {similarity!r}; choose output or weight")
    if router not in ROUTER:
        raise WorkbenchError(f"unknown router rule {router!r}; choose dominant or average")
    run = run if isinstance(run, Run) else open_run(run)
    mm = model if isinstance(model, MoEModel) else load_model(str(model), dtype=dtype, device=device)
    facts = router_facts(mm)
    if facts["n_group"] > 1:
        raise WorkbenchError("merging would mix experts of different groups of group-limited routing (n_group > 1); "
                             "prune instead, which removes the same number from every group")
    E, K = mm.n_experts, mm.top_k
    if run.n_experts != E or list(run.moe_layers) != list(mm.moe_layers):
        raise WorkbenchError(f"run {run.path} is not a capture of every MoE layer of this model")
    n = n_remove_for(ratio, E)
    if E - n < K:
        raise WorkbenchError(f"--ratio {ratio:g} merges {E} experts into {E - n} per layer, fewer than the {K} each "
                             f"token uses; the largest ratio is {(E - K) / E:g}")
    prot = protected_experts(protect, run)
    freq = frequency(run)
    inputs = None
    if similarity == "output":
        ids = list(doc_token_ids(run).values())
        if not ids:
            raise WorkbenchError(f"run {run.path} has no documents to compute expert outputs on")
        inputs = experts_inputs(mm, ids, max_tokens)
    info_layers, emix, rmix = {}, {}, {}
    for lay in tqdm(mm.layers, desc="merge", unit="layer", disable=not progress, leave=False):
        f = freq.filter(pl.col("layer") == lay.index).sort("expert")["score"].to_numpy().astype(np.float64)
        feats = output_features(mm, lay, inputs[lay.index]) if inputs is not None else weight_features(mm, lay)
        sim = _cosine(feats)
        groups = group(f, sim, E - n, {e for layer_, e in prot if layer_ == lay.index})
        em = torch.zeros(len(groups), E, dtype=torch.float64)
        rm = torch.zeros(len(groups), E, dtype=torch.float64)
        for i, g in enumerate(groups):
            w = f[g] if f[g].sum() > 0 else np.ones(len(g))
            em[i, g] = torch.as_tensor(w / w.sum())
            if router == "dominant":
                rm[i, g[0]] = 1.0
            else:
                rm[i, g] = em[i, g]
        emix[lay.index], rmix[lay.index] = em, rm
        info_layers[str(lay.index)] = {"groups": groups, "frequency": f.tolist(),
                                       "kept": [g[0] for g in groups]}
    info = {"file": "merging.json", "method": "merge", "criterion": f"merge-{similarity}", "ratio": ratio,
            "similarity": similarity, "router": router, "protected": format_spec(sorted(prot)),
            "base_model": {"spec": mm.spec, "path": mm.path, "file_hashes": mm.file_hashes}, "run": str(run.path),
            "n_experts_before": E, "n_experts_after": E - n, "top_k": K, "routing_rule": facts["rule"],
            "equals_ban": False, "exactness": "a merged model is not the base model with a ban; evaluate measures it",
            "calibration_tokens": int(next(iter(inputs.values())).shape[0]) if inputs else None,
            "layers": info_layers}
    rewrite_experts(mm, emix, rmix)
    if out is not None:
        save_checkpoint(mm, out, info, overwrite)
    return mm, info


__all__ = ["group", "merge", "output_features", "weight_features"]
