"""vLLM `enable_return_routed_experts`: `RequestOutput`s or OpenAI-server responses (objects or JSON) -> Docs.

Per release (vllm/outputs.py, vllm/entrypoints/openai/protocol.py; docs/guides/engines.md):
- 0.14-0.20, 0.22+: each sample's `routed_experts` covers the whole sequence, prompt + output - 1 rows
  (the last sampled token is never fed back); 0.22+ repeats the prompt rows in every sample.
- 0.21.0: `RequestOutput.prompt_routed_experts` (prompt rows, once) + each completion's generated rows.
- OpenAI server (completions, chat): `choices[i].routed_experts`, nested lists before 0.22, from 0.22
  base64 of `np.save` bytes (uint8, uint16 above 256 experts). Prompt ids with `return_token_ids`:
  completions on each choice (`choices[i].prompt_token_ids`), chat on the response.
- 0.34: the request field `routed_experts_prompt_start` drops the first rows (the array starts there).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError
from .common import INT16_MAX, Doc, id_list, inferred_facts, labels_of, whole

OFFSET_KEYS = ("routed_experts_prompt_start", "routed_experts_start_len")


def get(obj, name, default=None):
    """Attribute or key: engine objects and their JSON look alike."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def decode_npy(s, what: str) -> np.ndarray:
    """Base64 of `np.save` bytes -> array. The header's shape is checked against the bytes that follow
    before anything is allocated (np.load would allocate what a 600-byte header declares)."""
    from numpy.lib import format as npf

    try:
        raw = base64.b64decode(s.encode("ascii") if isinstance(s, str) else s, validate=True)
    except (binascii.Error, ValueError, TypeError, UnicodeEncodeError):
        raise WorkbenchError(f"{what} is neither an array nor valid base64") from None
    if not raw.startswith(b"\x93NUMPY"):
        raise WorkbenchError(f"{what} is base64 but not of .npy bytes (np.save), as vLLM 0.22+ sends")
    f = io.BytesIO(raw)
    try:
        major, _ = npf.read_magic(f)
        read = npf.read_array_header_1_0 if major == 1 else npf.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise WorkbenchError(f"{what} has a broken .npy header ({str(e).splitlines()[0][:80]})") from None
    if not np.issubdtype(dtype, np.integer):
        raise WorkbenchError(f"{what} must hold whole expert ids, its .npy header says {dtype}")
    n = 1
    for d in shape:
        n *= int(d)
    left = len(raw) - f.tell()
    if n * dtype.itemsize != left:
        raise WorkbenchError(f"{what} declares shape {tuple(shape)} ({n * dtype.itemsize} bytes) but carries "
                             f"{left} bytes")
    return np.frombuffer(raw, dtype=dtype, count=n, offset=f.tell()).reshape(shape, order="F" if fortran else "C")


