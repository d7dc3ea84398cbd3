"""vLLM `enable_return_routed_experts`: `RequestOutput`s (objects, or their fields as JSON) -> Docs.

Two layouts exist across vLLM releases: the completion's `routed_experts` covers the whole sequence
(prompt + output, minus the last token), or the request carries `prompt_routed_experts` and each
completion only its generated part. The OpenAI server returns the same fields (`choices[i]`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from . import Doc, inferred_facts


def get(obj, name, default=None):
    """Attribute or key: engine objects and their JSON look alike."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def as_array(x) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise WorkbenchError(f"routed experts must be an integer array, got {a.dtype}")
    return a


def read_records(source) -> list:
    """A list of records from objects, a .json (list or one record) or a .jsonl file."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise WorkbenchError(f"{p} is not a file")
        text = p.read_text()
        try:
            if p.suffix == ".jsonl":
                recs = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                data = json.loads(text)
                recs = data if isinstance(data, list) else [data]
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
        return recs
    if isinstance(source, (list, tuple)):
        out = []
        for r in source:  # SGLang answers a batch with a list: flatten one level
            out.extend(r if isinstance(r, list) else [r])
        return out
    return [source]


def read_tokens(tokens) -> list[dict] | None:
    """Per-request token ids and labels (`--tokens`): a .jsonl path, list of dicts, or list of id lists."""
    if tokens is None:
        return None
    rows = read_records(tokens) if isinstance(tokens, (str, Path)) else list(tokens)
    out = []
    for r in rows:
        if isinstance(r, dict):
            out.append(r)
        else:
            out.append({"input_ids": list(r)})
    return out


def _ids(x) -> list[int]:
    return [] if x is None else [int(t) for t in x]


def _labels(tok_row: dict | None) -> dict:
    if not tok_row:
        return {}
    return {k: v for k, v in tok_row.items() if k not in ("input_ids", "prompt_token_ids", "output_ids", "token_ids",
                                                          "text") and isinstance(v, (str, int, float, bool))}


def iter_docs(records, tok_rows):
    """One Doc per completion (n > 1 sampling gives several docs of the same prompt)."""
    for i, r in enumerate(records):
        t = tok_rows[i] if tok_rows is not None and i < len(tok_rows) else None
        prompt = _ids(get(r, "prompt_token_ids")) or _ids((t or {}).get("input_ids") or (t or {}).get("prompt_token_ids"))
        outs = get(r, "outputs")
        if outs is None:
            outs = get(r, "choices")
        if not outs:
            raise WorkbenchError(f"request {i} has no outputs/choices: is this a vLLM RequestOutput?")
        prompt_re = as_array(get(r, "prompt_routed_experts"))
        rid = get(r, "request_id", get(r, "id"))
        for j, c in enumerate(outs):
            gen = _ids(get(c, "token_ids")) or _ids((t or {}).get("output_ids"))
            re = as_array(get(c, "routed_experts"))
            if prompt_re is not None:
                parts = [a for a in (prompt_re, re) if a is not None and a.size]
                if not parts:
                    continue
                if re is not None and re.size and len(prompt_re) < len(prompt):
                    raise WorkbenchError(f"request {rid}: prompt_routed_experts has {len(prompt_re)} rows for "
                                         f"{len(prompt)} prompt tokens, so the generated rows cannot be placed")
                full = np.concatenate(parts)
            else:
                if re is None:
                    raise WorkbenchError(f"request {rid} carries no routed_experts: start vLLM with "
                                         "enable_return_routed_experts=True")
                full = re
            n_prompt = len(prompt) if prompt else max(0, len(full) + 1 - len(gen))
            ids = np.asarray(prompt + gen, np.int64) if prompt else \
                np.concatenate([np.full(n_prompt, -1, np.int64), np.asarray(gen, np.int64)])
            if len(full) > len(ids):
                raise WorkbenchError(f"request {rid}: {len(full)} routing rows for {len(ids)} tokens")
            labels = {"request_id": None if rid is None else str(rid), "completion": int(get(c, "index", j))}
            labels.update(_labels(t))
            yield Doc(token_ids=ids, experts=full, n_prompt=n_prompt, cached=int(get(r, "num_cached_tokens", 0) or 0),
                      labels=labels)


def infer(docs_factory, n_experts: int | None) -> dict:
    """Model facts from the routing alone: a layer no token was routed in (all slots equal) is dense."""
    n_layers = k = None
    routed = None
    hi = -1
    for d in docs_factory():
        ex = np.asarray(d.experts)
        if ex.ndim != 3 or not len(ex):
            continue
        n_layers, k = ex.shape[1], ex.shape[2]
        valid = (ex >= 0).all(axis=2)
        if k > 1:
            valid &= ~(ex == ex[:, :, :1]).all(axis=2)
        r = valid.any(axis=0)
        routed = r if routed is None else routed | r
        if valid.any():
            hi = max(hi, int(ex[valid].max()))
    if n_layers is None:
        raise WorkbenchError("the input holds no routing rows")
    moe = [int(i) for i in np.flatnonzero(routed)] if k > 1 else list(range(n_layers))
    return inferred_facts(n_layers, moe, int(n_experts or hi + 1), int(k))


def docs(outputs, tok_rows, model_info, n_experts):
    records = read_records(outputs)

    def factory():
        return iter_docs(records, tok_rows)

    if model_info is None:
        model_info = infer(factory, n_experts)
    elif n_experts:
        model_info["facts"]["n_experts"] = int(n_experts)
    return factory, model_info
