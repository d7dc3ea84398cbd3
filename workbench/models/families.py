"""The one table of per-family MoE quirks.

Adding a family means adding a row here, nothing else: which attribute of a decoder layer holds the
MoE block, where its router / fused experts / shared expert live, which routing rule the router
applies (interventions redo it), and which config keys give E and K. Families not in the table are
still supported when their structure matches (router returning (logits, weights, index) and a
fused experts module switched by `use_experts_implementation`): they are marked "generic".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# The transformers and torch releases the compatibility job (tools/compat.py, run by .ci/run) last
# passed on; pyproject's dependency floor is the oldest. Drift errors quote this range.
TESTED = {"transformers": ("5.21.0", "5.25.0"), "torch": ("2.13.0", "2.13.0")}

# Routing rules, named once. Interventions (probes/interventions.py) implement each of them.
SOFTMAX_TOPK = "softmax_topk"  # softmax over E, top-k, renormalise iff norm_topk_prob (Qwen2/3, OLMoE)
SOFTMAX_TOPK_RENORM = "softmax_topk_renorm"  # always renormalised (Mixtral)
TOPK_SOFTMAX = "topk_softmax"  # top-k on logits, softmax over the k (gpt-oss, granite)
DEEPSEEK_V2 = "deepseek_v2"  # softmax, greedy or group-limited greedy, times routed_scaling_factor
SIGMOID_BIAS_GROUP = "sigmoid_bias_group"  # DeepSeek-V3: sigmoid + correction bias + group selection
SPARSEMIXER = "sparsemixer"  # PhiMoE's sparsemixer, always 2 experts


@dataclass(frozen=True)
class Family:
    model_type: str
    rule: str
    block: tuple[str, ...] = ("mlp",)  # attribute on the decoder layer, first that exists wins
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None  # shared-expert module on the block
    shared_gate: str | None = None  # sigmoid gate on the shared expert output (Qwen2-MoE)
    n_experts_keys: tuple[str, ...] = ("num_local_experts", "num_experts", "n_routed_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "top_k")
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in [
        Family("mixtral", SOFTMAX_TOPK_RENORM),
        Family("qwen2_moe", SOFTMAX_TOPK, shared="shared_expert", shared_gate="shared_expert_gate"),
        Family("qwen3_moe", SOFTMAX_TOPK),
        Family("olmoe", SOFTMAX_TOPK),
        Family("deepseek_v2", DEEPSEEK_V2, shared="shared_experts"),
        Family("deepseek_v3", SIGMOID_BIAS_GROUP, shared="shared_experts",
               extra={"router_attrs": ("e_score_correction_bias",)}),
        Family("gpt_oss", TOPK_SOFTMAX, router="router", notes="router has a bias; experts interleaved gate/up with biases"),
        Family("phimoe", SPARSEMIXER, router="router"),
        Family("granitemoe", TOPK_SOFTMAX, block=("block_sparse_moe",), router="router"),
    ]
}

# Families with their own MoE code that the generic capture path would get wrong (DESIGN.md).
UNSUPPORTED = {
    "dbrx": "dbrx does top-k outside its router",
    "llama4_text": "llama4 applies the routing weight to the expert input",
    "llama4": "llama4 applies the routing weight to the expert input",
    "jetmoe": "jetmoe has its own MoE code",
    "longcat_flash": "longcat_flash routes to zero experts (ids >= E)",
}

GENERIC_BLOCK_NAMES = ("mlp", "block_sparse_moe", "moe", "feed_forward")
GENERIC_ROUTER_NAMES = ("gate", "router")

SUPPORTED_SENTENCE = (
    "supported: " + ", ".join(sorted(FAMILIES)) + ", and any decoder whose router returns "
    "(logits, weights, indices) with a fused experts module"
)


# ---- the family contract: what the table expects of the transformers modeling code ---------------------


def modeling_module(family: Family) -> str:
    """The transformers module whose classes a family's router / experts / block must come from."""
    return f"transformers.models.{family.model_type}.modeling_{family.model_type}"


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def drift_sentence(family: str, problem: str, more: int = 0, remote: str | None = None) -> str:
    """One sentence for a family whose MoE code no longer has the shape the table expects: the installed
    transformers' code, or (`remote`, the model class's module) the model's own trust_remote_code code."""
    lo, hi = TESTED["transformers"]
    extra = f" (and {more} more difference{'s' if more > 1 else ''})" if more else ""
    if remote:
        return (f"{family} with its own modeling code ({remote}, trust_remote_code): {problem}{extra}; the family "
                f"table describes transformers' {family} code, so load the model without trust_remote_code")
    return (f"{family} on transformers {transformers_version()}: {problem}{extra}; the workbench's family table "
            f"expects the MoE code of transformers {lo} to {hi} (pip install -c constraints.txt, see docs/compat.md)")


def _cls(mod) -> str:
    return f"{type(mod).__module__}.{type(mod).__qualname__}"


