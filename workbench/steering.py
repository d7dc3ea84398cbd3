"""Steering evaluation: what an intervention does to a model's text, distributions and routing.

The interventions themselves are hooks in `workbench.probes.interventions`; everything here runs a
model with and without them: `compare` (baseline vs steered continuations, per-token KL, routing
changes; the CLI `workbench steer` and the app's Steering lab), `perplexity`,
`continuation_logprob` (a behaviour score), and `random_experts_like` (the papers' control).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from .errors import WorkbenchError
from .models.hooks import RouterOut
from .probes.interventions import KINDS, describe_interventions, format_spec, parse_spec

ROUTING_CHANGE_SCHEMA = {"layer": pl.Int16, "pos": pl.Int32, "token": pl.String, "part": pl.String,
                         "baseline_experts": pl.List(pl.Int16), "steered_experts": pl.List(pl.Int16)}


def _steer_cm(mm, interventions):
    if not interventions:
        return contextlib.nullcontext()
    bad = [k for k in interventions if k not in KINDS]
    if bad:
        raise WorkbenchError(f"unknown intervention {bad[0]!r}; choose from {', '.join(KINDS)}")
    return mm.steer(**interventions)


# ---------------------------------------------------------------------------------------------
# compare


@dataclass
class SteerResult:
    """Baseline vs steered generation of one prompt.

    kl[j] = KL(baseline || steered) of the next-token distributions that predict the j-th baseline
    token, both models reading the same text (prompt + baseline continuation). routing_changes has
    one row per (layer, position) of that same text whose selected expert set differs.
    """

    prompt: str
    interventions: dict
    baseline_text: str
    steered_text: str
    baseline_ids: list[int]
    steered_ids: list[int]
    baseline_tokens: list[str]
    steered_tokens: list[str]
    kl: list[float]
    routing_changes: pl.DataFrame
    n_decisions: int  # (layer, position) routing decisions compared
    settings: dict = field(default_factory=dict)

    @property
    def first_divergence(self) -> int | None:
        """Index of the first generated token where the two continuations differ (None if equal)."""
        for j, (a, b) in enumerate(zip(self.baseline_ids, self.steered_ids)):
            if a != b:
                return j
        if len(self.baseline_ids) != len(self.steered_ids):
            return min(len(self.baseline_ids), len(self.steered_ids))
        return None

    @property
    def changed_fraction(self) -> float:
        return self.routing_changes.height / self.n_decisions if self.n_decisions else 0.0

    def changes_by_layer(self) -> pl.DataFrame:
        return (self.routing_changes.group_by("layer").agg(pl.len().alias("changed")).sort("layer"))

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "interventions": self.interventions, "settings": self.settings,
                "baseline": {"text": self.baseline_text, "ids": self.baseline_ids, "tokens": self.baseline_tokens},
                "steered": {"text": self.steered_text, "ids": self.steered_ids, "tokens": self.steered_tokens},
                "kl": self.kl, "first_divergence": self.first_divergence, "n_decisions": self.n_decisions,
                "routing_changes": self.routing_changes.to_dicts()}


class _RouteRecorder:
    """Router forward hooks keeping the selected experts of one forward (after any steering)."""

    def __init__(self, mm):
        self.mm, self.seen, self.hooks = mm, {}, None

    def __enter__(self):
        self.hooks = self.mm.hooks({f"L{layer.index}.router": self._hook(layer.index) for layer in self.mm.layers})
        return self

    def _hook(self, index):
        def hook(module, args, out):
            idx = RouterOut.of(out).index
            self.seen[index] = idx.detach().reshape(-1, idx.shape[-1]).to("cpu", torch.int64)
        return hook

    def __exit__(self, *exc):
        if self.hooks is not None:
            self.hooks.remove()

    def take(self) -> dict[int, torch.Tensor]:
        out, self.seen = self.seen, {}
        return out


def _generate(mm, ids, max_new_tokens, sample, seed, temperature):
    from .models.loading import seeded

    kw = {"max_new_tokens": max_new_tokens, "do_sample": sample, "pad_token_id": mm.tokenizer.pad_token_id}
    if sample:
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    else:
        kw.update(temperature=None, top_k=None, top_p=None)
    with seeded(seed) if sample else contextlib.nullcontext():
        out = mm.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return out[0, ids.shape[1]:].tolist()


def compare(mm, prompt: str, interventions: dict, max_new_tokens: int = 24, sample: bool = False, seed: int = 0,
            temperature: float = 1.0) -> SteerResult:
    """Generate from `prompt` without and with `interventions`; see SteerResult for what is compared.

    Greedy by default; with sample=True both runs sample with the same seed and temperature (and
    the KL uses the tempered distributions).
    """
    inter = describe_interventions(mm, interventions)
    if max_new_tokens < 1:
        raise WorkbenchError("--max-new-tokens must be at least 1")
    if sample and not temperature > 0:
        raise WorkbenchError("--temperature must be positive")
    prompt_ids = mm.tokenize(prompt)
    if not prompt_ids:
        raise WorkbenchError("the prompt is empty")
    dev = mm.device
    ids = torch.tensor([prompt_ids], device=dev)
    with torch.inference_mode():
        base = _generate(mm, ids, max_new_tokens, sample, seed, temperature)
        with _steer_cm(mm, interventions):
            steered = _generate(mm, ids, max_new_tokens, sample, seed, temperature)
        # Both models read the same text (prompt + baseline continuation): KL and routing compare like with like.
        full = torch.tensor([prompt_ids + base], device=dev)
        with _RouteRecorder(mm) as rec:
            lb = mm.model(input_ids=full).logits[0].float()
            rb = rec.take()
            with _steer_cm(mm, interventions):
                ls = mm.model(input_ids=full).logits[0].float()
            rs = rec.take()
    if not torch.isfinite(lb).all():
        raise WorkbenchError("the model's own logits are not finite on this prompt (NaN or inf), so there is "
                             "nothing to compare; try --dtype float32")
    if not torch.isfinite(ls).all():
        raise WorkbenchError("the steered model gives non-finite logits (NaN or inf) on this prompt; try smaller "
                             "--boost/--scale values")
    p0 = len(prompt_ids)
    t = temperature if sample else 1.0
    # float64: the KL of nearby distributions is a difference of close numbers
    lp_b = torch.log_softmax(lb[p0 - 1: p0 - 1 + len(base)].double() / t, -1)
    lp_s = torch.log_softmax(ls[p0 - 1: p0 - 1 + len(base)].double() / t, -1)
    kl = (lp_b.exp() * (lp_b - lp_s)).sum(-1).clamp_min(0).tolist()
    tokens = [mm.tokenizer.decode([i]) for i in prompt_ids + base]
    rows = {k: [] for k in ROUTING_CHANGE_SCHEMA}
    n_dec = 0
    for layer in mm.moe_layers:
        a, b = rb[layer], rs[layer]
        n_dec += a.shape[0]
        diff = (a.sort(-1)[0] != b.sort(-1)[0]).any(-1).nonzero().flatten().tolist()
        for pos in diff:
            rows["layer"].append(layer)
            rows["pos"].append(pos)
            rows["token"].append(tokens[pos])
            rows["part"].append("prompt" if pos < p0 else "generated")
            rows["baseline_experts"].append(a[pos].tolist())
            rows["steered_experts"].append(b[pos].tolist())
    changes = pl.DataFrame(rows, schema=ROUTING_CHANGE_SCHEMA).sort("pos", "layer")
    dec = mm.tokenizer.decode
    return SteerResult(
        prompt=prompt, interventions=inter, baseline_text=dec(base), steered_text=dec(steered),
        baseline_ids=base, steered_ids=steered, baseline_tokens=[dec([i]) for i in base],
        steered_tokens=[dec([i]) for i in steered], kl=[float(x) for x in kl], routing_changes=changes,
        n_decisions=n_dec,
        settings={"max_new_tokens": max_new_tokens, "sample": sample, "seed": seed,
                  "temperature": temperature if sample else None})


# ---------------------------------------------------------------------------------------------
# CLI


def steer_command(model: str, prompt: str, interventions: dict, max_new_tokens: int = 24, sample: bool = False,
                  seed: int = 0, temperature: float = 1.0, device: str | None = None, dtype: str | None = None,
                  as_json: bool = False) -> None:
    """`workbench steer MODEL --prompt TEXT [--ban ...]`: print baseline vs steered side by side."""
    if not interventions:
        raise WorkbenchError("give at least one intervention: --ban, --force, --boost, --zero or --scale")
    from .models.loading import load_model

    device = device or ("cuda" if torch.cuda.is_available() else None)
    mm = load_model(model, device=device, dtype=dtype)
    res = compare(mm, prompt, interventions, max_new_tokens=max_new_tokens, sample=sample, seed=seed,
                  temperature=temperature)
    if as_json:
        print(json.dumps(res.to_json(), ensure_ascii=False, allow_nan=False))  # strict JSON
        return
    print(render(res, model=f"{model} ({mm.family.model_type})"))


def _show(tok: str, width: int, tid: int | None = None) -> str:
    # a lone byte of a multi-byte character decodes to U+FFFD: show its id so tokens stay distinguishable
    s = f"<id {tid}>" if "\ufffd" in tok and tid is not None else repr(tok)[1:-1]
    return s if len(s) <= width else s[: width - 1] + "…"


def _kl(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 or x == 0 else f"{x:.1e}"


def render(res: SteerResult, model: str = "", max_changes: int = 8) -> str:
    """The text `workbench steer` prints: token table with KL, both continuations, routing changes."""
    w = max([10] + [min(len(repr(t)) - 2, 24) for t in res.baseline_tokens + res.steered_tokens])
    inter = "; ".join(f"{k} {','.join(v) if isinstance(v, list) else ','.join(f'{e}={x:g}' for e, x in v.items())}"
                      for k, v in res.interventions.items())
    lines = [f"model: {model}"] if model else []
    lines += [f"interventions: {inter}", f"prompt: {res.prompt!r}",
              f"{'step':>4}  {'baseline':<{w}}   {'steered':<{w}}  KL(base||steered)"]
    n = max(len(res.baseline_tokens), len(res.steered_tokens))
    for j in range(n):
        b = res.baseline_tokens[j] if j < len(res.baseline_tokens) else ""
        s = res.steered_tokens[j] if j < len(res.steered_tokens) else ""
        ids_b = res.baseline_ids[j] if j < len(res.baseline_ids) else None
        ids_s = res.steered_ids[j] if j < len(res.steered_ids) else None
        mark = " " if ids_b == ids_s else "*"
        kl = _kl(res.kl[j]) if j < len(res.kl) else ""
        lines.append(f"{j:>4}  {_show(b, w, ids_b):<{w}} {mark} {_show(s, w, ids_s):<{w}}  {kl}")
    fd = res.first_divergence
    lines += ["", f"baseline: {res.prompt}{res.baseline_text}", f"steered:  {res.prompt}{res.steered_text}",
              "continuations are identical" if fd is None else f"first difference at generated token {fd} (marked *)",
              f"mean KL {_kl(float(np.mean(res.kl)))}, max {_kl(max(res.kl))} (along the baseline continuation)"]
    ch = res.routing_changes
    by_layer = ", ".join(f"L{r['layer']} {r['changed']}" for r in res.changes_by_layer().iter_rows(named=True))
    lines.append(f"routing: {ch.height} of {res.n_decisions} decisions changed ({100 * res.changed_fraction:.1f}%)"
                 + (f"; by layer: {by_layer}" if ch.height else ""))
    for r in ch.head(max_changes).iter_rows(named=True):
        lines.append(f"  L{r['layer']} pos {r['pos']} {r['token']!r} ({r['part']}): experts {r['baseline_experts']} "
                     f"-> {r['steered_experts']}")
    if ch.height > max_changes:
        lines.append(f"  ... {ch.height - max_changes} more (use --json for all)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Evaluation helpers used by the analyses


def _records(texts) -> list[str]:
    if isinstance(texts, str):
        from .data import load_dataset

        return [r["text"] for r in load_dataset(texts).records]
    out = []
    for t in texts:
        if isinstance(t, dict):
            t = t.get("text")
        if not isinstance(t, str):
            raise WorkbenchError("texts must be strings or records with a 'text' field")
        out.append(t)
    return out


def right_padded(mm, seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token sequences right-padded with the tokenizer's pad id."""
    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
    s_max = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), s_max), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), s_max), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s)
        mask[b, : len(s)] = 1
    return ids, mask


