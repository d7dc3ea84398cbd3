"""Import routing recorded by serving engines (vLLM, SGLang) into a normal workbench run.

Engines record expert ids only (no routing weights, logits or expert outputs), so an imported run has
`tokens/` and `routing/` with null weights (or, from an aggregated SGLang dump, only `expert_load/`
counts). Every analysis that needs expert ids alone runs on it unchanged.

Formats, per release, read from the engines' released source (docs/guides/engines.md has the table):
- vLLM `enable_return_routed_experts` (0.14+): one array [prompt + output - 1 - prompt_start,
  num_hidden_layers, top_k] per sample (`CompletionOutput.routed_experts`); 0.21.0 alone split it into
  `RequestOutput.prompt_routed_experts` + the generated part. dtype int32 (..0.20), int16 (0.21), uint8 /
  uint16 above 256 experts (0.22+). The OpenAI server sends it per choice, as nested lists before 0.22
  and as base64 of `np.save` bytes from 0.22. Ids are logical, except 0.14-0.15 under EPLB (physical).
  0.34 adds the request field `routed_experts_prompt_start` (the first rows are not sent).
- SGLang `--enable-return-routed-experts`: `meta_info["routed_experts"]` is base64 of int32
  [seqlen - 1 - routed_experts_start_len, num_hidden_layers, top_k]; physical ids in 0.5.7-0.5.9,
  logical from 0.5.10 (captured before the logical->physical remap).
- SGLang expert distribution recorder (`.pt`): per-token records (`topk_ids_of_layer` [layers,
  tokens, 8], -1 padded, physical ids, plus `last_physical_to_logical_map`), per-pass counts, or
  `stat` counts (a circular buffer of logical counts, summed over all ranks).

Everything the input declares (counts, shapes, ids) is checked against the payload and the run's
column types before anything is allocated or written: a refused import leaves no run folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from ..errors import WorkbenchError
from .common import (  # noqa: F401  (re-exported: the package's public helpers)
    ENGINES, Doc, Counts, model_facts, inferred_facts, layer_columns, INT16_MAX, INT32_MAX, whole, id_list, parse_version, load_physical_to_logical, map_for_layers, to_logical, PHYSICAL_RELEASES, resolve_ids,
)

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
    """Engine layout -> rows in the run's layout (MoE layers in order, logical ids, valid tokens only)."""

    def __init__(self, facts: dict, p2l: np.ndarray | None = None):
        self.facts = facts
        self.E, self.K = int(facts["n_experts"]), int(facts["top_k"])
        self.p2l = None if p2l is None else map_for_layers(p2l, facts)
        self.layers = np.asarray(facts["moe_layers"], np.int16)
        self.vocab = facts.get("vocab_size")
        self.dropped = 0  # tokens whose routing the engine left empty (zero-filled or -1)
        self.unrouted_tail = 0  # tokens after the last routed one (the last generated token)
        self.without_routing = 0  # requests that carry no routed experts (aborted, or not asked for)

    def _moe(self, doc: Doc) -> np.ndarray:
        ex = np.asarray(doc.experts)
        if ex.shape == (0, 0, 0):  # a request without routed experts
            return np.zeros((0, len(self.layers), self.K), np.int64)
        if ex.ndim != 3:
            raise WorkbenchError(f"routed experts must be [tokens, layers, top_k], got shape {ex.shape}")
        if ex.shape[2] < self.K:
            raise WorkbenchError(f"routed experts hold {ex.shape[2]} experts a token, the model's top_k is {self.K}")
        cols = layer_columns(ex.shape[1], self.facts)
        ex = ex[:, cols, : self.K].astype(np.int64)
        if ex.size and ex.min() < -1:  # -1 pads an empty slot (recorder dumps); nothing else is negative
            raise WorkbenchError(f"expert id {int(ex.min())} is negative")
        return ex

    def _bad(self, ex: np.ndarray) -> np.ndarray:
        bad = (ex < 0).any(axis=(1, 2))
        if self.K > 1:  # a real top-k never repeats an expert; a zero-filled slot does
            bad |= (ex == ex[:, :, :1]).all(axis=2).any(axis=1)
        return bad

    def raw_max(self, doc: Doc) -> int:
        ex = self._moe(doc)
        ok = ex[~self._bad(ex)]
        return int(ok.max()) if ok.size else -1

    def convert(self, doc: Doc):
        if np.asarray(doc.experts).shape == (0, 0, 0):
            self.without_routing += 1
        ex = self._moe(doc)
        n_ids = len(doc.token_ids)
        if len(ex) > n_ids:
            raise WorkbenchError(f"{len(ex)} routing rows for {n_ids} tokens")
        if doc.start + n_ids - 1 > INT32_MAX:
            raise WorkbenchError(f"position {doc.start + n_ids - 1} is beyond the stored range (int32)")
        self.unrouted_tail += n_ids - len(ex)
        bad = self._bad(ex)
        keep = np.flatnonzero(~bad)
        good = ex[keep]
        if self.p2l is not None:
            good = to_logical(self.p2l, good, self.E)
        if good.size and good.max() >= self.E:
            raise WorkbenchError(f"expert id {int(good.max())} is out of range for {self.E} experts")
        ids = np.asarray(doc.token_ids, np.int64)[keep]
        if ids.size and (ids.max() > INT32_MAX or ids.min() < -1):
            raise WorkbenchError(f"token id {int(ids.max())} is beyond the stored range (int32)")
        if self.vocab and ids.size and ids.max() >= int(self.vocab):
            raise WorkbenchError(f"token id {int(ids.max())} is out of range for the model's {self.vocab}-token "
                                 "vocabulary: the trace is not from this model")
        self.dropped += int(bad.sum())
        return keep, good, ids


