"""SGLang: `/generate` responses with `return_routed_experts`, and the expert distribution recorder's dumps.

Responses (python/sglang/srt/managers/io_struct.py, tokenizer_manager.py): `meta_info["routed_experts"]` is
base64 of a flat int32 array [seqlen - 1 - routed_experts_start_len, num_hidden_layers, top_k] (prompt + output
minus the last token, from the request's start); ids are physical in 0.5.7-0.5.9 (captured after the EPLB
remap), logical from 0.5.10. A batch or n > 1 request is answered by a list of such responses. Prompt ids
come with `return_prompt_token_ids` (0.5.13+).

Recorder dumps (`/dump_expert_distribution_record`, `torch.save` of plain dicts and tensors):
- per_token: {"records": [{forward_pass_id, rank, input_ids, positions, extend_seq_lens, forward_mode,
  topk_ids_of_layer [layers, tokens, 8] (-1 padded), global_physical_count, ...}, ...],
  "last_physical_to_logical_map": [layers, physical]}; one file per rank.
- per_pass: the same records without `topk_ids_of_layer` (counts per forward pass).
- stat: {"rank", "logical_count" [steps, layers, logical experts], "average_utilization_rate_over_window"}.
The dump has no request ids: sequences are rebuilt from positions and the pass order (`iter_dump_docs`).
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from .common import Counts, Doc, id_list, labels_of, whole
from .vllm import offset_of, read_records


def decode_routed_experts(b64, what: str = "meta_info.routed_experts") -> np.ndarray:
    """SGLang's base64 payload -> flat int32 array (little-endian, as the server wrote it)."""
    if not isinstance(b64, (str, bytes)):
        raise WorkbenchError(f"{what} must be a base64 string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64.encode("ascii") if isinstance(b64, str) else b64, validate=True)
    except (ValueError, TypeError, UnicodeEncodeError):
        raise WorkbenchError(f"{what} is not valid base64") from None
    if len(raw) % 4:
        raise WorkbenchError(f"{what} is not a whole number of int32 values")
    return np.frombuffer(raw, dtype="<i4")


def _logprob_ids(entries, what: str) -> list[int]:
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise WorkbenchError(f"{what} must be a list of [logprob, token_id, ...] entries")
    return id_list([e[1] for e in entries if isinstance(e, (list, tuple)) and len(e) > 1 and e[1] is not None], what)


def iter_docs(records, tok_rows, facts, routed_start: int | None = None):
    K, n_layers, n_moe = int(facts["top_k"]), int(facts["n_layers"]), len(facts["moe_layers"])
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("meta_info"), dict):
            raise WorkbenchError(f"response {i} has no meta_info: is this a SGLang /generate response?")
        meta = r["meta_info"]
        b64 = meta.get("routed_experts")
        if b64 is None:  # aborted before any forward pass, or not asked for: counted, the others imported
            yield Doc(token_ids=np.zeros(0, np.int64), experts=np.zeros((0, 0, 0), np.int64), n_prompt=0,
                      labels={"request_id": None if meta.get("id") is None else str(meta.get("id"))})
            continue
        flat = decode_routed_experts(b64, f"response {i} meta_info.routed_experts")
        t = tok_rows[i] if tok_rows is not None and i < len(tok_rows) else {}
        start = offset_of(r, routed_start, meta)
        # prompt ids: return_prompt_token_ids (0.5.13+), the request's input_ids, --tokens, or input logprobs
        prompt = (id_list(r.get("prompt_token_ids"), f"response {i} prompt_token_ids")
                  or id_list(meta.get("prompt_token_ids"), f"response {i} meta_info.prompt_token_ids")
                  or id_list(r.get("input_ids"), f"response {i} input_ids")
                  or id_list(t.get("input_ids") or t.get("prompt_token_ids"), f"--tokens line {i + 1} input_ids"))
        partial_prompt = not prompt
        if not prompt:  # logprobs start at logprob_start_len: they may cover only the prompt's tail
            prompt = _logprob_ids(meta.get("input_token_logprobs"), f"response {i} input_token_logprobs")
        gen = id_list(r.get("output_ids") or t.get("output_ids"), f"response {i} output_ids")
        partial_gen = not gen
        if not gen:
            gen = _logprob_ids(meta.get("output_token_logprobs"), f"response {i} output_token_logprobs")
        decl_p, decl_g = meta.get("prompt_tokens"), meta.get("completion_tokens")
        n_prompt = len(prompt) if decl_p is None else whole(decl_p, f"response {i} meta_info.prompt_tokens")
        n_gen = len(gen) if decl_g is None else whole(decl_g, f"response {i} meta_info.completion_tokens")
        # declared counts against the payload, before anything of their size is made
        if decl_p is not None or decl_g is not None or (prompt and gen):
            rows = n_prompt + n_gen - 1 - start
            lw = next((lw for lw in (n_layers, n_moe) if rows > 0 and flat.size == rows * lw * K), None)
            if lw is None:
                raise WorkbenchError(
                    f"response {i} declares {n_prompt} prompt + {n_gen} generated tokens, so {max(rows, 0)} rows "
                    f"from position {start}, but its routed_experts hold {flat.size} ids, not rows x {n_layers} "
                    f"layers x top-{K}" + (": pass --routed-start (the routed_experts_start_len it sent)"
                                           if start == 0 and any(flat.size % (w * K) == 0 and flat.size // (w * K)
                                                                 < rows for w in (n_layers, n_moe)) else
                                           ": pass the model SGLang served with --model"))
        else:
            lw = next((lw for lw in (n_layers, n_moe) if flat.size % (lw * K) == 0), None)
            if lw is None or not flat.size:
                raise WorkbenchError(f"response {i}: {flat.size} routed expert ids do not fit {n_layers} layers x "
                                     f"top-{K}: pass the model SGLang served with --model")
            rows = flat.size // (lw * K)
            n_gen = len(gen)
            n_prompt = rows + 1 + start - n_gen
        if len(prompt) > n_prompt or len(gen) > n_gen:
            raise WorkbenchError(f"response {i} carries {len(prompt)} prompt and {len(gen)} output ids but declares "
                                 f"{n_prompt} and {n_gen}")
        if prompt and len(prompt) < n_prompt and not partial_prompt:
            raise WorkbenchError(f"response {i}: {len(prompt)} prompt ids for {n_prompt} prompt tokens")
        if gen and len(gen) < n_gen and not partial_gen:
            raise WorkbenchError(f"response {i}: {len(gen)} output ids for {n_gen} generated tokens")
        prompt = [-1] * (n_prompt - len(prompt)) + prompt  # logprobs cover the tail of the prompt
        gen = gen + [-1] * (n_gen - len(gen))
        if start > n_prompt:
            raise WorkbenchError(f"response {i}: routed_experts_start_len {start} exceeds its {n_prompt} prompt "
                                 "tokens (SGLang allows [0, prompt_tokens])")
        ex = flat.reshape(rows, lw, K)
        ids = np.asarray(prompt + gen, np.int64)[start:]
        labels = {"request_id": None if meta.get("id") is None else str(meta.get("id")), "completion": 0}
        labels.update(labels_of(t))
        cached = whole(meta.get("cached_tokens", 0) or 0, f"response {i} meta_info.cached_tokens")
        yield Doc(token_ids=ids, experts=ex, n_prompt=n_prompt - start, start=start,
                  cached=max(0, min(cached, n_prompt) - start), labels=labels)


