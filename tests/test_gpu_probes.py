"""expert-probes on CUDA: the grouped path + Triton kernel against the CPU loop path and against the
model's own default (grouped_mm) implementation. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import FAMILIES

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _table(run, name):
    return pq.read_table([str(f) for f in run.files(name)]).to_pandas().sort_values(
        ["doc_id", "pos", "layer", "slot"]).reset_index(drop=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_stats_match_cpu_loop(family, tiny_dir, sample_texts, tmp_path):
    import workbench as wb
    from workbench.models.loading import load_model
    from workbench.probes.kernels import uses_triton

    path = str(tiny_dir(family))
    cpu = load_model(path)
    gpu = load_model(path, device="cuda", experts_implementation=None)  # the model's default (grouped_mm)
    assert uses_triton(torch.zeros(1, 1, device="cuda"))
    a = _table(wb.capture(cpu, sample_texts, tmp_path / "cpu", probes=["experts"], batch_size=4, progress=False),
               "expert_stats")
    b = _table(wb.capture(gpu, sample_texts, tmp_path / "gpu", probes=["experts"], batch_size=4, progress=False),
               "expert_stats")
    assert len(a) == len(b)
    same = (a["expert"].to_numpy() == b["expert"].to_numpy())
    assert same.mean() > 0.98  # GPU matmuls may flip near-tied routing
    for col in ("out_maxabs", "out_l2", "weight"):
        np.testing.assert_allclose(b[col].to_numpy()[same], a[col].to_numpy()[same], rtol=2e-3, atol=1e-5)
    assert (b["out_argmax"].to_numpy()[same] == a["out_argmax"].to_numpy()[same]).mean() > 0.98


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_logits_within_default_path_tolerance(family, dtype, tiny_dir, sample_texts):
    from workbench.capture import _batch_context, build_sequences
    from workbench.data import load_dataset
    from workbench.models.loading import load_model
    from workbench.probes.experts import ExpertsProbe

    mm = load_model(str(tiny_dir(family)), device="cuda", dtype=dtype, experts_implementation=None)
    seqs = build_sequences(load_dataset(sample_texts), mm.tokenizer)
    ctx, *_ = _batch_context(seqs, mm.tokenizer.pad_token_id, mm.device)
    with torch.inference_mode():
        plain = mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits.float()
        probe = ExpertsProbe()
        probe.attach(mm)
        probe.begin(ctx)
        try:
            probed = mm.model(input_ids=ctx.input_ids, attention_mask=ctx.attention_mask).logits.float()
            arrays = probe.harvest()
        finally:
            probe.detach()
    valid = ctx.attention_mask.bool()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(probed[valid], plain[valid], **tol)
    assert torch.isfinite(arrays["maxabs"]).all() and (arrays["maxabs"] > 0).all()


def test_gpu_reference_and_triton_agree_inside_capture(tiny_dir, sample_texts, tmp_path, monkeypatch):
    import workbench as wb
    from workbench.models.loading import load_model

    mm = load_model(str(tiny_dir("qwen2_moe")), device="cuda", dtype="bf16", experts_implementation=None)
    a = _table(wb.capture(mm, sample_texts, tmp_path / "t", probes=["experts"], batch_size=4, progress=False),
               "expert_stats")
    monkeypatch.setenv("WORKBENCH_KERNEL", "reference")
    b = _table(wb.capture(mm, sample_texts, tmp_path / "r", probes=["experts"], batch_size=4, progress=False),
               "expert_stats")
    for col in ("expert", "out_maxabs", "out_argmax", "weight"):
        np.testing.assert_array_equal(a[col].to_numpy(), b[col].to_numpy())
    np.testing.assert_allclose(a["out_l2"].to_numpy(), b["out_l2"].to_numpy(), rtol=1e-5)


def test_auto_experts_implementation_keeps_the_fast_default_on_gpu(tiny_dir):
    from workbench.models.loading import load_model

    path = str(tiny_dir("olmoe"))
    assert load_model(path).model.config._experts_implementation == "eager"
    default = load_model(path, experts_implementation=None).model.config._experts_implementation
    assert load_model(path, device="cuda").model.config._experts_implementation == default != "eager"