def _nll_of_batch(mm, seqs: list[list[int]]) -> list[torch.Tensor]:
    """Token NLLs (next-token cross-entropy, fp32) of each sequence, right-padded into one forward."""
    ids, mask = right_padded(mm, seqs)
    logits = mm.model(input_ids=ids.to(mm.device), attention_mask=mask.to(mm.device), use_cache=False).logits
    out = []
    for b, s in enumerate(seqs):
        n = len(s)
        out.append(torch.nn.functional.cross_entropy(logits[b, : n - 1].float(), ids[b, 1:n].to(logits.device),
                                                     reduction="none").cpu())
    return out


def perplexity(mm, texts, interventions: dict | None = None, seq_len: int | None = None, batch_size: int = 8,
               max_tokens: int | None = None, max_len: int | None = None, progress: bool | None = None) -> dict:
    """Perplexity of a text set, optionally under interventions.

    texts: list of strings (or records with `text`), or a dataset name / file. Without seq_len each
    text is one sequence; with seq_len the token stream (texts joined by EOS) is cut into
    consecutive seq_len chunks, as the super-experts paper does with WikiText-2. Returns
    {"ppl": exp(mean token NLL), "nll", "tokens" (predicted tokens), "ppl_seq_mean": exp(mean over
    sequences of their mean NLL), "per_text": [{"doc_id", "tokens", "nll", "ppl"}], "interventions"}.
    Each sequence of n tokens predicts n - 1 of them.
    """
    from tqdm.auto import tqdm

    from .capture import build_sequences
    from .data import Dataset

    if batch_size < 1:
        raise WorkbenchError("batch_size must be at least 1")
    recs = _records(texts)
    ds = Dataset(name="<texts>", records=[{"text": t} for t in recs], sha256="", source="")
    cap = max_len or min(int(getattr(mm.model.config, "max_position_embeddings", 2048) or 2048), 8192)
    seqs = [s for s in build_sequences(ds, mm.tokenizer, seq_len=seq_len, max_tokens=max_tokens, max_len=cap)
            if len(s.ids) >= 2]
    if not seqs:
        raise WorkbenchError("no text has two or more tokens, so there is nothing to predict")
    inter = describe_interventions(mm, interventions) if interventions else {}
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))  # similar lengths share a batch
    nll: dict[int, torch.Tensor] = {}
    bar = tqdm(total=sum(len(s.ids) for s in seqs), disable=None if progress is None else not progress,
               unit="tok", desc="perplexity", leave=False)
    with torch.inference_mode(), _steer_cm(mm, interventions):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, v in zip(chunk, _nll_of_batch(mm, [seqs[i].ids.tolist() for i in chunk])):
                nll[i] = v
            bar.update(sum(len(seqs[i].ids) for i in chunk))
    bar.close()
    all_nll = torch.cat([nll[i] for i in range(len(seqs))]).double()
    per = [{"doc_id": int(seqs[i].doc_id), "tokens": int(nll[i].numel()), "nll": float(nll[i].double().mean()),
            "ppl": math.exp(float(nll[i].double().mean()))} for i in range(len(seqs))]
    mean = float(all_nll.mean())
    seq_mean = float(np.mean([p["nll"] for p in per]))
    return {"ppl": math.exp(mean), "nll": mean, "tokens": int(all_nll.numel()), "ppl_seq_mean": math.exp(seq_mean),
            "sequences": len(seqs), "seq_len": seq_len, "per_text": per, "interventions": inter}


