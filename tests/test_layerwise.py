"""--layerwise: every decoder layer read from disk once per chunk of batches, yet routing, expert
statistics, hidden-state statistics and tokens equal the normal path's, on a tiny model of every family."""

from __future__ import annotations

import pytest

import workbench as wb
from workbench import layerwise

from conftest import FAMILIES

pytest.importorskip("accelerate")

KEYS = {"routing": ["doc_id", "pos", "layer"], "expert_stats": ["doc_id", "pos", "layer", "slot"],
        "hidden": ["doc_id", "pos", "layer"], "tokens": ["doc_id", "pos"]}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_equals_normal_path(tiny_dir, tiny_model, tmp_path, sample_texts, family, monkeypatch):
    ref = tiny_model(family)
    lw = layerwise.load_layerwise(str(tiny_dir(family)), offload_folder=str(tmp_path / "off"))
    assert lw.layerwise and set(lw.model.hf_device_map.values()) >= {"disk"}
    # between layers no decoder weight is in memory
    assert all(p.device.type == "meta" for layer in lw.layers for p in layer.experts.parameters())
    loads = []
    real = layerwise.resident

    def counting(module):
        loads.append(module)
        return real(module)

    monkeypatch.setattr(layerwise, "resident", counting)
    kw = dict(probes=["routing", "experts", "hidden"], logits=True, batch_size=2, progress=False)
    a = wb.capture(ref, sample_texts, tmp_path / "ref", **kw)
    b = wb.capture(lw, sample_texts, tmp_path / "lw", **kw)
    assert len(loads) == ref.n_layers  # one chunk: each layer made resident exactly once
    for t, k in KEYS.items():
        fa, fb = a.table(t).collect().sort(k), b.table(t).collect().sort(k)
        assert fa.height > 0 and fa.equals(fb), t


def test_layerwise_chunks_and_intervention(tiny_dir, tiny_model, tmp_path, sample_texts, monkeypatch):
    """Several chunks (each re-reads every layer) and a ban: still the normal path's rows."""
    ref = tiny_model("mixtral")
    lw = layerwise.load_layerwise(str(tiny_dir("mixtral")), offload_folder=str(tmp_path / "off"))
    real = layerwise.forward_layerwise
    monkeypatch.setattr(layerwise, "forward_layerwise",
                        lambda *a, **k: real(*a, **dict(k, chunk_tokens=40)))
    kw = dict(probes=["routing", "experts"], batch_size=2, progress=False, interventions={"ban": "L1:E3"},
              part_tokens=30)
    a = wb.capture(ref, sample_texts, tmp_path / "ref", **kw)
    b = wb.capture(lw, sample_texts, tmp_path / "lw", **kw)
    assert len(b.manifest["parts"]) > 1
    for t in ("routing", "expert_stats"):
        fa, fb = a.table(t).collect().sort(KEYS[t]), b.table(t).collect().sort(KEYS[t])
        assert fa.equals(fb), t
