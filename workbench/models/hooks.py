"""Named hook sites of an MoE model, and the one place that knows what a router returns.

A site is a string `L{i}.{where}`, `i` the decoder-layer index (never a position among MoE layers):

    L3.router          forward hook on layer 3's router; its output is the router tuple (RouterOut.of reads it)
    L3.router.in       forward pre-hook on the router (its input: the hidden states)
    L3.experts.in      forward pre-hook on the fused experts, with kwargs: experts(hidden, index, weights)
                       (ExpertsCall.of reads them)
    L3.experts.out     forward hook on the fused experts (the routed experts' weighted sum)
    L3.shared.out      forward hook on the shared expert (families that have one)
    L3.shared_gate.out forward hook on the shared expert's sigmoid gate (Qwen2-MoE)
    L3.block.in/.out   the whole MoE block (router + experts + shared)
    L12.residual.in    forward pre-hook on decoder layer 12, with kwargs (the residual stream entering it)
    L12.residual       forward hook on decoder layer 12 (the residual stream after it); every layer has it

Hook functions have torch's own signatures, so anything written for `register_forward_hook` works:
a forward hook is `fn(module, args, output)` and may return a replacement output; a pre-hook is
`fn(module, args, kwargs)` and may return `(args, kwargs)`.

    with mm.hooks({"L3.router": fn, "L12.residual": fn2}):
        mm.model(**batch)

`trace_routing` runs texts and returns the routing in memory (what `capture` writes to a run's
`routing/` table, without a run folder), the counterpart of TransformerLens's `run_with_cache`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import WorkbenchError
from .families import SUPPORTED_SENTENCE

# where -> (attribute of the MoE layer or "decoder", hook kind). "pre" hooks are registered with kwargs.
SITES: dict[str, tuple[str, str]] = {
    "router": ("router", "forward"),
    "router.in": ("router", "pre"),
    "experts.in": ("experts", "pre"),
    "experts.out": ("experts", "forward"),
    "shared.out": ("shared", "forward"),
    "shared_gate.out": ("shared_gate", "forward"),
    "block.in": ("block", "pre"),
    "block.out": ("block", "forward"),
    "residual.in": ("decoder", "pre"),
    "residual": ("decoder", "forward"),
}

_SITE_RE = re.compile(r"^L(\d+)\.(.+)$")


@dataclass(frozen=True)
class RouterOut:
    """A router's output, by name. Every family in transformers 5 returns (logits [T, E], weights [T, K],
    index [T, K]) in that order (`rest` keeps anything a future router adds after them)."""

    logits: torch.Tensor
    weights: torch.Tensor
    index: torch.Tensor
    rest: tuple = ()

    @classmethod
    def of(cls, output: Any) -> RouterOut:
        """Read a router's forward output (a tuple, or a RouterOut already)."""
        if isinstance(output, RouterOut):
            return output
        if isinstance(output, (tuple, list)) and len(output) >= 3 and all(torch.is_tensor(t) for t in output[:3]):
            return cls(output[0], output[1], output[2], tuple(output[3:]))
        what = f"a {type(output).__name__}" + (f" of {len(output)}" if isinstance(output, (tuple, list)) else "")
        raise WorkbenchError(f"a router returned {what}, not (logits, weights, index); {SUPPORTED_SENTENCE}")

    def to_output(self) -> tuple:
        """The tuple form a router returns: what a forward hook returns to replace the output."""
        return (self.logits, self.weights, self.index, *self.rest)

    def replace(self, **changes) -> RouterOut:
        return dataclasses.replace(self, **changes)

    def flat(self) -> RouterOut:
        """Each tensor as [tokens, last dim] (routers flatten [B, S] already; this is for one that did not)."""
        return self.replace(**{n: getattr(self, n).reshape(-1, getattr(self, n).shape[-1])
                               for n in ("logits", "weights", "index")})


# How transformers' fused experts name their arguments when called with keywords.
_INDEX_NAMES = ("top_k_index", "router_indices", "selected_experts", "topk_indices")
_WEIGHT_NAMES = ("top_k_weights", "routing_weights", "topk_weights")


