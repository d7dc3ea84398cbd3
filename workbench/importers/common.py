"""What the engine readers (vllm.py, sglang.py) and the run writer (the package) share: the document and
count types, model facts, checked integer fields, release-dependent id spaces and the physical->logical map.
A module of its own so the readers never import the package that imports them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError

ENGINES = ("vllm", "sglang", "sglang-dump")


@dataclass
class Doc:
    """One sequence as an engine recorded it (engine layout, before layer mapping)."""

    token_ids: np.ndarray  # [n] int64, -1 where the engine output does not carry the id
    experts: np.ndarray  # [R, L_src, K] integer, R <= n: routing of positions start..start+R-1
    n_prompt: int  # tokens before this index are prompt (prefill), the rest generated (decode)
    start: int = 0  # position of the first token (a prefix the engine did not send starts later)
    cached: int = 0  # prompt tokens served from the prefix cache
    labels: dict = field(default_factory=dict)


@dataclass
class Counts:
    """Aggregated loads: counts[W, L_src, E] per window (forward pass or recorder step), logical ids."""

    counts: np.ndarray
    window: str  # what one window is
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Model facts: decoder layers, which are MoE, E, K (from a model folder, a config.json, or inferred)


def model_facts(model) -> dict:
    """The `model` section of a manifest from a spec (`demo`, folder, config.json, hub id), without
    loading weights: the model is built on the meta device and mapped by the family table."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models.loading import resolve_model_path, wrap_model

    spec = str(model)
    p = Path(spec).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        path = str(p.parent.resolve())
        cfg_src = str(p)
    else:
        path = resolve_model_path(spec)
        cfg_src = path
    try:
        cfg = AutoConfig.from_pretrained(cfg_src)
    except (OSError, ValueError) as e:
        raise WorkbenchError(f"cannot read the model config {spec!r}: {str(e).splitlines()[0]}") from None
    if not hasattr(cfg, "num_hidden_layers") and getattr(cfg, "text_config", None) is not None:
        cfg = cfg.text_config  # multimodal wrappers: the engines read hf_text_config
    try:
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any construction failure is the user's config
        raise WorkbenchError(f"cannot build {cfg.model_type} from {spec!r}: {str(e).splitlines()[0]}") from None
    facts = wrap_model(net, None, spec=spec, path="").describe()
    facts.update(path=path, file_hashes={})
    tok = None
    if Path(path).is_dir():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
        except Exception:  # noqa: BLE001 - a config without a tokenizer is fine: token strings stay empty
            tok = None
    return {"facts": facts, "tokenizer": tok}


def inferred_facts(n_layers: int, moe_layers: list[int], n_experts: int, top_k: int) -> dict:
    return {"facts": {"spec": None, "path": None, "model_type": "unknown", "family": "unknown",
                      "routing_rule": "unknown", "n_layers": n_layers, "moe_layers": moe_layers,
                      "n_experts": n_experts, "top_k": top_k, "shared_experts": 0, "file_hashes": {}},
            "tokenizer": None}


def layer_columns(n_src: int, facts: dict) -> np.ndarray:
    """Columns of the engine's layer axis that hold MoE layers, in `moe_layers` order.

    The engines index by decoder layer (num_hidden_layers, dense layers left empty); an axis as long
    as the MoE layers is read as MoE-layer order and mapped onto the decoder indices."""
    moe = list(facts["moe_layers"])
    if n_src == facts["n_layers"]:
        return np.asarray(moe, np.int64)
    if n_src == len(moe):
        return np.arange(len(moe))
    raise WorkbenchError(f"the routing has {n_src} layers but the model has {facts['n_layers']} decoder layers "
                         f"({len(moe)} MoE): pass the model the engine served with --model")


# ---------------------------------------------------------------------------------------------------
# Limits of the run's columns, and reading fields an engine (or a hand-edited file) declares

INT16_MAX = 2**15 - 1  # routing.experts, routing.layer, expert_load.expert
INT32_MAX = 2**31 - 1  # tokens.token_id, tokens.pos


