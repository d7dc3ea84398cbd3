"""Interventions: ban, force, boost, zero and scale experts, exactly, for every routing rule.

In transformers 5 the top-k happens inside the router, so editing the logits it returns changes
nothing. A ban / force / boost therefore replaces the router's output through a forward hook that
redoes the family's own routing rule (families.py names it) from the logits the router returned,
with per-expert offsets on the *selection* score. Weights always come from the natural scores:
forcing an expert selects it, it does not inflate its weight. zero / scale leave routing alone and
edit the routing weights on their way into the experts module (a forward pre-hook), or the shared
expert's output (`E-1`).

Hooks are registered with prepend=True so that capture hooks see the steered routing. Nested
`steer` contexts compose: each model keeps a stack of active plans and one set of hooks that
applies their union.
"""

from __future__ import annotations

import contextlib
import math
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

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
from ..models.hooks import ExpertsCall, RouterOut, register

KINDS = ("ban", "force", "boost", "zero", "scale")
ROUTING_KINDS = ("ban", "force", "boost")  # need the family's routing rule
VALUED_KINDS = ("boost", "scale")
DEFAULT_BOOST = 0.5
# Bounds on values (after nesting: boosts add, scales multiply). |lambda| = 100 already puts an expert
# 100 standard deviations above the others, i.e. a certain pick; far larger values only overflow
# (lambda * std(z) -> inf -> NaN logits). |s| = 100 multiplies an expert's contribution 100-fold.
MAX_BOOST = 100.0
MAX_SCALE = 100.0
SHARED = -1
RULES = (SOFTMAX_TOPK, SOFTMAX_TOPK_RENORM, TOPK_SOFTMAX, DEEPSEEK_V2, SIGMOID_BIAS_GROUP, SPARSEMIXER)

_ITEM = re.compile(r"^L(\d+):E(-1|\d+)$", re.IGNORECASE)
_EXAMPLE = "write L<layer>:E<expert>[,...], e.g. L3:E54,L4:E38 (E-1 = shared expert)"

Expert = tuple[int, int]


# ---------------------------------------------------------------------------------------------
# SPEC parsing


def format_spec(experts: Iterable[Expert]) -> str:
    """[(3, 54), (4, 38)] -> "L3:E54,L4:E38" (the inverse of parse_spec)."""
    return ",".join(f"L{layer}:E{expert}" for layer, expert in experts)


def _is_pair(x) -> bool:
    return (isinstance(x, (tuple, list)) and len(x) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in x))


def _parse_item(item: str, what: str) -> Expert:
    m = _ITEM.match(re.sub(r"\s+", "", item))
    if not m:
        raise WorkbenchError(f"malformed expert {item.strip()!r} in {what}: {_EXAMPLE}")
    return int(m.group(1)), int(m.group(2))


def _split(spec: str) -> list[str]:
    items = [s for s in spec.split(",")]
    if any(not s.strip() for s in items):
        raise WorkbenchError(f"malformed SPEC {spec!r}: empty item; {_EXAMPLE}")
    return items


def parse_spec(spec, mm=None, what: str = "SPEC") -> list[Expert]:
    """"L3:E54,L4:E38" (or a list of (layer, expert) tuples / such strings) -> [(3, 54), (4, 38)].

    Duplicates are dropped, order kept. With `mm`, each expert is checked against the model:
    the layer exists, is an MoE layer, and the expert is in range (E-1 needs a shared expert).
    """
    out: list[Expert] = []
    if spec is None:
        return out
    if isinstance(spec, str):
        if not spec.strip():
            return out
        if "=" in spec:
            raise WorkbenchError(f"{what} takes no values (only --boost and --scale do): {spec!r}")
        out = [_parse_item(s, what) for s in _split(spec)]
    elif _is_pair(spec):
        out = [(int(spec[0]), int(spec[1]))]
    elif isinstance(spec, Iterable) and not isinstance(spec, Mapping):
        for x in spec:
            if _is_pair(x):
                out.append((int(x[0]), int(x[1])))
            elif isinstance(x, str):
                out.extend(parse_spec(x, None, what))
            else:
                raise WorkbenchError(f"malformed expert {x!r} in {what}: {_EXAMPLE}")
    else:
        raise WorkbenchError(f"malformed {what} {spec!r}: {_EXAMPLE}")
    out = list(dict.fromkeys(out))
    if mm is not None:
        for layer, expert in out:
            check_expert(mm, layer, expert, what)
    return out