@dataclass(frozen=True)
class ExpertsCall:
    """The call of a fused experts module, experts(hidden, index, weights), as an `experts.in` pre-hook sees
    it (positional or by keyword, depending on the family)."""

    args: tuple
    kwargs: dict
    index: torch.Tensor
    weights: torch.Tensor
    weights_at: int | str  # the position or keyword the weights came in

    @classmethod
    def of(cls, module, args, kwargs, who: str = "this") -> ExpertsCall:
        """Read a pre-hook's (args, kwargs); `who` names the feature in the error (e.g. "attribution")."""
        args, kwargs = tuple(args), dict(kwargs)
        if len(args) >= 3:
            return cls(args, kwargs, args[1], args[2], 2)
        wname = next((n for n in _WEIGHT_NAMES if n in kwargs), None)
        iname = next((n for n in _INDEX_NAMES if n in kwargs), None)
        if wname is None or (len(args) < 2 and iname is None):
            raise WorkbenchError(f"cannot find the routing weights in the call of {type(module).__name__}; "
                                 f"{who} needs experts(hidden, index, weights)")
        return cls(args, kwargs, args[1] if len(args) == 2 else kwargs[iname], kwargs[wname], wname)

    def with_weights(self, weights: torch.Tensor) -> tuple[tuple, dict]:
        """(args, kwargs) with the routing weights replaced: what the pre-hook returns."""
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.weights_at, int):
            args[self.weights_at] = weights
        else:
            kwargs[self.weights_at] = weights
        return tuple(args), kwargs


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a transformers causal LM (or of an MoEModel's model)."""
    if not isinstance(model, torch.nn.Module) and isinstance(getattr(model, "model", None), torch.nn.Module):
        model = model.model  # an MoEModel
    for get in (lambda m: m.get_decoder().layers, lambda m: m.model.layers, lambda m: m.layers):
        with contextlib.suppress(AttributeError):
            layers = get(model)
            if isinstance(layers, torch.nn.ModuleList):
                return layers
    raise WorkbenchError(f"cannot find the decoder layers of {type(model).__name__}; {SUPPORTED_SENTENCE}")


def sites(mm) -> list[str]:
    """Every site name this model has, in layer order."""
    out = []
    moe = {layer.index: layer for layer in mm.layers}
    for i in range(len(decoder_layers(mm.model))):
        for where, (attr, _) in SITES.items():
            if attr == "decoder" or (i in moe and getattr(moe[i], attr, None) is not None):
                out.append(f"L{i}.{where}")
    return out


def resolve(mm, site: str) -> tuple[torch.nn.Module, str]:
    """Site name -> (module, "forward" | "pre"); a WorkbenchError naming what exists otherwise."""
    m = _SITE_RE.match(site) if isinstance(site, str) else None
    if m is None or m.group(2) not in SITES:
        raise WorkbenchError(f"{site!r} is not a hook site; write L<layer>.<where> with <where> one of "
                             f"{', '.join(SITES)} (e.g. L3.router)")
    i, where = int(m.group(1)), m.group(2)
    attr, kind = SITES[where]
    decs = decoder_layers(mm.model)
    if i >= len(decs):
        raise WorkbenchError(f"hook site {site}: the model has decoder layers 0 to {len(decs) - 1}")
    if attr == "decoder":
        return decs[i], kind
    layer = next((lay for lay in mm.layers if lay.index == i), None)
    if layer is None:
        raise WorkbenchError(f"hook site {site}: layer {i} is not an MoE layer (MoE layers: "
                             f"{', '.join(map(str, mm.moe_layers))})")
    mod = getattr(layer, attr)
    if mod is None:
        raise WorkbenchError(f"hook site {site}: layer {i} of this model has no {attr.replace('_', ' ')}")
    return mod, kind


def register(mm, site: str, fn: Callable, prepend: bool = False):
    """Register one hook at a named site; returns torch's removable handle."""
    mod, kind = resolve(mm, site)
    if kind == "pre":
        return mod.register_forward_pre_hook(fn, with_kwargs=True, prepend=prepend)
    return mod.register_forward_hook(fn, prepend=prepend)


class Hooks:
    """Hooks registered at named sites, all or nothing; `remove()` or use as a context manager."""

    def __init__(self, mm, mapping: dict[str, Callable], prepend: bool = False):
        if not isinstance(mapping, dict):
            raise WorkbenchError("hooks take a dict of site name -> function, e.g. {'L3.router': fn}")
        for site, fn in mapping.items():  # check every name before touching the model
            resolve(mm, site)
            if not callable(fn):
                raise WorkbenchError(f"the hook for {site} is a {type(fn).__name__}, not a function")
        self.handles: list = []
        try:
            for site, fn in mapping.items():
                self.handles.append(register(mm, site, fn, prepend))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class RoutingTrace:
    """Routing of texts held in memory, token-major like analysis.common.RoutingArrays (the same field
    names, so code written for a run's arrays reads it): `doc` is the text's index in the input list.

    experts[t, l, k] is the k-th expert (the model's order) token t chose in MoE layer layers[l].
    """

    doc: np.ndarray  # [T] int64
    pos: np.ndarray  # [T] int32
    layers: list[int]
    experts: np.ndarray  # [T, L, K] int16
    weights: np.ndarray  # [T, L, K] float32
    n_experts: int
    token_ids: np.ndarray  # [T] int32
    tokens: list[str]  # [T] each token decoded on its own
    logits: np.ndarray | None = None  # [T, L, E] float32 with logits=True

    @property
    def doc_bounds(self) -> np.ndarray:
        """Start offsets of each text's rows, plus the end."""
        change: np.ndarray = np.flatnonzero(np.diff(self.doc)) + 1
        return np.concatenate([[0], change, [len(self.doc)]])

    def text(self, i: int) -> slice:
        """The rows of text i."""
        rows = np.flatnonzero(self.doc == i)
        return slice(int(rows[0]), int(rows[-1]) + 1) if len(rows) else slice(0, 0)


def trace_routing(mm, texts, logits: bool = False, batch_size: int = 1, layers=None) -> RoutingTrace:
    """Run `texts` (a string or a list) through the model and return the routing of every token.

    The same forward as `capture` (tokens without special tokens, right padding, no KV cache), with
    router hooks appended after any active `mm.steer(...)`, so steered routing is what is recorded.
    batch_size > 1 pads texts together (faster; routing may differ from one text at a time by rounding).
    layers: the MoE layers to keep (default all).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise WorkbenchError("trace_routing needs a string or a non-empty list of strings")
    if batch_size < 1:
        raise WorkbenchError("batch_size must be at least 1")
    keep = list(mm.moe_layers) if layers is None else [int(x) for x in layers]
    bad = [x for x in keep if x not in mm.moe_layers]
    if bad or not keep:
        raise WorkbenchError(f"layer {bad[0] if bad else '(none)'} is not an MoE layer of this model "
                             f"(MoE layers: {', '.join(map(str, mm.moe_layers))})")
    enc = [list(mm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    empty = [i for i, ids in enumerate(enc) if not ids]
    if empty:
        raise WorkbenchError(f"text {empty[0]} has no tokens to route")
    pad = mm.tokenizer.pad_token_id if mm.tokenizer.pad_token_id is not None else 0
    seen: dict[int, RouterOut] = {}

    def hook(i):
        def fn(module, args, out):
            seen[i] = RouterOut.of(out)
        return fn

    ex: list[np.ndarray] = []
    w: list[np.ndarray] = []
    lg: list[np.ndarray] = []
    doc: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    ids_all: list[np.ndarray] = []
    with Hooks(mm, {f"L{i}.router": hook(i) for i in keep}), torch.inference_mode():
        for start in range(0, len(enc), batch_size):
            chunk = enc[start:start + batch_size]
            lengths = [len(c) for c in chunk]
            ids = torch.full((len(chunk), max(lengths)), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, c in enumerate(chunk):
                ids[b, :len(c)] = torch.tensor(c)
                mask[b, :len(c)] = 1
            valid = torch.nonzero(mask.reshape(-1)).reshape(-1)
            seen.clear()
            mm.model(input_ids=ids.to(mm.device), attention_mask=mask.to(mm.device), use_cache=False)
            missing = [i for i in keep if i not in seen]
            if missing:
                raise WorkbenchError(f"the routers of layers {missing} did not run; the MoE block was replaced "
                                     "or bypassed")
            recs = [seen[i].flat() for i in keep]

            def take(t):
                return t.index_select(0, valid.to(t.device)).to("cpu")

            ex.append(torch.stack([take(r.index).to(torch.int16) for r in recs], 1).numpy())
            w.append(torch.stack([take(r.weights).to(torch.float32) for r in recs], 1).numpy())
            if logits:
                lg.append(torch.stack([take(r.logits).to(torch.float32) for r in recs], 1).numpy())
            for b, n in enumerate(lengths):
                doc.append(np.full(n, start + b, np.int64))
                pos.append(np.arange(n, dtype=np.int32))
                ids_all.append(np.asarray(chunk[b], np.int32))
    token_ids = np.concatenate(ids_all)
    return RoutingTrace(doc=np.concatenate(doc), pos=np.concatenate(pos), layers=keep, experts=np.concatenate(ex),
                        weights=np.concatenate(w), n_experts=int(mm.n_experts), token_ids=token_ids,
                        tokens=[mm.tokenizer.decode([int(t)]) for t in token_ids],
                        logits=np.concatenate(lg) if logits else None)
