"""The typed run contract (workbench.manifest): every manifest the workbench writes reads into Manifest and
writes back byte for byte; problems() refuses what the store refused before; n_tokens counts the tokens table."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import pytest

import workbench as wb
from workbench.manifest import SCHEMA_VERSION, CaptureSettings, Manifest, Part, problem
from workbench.store import open_run


def _round_trip(run_path):
    raw = (run_path / "manifest.json").read_text()
    m = Manifest.from_json(json.loads(raw))
    assert json.dumps(m.to_json(), indent=1, default=str) == raw  # the writer's own format
    assert m.problems() == []
    return m


def test_captures_round_trip_byte_for_byte(tiny_model, sample_texts, tmp_path):
    mm = tiny_model("qwen2_moe")
    plain = wb.capture(mm, sample_texts[:3], tmp_path / "a", progress=False)
    m = _round_trip(plain.path)
    assert isinstance(m.settings, CaptureSettings) and m.settings.batch_size == 8
    assert all(isinstance(p, Part) for p in m.parts) and m.parts[0].files["routing"].startswith("routing/")
    assert m.schema_version == SCHEMA_VERSION and m.complete
    # the independent count: the tokens table's rows
    assert m.n_tokens == plain.n_tokens == plain.tokens.collect().height
    layered = wb.capture(mm, sample_texts[:2], tmp_path / "b", layers=[mm.moe_layers[-1]], logits=True,
                         part_tokens=8, seq_len=16, batch_size=1, interventions={"ban": f"L{mm.moe_layers[0]}:E1"}, progress=False)
    m = _round_trip(layered.path)
    assert m.settings.layers == [mm.moe_layers[-1]] and m.settings.seq_len == 16 and len(m.parts) > 1
    assert m.n_tokens == layered.tokens.collect().height
    gen = wb.capture_generate(mm, ["The cat sat on"], tmp_path / "g", max_new_tokens=4, progress=False)
    m = _round_trip(gen.path)
    assert "generations" in m.extra  # a key this version does not name is kept
    assert m.n_tokens == gen.tokens.collect().height


def test_imported_run_round_trips(tiny_dir, tmp_path):
    from workbench.importers import import_routed_experts

    model = tiny_dir("qwen3_moe")
    ids = list(range(40, 52))
    arr = np.tile(np.array([0, 1], np.int16), (len(ids), 4, 1))
    req = NS(request_id="r0", prompt_token_ids=ids[:6], num_cached_tokens=0,
             outputs=[NS(index=0, token_ids=ids[6:] + [7], routed_experts=arr)])
    imp = import_routed_experts([req], tmp_path / "imp", model=str(model), progress=False)
    m = _round_trip(imp.path)
    assert m.n_tokens == imp.tokens.collect().height == len(ids)


def test_absent_keys_stay_absent_and_new_fields_go_last():
    old = {"model": {"spec": "x"}, "parts": [{"index": 0, "batch_end": 1, "tokens": 5, "files": {"routing": "r.p"}}],
           "status": "complete"}  # an early run: no identity, no checksums, no settings
    m = Manifest.from_json(old)
    assert m.to_json() == old and list(m.to_json()) == list(old)
    assert list(m.parts[0].to_json()) == ["index", "batch_end", "tokens", "files"]
    m.repairs = [{"dropped_parts": [1]}]
    assert list(m.to_json())[-1] == "repairs"
    assert m.n_tokens == 5


@pytest.mark.parametrize("bad, why", [
    ([], "not a JSON object"),
    ({"status": "complete"}, "it lists no parts"),
    ({"parts": {}}, "its parts entry is not a list"),
    ({"parts": ["x"]}, "part 0 is malformed"),
    ({"parts": [{"files": {"routing": "r"}, "tokens": 1}]}, "part 0 is malformed"),
    ({"parts": [{"files": {"routing": "r"}, "tokens": True, "batch_end": 1}]}, "part 0 is malformed"),
    ({"parts": [{"files": {"routing": 3}, "tokens": 1, "batch_end": 1}]}, "part 0 is malformed"),
    ({"parts": [{"files": {"routing": "r"}, "tokens": 1, "batch_end": 1},
                {"files": {"routing": "../../etc/x"}, "tokens": 1, "batch_end": 2}]},
     "part 1 points outside the run (../../etc/x)"),
    ({"parts": [{"files": {"routing": "/abs/x"}, "tokens": 1, "batch_end": 1}]}, "part 0 points outside the run (/abs/x)"),
])
def test_problems_name_what_the_store_refuses(bad, why, tmp_path):
    assert problem(bad) == why
    (tmp_path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(wb.errors.WorkbenchError, match="damaged"):
        open_run(tmp_path)


def test_settings_and_schema_problems():
    m = Manifest.from_json({"parts": [], "settings": {"batch_size": 0, "seq_len": None}, "schema_version": 2})
    assert m.problems() == ["settings.batch_size 0 is not a positive integer", "schema version 2 is not 1"]
    assert problem(m.to_json()) is None  # the store opens it as before: only parts decide that


def test_new_gives_the_key_order_every_writer_used():
    """One builder for capture, generation capture and imports: the keys in the order manifest.json always had."""
    from workbench.manifest import Manifest

    common = dict(identity={"a": 1}, model={"spec": "m"}, dataset={"name": "d"}, label_columns=[], probes={},
                  settings={"batch_size": 2, "seq_len": None}, interventions={}, dtype=None, device=None,
                  versions={"torch": "x"})
    order = ["identity", "model", "dataset", "label_columns", "probes", "settings", "interventions", "dtype",
             "device", "versions"]
    assert list(Manifest.new(**common).to_json()) == order
    imported = Manifest.new(**common, source="vllm").to_json()
    assert list(imported) == ["identity", "source", *order[1:]] and imported["settings"] == common["settings"]