def continuation_logprobs(mm, prompts, continuations, interventions: dict | None = None,
                          batch_size: int = 16) -> pl.DataFrame:
    """log p(continuation | prompt) for every prompt x continuation: columns prompt, continuation, logprob, tokens.

    continuations: one list shared by all prompts, or a list of lists (one set per prompt).
    Prompt and continuation are tokenised separately and concatenated, so the boundary is exact.
    """
    prompts = _records(prompts)
    if not prompts:
        raise WorkbenchError("no prompts given")
    if isinstance(continuations, str):
        continuations = [continuations]
    per_prompt = bool(continuations) and all(isinstance(c, (list, tuple)) for c in continuations)
    if per_prompt and len(continuations) != len(prompts):
        raise WorkbenchError(f"{len(continuations)} continuation sets for {len(prompts)} prompts")
    sets = [list(c) for c in continuations] if per_prompt else [list(continuations)] * len(prompts)
    jobs = []
    for pi, p in enumerate(prompts):
        pid = mm.tokenize(p)
        if not pid:
            raise WorkbenchError(f"prompt {pi} is empty")
        if not sets[pi]:
            raise WorkbenchError(f"prompt {pi} has no continuations")
        for ci, c in enumerate(sets[pi]):
            cid = mm.tokenize(c)
            if not cid:
                raise WorkbenchError(f"continuation {c!r} is empty")
            jobs.append((pi, ci, pid, cid))
    out = {"prompt": [], "continuation": [], "logprob": [], "tokens": []}
    with torch.inference_mode(), _steer_cm(mm, interventions):
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            nlls = _nll_of_batch(mm, [pid + cid for _, _, pid, cid in chunk])
            for (pi, ci, pid, cid), v in zip(chunk, nlls):
                out["prompt"].append(pi)
                out["continuation"].append(ci)
                out["logprob"].append(-float(v[len(pid) - 1:].double().sum()))
                out["tokens"].append(len(cid))
    return pl.DataFrame(out, schema={"prompt": pl.Int64, "continuation": pl.Int64, "logprob": pl.Float64,
                                     "tokens": pl.Int64})


