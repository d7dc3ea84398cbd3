"""Import routing recorded by serving engines (vLLM, SGLang) into a normal workbench run.

Engines record expert ids only (no routing weights, logits or expert outputs), so an imported run has
`tokens/` and `routing/` with null weights (or, from an aggregated SGLang dump, only `expert_load/`
counts). Every analysis that needs expert ids alone runs on it unchanged.

Formats (read from the engines' source):
- vLLM `enable_return_routed_experts`: `CompletionOutput.routed_experts` is an int array
  [tokens, num_hidden_layers, top_k] covering prompt + output minus the last token (never fed
  back); newer releases split it into `RequestOutput.prompt_routed_experts` and the completion's
  generated part. Ids are logical (captured before the EPLB logical->physical mapping); the layer
  axis is the decoder-layer index, dense layers left zero.
- SGLang `--enable-return-routed-experts`: `meta_info["routed_experts"]` is base64 of int32
  [seqlen - 1, num_hidden_layers, top_k]; ids are captured after the EPLB mapping, so physical.
- SGLang expert distribution recorder (`.pt`): per-token records (`topk_ids_of_layer` [layers,
  tokens, 8], -1 padded, physical ids, plus `last_physical_to_logical_map`) or counts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

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
# Physical -> logical expert ids


def load_physical_to_logical(src) -> np.ndarray:
    """[layers, physical] map from an array, a SGLang expert-location JSON / `.pt`, or a dump."""
    if src is None:
        return None
    if isinstance(src, (str, Path)):
        p = Path(src)
        if not p.exists():
            raise WorkbenchError(f"expert-location file {p} does not exist")
        if p.suffix == ".pt":
            import torch

            try:
                data = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001
                raise WorkbenchError(f"cannot read {p} as tensors only: {str(e).splitlines()[0]}") from None
        else:
            try:
                data = json.loads(p.read_text())
            except json.JSONDecodeError:
                raise WorkbenchError(f"{p} is not valid JSON") from None
        src = data
    if isinstance(src, dict):
        for k in ("physical_to_logical_map", "last_physical_to_logical_map"):
            if k in src:
                src = src[k]
                break
        else:
            raise WorkbenchError("the expert-location data has no physical_to_logical_map")
    arr = np.asarray(src.cpu().numpy() if hasattr(src, "cpu") else src, np.int64)
    if arr.ndim != 2:
        raise WorkbenchError(f"physical_to_logical_map must be [layers, physical experts], got shape {arr.shape}")
    return arr


# ---------------------------------------------------------------------------------------------------
# The writer: Docs -> tokens/ + routing/ (null weights), in parts, resumable


def _null_weights(n: int, k: int) -> pa.Array:
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.nulls(n * k, pa.float32()))


def _experts_list(ex: np.ndarray) -> pa.Array:
    n, k = ex.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ex.reshape(-1).astype(np.int16)))


class _DocConverter:
    """Engine layout -> rows in the run's layout (decoder-layer index, logical ids, valid tokens only)."""

    def __init__(self, facts: dict, p2l: np.ndarray | None):
        self.facts, self.p2l = facts, p2l
        self.E, self.K = int(facts["n_experts"]), int(facts["top_k"])
        self.layers = np.asarray(facts["moe_layers"], np.int16)
        self.dropped = 0  # tokens whose routing the engine left empty (zero-filled or -1)
        self.unrouted_tail = 0  # tokens after the last routed one (the last generated token)

    def convert(self, doc: Doc):
        ex = np.asarray(doc.experts)
        if ex.ndim != 3:
            raise WorkbenchError(f"routed experts must be [tokens, layers, top_k], got shape {ex.shape}")
        if ex.shape[2] < self.K:
            raise WorkbenchError(f"routed experts hold {ex.shape[2]} experts a token, the model's top_k is {self.K}")
        cols = layer_columns(ex.shape[1], self.facts)
        ex = ex[:, :, : self.K].astype(np.int64) if ex.shape[2] > self.K else ex.astype(np.int64)
        if self.p2l is not None:
            ex = self._to_logical(ex)
        ex = ex[:, cols, :]  # [R, L_moe, K]
        r = min(len(ex), len(doc.token_ids))
        self.unrouted_tail += len(doc.token_ids) - r
        ex = ex[:r]
        bad = (ex < 0).any(axis=(1, 2))
        if self.K > 1:  # a real top-k never repeats an expert; a zero-filled slot does
            bad |= (ex == ex[:, :, :1]).all(axis=2).any(axis=1)
        if (ex[~bad] >= self.E).any():
            hi = int(ex[~bad].max())
            raise WorkbenchError(
                f"expert id {hi} is out of range for {self.E} experts: the engine ran with redundant (physical) "
                "experts; pass the placement it used with --physical-to-logical (SGLang's expert-location JSON "
                "or a recorder dump)")
        keep = np.flatnonzero(~bad)
        self.dropped += int(bad.sum())
        return keep, ex[keep]

    def _to_logical(self, ex: np.ndarray) -> np.ndarray:
        m = self.p2l
        if m.shape[0] != ex.shape[1]:
            if m.shape[0] == len(self.layers) and ex.shape[1] == self.facts["n_layers"]:
                full = np.tile(np.arange(m.shape[1]) % self.E, (ex.shape[1], 1))
                full[self.layers] = m
                m = full
            else:
                raise WorkbenchError(f"physical_to_logical_map has {m.shape[0]} layers, the routing {ex.shape[1]}")
        if ex.max(initial=0) >= m.shape[1]:
            raise WorkbenchError(f"expert id {int(ex.max())} exceeds the {m.shape[1]} physical experts of the map")
        return _map_ids(m, ex)


