"""compat: the workbench sees the model's own MoE code on whatever transformers the user installed.

Hub kernels (transformers >= 5.25 turns them on by default) may swap a module's forward; a flag that
swapped nothing in the MoE block is harmless, a swapped router / experts / block is refused by name.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models.loading import load_model, wrap_model

needs_kernels = pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="kernels not installed")


def test_load_model_turns_hub_kernels_off_without_env(tiny_dir, monkeypatch):
    """No USE_HUB_KERNELS in the environment: transformers >= 5.25 would kernelize; we load without."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    mm = load_model(str(tiny_dir("mixtral")))
    assert getattr(mm.model, "use_kernels", False) is False
    assert mm.describe()["hub_kernels"] == "off"


@needs_kernels
def test_flag_alone_is_not_an_error(tiny_dir, monkeypatch):
    """use_kernels=True through transformers' own path, no kernel touching the MoE block: accepted,
    and the manifest says kernels were on."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    path = tiny_dir("mixtral")
    model = AutoModelForCausalLM.from_pretrained(path, use_kernels=True)
    assert model.use_kernels is True
    mm = wrap_model(model, None, spec="flag-only")
    assert mm.describe()["hub_kernels"] == "on (no MoE block replaced)"
    # The probes still see the routing: the router's forward is the class's own.
    assert "forward" not in mm.layers[0].router.__dict__


class _FakeMoEKernel(torch.nn.Module):
    """A stateless 'hub kernel' layer (the kernels package's contract): forward only."""

    def forward(self, hidden_states):
        return hidden_states * 0


class _FakeRepo:
    """A kernels repository that loads the fake layer instead of downloading one."""

    layer_name = "_FakeMoEKernel"

    def load(self):
        return _FakeMoEKernel

    def __str__(self):
        return "test/fake-moe"


def _kernelize_for_real(model, cls, layer_name, monkeypatch):
    """Mark `cls` extensible (as transformers does with @use_kernel_forward_from_hub), map it to the
    fake kernel for CPU and let transformers kernelize the model."""
    from kernels import use_kernel_mapping

    monkeypatch.setattr(cls, "kernel_layer_name", layer_name, raising=False)
    monkeypatch.setattr(cls, "kernel_condition", staticmethod(lambda m: True), raising=False)
    with use_kernel_mapping({layer_name: {"cpu": _FakeRepo()}}):
        model.set_use_kernels(True)
    assert model.use_kernels is True


@needs_kernels
@pytest.mark.parametrize("part", ["block", "router"])
def test_kernel_that_replaced_moe_code_is_refused_by_name(tiny_dir, monkeypatch, part):
    from transformers import AutoModelForCausalLM
    from transformers.models.mixtral import modeling_mixtral as mx

    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral"), use_kernels=False)
    cls = mx.MixtralSparseMoeBlock if part == "block" else mx.MixtralTopKRouter
    _kernelize_for_real(model, cls, f"WbFake{part}", monkeypatch)
    # The kernel really replaced the forward (independent check: the instance carries a new forward).
    swapped = model.model.layers[0].mlp if part == "block" else model.model.layers[0].mlp.gate
    assert swapped.forward.__func__ is _FakeMoEKernel.forward
    with pytest.raises(WorkbenchError) as e:
        wrap_model(model, None, spec="kernelized")
    msg = str(e.value)
    want = "MoE block MixtralSparseMoeBlock" if part == "block" else "router MixtralTopKRouter"
    assert f"layer 0 {want}" in msg and "test/fake-moe" in msg and "use_kernels=False" in msg
    assert "\n" not in msg


def test_instance_patch_without_kernels_is_refused(tiny_dir):
    """A forward swapped by hand on the experts (no kernels flag): also refused, naming the part."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3_moe"), use_kernels=False)
    experts = model.model.layers[1].mlp.experts
    experts.forward = lambda *a, **k: None
    with pytest.raises(WorkbenchError, match=r"layer 1 experts Qwen3MoeExperts \(forward replaced on the instance"):
        wrap_model(model, None)