def missing_parts(family: Family, decoder_layers) -> str | None:
    """For a table family where no MoE layer was found: which expected attribute is missing or unfused
    in the first decoder layer that has the block (a renamed module), or None when no layer has the block
    at all (a dense model)."""
    for i, dec in enumerate(decoder_layers):
        name = next((n for n in family.block if hasattr(dec, n)), None)
        if name is None:
            continue
        block = getattr(dec, name)
        kids = ", ".join(n for n, _ in block.named_children()) or "none"
        if not hasattr(block, family.router):
            return f"the MoE block `{name}` of layer {i} ({_cls(block)}) has no router `{family.router}` (children: {kids})"
        experts = getattr(block, family.experts, None)
        if experts is None:
            return f"the MoE block `{name}` of layer {i} has no experts module `{family.experts}` (children: {kids})"
        down = getattr(experts, "down_proj", None)
        if getattr(down, "ndim", 0) != 3:
            return (f"the experts `{family.experts}` of layer {i} are {_cls(experts)}, not one fused module "
                    f"with 3-d down_proj [experts, ...] weights")
    return None


def contract_problems(family: Family, layers, n_experts: int, top_k: int, hidden_size: int,
                      check_classes: bool = True) -> list[str]:
    """What differs between a loaded model's MoE code and what the family row expects, checked on the
    first MoE layer: classes from the family's modeling module, fused 3-d expert weights, the router's
    output (logits [T, E] equal to its own linear projection, weights [T, K], integer index [T, K]) and
    the router attributes the family's routing rule reads. Empty when everything matches."""
    import torch

    want = modeling_module(family)
    layer = layers[0]
    i = layer.index
    out: list[str] = []
    for part, mod in (("router", layer.router), ("experts module", layer.experts), ("MoE block", layer.block)):
        if check_classes and type(mod).__module__ != want:
            out.append(f"the {part} of layer {i} is {_cls(mod)}, not a class of {want}")
    for name in ("gate_up_proj", "down_proj"):
        w = getattr(layer.experts, name, None)
        if getattr(w, "ndim", 0) != 3 or w.shape[0] != n_experts:
            shape = tuple(w.shape) if torch.is_tensor(w) else None
            out.append(f"the experts' {name} is {shape}, not a fused [{n_experts}, ...] weight")
    for attr in family.extra.get("router_attrs", ()):
        if getattr(layer.router, attr, None) is None:
            out.append(f"the router of layer {i} has no `{attr}`, which the {family.rule} rule reads")
    out += _router_output_problems(layer.router, i, n_experts, top_k, hidden_size)
    return out


def _router_output_problems(router, i: int, n_experts: int, top_k: int, hidden_size: int) -> list[str]:
    """Call the router on 5 fixed random tokens and compare its output with the contract."""
    import torch

    p = next(router.parameters(), None)
    if p is None or p.device.type == "meta":  # offloaded / not materialised yet: nothing to run
        return []
    gen = torch.Generator(device="cpu").manual_seed(0)  # the caller's random stream is left alone
    x = torch.randn(5, hidden_size, generator=gen).to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            out = router.forward(x)  # not __call__: hooks someone registered must not see probe tokens
    except Exception as e:  # noqa: BLE001 - any failure here is a contract difference to report
        return [f"calling the router of layer {i} on [5, {hidden_size}] hidden states raised "
                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    if not (isinstance(out, (tuple, list)) and len(out) >= 3 and all(torch.is_tensor(t) for t in out[:3])):
        what = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list)) else "")
        return [f"the router of layer {i} ({_cls(router)}) returns {what}, not (logits, weights, index)"]
    logits, weights, index = (t.reshape(-1, t.shape[-1]) for t in out[:3])
    if not logits.dtype.is_floating_point and index.dtype.is_floating_point and index.shape[-1] == n_experts:
        return [f"the router of layer {i} returns (index, weights, logits), the reverse of the (logits, weights, "
                "index) order the probes read"]
    problems = []
    if tuple(logits.shape) != (5, n_experts):
        problems.append(f"the router's logits are {tuple(logits.shape)}, not [tokens, {n_experts}]")
    if tuple(index.shape) != (5, top_k) or tuple(weights.shape) != (5, top_k):
        problems.append(f"the router's weights / index are {tuple(weights.shape)} / {tuple(index.shape)}, "
                        f"not [tokens, {top_k}]")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        problems.append(f"the router's index is {index.dtype}, not an integer tensor")
    weight = getattr(router, "weight", None)
    if not problems and torch.is_tensor(weight) and weight.shape == (n_experts, hidden_size):
        bias = getattr(router, "bias", None)
        with torch.no_grad():
            ref = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
        got = logits.detach().double()
        tol = 1e-4 if p.dtype == torch.float32 else 2e-2
        if not torch.allclose(got, ref, rtol=tol, atol=tol * float(ref.abs().max())):
            rows = got.sum(-1)
            if bool(((got >= 0) & (got <= 1)).all()) and torch.allclose(rows, torch.ones_like(rows), atol=1e-3):
                problems.append(f"the router of layer {i} returns probabilities (rows sum to 1) as its first "
                                "output where the workbench expects the raw logits")
            else:
                problems.append(f"the router of layer {i}'s first output is not its logits (x @ weight.T)")
    return problems