def _hash_docs(docs, h) -> None:
    for d in docs:
        if isinstance(d, Counts):
            h.update(np.ascontiguousarray(d.counts).tobytes())
            continue
        h.update(np.ascontiguousarray(d.token_ids, np.int64).tobytes())
        h.update(np.ascontiguousarray(d.experts, np.int64).tobytes())
        h.update(json.dumps([d.n_prompt, d.start, d.cached, d.labels], sort_keys=True, default=str).encode())


def _scan(docs_factory, facts: dict, engine: str):
    """Pass 1 over the input: its hash, and the largest raw expert id (everything `iter_docs` refuses
    is refused here, before a run folder exists)."""
    h = hashlib.sha256()
    probe = _DocConverter(facts)
    hi = -1
    n = 0
    for d in docs_factory():
        n += 1
        _hash_docs([d], h)
        if isinstance(d, Counts):
            continue
        hi = max(hi, probe.raw_max(d))
    if not n:
        raise WorkbenchError(f"nothing to import: the {engine} input holds no request")
    return h.hexdigest(), hi


def _check_counts(docs_factory, facts: dict, p2l) -> None:
    for d in docs_factory():
        if isinstance(d, Counts):
            _load_table(d, facts, p2l)


def write_run(docs_factory, out, engine: str, model_info: dict, p2l: np.ndarray | None = None,
              source_desc: dict | None = None, resume: bool = False, overwrite: bool = False,
              part_tokens: int = 65536, progress: bool = True, id_kind: str = "logical",
              engine_version: tuple | None = None, sha: str | None = None):
    """Write the Docs (or Counts) that `docs_factory()` yields into the run folder `out`.

    `docs_factory` is called more than once: a dry pass converts and checks everything (so a refused
    input leaves no run folder, and the manifest's counts cover every row, also after --resume), then
    the write, which on resume skips the documents already written. A part holds whole documents."""
    from ..manifest import Manifest
    from ..pipeline import TokenDecoder as _Decoder, progress_bar as _progress, versions as _versions
    from ..store import RunWriter, open_run

    facts = model_info["facts"]
    for key, hi in (("n_experts", INT16_MAX + 1), ("n_layers", INT16_MAX + 1), ("top_k", 1024)):
        whole(facts[key], f"the model's {key}", 1, hi)
    if sha is None:
        sha = _scan(docs_factory, facts, engine)[0]
    # dry pass: every refusal happens here, and the counts cover all rows
    conv = _DocConverter(facts, p2l)
    n_docs = n_tokens = 0
    counts_meta: dict = {}
    labels_all: list[str] = []
    for d in docs_factory():
        if isinstance(d, Counts):
            _load_table(d, facts, p2l)
            counts_meta.update(d.meta, windows=int(d.counts.shape[0]), window=d.window)
            continue
        keep, _, _ = conv.convert(d)
        labels_all.extend(k for k in d.labels if k not in labels_all)
        n_docs += 1
        n_tokens += len(keep)
    if not n_tokens and not counts_meta:
        if n_docs and conv.without_routing == n_docs:
            raise WorkbenchError(f"no {engine} response carries routed experts: start vLLM with "
                                 "enable_return_routed_experts=True, or SGLang with --enable-return-routed-experts "
                                 "and send return_routed_experts=true")
        raise WorkbenchError(f"nothing to import: no token of the {engine} input carries routing")
    stats = dict(counts_meta)
    if n_docs:
        stats.update(documents=n_docs - conv.without_routing, tokens=n_tokens, dropped_empty_routing=conv.dropped,
                     tokens_without_routing=conv.unrouted_tail, requests_without_routing=conv.without_routing)
    identity = {"source": engine, "sha256": sha, "model": facts.get("spec"), "expert_ids": id_kind,
                "physical_to_logical": None if p2l is None else hashlib.sha256(p2l.tobytes()).hexdigest()[:16]}
    settings = {"import": engine, "expert_ids": id_kind}
    if engine_version is not None:
        settings["engine_version"] = ".".join(map(str, engine_version))
    manifest = Manifest.new(identity=identity, source=engine, model=facts,
                            dataset={"name": f"{engine} import", **(source_desc or {})},
                            label_columns=[], probes={"routing": {"weights": False, "logits": False}},
                            settings=settings, interventions={}, dtype=None, device=None,
                            versions=_versions()).to_json()
    fresh = not Path(out).exists()
    w = RunWriter(out, manifest, resume=resume, overwrite=overwrite)
    if w.already_complete:
        return open_run(out)
    try:
        _write(w, docs_factory, engine, model_info, facts, p2l, part_tokens, progress, _Decoder, _progress)
    except WorkbenchError:
        if fresh and not w.manifest.get("parts"):
            _remove_fresh(w, Path(out))
        raise
    w.finish(label_columns=labels_all, **{"import": stats})
    return open_run(out)


