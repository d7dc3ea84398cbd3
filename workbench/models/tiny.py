"""`workbench tiny`: small random-weight checkpoints of real MoE architectures, built offline.

The tokenizer is byte-level (every byte is a token, plus a few merges), so any text round-trips and
nothing has to be downloaded. Same family + sizes + seed -> identical files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import WorkbenchError
from .families import FAMILIES

# Family-specific config keys beyond the common sizes (only what a tiny build needs to be valid).
_FAMILY_OVERRIDES = {
    "mixtral": {},
    "qwen2_moe": {"norm_topk_prob": False, "shared_expert_intermediate_size": "2i"},
    "qwen3_moe": {"norm_topk_prob": True, "head_dim": "hd"},
    "olmoe": {"norm_topk_prob": False},
    "deepseek_v2": {"num_key_value_heads": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": None,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "topk_method": "greedy",
                    "n_group": 1, "topk_group": 1},
    "deepseek_v3": {"num_key_value_heads": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 24,
                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 2,
                    "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True},
    "gpt_oss": {"head_dim": "hd", "sliding_window": 16, "layer_types": "alternate"},
    "phimoe": {},
    "granitemoe": {},
}
_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_INTER_KEYS = ("intermediate_size", "moe_intermediate_size")

SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def byte_tokenizer(extra_merges_text: str | None = None):
    """A byte-level BPE tokenizer with 256 byte tokens + specials; loads with AutoTokenizer offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIAL_TOKENS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   bos_token="<|endoftext|>")


def tiny_config(model_type: str, layers: int = 4, experts: int = 8, top_k: int = 2, hidden: int = 64,
                vocab_size: int = 320):
    from transformers import AutoConfig

    if model_type not in _FAMILY_OVERRIDES:
        raise WorkbenchError(
            f"no tiny recipe for {model_type!r}; choose one of {', '.join(sorted(_FAMILY_OVERRIDES))}"
        )
    if top_k > experts:
        raise WorkbenchError(f"--top-k {top_k} is larger than --experts {experts}")
    if hidden % 8:
        raise WorkbenchError(f"--hidden must be a multiple of 8, got {hidden}")
    if model_type == "phimoe" and top_k != 2:
        raise WorkbenchError("phimoe's sparsemixer always picks 2 experts: use --top-k 2")
    base = AutoConfig.for_model(model_type)
    heads = 4
    hd = hidden // heads
    kw = dict(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=2,
              vocab_size=vocab_size, max_position_embeddings=2048, num_experts_per_tok=top_k,
              tie_word_embeddings=False, pad_token_id=257, eos_token_id=256, bos_token_id=256)
    for k in _EXPERT_KEYS:
        if hasattr(base, k):
            kw[k] = experts
    for k in _INTER_KEYS:
        if hasattr(base, k):
            kw[k] = hidden
    if hasattr(base, "layer_types"):
        kw["layer_types"] = None  # let the config derive it for the new depth
    for k, v in _FAMILY_OVERRIDES[model_type].items():
        if v == "hd":
            v = hd
        elif v == "2i":
            v = 2 * hidden
        elif v == "alternate":
            v = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        kw[k] = v
    cfg = AutoConfig.for_model(model_type, **kw)
    if model_type == "deepseek_v3" and experts % cfg.n_group:
        raise WorkbenchError(f"deepseek_v3 needs --experts divisible by n_group={cfg.n_group}")
    if model_type in ("deepseek_v2", "deepseek_v3") and layers < 2:
        raise WorkbenchError(f"{model_type} tiny models keep layer 0 dense: use --layers >= 2")
    return cfg


def make_tiny(model_type: str, out: str | Path, layers: int = 4, experts: int = 8, top_k: int = 2,
              hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny random checkpoint + tokenizer to `out`; returns the folder."""
    from transformers import AutoModelForCausalLM

    from .loading import seeded

    cfg = tiny_config(model_type, layers, experts, top_k, hidden)
    with seeded(seed):  # the caller's random stream is left as it was
        model = AutoModelForCausalLM.from_config(cfg)
        _spread_router(model, seed)
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def _spread_router(model, seed: int) -> None:
    """Random init leaves routers near zero (all experts tie); give them visible preferences.

    DeepSeek routers init to zeros, which would make every top-k a tie-break on index.
    """
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)
            if len(leaf) == 2 and leaf[1] == "weight" and (".gate" in leaf[0] or ".router" in leaf[0]) \
                    and p.ndim == 2 and p.shape[0] < p.shape[1] * 4 and "proj" not in leaf[0]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)


TINY_FAMILIES = tuple(sorted(FAMILIES))