def parse_values(spec, mm=None, default: float | None = DEFAULT_BOOST, what: str = "SPEC") -> dict[Expert, float]:
    """Experts with a value: {"L12:E7": 0.5}, {(12, 7): 0.5}, "L12:E7=0.5,L3:E1" or a plain SPEC.

    Items without `=value` get `default`; default None means a value is required. A repeated
    expert keeps its last value.
    """
    out: dict[Expert, float] = {}
    if spec is None:
        return out
    if isinstance(spec, Mapping):
        items = []
        for k, v in spec.items():
            key = (int(k[0]), int(k[1])) if _is_pair(k) else None
            if key is None:
                if not isinstance(k, str):
                    raise WorkbenchError(f"malformed expert {k!r} in {what}: {_EXAMPLE}")
                keys = parse_spec(k, None, what)
            else:
                keys = [key]
            for key in keys:
                items.append((key, _number(v, what, key)))
    elif isinstance(spec, str):
        if not spec.strip():
            return out
        items = []
        for s in _split(spec):
            name, eq, val = s.partition("=")
            key = _parse_item(name, what)
            if eq:
                items.append((key, _number(val, what, key)))
            else:
                items.append((key, _default(default, what, key)))
    else:
        items = [(k, _default(default, what, k)) for k in parse_spec(spec, None, what)]
    for k, v in items:
        out[k] = v
    if mm is not None:
        for layer, expert in out:
            check_expert(mm, layer, expert, what)
    return out


def _number(v, what: str, key: Expert) -> float:
    try:
        x = float(v.strip()) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise WorkbenchError(f"value {v!r} for {format_spec([key])} in {what} is not a number") from None
    if not math.isfinite(x):
        raise WorkbenchError(f"value {v!r} for {format_spec([key])} in {what} must be finite")
    return x


def _default(default, what: str, key: Expert) -> float:
    if default is None:
        raise WorkbenchError(f"{what} needs a value per expert, e.g. {format_spec([key])}=0.5")
    return float(default)


def check_expert(mm, layer: int, expert: int, what: str = "SPEC") -> None:
    """One-sentence WorkbenchError unless (layer, expert) names an expert of `mm`."""
    if not 0 <= layer < mm.n_layers:
        raise WorkbenchError(f"layer {layer} in {what} does not exist: the model has {mm.n_layers} decoder layers "
                             f"(0-{mm.n_layers - 1})")
    if layer not in mm.moe_layers:
        moe = mm.moe_layers
        raise WorkbenchError(f"layer {layer} in {what} is a dense layer, not an MoE layer; MoE layers are "
                             f"{_ranges(moe)}")
    if expert == SHARED:
        if mm.layer(layer).shared is None:
            raise WorkbenchError(f"layer {layer} in {what} has no shared expert (E-1)")
        return
    if not 0 <= expert < mm.n_experts:
        raise WorkbenchError(f"expert {expert} in {what} is out of range: layer {layer} has experts "
                             f"0-{mm.n_experts - 1}")


def _ranges(xs: list[int]) -> str:
    parts, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        parts.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Plans: validated interventions


@dataclass
class Plan:
    """Validated interventions: expert lists / value maps keyed by (layer, expert)."""

    ban: list[Expert] = field(default_factory=list)
    force: list[Expert] = field(default_factory=list)
    boost: dict[Expert, float] = field(default_factory=dict)
    zero: list[Expert] = field(default_factory=list)
    scale: dict[Expert, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.ban or self.force or self.boost or self.zero or self.scale)

    def to_json(self) -> dict:
        out: dict = {}
        for k in ("ban", "force", "zero"):
            v = getattr(self, k)
            if v:
                out[k] = [format_spec([e]) for e in sorted(v)]
        for k in ("boost", "scale"):
            v = getattr(self, k)
            if v:
                out[k] = {format_spec([e]): float(v[e]) for e in sorted(v)}
        return out