def _map_ids(m: np.ndarray, ex: np.ndarray) -> np.ndarray:
    """ex [R, L, K] physical -> logical through m [L, P] (negative ids stay negative)."""
    lidx = np.arange(ex.shape[1])[None, :, None]
    return np.where(ex >= 0, m[lidx, np.maximum(ex, 0)], ex)


def _hash_docs(docs, h) -> None:
    for d in docs:
        if isinstance(d, Counts):
            h.update(np.ascontiguousarray(d.counts).tobytes())
            continue
        h.update(np.ascontiguousarray(d.token_ids, np.int64).tobytes())
        h.update(np.ascontiguousarray(d.experts, np.int64).tobytes())
        h.update(json.dumps([d.n_prompt, d.start, d.cached, d.labels], sort_keys=True, default=str).encode())


def write_run(docs_factory, out, engine: str, model_info: dict, p2l: np.ndarray | None = None,
              source_desc: dict | None = None, resume: bool = False, overwrite: bool = False,
              part_tokens: int = 65536, progress: bool = True, id_kind: str = "logical"):
    """Write the Docs (or Counts) that `docs_factory()` yields into the run folder `out`.

    `docs_factory` is called twice (a hash for the run's identity, then the write), so resume can
    check that it continues the same input. A part holds whole documents; `batch_end` counts them."""
    from ..pipeline import TokenDecoder as _Decoder, progress_bar as _progress, versions as _versions
    from ..store import RunWriter, open_run

    h = hashlib.sha256()
    _hash_docs(docs_factory(), h)
    facts = model_info["facts"]
    identity = {"source": engine, "sha256": h.hexdigest(), "model": facts.get("spec"),
                "physical_to_logical": None if p2l is None else hashlib.sha256(p2l.tobytes()).hexdigest()[:16]}
    manifest = {"identity": identity, "source": engine, "model": facts,
                "dataset": {"name": f"{engine} import", **(source_desc or {})},
                "label_columns": [], "probes": {"routing": {"weights": False, "logits": False}},
                "settings": {"import": engine, "expert_ids": id_kind}, "interventions": {},
                "dtype": None, "device": None, "versions": _versions()}
    w = RunWriter(out, manifest, resume=resume, overwrite=overwrite)
    if w.already_complete:
        return open_run(out)
    conv = _DocConverter(facts, p2l)
    tok = model_info.get("tokenizer")
    decode = _Decoder(tok) if tok is not None else None
    buf_tok, buf_rt, buf_load = [], [], []
    n_buf = 0
    labels_seen: list[str] = list(w.manifest.get("label_columns", []))
    stats = dict(w.manifest.get("import", {}) or {})
    n_docs = n_tokens = 0
    start = w.next_batch
    bar = _progress(None, 0, progress, f"import {engine}")

    def flush(batch_end):
        nonlocal buf_tok, buf_rt, buf_load, n_buf
        if not (buf_tok or buf_load):
            return
        tables = {}
        if buf_tok:
            tables["tokens"] = pa.concat_tables(buf_tok, promote_options="default")
            tables["routing"] = pa.concat_tables(buf_rt)
        if buf_load:
            tables["expert_load"] = pa.concat_tables(buf_load)
        w.write_part(tables, batch_end, n_buf)
        buf_tok, buf_rt, buf_load, n_buf = [], [], [], 0

    index = -1
    for index, d in enumerate(docs_factory()):
        if index < start:
            continue
        if isinstance(d, Counts):
            buf_load.append(_load_table(d, facts, p2l))
            stats["windows"] = int(d.counts.shape[0])
            stats["window"] = d.window
            stats.update(d.meta)
            flush(index + 1)
            continue
        keep, ex = conv.convert(d)
        n = len(keep)
        if n:
            pos = (d.start + keep).astype(np.int32)
            ids = np.asarray(d.token_ids, np.int64)[keep]
            cols = {"doc_id": pa.array(np.full(n, index, np.int64)), "pos": pa.array(pos),
                    "token_id": pa.array(ids.astype(np.int32)),
                    "token": decode(np.maximum(ids, 0)) if decode is not None and (ids >= 0).all()
                    else pa.array([""] * n, pa.string()),
                    "phase": pa.array(np.where(keep < d.n_prompt, "prefill", "decode").tolist(), pa.string()),
                    "cached": pa.array(keep < d.cached)}
            for k, v in d.labels.items():
                cols[k] = pa.array([v] * n)
                if k not in labels_seen:
                    labels_seen.append(k)
            buf_tok.append(pa.table(cols))
            L = len(conv.layers)
            buf_rt.append(pa.table({
                "doc_id": pa.array(np.full(n * L, index, np.int64)),
                "pos": pa.array(np.repeat(pos, L)),
                "layer": pa.array(np.tile(conv.layers, n)),
                "experts": _experts_list(ex.reshape(n * L, -1)),
                "weights": _null_weights(n * L, conv.K)}))
            n_buf += n
            n_tokens += n
        n_docs += 1
        bar.update(n)
        if n_buf >= part_tokens:
            flush(index + 1)
    flush(index + 1)
    bar.close()
    for k, v in (("documents", n_docs), ("tokens", n_tokens), ("dropped_empty_routing", conv.dropped),
                 ("tokens_without_routing", conv.unrouted_tail)):
        stats[k] = int(stats.get(k, 0)) + int(v)
    w.finish(label_columns=labels_seen, **{"import": stats})
    if not any(p["files"] for p in w.manifest["parts"]):
        raise WorkbenchError(f"nothing to import: no token of the {engine} input carries routing")
    return open_run(out)


