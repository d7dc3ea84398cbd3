"""The one table of per-family MoE quirks.

Adding a family means adding a row here, nothing else: which attribute of a decoder layer holds the
MoE block, where its router / fused experts / shared expert live, which routing rule the router
applies (interventions redo it), and which config keys give E and K. Families not in the table are
still supported when their structure matches (router returning (logits, weights, index) and a
fused experts module switched by `use_experts_implementation`): they are marked "generic".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
        Family("deepseek_v3", SIGMOID_BIAS_GROUP, shared="shared_experts"),
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