def _remove_fresh(w, out: Path) -> None:
    """A refusal after the folder was made (should the dry pass miss one): leave nothing that blocks a retry."""
    from ..safefs import remove_file
    from ..store import LOCK, MANIFEST

    w.discard_uncommitted()
    w.release()
    for name in (MANIFEST, LOCK):
        remove_file(out, name)  # regular files only, never through a link (the one deletion path)
    for d in out.iterdir() if out.is_dir() else []:
        if d.is_dir() and not d.is_symlink():
            try:
                d.rmdir()
            except OSError:
                pass
    try:
        out.rmdir()
    except OSError:
        pass


def _write(w, docs_factory, engine, model_info, facts, p2l, part_tokens, progress, _Decoder, _progress):
    conv = _DocConverter(facts, p2l)
    tok = model_info.get("tokenizer")
    decode = _Decoder(tok) if tok is not None else None
    buf_tok, buf_rt, buf_load = [], [], []
    n_buf = 0
    start = w.next_batch
    bar = _progress(None, 0, progress, f"import {engine}")
    L = len(conv.layers)

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
            t = _load_table(d, facts, p2l)
            buf_load.append(t)
            # a counts part's `tokens`: the tokens its counts route (slots / (top_k x MoE layers)), at least
            # one a window, so the store's row bound (windows x layers x experts) holds
            W = len(t) // max(1, L * int(facts["n_experts"]))
            n_buf = max(W, int(round(pa.compute.sum(t["count"]).as_py() or 0) / max(1, conv.K * L)))
            flush(index + 1)
            continue
        keep, ex, ids = conv.convert(d)
        n = len(keep)
        if n:
            pos = (d.start + keep).astype(np.int32)
            cols = {"doc_id": pa.array(np.full(n, index, np.int64)), "pos": pa.array(pos),
                    "token_id": pa.array(ids.astype(np.int32)),
                    "token": decode(np.maximum(ids, 0)) if decode is not None and (ids >= 0).all()
                    else pa.array([""] * n, pa.string()),
                    "phase": pa.array(np.where(keep < d.n_prompt, "prefill", "decode").tolist(), pa.string()),
                    "cached": pa.array(keep < d.cached)}
            for k, v in d.labels.items():
                cols[k] = pa.array([v] * n)
            buf_tok.append(pa.table(cols))
            buf_rt.append(pa.table({
                "doc_id": pa.array(np.full(n * L, index, np.int64)),
                "pos": pa.array(np.repeat(pos, L)),
                "layer": pa.array(np.tile(conv.layers, n)),
                "experts": _experts_list(ex.reshape(n * L, -1)),
                "weights": _null_weights(n * L, conv.K)}))
            n_buf += n
        bar.update(n)
        if n_buf >= part_tokens:
            flush(index + 1)
    flush(index + 1)
    bar.close()


