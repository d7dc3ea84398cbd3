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
    assert f"layer 0 {want}" in msg and "use_kernels=False" in msg
    # kernels >= 0.16 records the repository on the module; the sentence then names it
    assert "test/fake-moe" in msg or "_kernel_repo" not in swapped.__dict__
    assert "\n" not in msg


def test_instance_patch_without_kernels_is_refused(tiny_dir):
    """A forward swapped by hand on the experts (no kernels flag): also refused, naming the part."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen3_moe"), use_kernels=False)
    experts = model.model.layers[1].mlp.experts
    experts.forward = lambda *a, **k: None
    with pytest.raises(WorkbenchError, match=r"layer 1 experts Qwen3MoeExperts \(forward replaced on the instance"):
        wrap_model(model, None)


# ---- upstream drift: one sentence naming family, transformers version and the difference ----------------


def _one_sentence_about(e, family):
    import transformers

    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{family} on transformers {transformers.__version__}: ")
    return msg


def _build(tiny_dir, family):
    """A model built from the tiny checkpoint's config by the (possibly patched) modeling module."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_dir(family))
    return AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")


def test_router_returning_probabilities_is_drift(tiny_dir, monkeypatch):
    """transformers 5.5-5.12 Mixtral: the router's first output was softmax probabilities, not logits;
    interventions redo the rule from it, so it would steer wrong. Faked here by an upstream-style class
    patch (its code lives in the modeling module, as a new release's would)."""
    from transformers.models.mixtral import modeling_mixtral as mx

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        probs = torch.softmax(torch.nn.functional.linear(hidden_states, self.weight).float(), dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)
        return probs, top / top.sum(-1, keepdim=True), idx

    forward.__module__ = mx.__name__
    monkeypatch.setattr(mx.MixtralTopKRouter, "forward", forward)
    with pytest.raises(WorkbenchError) as e:
        load_model(str(tiny_dir("mixtral")))
    assert "returns probabilities (rows sum to 1)" in _one_sentence_about(e, "mixtral")


def test_router_that_became_a_linear_is_drift(tiny_dir, monkeypatch):
    """transformers <= 5.12 DeepSeek-V2: `gate` was a plain nn.Linear (hooks saw a tensor)."""
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds

    class LinearGate(torch.nn.Linear):
        def __init__(self, config):
            super().__init__(config.hidden_size, config.n_routed_experts, bias=False)

    monkeypatch.setattr(ds, "DeepseekV2TopkRouter", LinearGate)
    model = _build(tiny_dir, "deepseek_v2")
    with pytest.raises(WorkbenchError) as e:
        wrap_model(model, None)
    msg = _one_sentence_about(e, "deepseek_v2")
    assert "the router of layer 1 is test_compat." in msg and "LinearGate, not a class of" in msg


def test_reordered_router_output_is_drift(tiny_dir, monkeypatch):
    """transformers 5.13-5.20 GraniteMoE: the router returned (index, weights, logits)."""
    from transformers.models.granitemoe import modeling_granitemoe as gm

    original = gm.GraniteMoeTopKRouter.forward

    def forward(self, hidden_states):
        logits, weights, index = original(self, hidden_states)
        return index, weights, logits

    forward.__module__ = gm.__name__
    monkeypatch.setattr(gm.GraniteMoeTopKRouter, "forward", forward)
    with pytest.raises(WorkbenchError) as e:
        wrap_model(_build(tiny_dir, "granitemoe"), None)
    assert "returns (index, weights, logits)" in _one_sentence_about(e, "granitemoe")


def test_renamed_experts_module_is_drift(tiny_dir):
    """A release that renames the block's `experts`: named, never taken for a dense model."""
    model = _build(tiny_dir, "qwen3_moe")
    for dec in model.model.layers:
        dec.mlp.routed = dec.mlp.experts
        del dec.mlp.experts
    with pytest.raises(WorkbenchError) as e:
        wrap_model(model, None)
    msg = _one_sentence_about(e, "qwen3_moe")
    assert "has no experts module `experts` (children: gate, routed)" in msg


def test_unfused_experts_implementation_is_drift(tiny_dir):
    """A new experts implementation (a ModuleList of per-expert MLPs instead of fused 3-d weights)."""
    from transformers.models.olmoe import modeling_olmoe as om

    class ListExperts(torch.nn.ModuleList):
        def __init__(self, config):
            super().__init__([om.OlmoeMLP(config) for _ in range(config.num_experts)])

    ListExperts.__module__ = om.__name__
    model = _build(tiny_dir, "olmoe")
    for dec in model.model.layers:  # what a release with per-expert modules would build
        dec.mlp.experts = ListExperts(model.config)
    with pytest.raises(WorkbenchError) as e:
        wrap_model(model, None)
    assert "not one fused module with 3-d down_proj" in _one_sentence_about(e, "olmoe")