def docs(outputs, tok_rows, model_info, n_experts, routed_start=None):
    if model_info is None:
        raise WorkbenchError("SGLang sends a flat array of expert ids: pass the served model (--model, a folder "
                             "or its config.json) so its layers and top-k are known")
    if n_experts:
        model_info["facts"]["n_experts"] = int(n_experts)
    records = read_records(outputs)

    def factory():
        return iter_docs(records, tok_rows, model_info["facts"], routed_start)

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


def _np(x, what: str = "a dump field") -> np.ndarray:
    try:
        a = np.asarray(x.cpu().numpy() if hasattr(x, "cpu") else x)
    except (ValueError, TypeError):
        raise WorkbenchError(f"{what} is not an array") from None
    if a.dtype == object:
        raise WorkbenchError(f"{what} is not a numeric array")
    return a


def _digest(rec: dict) -> bytes:
    """What a pass record holds (token ids, positions, counts, top-k ids), to tell TP duplicates apart."""
    import hashlib

    h = hashlib.sha256()
    for k in ("forward_pass_id", "input_ids", "positions", "extend_seq_lens"):
        h.update(repr(_plain(rec.get(k))).encode())
    for k in ("topk_ids_of_layer", "global_physical_count"):
        if rec.get(k) is not None:
            a = _np(rec[k], k)
            h.update(repr(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return h.digest()


def _plain(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def _records(dumps) -> tuple[dict[int, list[dict]], np.ndarray | None]:
    """Per-pass records by rank, in pass order. A rank whose records equal another's in content is a TP
    duplicate (every rank of a TP group sees the same tokens) and is dropped; ranks that differ (DP
    attention, DeepEP: each rank its own tokens, the same forward_pass_ids) are all kept."""
    p2l = None
    by_rank: dict[int, list] = {}
    for d in dumps:
        if not isinstance(d, dict):
            raise WorkbenchError("a dump must be a dict of records or counts")
        if "last_physical_to_logical_map" in d and p2l is None:
            p2l = _np(d["last_physical_to_logical_map"], "last_physical_to_logical_map").astype(np.int64)
        recs = d.get("records", [])
        if not isinstance(recs, (list, tuple)) or not all(isinstance(r, dict) for r in recs):
            raise WorkbenchError("the dump's records must be a list of dicts")
        for rec in recs:
            by_rank.setdefault(whole(rec.get("rank", 0), "a record's rank"), []).append(rec)
    seen, out = set(), {}
    for rank in sorted(by_rank):
        recs = sorted(by_rank[rank], key=lambda r: whole(r.get("forward_pass_id", 0), "forward_pass_id"))
        sig = b"".join(_digest(r) for r in recs)
        if sig in seen:
            continue
        seen.add(sig)
        out[rank] = recs
    return out, p2l


EXTEND, DECODE, MIXED = 1, 2, 3  # sglang ForwardMode values (forward_batch_info.py)
RID_KEYS = ("rids", "rid", "request_ids", "req_ids")


def iter_dump_docs(records_by_rank: dict[int, list[dict]], K: int):
    """Per-token records -> Docs; sequences rebuilt per rank, in pass order, as SGLang's scheduler runs them:
    - an extend (prefill) segment at position 0 opens a sequence; at p > 0 it continues the chunked request,
      which is the last segment of the previous extend pass (the prefill adder truncates the request it
      adds last, and the next prefill batch resumes it), provided it stopped at p and has not decoded;
      any other segment at p > 0 is a new request whose first p tokens came from the prefix cache;
    - a decode token at p extends the first running sequence (in batch order: running first, newly
      prefilled appended) that stopped at p; the scheduler never extends a sequence that started decoding.
    Records that carry request ids (one per segment, or per token in decode) are linked by them instead."""
    n_seq = 0
    for rank in sorted(records_by_rank):
        seqs: list[dict] = []
        by_rid: dict = {}
        last_extend: list[int] = []
        running: list[int] = []
        for rec in records_by_rank[rank]:
            ids = id_list(rec.get("input_ids"), "a record's input_ids")
            pos = id_list(rec.get("positions"), "a record's positions")
            n = len(ids)
            if not n:
                continue
            if len(pos) != n:
                raise WorkbenchError(f"a record has {n} input_ids but {len(pos)} positions")
            topk = _np(rec.get("topk_ids_of_layer"), "topk_ids_of_layer")
            if topk.ndim != 3 or topk.shape[1] < n or not np.issubdtype(topk.dtype, np.integer):
                raise WorkbenchError(f"topk_ids_of_layer must be whole ids [layers, >= {n} tokens, k], got "
                                     f"{topk.shape} of {topk.dtype}")
            topk = topk[:, :n, :]
            if topk.shape[2] < K:
                raise WorkbenchError(f"the dump holds {topk.shape[2]} experts a token, the model's top_k is {K}")
            if topk.shape[2] > K and (topk[:, :, K:] != -1).any():
                raise WorkbenchError(f"the dump holds more than top_k={K} experts a token: pass the served model")
            topk = topk[:, :, :K].transpose(1, 0, 2)  # [n, layers, K]
            ext = rec.get("extend_seq_lens")
            ext = None if ext is None else id_list(ext, "extend_seq_lens")
            mode = rec.get("forward_mode")
            rids = next((rec[k] for k in RID_KEYS if rec.get(k) is not None), None)
            rids = None if rids is None else [str(x) for x in _plain(rids)]
            if ext and sum(ext) != n:
                raise WorkbenchError(f"a record's extend_seq_lens add up to {sum(ext)}, not its {n} tokens")
            extend = bool(ext)
            lens = ext if extend else [1] * n
            if rids is not None and len(rids) != len(lens):
                rids = None
            taken: set[int] = set()
            chunked = [si for si in last_extend[-1:] if not seqs[si]["decoded"]]
            this_extend = []
            s = 0
            for g, m in enumerate(lens):
                p0 = pos[s]
                if pos[s:s + m] != list(range(p0, p0 + m)):
                    raise WorkbenchError("a record's positions do not run consecutively within a sequence")
                si = by_rid.get(rids[g]) if rids is not None else None
                is_decode = not extend or (mode == MIXED and m == 1 and si is None and
                                           any(seqs[j]["next"] == p0 and seqs[j]["decoded"] for j in running))
                if si is None and p0 > 0:
                    if is_decode:  # the request still being chunked is not in the running batch: last resort
                        order = [j for j in running if j not in chunked] + chunked
                        si = next((j for j in order if j not in taken and seqs[j]["next"] == p0), None)
                    elif chunked and seqs[chunked[0]]["next"] == p0:
                        si = chunked.pop()
                if si is None:
                    si = len(seqs)
                    seqs.append({"start": p0, "next": p0, "ids": [], "rows": [], "decode": [], "decoded": False})
                    if rids is not None:
                        by_rid[rids[g]] = si
                seq = seqs[si]
                if seq["next"] != p0:
                    raise WorkbenchError(f"request {rids[g] if rids else si} jumps from position {seq['next']} to {p0}")
                taken.add(si)
                seq["ids"].extend(ids[s:s + m])
                seq["rows"].append(topk[s:s + m])
                seq["decode"].extend([is_decode] * m)
                seq["decoded"] |= is_decode
                seq["next"] = p0 + m
                if extend and not is_decode:
                    this_extend.append(si)
                s += m
            if extend:
                last_extend = this_extend
                running.extend(si for si in this_extend if si not in running)
        for seq in seqs:
            dec = np.asarray(seq["decode"], bool)
            n_prompt = int(np.argmax(dec)) if dec.any() else len(dec)
            yield Doc(token_ids=np.asarray(seq["ids"], np.int64), experts=np.concatenate(seq["rows"]),
                      n_prompt=n_prompt, start=int(seq["start"]), labels={"sequence": n_seq, "rank": rank})
            n_seq += 1


def stat_windows(logical_count: np.ndarray) -> tuple[np.ndarray, dict]:
    """The recorder's `stat` buffer -> the windows it holds. SGLang's circular buffer
    (expert_distribution.py `_CircularBuffer`) is all zeros until written and is dumped whole, without
    its write index: all-zero slots are dropped; a buffer with no empty slot may have wrapped, and then
    the order of its windows (oldest first?) cannot be known."""
    c = logical_count
    filled = c.reshape(len(c), -1).any(axis=1)
    order_known = bool(len(c) == 0 or not filled[-1])
    meta = {"windows_recorded": int(len(c)), "empty_windows_dropped": int((~filled).sum()),
            "window_order": "as recorded" if order_known else
            "unknown (the recorder's circular buffer is full, so it may have wrapped: window order is not time)"}
    return c[filled], meta


def dump_docs(source, model_info, n_experts):
    dumps = load_dump(source)
    records, p2l = _records(dumps)
    if model_info is None:
        raise WorkbenchError("a SGLang dump does not say which layers are MoE: pass the served model with --model")
    facts = model_info["facts"]
    if n_experts:
        facts["n_experts"] = int(n_experts)
    K = int(facts["top_k"])
    stat = [d for d in dumps if "logical_count" in d]
    if stat:
        lc = _np(stat[0]["logical_count"], "logical_count")
        if lc.ndim < 2 or not np.issubdtype(lc.dtype, np.integer):
            raise WorkbenchError(f"logical_count must be whole counts [steps, layers, experts], got {lc.shape}")
        counts, meta = stat_windows(lc.reshape((-1,) + lc.shape[-2:]).astype(np.int64))  # all-reduced: one file
        if not len(counts):
            raise WorkbenchError("nothing to import: the stat dump's buffer holds no recorded step")
        util = stat[0].get("average_utilization_rate_over_window")
        meta.update(recorder_mode="stat", engine_balancedness=None if util is None else float(util),
                    counts_note="summed over all ranks: under pure TP every rank counts every token, so the counts "
                    "are the TP size times the tokens")

        def factory():
            yield Counts(counts=counts, window="recorder step", meta=meta)

        return factory, model_info, None
    if not records:
        raise WorkbenchError("the dump has neither records nor logical_count: is it an expert distribution dump?")
    flat = [r for recs in records.values() for r in recs]
    if all("topk_ids_of_layer" in r for r in flat):
        def factory():
            return iter_dump_docs(records, K)

        return factory, model_info, p2l
    # per_pass: counts only, one window per forward pass, summed over the kept ranks (each its own tokens)
    passes: dict[int, np.ndarray] = {}
    shape = None
    for r in flat:
        if r.get("global_physical_count") is None:
            raise WorkbenchError("a per-pass record has no global_physical_count")
        c = _np(r["global_physical_count"], "global_physical_count")
        if c.ndim != 2 or not np.issubdtype(c.dtype, np.integer) or (shape is not None and c.shape != shape):
            raise WorkbenchError(f"global_physical_count must be whole counts [layers, physical experts] of one "
                                 f"shape, got {c.shape} of {c.dtype}")
        shape = c.shape
        f = whole(r.get("forward_pass_id", 0), "forward_pass_id")
        passes[f] = passes.get(f, 0) + c.astype(np.int64)
    phys = np.stack([passes[f] for f in sorted(passes)])

    def factory():
        yield Counts(counts=phys, window="forward pass", meta={"recorder_mode": "per_pass", "ranks": len(records)})

    return factory, model_info, p2l