def whole(value, what: str, lo: int = 0, hi: int = INT32_MAX) -> int:
    """A declared count or offset as an int in [lo, hi], or one sentence saying why not."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise WorkbenchError(f"{what} must be a whole number, got {str(value)[:40]!r}")
    if isinstance(value, (float, np.floating)) and not float(value).is_integer():
        raise WorkbenchError(f"{what} must be a whole number, got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise WorkbenchError(f"{what} is {v}, outside [{lo}, {hi}]")
    return v


def id_list(x, what: str) -> list[int]:
    """Token ids (a list, array or tensor of whole numbers that fit the int32 token_id column)."""
    if x is None:
        return []
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    if isinstance(x, (str, bytes, dict)) or not hasattr(x, "__len__"):
        raise WorkbenchError(f"{what} must be a list of token ids, got {type(x).__name__}")
    if len(x) and (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.integer)):
        a = x.astype(np.int64).reshape(-1)
    else:
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in x):
            bad = next(t for t in x if isinstance(t, bool) or not isinstance(t, (int, np.integer)))
            raise WorkbenchError(f"{what} must hold whole token ids, found {str(bad)[:40]!r}")
        try:
            a = np.asarray([int(t) for t in x], np.int64)
        except OverflowError:
            raise WorkbenchError(f"{what} holds a token id beyond 64 bits") from None
    if a.size and (a.min() < 0 or a.max() > INT32_MAX):
        v = int(a.min()) if a.min() < 0 else int(a.max())
        raise WorkbenchError(f"{what} holds token id {v}, outside the stored range [0, {INT32_MAX}]")
    return a.tolist()


def parse_version(v) -> tuple | None:
    """'0.5.10' / 'v0.22.1rc1' -> (0, 5, 10) / (0, 22, 1); None stays None."""
    if v is None:
        return None
    import re

    m = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", str(v).strip())
    if not m:
        raise WorkbenchError(f"--engine-version must look like 0.22.1, got {str(v)[:40]!r}")
    return tuple(int(g) for g in m.groups(default="0"))


# ---------------------------------------------------------------------------------------------------
# Physical -> logical expert ids


def load_physical_to_logical(src) -> np.ndarray:
    """[layers, physical] map from an array, a SGLang expert-location JSON / `.pt`, or a dump."""
    if src is None:
        return None
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.is_file():
            raise WorkbenchError(f"expert-location file {p} does not exist or is not a file")
        if p.suffix == ".pt":
            import torch

            try:
                data = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise WorkbenchError(f"cannot read {p} as tensors only: {str(e).splitlines()[0]}") from None
        else:
            try:
                data = json.loads(p.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise WorkbenchError(f"{p} is not valid JSON") from None
        src = data
    if isinstance(src, dict):
        for k in ("physical_to_logical_map", "last_physical_to_logical_map"):
            if k in src:
                src = src[k]
                break
        else:
            raise WorkbenchError("the expert-location data has no physical_to_logical_map")
    try:
        arr = np.asarray(src.cpu().numpy() if hasattr(src, "cpu") else src)
    except (ValueError, TypeError):
        raise WorkbenchError("physical_to_logical_map must be a [layers, physical experts] table of ids") from None
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise WorkbenchError(f"physical_to_logical_map must be [layers, physical experts] of whole ids, got "
                             f"shape {arr.shape} of {arr.dtype}")
    return arr.astype(np.int64)


def map_for_layers(m: np.ndarray, facts: dict) -> np.ndarray:
    """The map's rows for the MoE layers, in `moe_layers` order (a map may list every decoder layer)."""
    moe = list(facts["moe_layers"])
    if m.shape[0] == facts["n_layers"]:
        return m[moe]
    if m.shape[0] == len(moe):
        return m
    raise WorkbenchError(f"physical_to_logical_map has {m.shape[0]} layers; the model has {facts['n_layers']} "
                         f"decoder layers ({len(moe)} MoE)")


def to_logical(m: np.ndarray, ex: np.ndarray, E: int) -> np.ndarray:
    """ex [R, L, K] physical (all >= 0) -> logical through m [L, P]; a slot the map leaves empty (-1) or
    sends past E must not be used: the map is not the one the engine ran."""
    if ex.size == 0:
        return ex
    hi = int(ex.max())
    if hi >= m.shape[1]:
        raise WorkbenchError(f"expert id {hi} exceeds the {m.shape[1]} physical experts of the "
                             "physical_to_logical_map: the map is not the one the engine ran")
    out = m[np.arange(ex.shape[1])[None, :, None], ex]
    bad = (out < 0) | (out >= E)
    if bad.any():
        r, layer, k = (int(v[0]) for v in np.nonzero(bad))
        raise WorkbenchError(f"the physical_to_logical_map sends physical expert {int(ex[r, layer, k])} (MoE layer "
                             f"{layer}) to {int(out[r, layer, k])}, not an expert below {E}, yet {int(bad.sum())} "
                             "routed slots use such entries: the map is not the one the engine ran")
    return out


# Releases whose ids are physical (after the EPLB logical->physical remap); the rest report logical ids.
PHYSICAL_RELEASES = {"vllm": ((0, 0, 0), (0, 16, 0)), "sglang": ((0, 0, 0), (0, 5, 10))}


def resolve_ids(engine: str, version: tuple | None, p2l, max_raw: int, E: int, facts: dict):
    """(map to apply or None, what the stored ids are) for responses of `engine` at `version`."""
    name = {"vllm": "vLLM", "sglang": "SGLang"}[engine]
    lo, hi = PHYSICAL_RELEASES[engine]
    vs = None if version is None else ".".join(map(str, version))
    if version is not None and not lo <= version < hi:  # logical ids
        if p2l is not None:
            raise WorkbenchError(f"{name} {vs} reports logical expert ids (captured before its EPLB remap): drop "
                                 "--physical-to-logical")
        return None, "logical"
    if p2l is None:
        if max_raw >= E:
            raise WorkbenchError(
                f"expert id {max_raw} is out of range for {E} experts: the engine ran with redundant (physical) "
                "experts; pass the placement it used with --physical-to-logical (SGLang's expert-location JSON or "
                "a recorder dump)" + ("" if version is not None else ", or --engine-version if the model differs"))
        return None, "physical = logical (no EPLB)" if version is not None else "logical"
    m = map_for_layers(p2l, facts)
    if version is None and max_raw < E and max_raw >= 0:
        ident = (m[:, : max_raw + 1] == np.arange(min(max_raw + 1, m.shape[1]))).all()
        if not ident:
            raise WorkbenchError(
                f"every expert id is below {E}, so the ids may be logical ({name} "
                f"{'0.16+' if engine == 'vllm' else '0.5.10+'} captures them before the remap) and the map would "
                f"corrupt them: pass --engine-version (the {name} release that served) to say which they are")
    return p2l, "logical (mapped from physical)"


def labels_of(tok_row: dict | None) -> dict:
    """The label fields of a saved request (scalars other than the token and text fields)."""
    if not tok_row:
        return {}
    return {k: v for k, v in tok_row.items() if k not in ("input_ids", "prompt_token_ids", "output_ids", "token_ids",
                                                          "text") and isinstance(v, (str, int, float, bool))}