def as_array(x, what: str = "routed_experts") -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, (str, bytes)):
        return decode_npy(x, what)
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except (ValueError, TypeError):
        raise WorkbenchError(f"{what} must be an integer array [tokens, layers, top_k]") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise WorkbenchError(f"{what} must be an integer array [tokens, layers, top_k], got {a.dtype}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise WorkbenchError(f"{what} holds expert id {int(a.max())}, beyond 64-bit integers")
    if a.ndim != 3 and a.size:
        raise WorkbenchError(f"{what} must be [tokens, layers, top_k], got shape {a.shape}")
    return a.reshape(-1, *(a.shape[1:] if a.ndim == 3 else (0, 0)))


def _flatten(items, out: list) -> list:
    for r in items:  # SGLang answers a batch or n > 1 with a list (also one line of a .jsonl)
        if isinstance(r, (list, tuple)):
            _flatten(r, out)
        else:
            out.append(r)
    return out


def read_records(source) -> list:
    """A list of records from objects, a .json (list or one record) or a .jsonl file; lists flattened."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if not p.is_file():
            raise WorkbenchError(f"{p} is not a file")
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            raise WorkbenchError(f"{p} is not a text file of JSON") from None
        try:
            if p.suffix == ".jsonl":
                recs = [json.loads(line) for line in text.splitlines() if line.strip()]
            else:
                data = json.loads(text)
                recs = data if isinstance(data, list) else [data]
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise WorkbenchError(f"{p} nests JSON too deeply") from None
        return _flatten(recs, [])
    if isinstance(source, (list, tuple)):
        return _flatten(source, [])
    return [source]


def read_tokens(tokens) -> list[dict] | None:
    """Per-request token ids and labels (`--tokens`): a .jsonl path, list of dicts, or list of id lists."""
    if tokens is None:
        return None
    if isinstance(tokens, (str, Path)):
        p = Path(tokens)
        if not p.is_file():
            raise WorkbenchError(f"--tokens {p} is not a file")
        try:
            rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WorkbenchError(f"--tokens {p} is not JSON lines") from None
    else:
        rows = list(tokens)
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, dict):
            out.append(r)
        elif isinstance(r, (list, tuple)):
            out.append({"input_ids": list(r)})
        else:
            raise WorkbenchError(f"--tokens line {i + 1} must be an object or a list of token ids")
    return out


def offset_of(r, default: int | None, *places) -> int:
    """Rows the engine skipped at the front: from the record (or the request saved with it), else `default`."""
    for where in (r, get(r, "sampling_params"), get(r, "request"), *places):
        if where is None:
            continue
        for k in OFFSET_KEYS:
            v = get(where, k)
            if v is not None:
                return whole(v, k)
    return int(default or 0)


def place(rid, rows: int, prompt: list[int] | None, gen: list[int] | None, start: int,
          n_prompt_declared: int | None = None) -> tuple[np.ndarray, int]:
    """Token ids (-1 where unknown) of positions `start`.. and the prompt length, for `rows` routing rows
    covering positions start .. start + rows - 1 of prompt + output (the last output token has no row)."""
    last = start + rows + 1  # tokens the rows imply: every routed one plus the unrouted last
    if prompt and gen:
        n_total = len(prompt) + len(gen)
        if n_total != last:
            hint = (" (the request skipped the first rows: pass --routed-start, the routed_experts_prompt_start or "
                    "routed_experts_start_len it sent)" if last < n_total and start == 0 else "")
            raise WorkbenchError(f"request {rid}: {rows} routing rows from position {start} do not fit its "
                                 f"{len(prompt)} prompt + {len(gen)} generated tokens{hint}")
        ids = np.asarray(prompt + gen, np.int64)
        n_prompt = len(prompt)
    else:
        n_prompt = len(prompt) if prompt else (n_prompt_declared if n_prompt_declared is not None
                                               else last - len(gen or []))
        if n_prompt < 0 or n_prompt > last or (gen and n_prompt + len(gen) != last):
            raise WorkbenchError(f"request {rid}: {rows} routing rows from position {start} do not fit "
                                 f"{n_prompt} prompt + {len(gen or [])} generated tokens")
        ids = np.full(last, -1, np.int64)
        if prompt:
            ids[:n_prompt] = prompt
        if gen:
            ids[n_prompt:] = gen
    if start > n_prompt:
        raise WorkbenchError(f"request {rid}: the routing starts at position {start}, after the {n_prompt} prompt "
                             "tokens (the engines allow a start inside the prompt only)")
    return ids[start:], n_prompt


def iter_docs(records, tok_rows, routed_start: int | None = None):
    """One Doc per completion (n > 1 sampling gives several docs of the same prompt)."""
    for i, r in enumerate(records):
        t = tok_rows[i] if tok_rows is not None and i < len(tok_rows) else None
        if t is not None and not isinstance(t, dict):
            raise WorkbenchError(f"--tokens line {i + 1} must be an object")
        t = t or {}
        outs = get(r, "outputs")
        if outs is None:
            outs = get(r, "choices")
        if not isinstance(outs, (list, tuple)) or not outs:
            raise WorkbenchError(f"request {i} has no outputs/choices: is this a vLLM RequestOutput or response?")
        rid = get(r, "request_id", get(r, "id"))
        r_prompt = id_list(get(r, "prompt_token_ids"), f"request {i} prompt_token_ids") or \
            id_list(t.get("input_ids") or t.get("prompt_token_ids"), f"--tokens line {i + 1} input_ids")
        prompt_re = as_array(get(r, "prompt_routed_experts"), f"request {i} prompt_routed_experts")
        usage = get(r, "usage")
        n_prompt_decl = get(usage, "prompt_tokens") if usage is not None else None
        n_prompt_decl = None if n_prompt_decl is None else whole(n_prompt_decl, f"request {i} usage.prompt_tokens")
        cached = get(r, "num_cached_tokens", 0) or 0
        cached = whole(cached, f"request {i} num_cached_tokens")
        for j, c in enumerate(outs):
            what = f"request {i} choice {j}"
            prompt = id_list(get(c, "prompt_token_ids"), f"{what} prompt_token_ids") or r_prompt
            gen = id_list(get(c, "token_ids"), f"{what} token_ids") or \
                id_list(t.get("output_ids"), f"--tokens line {i + 1} output_ids")
            re = as_array(get(c, "routed_experts"), f"{what} routed_experts")
            start = offset_of(r, routed_start, c)
            if prompt_re is not None:  # 0.21.0: prompt rows once, each completion its generated rows
                parts = [a for a in (prompt_re, re) if a is not None and a.size]
                if not parts:
                    continue
                if len({a.shape[1:] for a in parts}) > 1:
                    raise WorkbenchError(f"{what}: prompt_routed_experts {prompt_re.shape} and routed_experts "
                                         f"{re.shape} differ in layers or top_k")
                full = np.concatenate(parts)
            else:
                if re is None:  # aborted before any forward pass, or the server does not return them
                    yield Doc(token_ids=np.zeros(0, np.int64), experts=np.zeros((0, 0, 0), np.int64), n_prompt=0,
                              labels={"request_id": None if rid is None else str(rid)})
                    continue
                full = re
            if not full.size:
                continue
            ids, n_prompt = place(rid if rid is not None else i, len(full), prompt, gen, start, n_prompt_decl)
            labels = {"request_id": None if rid is None else str(rid),
                      "completion": whole(get(c, "index", j), f"{what} index")}
            labels.update(labels_of(t))
            yield Doc(token_ids=ids, experts=full, n_prompt=n_prompt - start, start=start,
                      cached=max(0, min(cached, n_prompt) - start), labels=labels)


def infer(docs_factory, n_experts: int | None) -> dict:
    """Model facts from the routing alone: a layer no token was routed in (all slots equal) is dense."""
    n_layers = k = None
    routed = None
    hi = -1
    for d in docs_factory():
        ex = np.asarray(d.experts)
        if ex.ndim != 3 or not len(ex):
            continue
        if n_layers is not None and ex.shape[1:] != (n_layers, k):
            raise WorkbenchError(f"requests disagree on [layers, top_k]: {(n_layers, k)} vs {ex.shape[1:]}")
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
    if not n_experts and hi > INT16_MAX:
        raise WorkbenchError(f"expert id {hi} is beyond what a run stores (ids up to {INT16_MAX}): pass the served "
                             "model with --model (or --experts) so ids are checked against it")
    moe = [int(i) for i in np.flatnonzero(routed)] if k > 1 else list(range(n_layers))
    if not moe:
        raise WorkbenchError("no layer of the input carries routing")
    return inferred_facts(n_layers, moe, int(n_experts or hi + 1), int(k))


def docs(outputs, tok_rows, model_info, n_experts, routed_start=None):
    records = read_records(outputs)

    def factory():
        return iter_docs(records, tok_rows, routed_start)

    if model_info is None:
        model_info = infer(factory, n_experts)
    elif n_experts:
        model_info["facts"]["n_experts"] = int(n_experts)
    return factory, model_info
