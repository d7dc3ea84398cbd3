"""Interventions are all-or-nothing: a refused or failed steer leaves the model bit-identical.

Truth used: the model's own logits and hook tables recorded before the attempt (a refused steer must
not change a single bit or leave a single hook), and the logits of an outer context on its own (a
failed inner context must leave the outer one exactly as it was).
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.probes import interventions as iv
from workbench.probes.interventions import MAX_BOOST, MAX_SCALE, active_plan

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 120, 11, 2, 80, 33]])


def _hooks(model) -> dict:
    """Every forward (pre-)hook of every module, by module name: must be unchanged by a failed steer."""
    return {name: (list(m._forward_hooks), list(m._forward_pre_hooks)) for name, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def _logits(mm):
    with torch.inference_mode():
        return mm.model(input_ids=IDS).logits.clone()


@pytest.fixture
def olmoe(tiny_model):
    mm = tiny_model("olmoe")
    assert mm.moe_layers == [0, 1, 2, 3]
    return mm


@pytest.fixture
def qwen2(tiny_model):
    mm = tiny_model("qwen2_moe")  # has shared experts: all three hook kinds can be installed
    assert all(layer.shared is not None for layer in mm.layers)
    return mm


def test_failed_steer_leaves_model_bit_identical(olmoe):
    mm = olmoe
    before, hooks = _logits(mm), _hooks(mm.model)
    with pytest.raises(WorkbenchError, match=r"--boost L1:E3=1e\+300 .*between -100 and 100"):
        with mm.steer(ban="L0:E1", boost={"L1:E3": 1e300}):
            pytest.fail("the body must not run")
    assert _hooks(mm.model) == hooks == {}
    assert active_plan(mm).empty()
    assert torch.equal(_logits(mm), before)
    # and the model still steers normally afterwards
    with mm.steer(ban="L0:E1"):
        assert not torch.equal(_logits(mm), before)
    assert torch.equal(_logits(mm), before) and _hooks(mm.model) == {}


@pytest.mark.parametrize("inter", [
    {"boost": {"L1:E3": 3e38}}, {"boost": {"L1:E3": -1e300}}, {"boost": {"L1:E3": MAX_BOOST * 1.01}},
    {"boost": "L1:E3=1e39"}, {"scale": {"L2:E0": MAX_SCALE + 1}}, {"scale": "L2:E0=-1e5"},
    {"boost": {"L1:E3": float("inf")}}, {"scale": {"L2:E0": float("nan")}},
])
def test_out_of_range_values_refused_before_anything_is_attached(olmoe, inter):
    mm = olmoe
    before = _logits(mm)
    with pytest.raises(WorkbenchError) as e:
        with mm.steer(ban="L0:E1", zero="L3:E2", **inter):
            pass
    assert "\n" not in str(e.value)
    assert _hooks(mm.model) == {} and torch.equal(_logits(mm), before)


def test_bounds_are_inclusive(olmoe):
    with olmoe.steer(boost={"L1:E3": MAX_BOOST, "L2:E3": -MAX_BOOST}, scale={"L3:E0": -MAX_SCALE}):
        assert torch.isfinite(_logits(olmoe)).all()
    assert _hooks(olmoe.model) == {}


def test_value_not_finite_in_the_model_dtype(tiny_dir):
    from workbench.models.loading import load_model

    mm = load_model(str(tiny_dir("olmoe")), dtype="float16")
    with pytest.raises(WorkbenchError, match="not a finite float16 number"):
        with mm.steer(scale={"L1:E0": 7e4}):  # 7e4 > 65504, the largest float16
            pass
    assert _hooks(mm.model) == {}
    # the largest allowed boost saturates in float16 instead of turning the logits into inf/NaN
    with mm.steer(boost={"L1:E0": MAX_BOOST, "L2:E1": -MAX_BOOST}):
        assert torch.isfinite(_logits(mm)).all()


def test_nested_values_are_checked_after_combining(olmoe):
    mm = olmoe
    with mm.steer(boost={"L1:E3": 60}):
        outer, hooks = _logits(mm), _hooks(mm.model)
        with pytest.raises(WorkbenchError, match="nested contexts add boosts"):
            with mm.steer(boost={"L1:E3": 60}):
                pass
        assert _hooks(mm.model) == hooks and torch.equal(_logits(mm), outer)
        assert active_plan(mm).boost == {(1, 3): 60.0}
    assert _hooks(mm.model) == {}


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("fail_at", [0, 2, 4])
def test_failure_in_the_middle_of_installation_removes_what_was_attached(qwen2, monkeypatch, exc, fail_at):
    """Registration number `fail_at` (router, experts and shared hooks over 3 MoE layers) raises."""
    mm = qwen2
    before, hooks = _logits(mm), _hooks(mm.model)
    calls = []
    real_register = iv.register  # every hook of a plan is attached through the named-site registry

    def register(*a, **k):
        i = len(calls)
        calls.append(i)
        if i == fail_at:
            raise exc("injected")
        return real_register(*a, **k)

    monkeypatch.setattr(iv, "register", register)
    inter = dict(ban="L0:E1", zero="L1:E2", scale="L2:E-1=0.5,L3:E4=2", boost={"L3:E0": 1.0})
    with pytest.raises(exc, match="injected"):
        with mm.steer(**inter):
            pytest.fail("the body must not run")
    assert calls[-1] == fail_at
    assert _hooks(mm.model) == hooks == {} and active_plan(mm).empty()
    with mm.steer(**inter):  # the plan really has more registrations than the failing one
        assert len(_hooks(mm.model)) >= 5 > fail_at
    assert torch.equal(_logits(mm), before)
    monkeypatch.undo()
    with mm.steer(**inter):  # installs cleanly afterwards
        assert len(_hooks(mm.model)) >= 5
    assert _hooks(mm.model) == {}


def test_failure_inside_an_outer_context_keeps_the_outer_one_exact(qwen2, monkeypatch):
    mm = qwen2
    plain = _logits(mm)
    with mm.steer(ban="L1:E3", scale="L2:E-1=0"):
        outer, hooks = _logits(mm), _hooks(mm.model)
        assert not torch.equal(outer, plain)
        real_register = iv.register

        def register(mm_, site, fn, prepend=False):
            if site == "L3.experts.in":  # the one registration the inner context adds fails
                raise Boom("injected")
            return real_register(mm_, site, fn, prepend=prepend)

        monkeypatch.setattr(iv, "register", register)
        with pytest.raises(Boom):
            with mm.steer(zero="L3:E1"):
                pass
        monkeypatch.undo()
        assert _hooks(mm.model) == hooks
        assert torch.equal(_logits(mm), outer)
        assert active_plan(mm).ban == [(1, 3)] and not active_plan(mm).zero
    assert _hooks(mm.model) == {} and torch.equal(_logits(mm), plain)


def test_capture_after_a_failed_steer_is_unsteered(olmoe, tmp_path):
    """The issue's symptom: a capture after a failed steer recorded `interventions: {}` yet never chose L0:E1."""
    import polars as pl

    from workbench import capture

    texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b"] * 3
    capture(olmoe, texts, tmp_path / "ref", progress=False)
    with pytest.raises(WorkbenchError):
        with olmoe.steer(ban="L0:E1", boost={"L1:E3": 1e300}):
            pass
    capture(olmoe, texts, tmp_path / "after", progress=False)
    a = pl.read_parquet(tmp_path / "ref" / "routing")
    b = pl.read_parquet(tmp_path / "after" / "routing")
    assert a.sort("doc_id", "pos", "layer").equals(b.sort("doc_id", "pos", "layer"))
    assert a.filter(pl.col("layer") == 0)["experts"].list.contains(1).any()  # L0:E1 is chosen unsteered
    assert json.loads((tmp_path / "after" / "manifest.json").read_text()).get("interventions") in ({}, None)


def test_cli_steer_json_refuses_3e38(tiny_dir, capsys):
    from workbench.cli import main

    d = str(tiny_dir("olmoe"))
    assert main(["steer", d, "--prompt", "The cat", "--boost", "L1:E0=3e38", "--max-new-tokens", "3", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "out of range" in lines[0] and "Traceback" not in err


def test_app_steering_service_gets_one_sentence(olmoe):
    from workbench.app.service import ModelService

    svc = ModelService(olmoe)
    try:
        job = svc.submit("s1", "The cat", [[0, 1, "ban", None], [1, 3, "boost", 3e38]], max_new_tokens=2)
        for _ in range(600):
            state, payload = svc.poll(job)
            if state not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert state == "error" and "out of range" in payload and "\n" not in payload
        assert _hooks(olmoe.model) == {}
    finally:
        svc.close()
