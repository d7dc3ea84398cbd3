"""The capture pipeline (workbench/pipeline.py): streamed tokenisation equals tokenising the whole data set,
batches built on a worker thread fail loudly and leave a resumable run, the last part is split across
encoder threads without changing a row, routing from the one-buffer-per-batch hooks equals the routers'
own outputs, and the capture wing's imports point one way."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import pipeline
from workbench.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]


def _reference_sequences(ds, tokenizer, seq_len=None, max_tokens=None, max_len=2048):
    """The pre-stream algorithm, written out: tokenise every record at once, then cut or pack."""
    enc = tokenizer([r["text"] for r in ds.records], add_special_tokens=False)["input_ids"]
    budget = max_tokens if max_tokens is not None else float("inf")
    out = []
    if seq_len is None:
        for i, ids in enumerate(enc):
            ids = list(ids[:max_len])
            if budget <= 0:
                break
            ids = ids[: int(min(len(ids), budget))]
            if ids:
                out.append((i, ids, [i] * len(ids)))
                budget -= len(ids)
        return out
    stream, src = [], []
    for i, ids in enumerate(enc):
        piece = list(ids) + [tokenizer.eos_token_id]
        stream += piece
        src += [i] * len(piece)
        if len(stream) >= budget:
            break
    n = int(min(len(stream), budget))
    return [(j, stream[s:min(s + seq_len, n)], src[s:min(s + seq_len, n)]) for j, s in enumerate(range(0, n, seq_len))]


@pytest.mark.parametrize("kw", [dict(), dict(max_tokens=37), dict(max_len=9), dict(seq_len=5),
                                dict(seq_len=6, max_tokens=41), dict(seq_len=64)])
def test_streamed_sequences_equal_tokenising_everything_at_once(tiny_model, sample_texts, kw):
    mm = tiny_model("olmoe")
    ds = load_dataset(sample_texts * 3)
    want = _reference_sequences(ds, mm.tokenizer, **kw)
    # a few characters a chunk: many chunk and sequence boundaries fall inside documents
    got = list(pipeline.iter_sequences(ds, mm.tokenizer, chunk_chars=40, cut=pipeline.CutDocuments(), **kw))
    assert [(s.doc_id, s.ids.tolist(), s.src.tolist()) for s in got] == want


def test_cut_documents_are_counted_over_the_whole_stream(tiny_model):
    mm = tiny_model("olmoe")
    ds = load_dataset(["x" * 30, "short", "y" * 12])
    cut = pipeline.CutDocuments()
    seqs = list(pipeline.iter_sequences(ds, mm.tokenizer, max_len=10, chunk_chars=8, cut=cut))
    assert [len(s.ids) for s in seqs] == [10, 5, 10]
    assert (cut.docs, cut.dropped, cut.total_docs, cut.total_tokens) == (2, 20 + 2, 3, 47)
    with pytest.warns(wb.errors.WorkbenchWarning, match="2 of 3 documents .* were cut"):
        cut.warn()


def test_a_batch_that_fails_on_the_worker_surfaces_and_the_run_resumes_exactly(tiny_model, sample_texts, tmp_path,
                                                                              monkeypatch):
    mm = tiny_model("qwen3_moe")
    kw = dict(batch_size=1, part_tokens=1, progress=False)
    ref = wb.capture(mm, sample_texts, tmp_path / "ref", **kw)
    real, calls = pipeline.batch_context, []

    def failing(*a, **k):
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise OSError("the disk holding the data went away")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "batch_context", failing)
    with pytest.raises(OSError, match="went away"):
        wb.capture(mm, sample_texts, tmp_path / "r", **kw)
    assert set(calls) == {"wb-batches"}  # built on the worker, raised on the caller
    assert not [t for t in threading.enumerate() if t.name in ("wb-batches", "wb-writer")]
    partial = wb.open_run(tmp_path / "r")
    assert not partial.complete and 0 < len(partial.manifest["parts"]) <= 3
    monkeypatch.setattr(pipeline, "batch_context", real)
    run = wb.capture(mm, sample_texts, tmp_path / "r", resume=True, **kw)
    for t, key in (("tokens", ["doc_id", "pos"]), ("routing", ["doc_id", "pos", "layer"])):
        assert run.table(t).collect().sort(key).equals(ref.table(t).collect().sort(key)), t


def test_the_last_part_is_split_across_encoder_threads_without_changing_a_row(tiny_model, sample_texts, tmp_path,
                                                                              monkeypatch):
    mm = tiny_model("mixtral")
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 10)  # 4 encoder threads whatever the machine
    one = wb.capture(mm, sample_texts, tmp_path / "one", batch_size=2, part_tokens=1 << 30, progress=False)
    per_batch = wb.capture(mm, sample_texts, tmp_path / "b", batch_size=2, part_tokens=1, progress=False)
    parts = one.manifest["parts"]
    n_batches = -(-len(sample_texts) // 2)
    assert len(parts) == min(4, n_batches) > 1  # one part's worth of batches, written as 4 parts
    ends = [p["batch_end"] for p in parts]
    assert ends == sorted(ends) and ends[-1] == n_batches and [p["index"] for p in parts] == list(range(len(parts)))
    assert sum(p["tokens"] for p in parts) == sum(p["tokens"] for p in per_batch.manifest["parts"])
    for t in ("tokens", "routing"):  # row order too: parts concatenated in order
        assert one.table(t).collect().equals(per_batch.table(t).collect()), t


def test_routing_of_packed_batches_equals_the_routers_own_outputs(tiny_model, sample_texts, tmp_path):
    """Packed sequences fill every row (no padding): the hooks' buffers are copied whole; an independent
    forward with plain router hooks gives the same experts (bit-exact) and weights."""
    mm = tiny_model("deepseek_v3")
    run = wb.capture(mm, sample_texts, tmp_path / "r", seq_len=8, batch_size=3, logits=True, progress=False)
    seqs = pipeline.build_sequences(load_dataset(sample_texts), mm.tokenizer, seq_len=8)
    got = run.routing.sort("doc_id", "pos", "layer").collect()
    idx, w, lg = [], [], []
    for i in range(0, len(seqs), 3):
        batch = seqs[i:i + 3]
        seen = {}
        hs = [layer.router.register_forward_hook(lambda m, a, out, li=layer.index: seen.__setitem__(li, out))
              for layer in mm.layers]
        try:
            for s in batch:  # one sequence at a time: no batch, no padding, no mask
                with torch.inference_mode():
                    mm.model(input_ids=torch.tensor([s.ids.tolist()]), use_cache=False)
                rows = [seen[li] for li in mm.moe_layers]
                idx.append(np.stack([r[2].reshape(len(s.ids), -1).numpy() for r in rows], 1))
                w.append(np.stack([r[1].reshape(len(s.ids), -1).float().numpy() for r in rows], 1))
                lg.append(np.stack([r[0].reshape(len(s.ids), -1).float().numpy() for r in rows], 1))
        finally:
            for h in hs:
                h.remove()
    nl = len(mm.moe_layers)
    want_idx = np.concatenate(idx).reshape(-1, idx[0].shape[-1])
    assert got.height == want_idx.shape[0] and got.height == sum(len(s.ids) for s in seqs) * nl
    assert (np.stack(got["experts"].to_list()) == want_idx).all()
    np.testing.assert_allclose(np.stack(got["weights"].to_list()), np.concatenate(w).reshape(got.height, -1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.stack(got["logits"].to_list()), np.concatenate(lg).reshape(got.height, -1),
                               rtol=1e-5, atol=1e-5)


def test_run_store_and_a_rank_are_part_sinks_and_a_rank_lists_checksums(tmp_path):
    """A rank writes its part files through the store's public PartFiles and takes their checksums
    through `take_checksums`; what it lists verifies like a single-process part."""
    import pyarrow as pa

    from workbench.distributed import RankWriter
    from workbench.store import SCHEMAS, RunWriter, part_problem

    run = RunWriter(tmp_path / "r", {"identity": {}})
    rank1 = RankWriter(tmp_path / "r", rank=1, ws=2, base=0, mine=[1, 3], run=None)
    assert isinstance(run, pipeline.PartSink) and isinstance(rank1, pipeline.PartSink)
    idx = rank1.reserve_part()
    table = pa.table({"doc_id": [0, 1], "pos": [0, 1], "token_id": [5, 6], "token": ["a", "b"],
                      "phase": ["prefill"] * 2}).cast(SCHEMAS["tokens"])
    files = {"tokens": rank1.write_table_file(idx, "tokens", table)}
    rank1.commit_part(idx, files, batch_end=2, n_tokens=2)
    part = rank1.parts[0]
    assert (idx, part["batches"], part["batch_end"]) == (1, [1, 3], 4)
    assert part["bytes"]["tokens"] == (tmp_path / "r" / files["tokens"]).stat().st_size
    assert part_problem(tmp_path / "r", part, "tokens") is None
    (tmp_path / "r" / files["tokens"]).write_bytes(b"x" * part["bytes"]["tokens"])  # same size, other bytes
    assert "checksum" in part_problem(tmp_path / "r", part, "tokens")
    run.release()


# ------------------------------------------------------------------------------------------ imports

# importers/ (its package <-> submodule imports) is [engines-2]'s to untangle; it may import the wing's public names
WING = ("capture", "pipeline", "distributed", "layerwise", "store")


def _modules() -> dict[str, Path]:
    mods = {}
    for base, pkg in ((ROOT / "workbench", "workbench"), (ROOT / "probes", "workbench.probes")):
        for f in base.rglob("*.py"):
            rel = f.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, path: Path, mods) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, function-level ones too."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, []) if sub in mods else (target, [a.name]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return [(t, n) for t, n in out if t in mods]


def test_capture_wing_imports_point_one_way_and_take_no_private_names():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods) if t != m} for m, p in mods.items()}
    wing = {m for m in mods if m.split(".")[1:2] and m.split(".")[1] in WING}
    # no cycle through a capture-wing module (function-level imports count: they hid the old one)
    for start in wing:
        stack, seen = [(start, [start])], set()
        while stack:
            m, path = stack.pop()
            for t in graph.get(m, ()):
                assert t != start, f"import cycle: {' -> '.join(path + [t])}"
                if t not in seen:
                    seen.add(t)
                    stack.append((t, path + [t]))
    # no capture-wing module takes another module's _private name, and nobody takes a wing module's
    bad = [(m, t, n) for m, p in mods.items() for t, names in _imports(m, p, mods) for n in names
           if n.startswith("_") and not n.startswith("__") and t != m and (m in wing or t in wing)
           and not t.startswith(m + ".")]
    assert not bad, bad
    assert "workbench.pipeline" not in graph["workbench.store"]  # the pipeline sits above the store
    assert "workbench.capture" not in graph["workbench.pipeline"] | graph["workbench.distributed"] \
        | graph["workbench.layerwise"]