def _load_table(c: Counts, facts: dict, p2l) -> pa.Table:
    cnt = np.asarray(c.counts, np.int64)
    cols = layer_columns(cnt.shape[1], facts)
    cnt = cnt[:, cols, :]
    W, L, E = cnt.shape
    layers = np.asarray(facts["moe_layers"], np.int16)
    return pa.table({"window": pa.array(np.repeat(np.arange(W, dtype=np.int64), L * E)),
                     "layer": pa.array(np.tile(np.repeat(layers, E), W)),
                     "expert": pa.array(np.tile(np.arange(E, dtype=np.int16), W * L)),
                     "count": pa.array(cnt.reshape(-1))})


# ---------------------------------------------------------------------------------------------------
# Public entry


def import_routed_experts(outputs, out, engine: str | None = None, model=None, tokens=None,
                          physical_to_logical=None, n_experts: int | None = None, resume: bool = False,
                          overwrite: bool = False, part_tokens: int = 65536, progress: bool = True):
    """Write an engine's recorded routing as a workbench run and open it.

    outputs: vLLM `RequestOutput`s (or dicts with the same fields, e.g. the OpenAI server's JSON),
    SGLang `/generate` response dicts, a SGLang recorder dump (`.pt` file or folder), or a file of
    them (`.jsonl` / `.json`). engine: vllm, sglang or sglang-dump (guessed when None).
    model: the served model (`demo`, a folder, a config.json, a hub id in the local cache): gives
    decoder layers, MoE layers, E and top-k; without it they are inferred from the routing.
    tokens: per-request token ids / labels when the engine output lacks them (list of dicts or a
    .jsonl path; fields `input_ids`, `output_ids`, anything else becomes a label column).
    physical_to_logical: SGLang's placement ([layers, physical] array or its JSON / `.pt`) when it
    ran with EPLB; vLLM already reports logical ids.
    """
    from . import sglang, vllm

    engine = engine or _guess_engine(outputs)
    if engine not in ENGINES:
        raise WorkbenchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if part_tokens < 1:
        raise WorkbenchError("part_tokens must be at least 1")
    tok_rows = vllm.read_tokens(tokens)
    p2l = load_physical_to_logical(physical_to_logical)
    mi = model_facts(model) if model is not None else None
    desc = {"path": str(outputs)} if isinstance(outputs, (str, Path)) else {"objects": True}
    if engine == "vllm":
        factory, mi = vllm.docs(outputs, tok_rows, mi, n_experts)
        id_kind = "logical"
        if p2l is not None:
            raise WorkbenchError("vLLM reports logical expert ids (before its EPLB mapping): drop --physical-to-logical")
    elif engine == "sglang":
        factory, mi = sglang.docs(outputs, tok_rows, mi, n_experts)
        id_kind = "logical (mapped)" if p2l is not None else "as reported (physical = logical without EPLB)"
    else:
        factory, mi, dump_p2l = sglang.dump_docs(outputs, mi, n_experts)
        if p2l is None:
            p2l = dump_p2l
        id_kind = "logical (mapped)" if p2l is not None else "as reported"
    return write_run(factory, out, engine, mi, p2l=p2l, source_desc=desc, resume=resume, overwrite=overwrite,
                     part_tokens=part_tokens, progress=progress, id_kind=id_kind)


def _guess_engine(outputs) -> str:
    if isinstance(outputs, (str, Path)):
        p = Path(outputs)
        if p.suffix == ".pt" or (p.is_dir() and any(p.glob("*.pt"))):
            return "sglang-dump"
        raise WorkbenchError(f"cannot tell which engine wrote {p}: name it (vllm, sglang or sglang-dump)")
    first = next(iter(outputs), None) if isinstance(outputs, (list, tuple)) else outputs
    if isinstance(first, dict):
        return "sglang" if "meta_info" in first else "vllm"
    return "vllm"
