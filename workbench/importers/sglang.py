"""SGLang: `/generate` responses with `return_routed_experts`, and the expert distribution recorder's dumps.

Responses: `meta_info["routed_experts"]` is base64 of a flat int32 array [seqlen - 1, num_hidden_layers,
top_k] (prompt + output minus the last token); ids are physical (captured after the EPLB mapping).

Recorder dumps (`/dump_expert_distribution_record`, `torch.save` of plain dicts and tensors):
- per_token: {"records": [{forward_pass_id, rank, input_ids, positions, extend_seq_lens, forward_mode,
  topk_ids_of_layer [layers, tokens, 8] (-1 padded), global_physical_count, ...}, ...],
  "last_physical_to_logical_map": [layers, physical]}; one file per rank.
- per_pass: the same records without `topk_ids_of_layer` (counts per forward pass).
- stat: {"rank", "logical_count" [steps, layers, logical experts], "average_utilization_rate_over_window"}.
The dump has no request ids: sequences are rebuilt from positions (a segment starting at 0 opens one;
one starting at p continues the sequence that stopped at p, first come first served).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from . import Counts, Doc
from .vllm import _ids, _labels, read_records


def decode_routed_experts(b64: str) -> np.ndarray:
    """SGLang's base64 payload -> flat int32 array (little-endian, as the server wrote it)."""
    try:
        raw = base64.b64decode(b64.encode("ascii") if isinstance(b64, str) else b64, validate=True)
    except (ValueError, TypeError):
        raise WorkbenchError("meta_info.routed_experts is not valid base64") from None
    if len(raw) % 4:
        raise WorkbenchError("meta_info.routed_experts is not a whole number of int32 values")
    return np.frombuffer(raw, dtype="<i4")


def _token_ids_from_logprobs(entries) -> list[int]:
    return [int(e[1]) for e in entries or [] if e is not None and len(e) > 1 and e[1] is not None]