def _load_table(c: Counts, facts: dict, p2l) -> pa.Table:
    cnt = np.asarray(c.counts)
    if cnt.ndim != 3 or not (np.issubdtype(cnt.dtype, np.integer) or cnt.size == 0):
        raise WorkbenchError(f"expert counts must be whole numbers [windows, layers, experts], got shape "
                             f"{cnt.shape} of {cnt.dtype}")
    cnt = cnt.astype(np.int64)
    if cnt.size and cnt.min() < 0:
        raise WorkbenchError(f"expert counts hold {int(cnt.min())}: counts cannot be negative")
    cols = layer_columns(cnt.shape[1], facts)
    cnt = cnt[:, cols, :]
    E = int(facts["n_experts"])
    if p2l is not None:
        cnt = physical_to_logical_counts(cnt, map_for_layers(p2l, facts), E)
    elif cnt.shape[2] != E:
        raise WorkbenchError(f"the counts cover {cnt.shape[2]} experts for {E} logical ones and no "
                             "physical_to_logical_map is known: pass --physical-to-logical")
    W, L, _ = cnt.shape
    layers = np.asarray(facts["moe_layers"], np.int16)
    return pa.table({"window": pa.array(np.repeat(np.arange(W, dtype=np.int64), L * E)),
                     "layer": pa.array(np.tile(np.repeat(layers, E), W)),
                     "expert": pa.array(np.tile(np.arange(E, dtype=np.int16), W * L)),
                     "count": pa.array(cnt.reshape(-1))})


def physical_to_logical_counts(phys: np.ndarray, m: np.ndarray, E: int) -> np.ndarray:
    """[W, L, P] physical counts -> [W, L, E] logical (replicas of one expert add up). A slot the map
    leaves empty (-1) or sends past E may hold no count: the map is not the engine's otherwise."""
    W, L, P = phys.shape
    if m.shape[1] != P:
        raise WorkbenchError(f"the counts cover {P} physical experts, the physical_to_logical_map {m.shape[1]}")
    invalid = (m < 0) | (m >= E)  # [L, P]
    lost = phys[:, invalid].sum() if invalid.any() else 0
    if lost:
        layer, p = (int(v[0]) for v in np.nonzero(invalid & (phys.sum(0) > 0)))
        raise WorkbenchError(f"the physical_to_logical_map sends physical expert {p} (MoE layer {layer}) to "
                             f"{int(m[layer, p])}, not an expert below {E}, yet {int(lost)} counts fall there: "
                             "the map is not the one the engine ran")
    out = np.zeros((W, L, E), np.int64)
    for layer in range(L):
        ok = ~invalid[layer]
        np.add.at(out[:, layer, :], (slice(None), m[layer][ok]), phys[:, layer, ok])
    return out