def make_plan(mm, ban=None, force=None, boost=None, zero=None, scale=None) -> Plan:
    """Parse and validate each kind against the model (raises WorkbenchError with one sentence)."""
    plan = Plan(ban=parse_spec(ban, mm, "--ban"), force=parse_spec(force, mm, "--force"),
                boost=parse_values(boost, mm, DEFAULT_BOOST, "--boost"), zero=parse_spec(zero, mm, "--zero"),
                scale=parse_values(scale, mm, None, "--scale"))
    for kind in ROUTING_KINDS:
        items = getattr(plan, kind)
        shared = [e for e in items if e[1] == SHARED]
        if shared:
            raise WorkbenchError(f"--{kind} cannot apply to the shared expert {format_spec(shared[:1])}: it is "
                                 "always used; shared experts accept only --zero and --scale")
        if items and mm.family.rule not in RULES:
            raise WorkbenchError(f"--{kind} needs the family's routing rule, which is unknown for "
                                 f"{mm.family.model_type} (a generic model); --zero and --scale still work")
    _check_combined(mm, plan)
    return plan


def model_dtype(mm) -> torch.dtype:
    p = next(mm.model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def _check_values(mm, plan: Plan, nested: bool = False) -> None:
    """Every boost / scale finite in the model's dtype and within MAX_BOOST / MAX_SCALE."""
    dt = model_dtype(mm)
    fmax = torch.finfo(dt).max if dt.is_floating_point else torch.finfo(torch.float32).max
    how = " (nested contexts add boosts and multiply scales)" if nested else ""
    for kind, limit, what in (("boost", MAX_BOOST, "lambda"), ("scale", MAX_SCALE, "s")):
        for e, v in getattr(plan, kind).items():
            if not math.isfinite(v) or abs(v) > fmax:
                raise WorkbenchError(f"--{kind} {format_spec([e])}={v:g} is not a finite {str(dt).replace('torch.', '')} "
                                     f"number{how}; {what} must be between -{limit:g} and {limit:g}")
            if abs(v) > limit:
                raise WorkbenchError(f"--{kind} {format_spec([e])}={v:g} is out of range{how}: {what} must be between "
                                     f"-{limit:g} and {limit:g}")


def _check_combined(mm, plan: Plan, nested: bool = False) -> None:
    _check_values(mm, plan, nested)
    both = sorted(set(plan.ban) & set(plan.force))
    if both:
        raise WorkbenchError(f"{format_spec(both[:1])} is both banned and forced")
    k, n = mm.top_k, mm.n_experts
    for layer in mm.moe_layers:
        nf = sum(1 for e in plan.force if e[0] == layer)
        if nf > k:
            raise WorkbenchError(f"cannot force {nf} experts in layer {layer}: each token uses only {k}")
        nb = sum(1 for e in plan.ban if e[0] == layer)
        if nb > n - k:
            raise WorkbenchError(f"cannot ban {nb} of {n} experts in layer {layer}: each token needs {k}")


def combine(mm, plans: list[Plan]) -> Plan:
    """The union of nested plans: lists merged, boosts added, scales multiplied."""
    out = Plan()
    for p in plans:
        out.ban = list(dict.fromkeys(out.ban + p.ban))
        out.force = list(dict.fromkeys(out.force + p.force))
        out.zero = list(dict.fromkeys(out.zero + p.zero))
        for e, v in p.boost.items():
            out.boost[e] = out.boost.get(e, 0.0) + v
        for e, v in p.scale.items():
            out.scale[e] = out.scale.get(e, 1.0) * v
    _check_combined(mm, out, nested=len(plans) > 1)
    return out


def describe_interventions(mm, interventions: Mapping | None) -> dict:
    """Validated, canonical, JSON-able form of `interventions` (recorded in run manifests)."""
    if not interventions:
        return {}
    bad = [k for k in interventions if k not in KINDS]
    if bad:
        raise WorkbenchError(f"unknown intervention {bad[0]!r}; choose from {', '.join(KINDS)}")
    return make_plan(mm, **interventions).to_json()


# ---------------------------------------------------------------------------------------------
# Routing rules, redone with per-expert offsets


@dataclass
class RouterParams:
    """What a rule needs beyond the logits (read from the router module and the config)."""

    rule: str
    top_k: int
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"
    correction_bias: torch.Tensor | None = None
    jitter_eps: float = 0.01


def router_params(mm, layer) -> RouterParams:
    r, cfg = layer.router, mm.model.config

    def get(name, default):
        v = getattr(r, name, None)
        if v is None:
            v = getattr(cfg, name, None)
        return default if v is None else v

    return RouterParams(
        rule=mm.family.rule, top_k=int(getattr(r, "top_k", None) or mm.top_k),
        norm_topk_prob=bool(get("norm_topk_prob", False)),
        routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
        n_group=int(getattr(r, "num_group", None) or getattr(cfg, "n_group", None) or 1),
        topk_group=int(get("topk_group", 1)), topk_method=str(get("topk_method", "greedy")),
        correction_bias=getattr(r, "e_score_correction_bias", None),
        jitter_eps=float(get("router_jitter_noise", 0.01)),
    )


def _lift(sel: torch.Tensor, force: torch.Tensor | None) -> torch.Tensor:
    """Raise forced entries above every other finite entry of their row, keeping their order."""
    if force is None:
        return sel
    finite = torch.isfinite(sel)
    hi = sel.masked_fill(~finite, -torch.inf).amax(-1, keepdim=True)
    lo = sel.masked_fill(~finite, torch.inf).amin(-1, keepdim=True)
    return torch.where(force, sel + (hi - lo + 1), sel)


def _ban(sel: torch.Tensor, ban: torch.Tensor | None) -> torch.Tensor:
    return sel if ban is None else sel.masked_fill(ban, -torch.inf)


def _grouped_choice(sel, k, n_group, topk_group, group_score, ban, force):
    """Group-limited top-k: groups chosen on `sel` (forced experts already lifted), ban applied after.

    A ban applied after group selection leaves tokens that never chose the banned expert untouched.
    Where it leaves fewer than k candidates in the chosen groups, the groups are chosen again without
    the banned experts, and as a last resort among all experts.
    """
    t, e = sel.shape

    def pick_groups(s):
        gs = group_score(s.view(t, n_group, e // n_group))
        gidx = torch.topk(gs, k=topk_group, dim=-1, sorted=False)[1]
        gmask = torch.zeros_like(gs).scatter_(1, gidx, 1)
        smask = gmask.unsqueeze(-1).expand(-1, n_group, e // n_group).reshape(-1, e).bool()
        if force is not None:
            smask = smask | force  # a forced expert is selected even outside the chosen groups
        return s.masked_fill(~smask, -torch.inf)

    cand = _ban(pick_groups(sel), ban)
    if ban is not None:  # computed for every row: a data-dependent branch would sync the GPU
        short = torch.isfinite(cand).sum(-1, keepdim=True) < k
        banned = _ban(sel, ban)
        alt = pick_groups(banned)
        alt = torch.where(torch.isfinite(alt).sum(-1, keepdim=True) < k, banned, alt)
        cand = torch.where(short, alt, cand)
    return torch.topk(cand, k=k, dim=-1, sorted=False)[1]


def _sparsemixer(z, sel, eps):
    """PhiMoE's eval-mode sparsemixer, generalised: picks follow `sel`; each weight is the softmax,
    over the experts within the jitter threshold of the pick, of the natural scores `z`.

    With sel == z this is the transformers code exactly. Banned experts are -inf in `sel` and never
    enter a softmax.
    """
    banned = torch.isneginf(sel)
    _, c1 = sel.max(dim=-1, keepdim=True)
    ref = z.gather(-1, c1)
    factor = z.abs().clamp(min=ref)
    mask = ((ref - z) / factor) > (2 * eps)
    w1 = torch.softmax(z.masked_fill(mask | banned, float("-inf")), dim=-1).gather(-1, c1)
    masked_scores = torch.scatter(z, -1, c1, float("-inf"))
    sel2 = torch.scatter(sel, -1, c1, float("-inf"))
    _, c2 = sel2.max(dim=-1, keepdim=True)
    ref2 = masked_scores.gather(-1, c2)
    factor = z.abs().clamp(min=ref2)
    mask = ((ref2 - z) / factor) > (2 * eps)
    w2 = torch.softmax(masked_scores.masked_fill(mask | banned, float("-inf")), dim=-1).gather(-1, c2)
    return torch.cat((w1, w2), dim=-1), torch.cat((c1, c2), dim=-1)


def route(p: RouterParams, logits: torch.Tensor, ban: torch.Tensor | None = None,
          force: torch.Tensor | None = None, boost: torch.Tensor | None = None):
    """Redo the routing rule `p.rule` on router logits [T, E] -> (logits, weights [T, K], index [T, K]).

    ban / force: bool [E]; boost: float [E] of lambdas, adding lambda * std(z) (per token, over the
    experts) to the logits before the rule. The returned logits are the boosted ones. With no
    intervention the result equals the transformers router's output (tests check it bit for bit).
    """
    z = logits
    if boost is not None:
        zf = z.float()
        lim = torch.finfo(logits.dtype).max  # saturate, never overflow to inf (-> NaN after softmax)
        z = (zf + boost.to(zf) * zf.std(dim=-1, keepdim=True, correction=0)).clamp(-lim, lim).to(logits.dtype)
    k = p.top_k
    if p.rule in (SOFTMAX_TOPK, SOFTMAX_TOPK_RENORM):
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        if ban is None and force is None:
            w, idx = torch.topk(probs, k, dim=-1)
        else:
            idx = torch.topk(_lift(_ban(probs, ban), force), k, dim=-1)[1]
            w = probs.gather(-1, idx)
        if p.rule == SOFTMAX_TOPK_RENORM or p.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
    elif p.rule == TOPK_SOFTMAX:
        if ban is None and force is None:
            top, idx = torch.topk(z, k, dim=-1)
        else:
            idx = torch.topk(_lift(_ban(z, ban), force), k, dim=-1)[1]
            top = z.gather(-1, idx)
        w = torch.softmax(top, dim=-1, dtype=top.dtype)
    elif p.rule == DEEPSEEK_V2:
        probs = torch.softmax(z, dim=-1, dtype=torch.float32)
        sel = _lift(probs, force)
        if p.topk_method == "group_limited_greedy":
            idx = _grouped_choice(sel, k, p.n_group, p.topk_group, lambda g: g.max(dim=-1).values, ban, force)
        else:
            idx = torch.topk(_ban(sel, ban), k=k, dim=-1, sorted=False)[1]
        w = probs.gather(-1, idx) * p.routed_scaling_factor
    elif p.rule == SIGMOID_BIAS_GROUP:
        scores = z.sigmoid()
        choice = scores if p.correction_bias is None else scores + p.correction_bias
        choice = _lift(choice, force)
        idx = _grouped_choice(choice, k, p.n_group, p.topk_group, lambda g: g.topk(2, dim=-1)[0].sum(dim=-1),
                              ban, force)
        w = scores.gather(1, idx)
        if p.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        w = w * p.routed_scaling_factor
    elif p.rule == SPARSEMIXER:
        w, idx = _sparsemixer(z, _lift(_ban(z, ban), force), p.jitter_eps)
    else:
        raise WorkbenchError(f"routing rule {p.rule!r} cannot be redone; --zero and --scale still work")
    return z, w, idx


def merge_with_original(p: RouterParams, out, new, boosted: bool):
    """Keep the model's own rows wherever the intervention leaves the selected set unchanged.

    For every rule but the sparsemixer (whose weights depend on which experts are within reach), an
    unchanged set under ban / force means unchanged weights, so those rows stay bit-identical to
    the router's output and in its order. Boosted rows keep the original order when the set is the
    same, with the new weights.
    """
    own = RouterOut.of(out)
    w0, i0 = own.weights, own.index
    z, w, idx = new
    w = w.to(w0.dtype)
    if p.rule == SPARSEMIXER or idx.shape != i0.shape:
        return z, w, idx
    same = (torch.sort(idx, dim=-1)[0] == torch.sort(i0, dim=-1)[0]).all(-1, keepdim=True)
    if boosted:
        dense = torch.zeros(w.shape[0], z.shape[-1], dtype=w.dtype, device=w.device)
        dense.scatter_(1, idx, w)
        return z, torch.where(same, dense.gather(1, i0), w), torch.where(same, i0, idx)
    return z, torch.where(same, w0, w), torch.where(same, i0, idx)


# ---------------------------------------------------------------------------------------------
# Hooks and the steering context


class _LayerTensors:
    """Per-layer masks, built once per device."""

    def __init__(self, mm, layer: int, plan: Plan):
        e = mm.n_experts
        self.ban = self._mask(e, [x for l_, x in plan.ban if l_ == layer])
        self.force = self._mask(e, [x for l_, x in plan.force if l_ == layer])
        b = {x: v for (l_, x), v in plan.boost.items() if l_ == layer}
        self.boost = None
        if b:
            self.boost = torch.zeros(e)
            for x, v in b.items():
                self.boost[x] = v
        mult = {x: 0.0 for l_, x in plan.zero if l_ == layer}
        for (l_, x), v in plan.scale.items():
            if l_ == layer and x not in mult:
                mult[x] = v
        self.shared_mult = mult.pop(SHARED, None)
        self.mult = None
        if mult:
            self.mult = torch.ones(e)
            for x, v in mult.items():
                self.mult[x] = v
        self._dev: dict = {}

    @staticmethod
    def _mask(e, xs):
        if not xs:
            return None
        m = torch.zeros(e, dtype=torch.bool)
        m[xs] = True
        return m

    @property
    def routes(self) -> bool:
        return self.ban is not None or self.force is not None or self.boost is not None

    def on(self, device):
        if device not in self._dev:
            mv = lambda t: None if t is None else t.to(device)  # noqa: E731
            with torch.inference_mode(False):  # cached across calls: must not be inference tensors
                self._dev[device] = (mv(self.ban), mv(self.force), mv(self.boost), mv(self.mult))
        return self._dev[device]


class _Controller:
    """One per model: the stack of active plans and the hooks that apply their union."""

    def __init__(self, mm):
        self.mm = mm
        self.stack: list[Plan] = []
        self.handles: list = []
        self.plan = Plan()

    def push(self, plan: Plan) -> None:
        combined = combine(self.mm, self.stack + [plan])  # validates first: a refusal changes nothing
        self._install(combined)
        self.stack.append(plan)  # only once its hooks are in place: a failed push leaves no trace

    def pop(self, plan: Plan) -> None:
        stack = list(self.stack)
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is plan:
                del stack[i]
                break
        try:
            if stack:
                self._install(combine(self.mm, stack))
            else:
                self._remove()
        except BaseException:
            # cannot restore the outer contexts: leave the model plain rather than half-steered
            self._remove()
            self.stack.clear()
            raise
        self.stack = stack

    def _remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.plan = Plan()

    def _prepare(self, plan: Plan) -> list:
        """Everything that can fail on bad values (masks, router parameters, hooks) before any attach."""
        steps = []
        for layer in self.mm.layers:
            lt = _LayerTensors(self.mm, layer.index, plan)
            if lt.routes:
                h = _router_hook(router_params(self.mm, layer), lt)
                steps.append((f"L{layer.index}.router", h))
            if lt.mult is not None:
                steps.append((f"L{layer.index}.experts.in", _experts_hook(lt)))
            if lt.shared_mult is not None:
                steps.append((f"L{layer.index}.shared.out", _shared_hook(lt.shared_mult)))
        return steps

    def _install(self, plan: Plan) -> None:
        """All or nothing: attach every new hook, then drop the old ones; on any failure (even
        Ctrl-C) remove what was attached, so the model keeps exactly the hooks it had."""
        steps = self._prepare(plan)
        new = []
        try:
            for site, fn in steps:  # prepend: capture's probes, registered later, see the steered routing
                new.append(register(self.mm, site, fn, prepend=True))
        except BaseException:
            for h in new:
                h.remove()
            raise
        old, self.handles, self.plan = self.handles, new, plan
        for h in old:
            h.remove()


def _router_hook(p: RouterParams, lt: _LayerTensors):
    def hook(module, args, out):
        own = RouterOut.of(out)
        logits = own.logits
        ban, force, boost, _ = lt.on(logits.device)
        flat = logits.reshape(-1, logits.shape[-1])
        pp = p if p.correction_bias is None else replace(p, correction_bias=module.e_score_correction_bias)
        new = route(pp, flat, ban, force, boost)
        z, w, idx = merge_with_original(pp, own.replace(logits=flat), new, boost is not None)
        if boost is None:
            z = logits
        return own.replace(logits=z, weights=w, index=idx).to_output()
    return hook


def _experts_hook(lt: _LayerTensors):
    def hook(module, args, kwargs):
        call = ExpertsCall.of(module, args, kwargs, "--zero / --scale")
        w = call.weights
        f = lt.on(w.device)[3].to(w.dtype)[call.index]
        return call.with_weights(torch.where(f == 0, torch.zeros_like(w), w * f))
    return hook


def _shared_hook(s: float):
    def hook(module, args, out):
        return torch.zeros_like(out) if s == 0 else out * s
    return hook


_CONTROLLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _controller(mm) -> _Controller:
    c = _CONTROLLERS.get(mm.model)
    if c is None or c.mm is not mm and not c.stack:
        c = _CONTROLLERS[mm.model] = _Controller(mm)
    return c


def active_plan(mm) -> Plan:
    """The union of the interventions active on `mm` right now (empty outside any steer)."""
    c = _CONTROLLERS.get(mm.model)
    return c.plan if c is not None and c.stack else Plan()


@contextlib.contextmanager
def steer(mm, ban=None, force=None, boost=None, zero=None, scale=None):
    """Apply interventions to `mm` for the body of the `with` (forward, generate or capture).

    ban: never selected, the family's rule picks the replacement. force: always selected, with its
    natural weight. boost: {SPEC: lambda} adds lambda * std(logits) to the expert's logit (negative
    suppresses). zero: routing unchanged, contribution dropped. scale: {SPEC: s}, weight times s.
    Contexts nest (their union applies) and always remove their hooks, even on exceptions.
    """
    plan = make_plan(mm, ban=ban, force=force, boost=boost, zero=zero, scale=scale)
    if plan.empty():
        yield plan
        return
    c = _controller(mm)
    c.push(plan)
    try:
        yield plan
    finally:
        c.pop(plan)


# ---------------------------------------------------------------------------------------------
# Router margins and forced (replayed) routes: used by the routing probe's margin column and by
# workbench.fidelity (replay of recorded routes, stability of routing decisions).


def selection_scores(p: RouterParams, logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """The scores the family's rule ranks experts by, float32 [T, E], with experts outside the chosen
    groups at -inf (group-limited rules), and the group scores [T, G] (None without groups).

    Rules that rank softmax probabilities (Qwen, OLMoE, Mixtral, DeepSeek-V2) are scored in log-probability
    space, i.e. by logit: softmax is monotone, so the order is the logits', and a logit gap is what rounding
    must overcome (in probability space a peaked router makes every gap below the top expert look tiny).
    top-k-then-softmax and the sparsemixer rank logits; DeepSeek-V3 ranks sigmoid + correction bias.
    """
    z = logits.reshape(-1, logits.shape[-1])
    if p.rule in (SOFTMAX_TOPK, SOFTMAX_TOPK_RENORM, DEEPSEEK_V2, TOPK_SOFTMAX, SPARSEMIXER):
        s = z.float()
    elif p.rule == SIGMOID_BIAS_GROUP:
        s = z.sigmoid().float()
        bias = correction_bias if correction_bias is not None else p.correction_bias
        if bias is not None:
            s = s + bias.float()
    else:
        raise WorkbenchError(f"routing rule {p.rule!r} is unknown, so its router margins cannot be computed")
    grouped = (p.rule == SIGMOID_BIAS_GROUP or (p.rule == DEEPSEEK_V2 and p.topk_method == "group_limited_greedy"))
    if not grouped or p.n_group <= 1 or p.topk_group >= p.n_group:
        return s, None
    t, e = s.shape
    g = s.view(t, p.n_group, e // p.n_group)
    gs = g.topk(2, dim=-1)[0].sum(-1) if p.rule == SIGMOID_BIAS_GROUP else g.max(dim=-1).values
    gidx = torch.topk(gs, k=p.topk_group, dim=-1, sorted=False)[1]
    gmask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gidx, True)
    smask = gmask.unsqueeze(-1).expand(-1, p.n_group, e // p.n_group).reshape(t, e)
    return s.masked_fill(~smask, -torch.inf), gs


def routing_margin(p: RouterParams, logits: torch.Tensor, correction_bias: torch.Tensor | None = None):
    """Per token, how far the decision is from flipping: the k-th minus the (k+1)-th selection score
    (in the family's score space), float32 [T]; for group-limited rules the smaller of that and the gap
    between the last chosen and the first unchosen group. inf where no alternative exists.

    The sparsemixer picks its two experts one after the other by logit, so its set is the top 2 as well.
    """
    s, gs = selection_scores(p, logits, correction_bias)
    k = min(p.top_k, s.shape[-1])
    if k >= s.shape[-1]:
        return torch.full(s.shape[:1], torch.inf, device=s.device)
    top = torch.topk(s, k + 1, dim=-1).values
    m = top[:, k - 1] - top[:, k]
    m = torch.where(torch.isfinite(top[:, k]), m, torch.full_like(m, torch.inf))
    if gs is not None:
        gt = torch.topk(gs, p.topk_group + 1, dim=-1).values
        m = torch.minimum(m, gt[:, p.topk_group - 1] - gt[:, p.topk_group])
    return m


class ForcedRoutes:
    """Replace the routers' choices with given routes (a replay) and record what each router chose itself.

    `set(routes)` before each forward: {layer: (rows [N] long, index [N, K], weights [N, K] or None)}, rows
    indexing the flattened [B*S] tokens of the batch. A layer not in `routes` routes freely. With weights,
    the recorded weights are used as given; without, the model's own router scores restricted to the given
    experts, weighted by the family's rule (`route` with a per-token force mask). Rows whose given set
    equals the router's own keep the router's output untouched, so a self-replay is bit-identical.

    After a forward, `own[layer]` is the router's own index [B*S, K] (before the replacement: the choice
    the model makes on the inputs the replayed upstream layers produced), `margin[layer]` its margin
    (with margins=True).
    """

    def __init__(self, mm, layers=None, margins: bool = False):
        self.mm = mm
        self.layers = list(mm.moe_layers if layers is None else layers)
        self.margins = margins
        self.routes: dict = {}
        self.own: dict[int, torch.Tensor] = {}
        self.margin: dict[int, torch.Tensor] = {}
        self.params = {lay.index: router_params(mm, lay) for lay in mm.layers if lay.index in self.layers}
        if margins and mm.family.rule not in RULES:
            raise WorkbenchError(f"router margins need the family's routing rule, which is unknown for "
                                 f"{mm.family.model_type} (a generic model)")
        self.handles: list = []

    def set(self, routes: dict | None) -> None:
        """Routes for the next forward, moved to the model's device now (one non-blocking copy per tensor from
        pinned memory on a GPU, instead of a synchronous copy inside every router hook)."""
        dev = self.mm.device
        self.routes = {layer: tuple(_on(t, dev) for t in r[:3]) + tuple(r[3:]) for layer, r in (routes or {}).items()}
        self.own, self.margin = {}, {}

    def _hook(self, index: int):
        p = self.params[index]

        def hook(module, args, out):
            ro = RouterOut.of(out)
            flat = ro.logits.reshape(-1, ro.logits.shape[-1])
            i0 = ro.index.reshape(-1, ro.index.shape[-1])
            w0 = ro.weights.reshape(-1, ro.weights.shape[-1])
            bias = getattr(module, "e_score_correction_bias", None)
            self.own[index] = i0
            if self.margins:
                self.margin[index] = routing_margin(p, flat, bias)
            r = self.routes.get(index)
            if r is None:
                return None
            rows, idx, w = r[:3]  # (anything after is the caller's)
            dev = i0.device
            rows, idx = rows.to(dev), idx.to(dev, i0.dtype)
            new_i, new_w = i0.clone(), w0.clone()
            if w is None:
                force = torch.zeros(len(rows), flat.shape[-1], dtype=torch.bool, device=dev).scatter_(1, idx, True)
                pp = p if bias is None else replace(p, correction_bias=bias)
                orig = (flat[rows], w0[rows], i0[rows])
                z, w_r, i_r = route(pp, orig[0], force=force)
                dense = torch.zeros(len(rows), flat.shape[-1], dtype=w_r.dtype, device=dev).scatter_(1, i_r, w_r)
                z, w_new, i_new = merge_with_original(pp, orig, (z, dense.gather(1, idx), idx), False)  # given order
                new_i[rows], new_w[rows] = i_new.to(i0.dtype), w_new.to(w0.dtype)
            else:
                new_i[rows], new_w[rows] = idx, w.to(dev, w0.dtype)
            return ro.replace(index=new_i.reshape(ro.index.shape), weights=new_w.reshape(ro.weights.shape)).to_output()
        return hook

    def attach(self) -> None:
        try:
            for lay in self.mm.layers:
                if lay.index in self.layers:  # prepend: capture hooks registered later see the replayed routes
                    self.handles.append(register(self.mm, f"L{lay.index}.router", self._hook(lay.index), prepend=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _on(t, dev):
    if not isinstance(t, torch.Tensor) or t.device == dev:
        return t
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


@contextlib.contextmanager
def forced_routes(mm, layers=None, margins: bool = False):
    """`with forced_routes(mm) as fr: fr.set({3: (rows, index, weights)}); mm.model(...)` - see ForcedRoutes."""
    fr = ForcedRoutes(mm, layers, margins)
    fr.attach()
    try:
        yield fr
    finally:
        fr.detach()
