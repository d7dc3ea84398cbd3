"""Expert pruning into a real checkpoint: remove the least salient routed experts of every MoE layer.

What is rewritten, per MoE layer: every parameter and buffer of the router and of the fused experts
module whose first dimension is the expert count (router rows and biases, DeepSeek-V3's
`e_score_correction_bias`, gpt-oss expert biases, the 3-D `gate_up_proj` / `down_proj`), plus the
config's expert-count keys. Shared experts and dense layers are untouched. The result is saved with
`save_pretrained` and loads with plain `AutoModelForCausalLM.from_pretrained`.

A transformers config has one expert count for all layers, so a non-uniform plan (`per_layer="global"`)
physically removes, in every layer, as many experts as the least-pruned layer loses; the layers that
should lose more keep those experts in the weights and list them under `ban_after_load` in
`pruning.json` (a `--ban` plan on the pruned checkpoint's expert ids). The `ban` field is the whole
plan as a run-time ban on the base model, for users who would rather mask than rewrite.

Exactness (routing rule by family, see EXACTNESS): where the kept top-k weights are renormalised
(Mixtral; Qwen/OLMoE with norm_topk_prob), or the softmax runs over the top-k only (gpt-oss, granite),
the pruned checkpoint computes the same function as the base model with the removed experts banned.
Where the softmax runs over all experts and the top-k weights are not renormalised (OLMoE,
Qwen2-MoE, DeepSeek-V2), removing router rows raises every kept weight by 1 / (1 - removed
probability mass): the outputs differ, and `workbench evaluate` measures by how much.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ..errors import WorkbenchError
from ..models.families import (
    DEEPSEEK_V2,
    SIGMOID_BIAS_GROUP,
    SOFTMAX_TOPK,
    SOFTMAX_TOPK_RENORM,
    SPARSEMIXER,
    TOPK_SOFTMAX,
)
from ..probes.interventions import format_spec, parse_spec

PER_LAYER = ("uniform", "global")
_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "out_features")


# ---------------------------------------------------------------------------------------------
# What the family's routing rule lets us promise


def exactness(rule: str, norm_topk_prob: bool, n_group: int = 1) -> tuple[bool, str]:
    """(pruned checkpoint == base model with the removed experts banned?, one sentence why)."""
    if rule == SOFTMAX_TOPK_RENORM or (rule == SOFTMAX_TOPK and norm_topk_prob):
        return True, ("the top-k weights are renormalised over the chosen experts, so the softmax denominator "
                      "cancels: pruned logits equal the base model's with these experts banned")
    if rule == TOPK_SOFTMAX:
        return True, ("the softmax runs over the chosen top-k logits only, so removed rows never enter it: pruned "
                      "logits equal the base model's with these experts banned")
    if rule == SPARSEMIXER:
        return True, ("the sparsemixer's masks and softmaxes skip banned experts as if absent: pruned logits equal "
                      "the base model's with these experts banned")
    if rule == SIGMOID_BIAS_GROUP:
        if n_group <= 1:
            return True, ("sigmoid scores are per expert: pruned logits equal the base model's with these experts "
                          "banned")
        return False, ("sigmoid scores are per expert, but group scores are recomputed over the kept experts: the "
                       "pruned model equals a ban applied before group selection, while the run-time --ban "
                       "(workbench steer) applies it after; they differ where a removed expert was among its "
                       "group's top two")
    if rule in (SOFTMAX_TOPK, DEEPSEEK_V2):
        return False, ("the softmax runs over all experts and the top-k weights are not renormalised, so removing "
                       "router rows raises every kept weight by 1/(1 - removed probability mass): the pruned model "
                       "is not the base model with these experts banned (workbench evaluate measures the gap)")
    return False, f"routing rule {rule!r}: no exactness claim"


def router_facts(mm) -> dict:
    cfg = mm.model.config
    rule = mm.family.rule
    r = mm.layers[0].router
    n_group = int(getattr(r, "num_group", None) or getattr(cfg, "n_group", None) or 1)
    grouped = n_group > 1 and (rule == SIGMOID_BIAS_GROUP or
                               (rule == DEEPSEEK_V2 and getattr(cfg, "topk_method", "greedy") == "group_limited_greedy"))
    norm = bool(getattr(r, "norm_topk_prob", None) if getattr(r, "norm_topk_prob", None) is not None
                else getattr(cfg, "norm_topk_prob", False))
    return {"rule": rule, "norm_topk_prob": norm, "n_group": n_group if grouped else 1,
            "topk_group": int(getattr(cfg, "topk_group", 1) or 1) if grouped else 1}


# ---------------------------------------------------------------------------------------------
# Choosing the experts


def super_experts(run) -> list[tuple[int, int]]:
    """The run's super experts (Su et al.'s rule, workbench.analysis.super_experts), routed ones only."""
    from ..analysis.super_experts import expert_max, find_super_experts

    n_layers = int(run.model_info.get("n_layers") or (max(run.moe_layers) + 1))
    ranked, _ = find_super_experts(expert_max(run), n_layers)
    ses = ranked.filter(pl.col("is_super_expert") & (pl.col("expert") >= 0))
    return [(int(a), int(b)) for a, b in ses.select("layer", "expert").iter_rows()]


def protected_experts(protect, run=None) -> list[tuple[int, int]]:
    """`protect`: None, "super-experts", a SPEC ("L1:E3,..."), or both comma-joined, or a list of pairs."""
    if protect is None or protect == "" or protect == []:
        return []
    if isinstance(protect, str):
        items = [s.strip() for s in protect.split(",") if s.strip()]
        out = []
        rest = [s for s in items if s.lower() not in ("super-experts", "super_experts")]
        if len(rest) < len(items):
            if run is None:
                raise WorkbenchError("--protect super-experts needs the run (its expert_stats table)")
            out += super_experts(run)
        out += parse_spec(",".join(rest), None, "--protect") if rest else []
        return list(dict.fromkeys(out))
    return parse_spec(protect, None, "--protect")


def n_remove_for(ratio: float, n_experts: int) -> int:
    """Experts removed per layer for a ratio: round(ratio * E), half up (12.5% of 64 = 8)."""
    if not 0 <= ratio < 1:
        raise WorkbenchError(f"--ratio must be in [0, 1), got {ratio:g}")
    return int(math.floor(ratio * n_experts + 0.5))


def choose(scores: pl.DataFrame, ratio: float, n_experts: int, top_k: int, protect=(), per_layer: str = "uniform",
           n_group: int = 1, topk_group: int = 1, normalise: bool = True) -> dict[int, list[int]]:
    """{layer: sorted expert ids to remove}: the lowest scores, never a protected expert.

    uniform: round(ratio * E) per layer; with group-limited routing (n_group > 1) the same number in every
    group, so each group keeps E / n_group - n / n_group experts. global: round(ratio * E * layers) in all,
    lowest first across layers, at most E - top_k in a layer; scores are compared across layers after
    dividing by the layer's mean |score| when `normalise` (frequency and REAP scales differ per layer;
    attribution is already in nats). Ties: lower score first, then lower expert id.
    """
    if per_layer not in PER_LAYER:
        raise WorkbenchError(f"unknown per-layer mode {per_layer!r}; choose uniform or global")
    n = n_remove_for(ratio, n_experts)
    prot = {(int(a), int(b)) for a, b in protect}
    layers = sorted(int(x) for x in scores["layer"].unique().to_list())
    bad = sorted(p for p in prot if p[0] not in layers or not 0 <= p[1] < n_experts)
    if bad:
        raise WorkbenchError(f"--protect {format_spec(bad[:1])} is not a routed expert of an MoE layer of this model")
    if n_experts - n < top_k:
        raise WorkbenchError(f"--ratio {ratio:g} removes {n} of {n_experts} experts per layer, leaving fewer than the "
                             f"{top_k} each token uses; the largest ratio is {(n_experts - top_k) / n_experts:g}")
    out: dict[int, list[int]] = {}
    if per_layer == "uniform":
        for layer in layers:
            s = scores.filter(pl.col("layer") == layer).sort("expert")["score"].to_numpy().astype(np.float64)
            if n_group > 1:
                out[layer] = _choose_grouped(s, n, n_group, topk_group, top_k, {e for lay, e in prot if lay == layer},
                                             layer)
                continue
            order = [e for e in np.lexsort((np.arange(n_experts), s)) if (layer, int(e)) not in prot]
            if len(order) < n:
                raise WorkbenchError(f"layer {layer}: {n_experts - len(order)} protected experts leave only "
                                     f"{len(order)} to remove, fewer than the {n} asked")
            out[layer] = sorted(int(e) for e in order[:n])
        return out
    if n_group > 1:
        raise WorkbenchError("a global (non-uniform) budget would unbalance the expert groups of group-limited "
                             "routing (n_group > 1); use the uniform per-layer ratio")
    total = n * len(layers)
    cand = []
    for layer in layers:
        s = scores.filter(pl.col("layer") == layer).sort("expert")["score"].to_numpy().astype(np.float64)
        scale = float(np.mean(np.abs(s))) if normalise else 1.0
        s = s / scale if scale > 0 else s
        cand += [(float(s[e]), layer, e) for e in range(n_experts) if (layer, e) not in prot]
    cand.sort()
    cap = n_experts - top_k
    counts = dict.fromkeys(layers, 0)
    for _, layer, e in cand:
        if sum(counts.values()) >= total:
            break
        if counts[layer] < cap:
            out.setdefault(layer, []).append(e)
            counts[layer] += 1
    if sum(counts.values()) < total:
        raise WorkbenchError(f"the protected experts and the top-k ({top_k}) leave only {sum(counts.values())} experts "
                             f"to remove, fewer than the {total} asked")
    return {layer: sorted(out.get(layer, [])) for layer in layers}


def _choose_grouped(s, n, n_group, topk_group, top_k, prot, layer) -> list[int]:
    size = len(s) // n_group
    if n % n_group:
        raise WorkbenchError(f"group-limited routing (n_group={n_group}) needs the same number of experts removed from "
                             f"every group: remove a multiple of {n_group} per layer (this ratio removes {n})")
    per = n // n_group
    if size - per < 2:
        raise WorkbenchError(f"group-limited routing scores each group by its top two experts: keep at least 2 of the "
                             f"{size} experts per group (this ratio keeps {size - per})")
    if (size - per) * topk_group < top_k:
        raise WorkbenchError(f"each token chooses {top_k} experts within {topk_group} group(s): keep at least "
                             f"{math.ceil(top_k / topk_group)} experts per group (this ratio keeps {size - per})")
    out = []
    for g in range(n_group):
        ids = np.arange(g * size, (g + 1) * size)
        order = [int(ids[i]) for i in np.lexsort((ids, s[ids])) if int(ids[i]) not in prot]
        if len(order) < per:
            raise WorkbenchError(f"layer {layer}, group {g}: protected experts leave fewer than {per} to remove")
        out += order[:per]
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Rewriting the weights


def rewrite_experts(mm, experts_mix: dict[int, torch.Tensor], router_mix: dict[int, torch.Tensor] | None = None) -> None:
    """Replace each MoE layer's experts by combinations of the old ones, in place.

    experts_mix[layer]: [n_new, E] float (row i says how new expert i mixes the old experts' weights);
    router_mix[layer] the same for router rows (default: experts_mix). A one-hot row copies the old
    expert exactly (index_select, no arithmetic). Updates module counts, mm.n_experts and the config.
    """
    E = mm.n_experts
    news = {int(m.shape[0]) for m in experts_mix.values()}
    if len(news) != 1 or set(experts_mix) != set(mm.moe_layers):
        raise WorkbenchError("every MoE layer must keep the same number of experts (a transformers config has one "
                             "expert count)")
    n_new = news.pop()
    if n_new < mm.top_k:
        raise WorkbenchError(f"{n_new} experts per layer is fewer than the {mm.top_k} each token uses")
    router_mix = router_mix or experts_mix
    with torch.no_grad():
        for lay in mm.layers:
            for mods, mix in ((list(lay.experts.modules()), experts_mix[lay.index]),
                              (list(lay.router.modules()), router_mix[lay.index])):
                for mod in mods:
                    for name, t in list(mod.named_parameters(recurse=False)):
                        if t.ndim >= 1 and t.shape[0] == E:
                            setattr(mod, name, torch.nn.Parameter(_mix(t.data, mix), requires_grad=t.requires_grad))
                    for name, b in list(mod.named_buffers(recurse=False)):
                        if b.ndim >= 1 and b.shape[0] == E:
                            mod._buffers[name] = _mix(b, mix)
                    for attr in _COUNT_ATTRS:
                        if getattr(mod, attr, None) == E and not isinstance(getattr(mod, attr), bool):
                            setattr(mod, attr, n_new)
    cfg = mm.model.config
    for key in mm.family.n_experts_keys + ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) == E:
            setattr(cfg, key, n_new)
    mm.n_experts = n_new


def _mix(t: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    mix = mix.to(torch.float64)
    onehot = bool(((mix == 0) | (mix == 1)).all()) and bool((mix.sum(1) == 1).all())
    if onehot:
        return t.index_select(0, mix.argmax(1).to(t.device)).clone()
    flat = t.reshape(t.shape[0], -1).to(torch.float64)
    return (mix.to(t.device) @ flat).reshape((mix.shape[0],) + tuple(t.shape[1:])).to(t.dtype)


def selection(keep: list[int], n_experts: int) -> torch.Tensor:
    m = torch.zeros(len(keep), n_experts)
    m[torch.arange(len(keep)), torch.as_tensor(keep)] = 1.0
    return m


def save_checkpoint(mm, out, info: dict, overwrite: bool = False) -> Path:
    """save_pretrained + tokenizer + the json `info` (pruning.json / merging.json, named by info['file'])."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file, not a folder")
    if (out / "config.json").exists() and not overwrite:
        raise WorkbenchError(f"--out {out} already holds a model; choose another folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    mm.model.save_pretrained(out)
    if mm.tokenizer is not None:
        mm.tokenizer.save_pretrained(out)
    name = info.get("file", "pruning.json")
    (out / name).write_text(json.dumps(info, indent=1) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# The whole job


def plan(run, by: str, ratio: float, n_experts: int, top_k: int, model=None, protect=None, per_layer: str = "uniform",
         seed: int = 0, exact: bool = False, max_tokens: int | None = 2048, n_group: int = 1, topk_group: int = 1,
         progress: bool = False, scores: pl.DataFrame | None = None) -> dict:
    """Scores, protected experts and the removal per layer (no weights touched)."""
    from .saliency import scores as saliency

    if run.n_experts != n_experts:
        raise WorkbenchError(f"run {run.path} has {run.n_experts} experts per layer, the model {n_experts}: "
                             "it is not a run of this model")
    prot = protected_experts(protect, run)
    sc = scores if scores is not None else saliency(run, by, model=model, seed=seed, exact=exact,
                                                    max_tokens=max_tokens, progress=progress)
    removed = choose(sc, ratio, n_experts, top_k, prot, per_layer, n_group, topk_group,
                     normalise=by != "attribution")
    return {"scores": sc, "protected": prot, "removed": removed}


def prune(model, run, ratio: float, by: str = "reap", out=None, protect=None, per_layer: str = "uniform",
          seed: int = 0, exact: bool = False, max_tokens: int | None = 2048, dtype="auto", device=None,
          overwrite: bool = False, progress: bool = True, scores: pl.DataFrame | None = None):
    """Prune `model` (spec or MoEModel, rewritten in place when given) by the run's saliency; with `out`,
    save the checkpoint and pruning.json. Returns (MoEModel pruned, info dict).

    scores: a saliency table of criterion `by` computed before (saliency.scores), reused instead of
    computing it again (attribution runs the model)."""
    from ..models.loading import MoEModel, load_model
    from ..store import Run, open_run

    run = run if isinstance(run, Run) else open_run(run)
    mm = model if isinstance(model, MoEModel) else load_model(str(model), dtype=dtype, device=device)
    facts = router_facts(mm)
    E, K = mm.n_experts, mm.top_k
    if list(mm.moe_layers) != list(run.moe_layers):
        raise WorkbenchError(f"run {run.path} covers MoE layers {run.moe_layers}, the model has {mm.moe_layers}: "
                             "capture the whole model")
    scorer = None
    if scores is None and (by == "attribution" or (by == "reap" and not run.has("expert_stats"))):
        scorer = mm if mm.model.dtype == torch.float32 or not isinstance(model, str) else load_model(str(model))
    p = plan(run, by, ratio, E, K, model=scorer, protect=protect, per_layer=per_layer, seed=seed, exact=exact,
             max_tokens=max_tokens, n_group=facts["n_group"], topk_group=facts["topk_group"], progress=progress,
             scores=scores)
    removed = p["removed"]
    n_phys = min(len(v) for v in removed.values())  # one expert count for every layer (module docstring)
    score_of = {(int(a), int(b)): float(s) for a, b, s in p["scores"].iter_rows()}
    layers, after_ban = {}, []
    mix = {}
    for layer in mm.moe_layers:
        rem = removed[layer]
        phys = sorted(sorted(rem, key=lambda e: (score_of[(layer, e)], e))[:n_phys])
        keep = [e for e in range(E) if e not in set(phys)]
        still = [keep.index(e) for e in rem if e not in set(phys)]
        after_ban += [(layer, i) for i in still]
        mix[layer] = selection(keep, E)
        layers[str(layer)] = {"kept": keep, "removed": rem,
                              "scores": [score_of[(layer, e)] for e in range(E)]}
    ok, why = exactness(facts["rule"], facts["norm_topk_prob"], facts["n_group"])
    info = {
        "file": "pruning.json", "method": "prune", "criterion": by, "ratio": ratio, "per_layer": per_layer,
        "seed": seed if by == "random" else None, "attribution": ("exact" if exact else "estimate")
        if by == "attribution" else None,
        "protected": format_spec(sorted(p["protected"])), "base_model": {"spec": mm.spec, "path": mm.path,
                                                                          "file_hashes": mm.file_hashes},
        "run": str(run.path), "n_experts_before": E, "n_experts_after": E - n_phys, "top_k": K,
        "routing_rule": facts["rule"], "norm_topk_prob": facts["norm_topk_prob"],
        "equals_ban": ok, "exactness": why,
        "ban": format_spec(sorted((lay, e) for lay, rem in removed.items() for e in rem)),
        "ban_after_load": format_spec(after_ban),
        "layers": layers,
    }
    rewrite_experts(mm, mix)
    if out is not None:
        save_checkpoint(mm, out, info, overwrite)
    return mm, info


def predicted_cost(run, removed: dict[int, list[int]]) -> pl.DataFrame:
    """Per MoE layer, the share of the run's routing weight that fell on the removed experts (what a
    capture predicts a pruning costs before any checkpoint exists); columns layer, removed_mass."""
    rows = []
    for layer, rem in removed.items():
        rows += [(int(layer), int(e)) for e in rem]
    gone = pl.DataFrame(rows, schema={"layer": pl.Int16, "expert": pl.Int16}, orient="row").with_columns(
        pl.lit(True).alias("gone"))
    d = (run.routing.select("doc_id", "pos", "layer", "experts", "weights").explode("experts", "weights")
         .rename({"experts": "expert", "weights": "weight"})
         .join(gone.lazy(), on=["layer", "expert"], how="left")
         .group_by("doc_id", "pos", "layer")
         .agg((pl.col("weight").filter(pl.col("gone").fill_null(False)).sum() / pl.col("weight").sum())
              .alias("removed_mass"))
         .group_by("layer").agg(pl.col("removed_mass").mean()).sort("layer").collect())
    return d.cast({"layer": pl.Int16, "removed_mass": pl.Float64})


def load_info(path) -> dict | None:
    """pruning.json or merging.json of a compressed checkpoint folder (None for an ordinary model)."""
    p = Path(path)
    for name in ("pruning.json", "merging.json"):
        if (p / name).is_file():
            try:
                return json.loads((p / name).read_text())
            except ValueError:
                raise WorkbenchError(f"{p / name} is not valid JSON") from None
    return None


__all__ = ["choose", "exactness", "load_info", "plan", "predicted_cost", "protected_experts", "prune", "rewrite_experts",
           "save_checkpoint", "selection", "super_experts"]