def test_dense_model_of_a_table_family_is_still_called_dense(tiny_dir):
    """The drift diagnosis must not fire when the block simply is not there (a dense layer stack)."""
    model = _build(tiny_dir, "mixtral")
    for dec in model.model.layers:
        del dec.mlp
    with pytest.raises(WorkbenchError, match="has no MoE layers the workbench can probe: a dense model"):
        wrap_model(model, None)


def test_contract_holds_on_the_installed_transformers(tiny_model):
    """The nine families match the table on this transformers (the negative control of the tests above)."""
    from conftest import FAMILIES
    from workbench.models.families import contract_problems

    for fam in FAMILIES:
        mm = tiny_model(fam)
        assert contract_problems(mm.family, mm.layers, mm.n_experts, mm.top_k, mm.model.config.hidden_size) == [], fam


def test_declared_range_matches_pyproject():
    """pyproject's transformers floor is the oldest tested release, and its compat table repeats TESTED."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from packaging.requirements import Requirement

    from workbench.models.families import TESTED

    py = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    reqs = {Requirement(d).name: Requirement(d) for d in py["project"]["dependencies"]}
    floor = {s.version for s in reqs["transformers"].specifier if s.operator == ">="}
    assert floor == {TESTED["transformers"][0]}
    declared = py["tool"]["moe-workbench"]["compat"]
    assert tuple(declared["transformers"]) == TESTED["transformers"] and tuple(declared["torch"]) == TESTED["torch"]


# ---- the compatibility job's own logic (tools/compat.py), offline ----------------------------------------


def _compat_tool():
    import importlib.util as iu
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "compat.py"
    spec = iu.spec_from_file_location("wb_compat_tool", path)
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_installs_only_what_the_environment_lacks(tmp_path):
    """A fake transformers in a --target folder: requirements the environment satisfies are left out, an
    unsatisfiable pin and a missing package are named, an optional package the environment has (kernels)
    must match transformers' extra, other extras are ignored."""
    pytest.importorskip("kernels")
    tool = _compat_tool()
    info = tmp_path / "transformers-9.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("\n".join([
        "Metadata-Version: 2.1", "Name: transformers", "Version: 9.0.0",
        "Requires-Dist: numpy>=1.0",
        "Requires-Dist: huggingface-hub<0.1",
        "Requires-Dist: wb-not-a-real-package>=1",
        'Requires-Dist: kernels<0.1; extra == "kernels"',
        'Requires-Dist: wb-dev-only; extra == "dev"',
    ]) + "\n")
    assert tool._unsatisfied(str(tmp_path)) == ["huggingface-hub<0.1", "wb-not-a-real-package>=1", "kernels<0.1"]


def test_job_table_marks_the_failing_family():
    tool = _compat_tool()
    cases = {}
    for fam in tool.FAMILIES:
        cases[f"tests/test_capture.py::test_routing_equals_independent_recomputation[{fam}]"] = "passed"
        cases[f"tests/test_steering.py::test_ban_prefill[{fam}]"] = "passed"
        if fam != "phimoe":  # no force case ran for phimoe: that is a failure, not a pass
            cases[f"tests/test_steering.py::test_force_prefill[{fam}]"] = "passed"
    cases["tests/test_capture.py::test_routing_equals_independent_recomputation[granitemoe]"] = "failed: drift"
    cases["tests/test_stats.py::test_hand_worked"] = "passed"
    cases["tests/test_compat.py::test_x"] = "skipped"  # nothing ran: not a pass
    cols = tool._columns(cases)
    assert cols["capture granitemoe"] == "FAIL" and cols["capture mixtral"] == "pass"
    assert cols["force phimoe"] == "FAIL" and cols["ban phimoe"] == "pass"
    assert cols["stats"] == "pass" and cols["contract"] == "FAIL"
    row = tool.table([{"transformers": "9.0.0", "role": "probe", "torch": "2.13.0", "checks": cols}]).splitlines()[-1]
    assert row.startswith("| 9.0.0 (probe) | 2.13.0 | FAIL: granitemoe | pass | FAIL: phimoe | pass | FAIL |")


def test_remote_code_model_is_not_blamed_on_transformers(tiny_dir, monkeypatch):
    """A model whose classes live outside transformers (trust_remote_code) with a non-fused MoE: the sentence
    says it is the model's own code, not a transformers release."""
    model = _build(tiny_dir, "mixtral")
    remote = type("MixtralForCausalLM", (type(model),), {"__module__": "transformers_modules.acme.modeling_mixtral"})
    model.__class__ = remote
    for dec in model.model.layers:
        del dec.mlp.experts
    with pytest.raises(WorkbenchError) as e:
        wrap_model(model, None)
    msg = str(e.value)
    assert msg.startswith("mixtral with its own modeling code (transformers_modules.acme.modeling_mixtral")
    assert "load the model without trust_remote_code" in msg and "on transformers" not in msg