# ---------------------------------------------------------------------------------------------------
# Public entry


def import_routed_experts(outputs, out, engine: str | None = None, model=None, tokens=None,
                          physical_to_logical=None, n_experts: int | None = None, resume: bool = False,
                          overwrite: bool = False, part_tokens: int = 65536, progress: bool = True,
                          engine_version: str | None = None, routed_start: int | None = None):
    """Write an engine's recorded routing as a workbench run and open it.

    outputs: vLLM `RequestOutput`s or OpenAI-server responses (completions, chat; objects or JSON),
    SGLang `/generate` responses (a batch or n > 1 answer is a list of them), a SGLang recorder dump
    (`.pt` file or folder), or a file of them (`.jsonl` / `.json`). engine: vllm, sglang or
    sglang-dump (guessed when None). model: the served model (`demo`, a folder, a config.json, a hub
    id in the local cache): decoder layers, MoE layers, E and top-k; without it they are inferred.
    tokens: per-request token ids / labels when the engine output lacks them (list of dicts or a
    .jsonl path; `input_ids`, `output_ids`, anything else becomes a label column).
    physical_to_logical: the placement ([layers, physical] array or SGLang's JSON / `.pt`) for
    releases that report physical ids (SGLang 0.5.7-0.5.9, vLLM 0.14-0.15 under EPLB).
    engine_version: the release that served ("0.5.10"): says whether ids are physical or logical.
    routed_start: rows skipped at the front (vLLM `routed_experts_prompt_start`, SGLang
    `routed_experts_start_len`) when the responses do not carry it.
    """
    from . import sglang, vllm

    engine = engine or _guess_engine(outputs)
    if engine not in ENGINES:
        raise WorkbenchError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if part_tokens < 1:
        raise WorkbenchError("part_tokens must be at least 1")
    if n_experts is not None:
        n_experts = whole(n_experts, "--experts", 1, INT16_MAX + 1)
    if routed_start is not None:
        routed_start = whole(routed_start, "--routed-start")
    version = parse_version(engine_version)
    tok_rows = vllm.read_tokens(tokens)
    p2l = load_physical_to_logical(physical_to_logical)
    mi = model_facts(model) if model is not None else None
    desc = {"path": str(outputs)} if isinstance(outputs, (str, Path)) else {"objects": True}
    if engine in ("vllm", "sglang"):
        mod = vllm if engine == "vllm" else sglang
        factory, mi = mod.docs(outputs, tok_rows, mi, n_experts, routed_start)
        facts = mi["facts"]
        sha, max_raw = _scan(factory, facts, engine)
        p2l, id_kind = resolve_ids(engine, version, p2l, max_raw, int(facts["n_experts"]), facts)
    else:
        factory, mi, dump_p2l = sglang.dump_docs(outputs, mi, n_experts)
        if p2l is None:
            p2l = dump_p2l
        id_kind = "logical (mapped from physical)" if p2l is not None else "as recorded"
        sha = None
    return write_run(factory, out, engine, mi, p2l=p2l, source_desc=desc, resume=resume, overwrite=overwrite,
                     part_tokens=part_tokens, progress=progress, id_kind=id_kind, engine_version=version, sha=sha)


def _guess_engine(outputs) -> str:
    if isinstance(outputs, (str, Path)):
        p = Path(outputs)
        if p.suffix == ".pt" or (p.is_dir() and any(p.glob("*.pt"))):
            return "sglang-dump"
        raise WorkbenchError(f"cannot tell which engine wrote {p}: name it (vllm, sglang or sglang-dump)")
    first = outputs
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, dict):
        if "meta_info" in first:
            return "sglang"
        if "records" in first or "logical_count" in first:
            return "sglang-dump"
    return "vllm"