def iter_docs(records, tok_rows, facts):
    K, n_layers, n_moe = int(facts["top_k"]), int(facts["n_layers"]), len(facts["moe_layers"])
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "meta_info" not in r:
            raise WorkbenchError(f"response {i} has no meta_info: is this a SGLang /generate response?")
        meta = r["meta_info"]
        b64 = meta.get("routed_experts")
        if b64 is None:
            raise WorkbenchError(f"response {i} carries no meta_info.routed_experts: start SGLang with "
                                 "--enable-return-routed-experts and send return_routed_experts=true")
        flat = decode_routed_experts(b64)
        t = tok_rows[i] if tok_rows is not None and i < len(tok_rows) else {}
        prompt = _ids(r.get("input_ids") or t.get("input_ids") or t.get("prompt_token_ids")) or \
            _token_ids_from_logprobs(meta.get("input_token_logprobs"))
        gen = _ids(r.get("output_ids") or t.get("output_ids")) or _token_ids_from_logprobs(meta.get("output_token_logprobs"))
        n_prompt = int(meta.get("prompt_tokens", len(prompt)) or len(prompt))
        n_gen = int(meta.get("completion_tokens", len(gen)) or len(gen))
        width = next((lw * K for lw in (n_layers, n_moe) if flat.size % (lw * K) == 0
                      and (n_prompt + n_gen == 0 or flat.size // (lw * K) <= n_prompt + n_gen)), None)
        if width is None:
            raise WorkbenchError(f"response {i}: {flat.size} routed expert ids do not fit {n_layers} layers x top-{K}: "
                                 "pass the model SGLang served with --model")
        ex = flat.reshape(-1, width // K, K)
        if len(prompt) < n_prompt:
            prompt = [-1] * (n_prompt - len(prompt)) + prompt if not prompt else prompt + [-1] * (n_prompt - len(prompt))
        if len(gen) < n_gen:
            gen = gen + [-1] * (n_gen - len(gen))
        ids = np.asarray(prompt + gen, np.int64)
        if len(ex) > len(ids):
            ids = np.concatenate([ids, np.full(len(ex) - len(ids), -1, np.int64)])
        labels = {"request_id": None if meta.get("id") is None else str(meta.get("id")), "completion": 0}
        labels.update(_labels(t))
        yield Doc(token_ids=ids, experts=ex, n_prompt=len(prompt), cached=int(meta.get("cached_tokens", 0) or 0),
                  labels=labels)


def docs(outputs, tok_rows, model_info, n_experts):
    if model_info is None:
        raise WorkbenchError("SGLang sends a flat array of expert ids: pass the served model (--model, a folder "
                             "or its config.json) so its layers and top-k are known")
    if n_experts:
        model_info["facts"]["n_experts"] = int(n_experts)
    records = read_records(outputs)

    def factory():
        return iter_docs(records, tok_rows, model_info["facts"])

    return factory, model_info


# ---------------------------------------------------------------------------------------------------
# Recorder dumps


def load_dump(source) -> list[dict]:
    """The dump dict(s): a dict, a `.pt` file, or a folder of `.pt` files (one per rank), tensors only."""
    if isinstance(source, dict):
        return [source]
    if isinstance(source, (list, tuple)):
        return [d for s in source for d in load_dump(s)]
    import torch

    p = Path(source)
    files = sorted(p.glob("*.pt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise WorkbenchError(f"{p} is not a .pt dump or a folder of them")
    out = []
    for f in files:
        try:
            out.append(torch.load(f, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001 - anything unreadable is the user's file
            raise WorkbenchError(f"cannot read {f} as a tensors-only dump: {str(e).splitlines()[0]}") from None
    return out


def _np(x) -> np.ndarray:
    return np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)


def _records(dumps) -> tuple[list[dict], np.ndarray | None]:
    """All per-pass records, TP duplicates dropped (every rank of a TP group sees the same tokens)."""
    p2l = None
    by_rank: dict[int, list] = {}
    for d in dumps:
        if "last_physical_to_logical_map" in d and p2l is None:
            p2l = _np(d["last_physical_to_logical_map"]).astype(np.int64)
        for rec in d.get("records", []):
            by_rank.setdefault(int(rec.get("rank", 0)), []).append(rec)
    seen, out = [], []
    for rank in sorted(by_rank):
        recs = sorted(by_rank[rank], key=lambda r: int(r.get("forward_pass_id", 0)))
        sig = [(int(r.get("forward_pass_id", 0)), tuple(_ids(r.get("input_ids")))) for r in recs]
        if sig in seen:
            continue
        seen.append(sig)
        out.extend(recs)
    return out, p2l


def iter_dump_docs(records, K: int):
    """Per-token records -> Docs, sequences rebuilt from positions (see the module docstring)."""
    seqs: list[dict] = []
    waiting: dict[int, list[int]] = {}  # next expected position -> open sequences, oldest first
    for rec in records:
        ids = _ids(rec.get("input_ids"))
        pos = _ids(rec.get("positions"))
        n = len(ids)
        if not n:
            continue
        topk = _np(rec["topk_ids_of_layer"])[:, :n, :]  # [layers, n, 8]
        if topk.shape[2] > K and (topk[:, :, K:] != -1).any():
            raise WorkbenchError(f"the dump holds more than top_k={K} experts a token: pass the served model")
        topk = topk[:, :, :K].transpose(1, 0, 2)  # [n, layers, K]
        ext = rec.get("extend_seq_lens")
        decode = not ext
        lens = [int(x) for x in ext] if ext and sum(int(x) for x in ext) == n else [1] * n
        s = 0
        for m in lens:
            p0 = pos[s]
            q = waiting.get(p0) if p0 > 0 else None
            if q:
                si = q.pop(0)
            else:
                si = len(seqs)
                seqs.append({"start": p0, "ids": [], "rows": [], "decode": []})
            seq = seqs[si]
            seq["ids"].extend(ids[s:s + m])
            seq["rows"].append(topk[s:s + m])
            seq["decode"].extend([decode] * m)
            waiting.setdefault(p0 + m, []).append(si)
            s += m
    for i, seq in enumerate(seqs):
        dec = np.asarray(seq["decode"], bool)
        n_prompt = int(np.argmax(dec)) if dec.any() else len(dec)
        yield Doc(token_ids=np.asarray(seq["ids"], np.int64), experts=np.concatenate(seq["rows"]), n_prompt=n_prompt,
                  start=int(seq["start"]), labels={"sequence": i})


def _logical_counts(phys: np.ndarray, p2l: np.ndarray | None, E: int) -> np.ndarray:
    """[W, L, P] physical counts -> [W, L, E] logical (replicas of one expert add up)."""
    if p2l is None:
        if phys.shape[2] != E:
            raise WorkbenchError(f"the dump counts {phys.shape[2]} physical experts for {E} logical ones and has no "
                                 "physical_to_logical_map: pass --physical-to-logical")
        return phys
    out = np.zeros(phys.shape[:2] + (E,), np.int64)
    for layer in range(phys.shape[1]):
        np.add.at(out[:, layer, :], (slice(None), p2l[layer]), phys[:, layer, :])
    return out


def dump_docs(source, model_info, n_experts):
    dumps = load_dump(source)
    records, p2l = _records(dumps)
    if model_info is None:
        raise WorkbenchError("a SGLang dump does not say which layers are MoE: pass the served model with --model")
    facts = model_info["facts"]
    if n_experts:
        facts["n_experts"] = int(n_experts)
    E, K = int(facts["n_experts"]), int(facts["top_k"])
    stat = [d for d in dumps if "logical_count" in d]
    if stat:
        counts = np.concatenate([_np(d["logical_count"]).reshape((-1,) + _np(d["logical_count"]).shape[-2:])
                                 for d in stat[:1]])  # all-reduced over ranks: one file is the whole
        util = stat[0].get("average_utilization_rate_over_window")
        meta = {"recorder_mode": "stat", "engine_balancedness": None if util is None else float(util)}

        def factory():
            yield Counts(counts=counts.astype(np.int64), window="recorder step", meta=meta)

        return factory, model_info, None
    if not records:
        raise WorkbenchError("the dump has neither records nor logical_count: is it an expert distribution dump?")
    if all("topk_ids_of_layer" in r for r in records):
        def factory():
            return iter_dump_docs(records, K)

        return factory, model_info, p2l
    # per_pass: counts only, one window per forward pass, summed over ranks (each counts its own tokens)
    passes: dict[int, np.ndarray] = {}
    for r in records:
        c = _np(r["global_physical_count"]).astype(np.int64)
        f = int(r.get("forward_pass_id", 0))
        passes[f] = passes.get(f, 0) + c
    phys = np.stack([passes[f] for f in sorted(passes)])
    counts = _logical_counts(phys, p2l, E)

    def factory():
        yield Counts(counts=counts, window="forward pass", meta={"recorder_mode": "per_pass"})

    return factory, model_info, None