def continuation_logprob(mm, prompts, continuations, interventions: dict | None = None,
                         batch_size: int = 16) -> float:
    """Behaviour score: mean over prompts of log P(the model continues with any of `continuations`).

    Per prompt that is logsumexp over the set of log p(continuation | prompt); e.g. how likely the
    model opens a refusal ("I cannot", "I'm sorry", ...). Higher = more of the behaviour.
    """
    df = continuation_logprobs(mm, prompts, continuations, interventions, batch_size)
    per = df.group_by("prompt").agg(pl.col("logprob")).sort("prompt")
    vals = [float(torch.logsumexp(torch.tensor(v, dtype=torch.float64), 0)) for v in per["logprob"].to_list()]
    return float(np.mean(vals))


def random_experts_like(mm, experts, seed: int = 0, n_per_layer: int | None = None) -> list[tuple[int, int]]:
    """The papers' control: as many random routed experts per layer as `experts` has there, from the
    same layers, never one of `experts` (a shared expert in `experts` counts towards its layer and is
    replaced by a routed one). n_per_layer overrides the count. Seeded; returned sorted.
    """
    chosen = parse_spec(experts, mm, "experts")
    counts: dict[int, int] = {}
    for layer, _ in chosen:
        counts[layer] = counts.get(layer, 0) + 1
    if n_per_layer is not None:
        if n_per_layer < 0:
            raise WorkbenchError("n_per_layer must be non-negative")
        counts = {layer: n_per_layer for layer in counts}
    rng = np.random.default_rng(seed)
    out = []
    for layer in sorted(counts):
        taken = {e for lyr, e in chosen if lyr == layer}
        pool = [e for e in range(mm.n_experts) if e not in taken]
        if counts[layer] > len(pool):
            raise WorkbenchError(f"layer {layer} has only {len(pool)} other routed experts, "
                                 f"cannot draw {counts[layer]}")
        out += [(layer, int(e)) for e in sorted(rng.choice(pool, size=counts[layer], replace=False).tolist())]
    return out


__all__ = ["SteerResult", "compare", "continuation_logprob", "continuation_logprobs", "format_spec", "perplexity",
           "random_experts_like", "render", "steer_command"]
