"""A SIGKILLed capture stays readable and --resume completes it exactly; bad input is one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

import workbench as wb
from workbench.cli import main
from workbench.store import read_manifest

WB = [sys.executable, "-m", "workbench.cli"]


def _corpus(path, n=1500):
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i * 7 + j) % len(words)] for j in range(8 + i % 13))
            f.write(json.dumps({"text": text, "group": f"g{i % 3}"}) + "\n")


def _sorted(run, table, keys):
    return run.table(table).collect().sort(keys)


def test_sigkill_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    model = str(tiny_dir("olmoe"))
    data = tmp_path / "data.jsonl"
    _corpus(data)
    common = ["capture", model, "--data", str(data), "--batch-size", "2", "--part-tokens", "200",
              "--logits", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(WB + common + ["--out", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    parts = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            parts = len(read_manifest(killed)["parts"])
        except Exception:
            parts = 0
        if parts >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "capture finished before it could be killed; make the corpus larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    half = wb.open_run(killed)  # readable, every listed part complete
    assert half.manifest["status"] == "running" and len(half.manifest["parts"]) >= 4
    n_half = half.routing.collect().height
    assert n_half == half.tokens.collect().height * len(half.moe_layers)
    # an orphan part and a temp file, as if the kill had hit between rename and manifest update
    (killed / "routing" / "part-999999.parquet").write_bytes(b"garbage")
    (killed / "routing" / ".part-999998.parquet.tmp").write_bytes(b"garbage")

    assert main(common + ["--out", str(killed), "--resume"]) == 0
    full = tmp_path / "full"
    assert main(common + ["--out", str(full)]) == 0
    a, b = wb.open_run(killed), wb.open_run(full)
    assert a.complete and b.complete
    for table, keys in [("tokens", ["doc_id", "pos"]), ("routing", ["doc_id", "pos", "layer"])]:
        ta, tb = _sorted(a, table, keys), _sorted(b, table, keys)
        assert ta.height == tb.height > n_half // len(a.moe_layers)
        assert ta.equals(tb), table
        assert ta.select(keys).is_duplicated().sum() == 0
    assert not (killed / "routing" / "part-999999.parquet").exists()


def test_completed_run_is_reused_and_other_runs_are_protected(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("mixtral"))
    d1, d2 = tmp_path / "a.txt", tmp_path / "b.txt"
    d1.write_text("one two three\nfour five\n")
    d2.write_text("something else\n")
    out = tmp_path / "run"
    assert main(["capture", model, "--data", str(d1), "--out", str(out), "--no-progress"]) == 0
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert main(["capture", model, "--data", str(d1), "--out", str(out), "--no-progress"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime  # same capture: reused, not redone
    capsys.readouterr()
    assert main(["capture", model, "--data", str(d2), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["capture", model, "--data", str(d2), "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "different model, data or settings" in capsys.readouterr().err
    assert main(["capture", model, "--data", str(d2), "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert wb.open_run(out).tokens.collect().height == len("something else")


def test_same_records_under_another_selection_are_reused(tiny_dir, tmp_path, capsys):
    """`--limit 2` and a `--where` that keeps the same two records are one capture, not a conflict."""
    model = str(tiny_dir("mixtral"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "lang": l}) + "\n"
                            for t, l in [("one two", "en"), ("drei vier", "de"), ("cinq six", "fr")]))
    out = tmp_path / "run"
    assert main(["capture", model, "--data", str(data), "--out", str(out), "--limit", "2", "--no-progress"]) == 0
    mtime = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["capture", model, "--data", str(data), "--out", str(out), "--where", "lang=en,de",
                 "--no-progress"]) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == mtime  # reused, not redone
    assert "already holds" not in capsys.readouterr().err
    # other records under a similar selection are still another capture
    assert main(["capture", model, "--data", str(data), "--out", str(out), "--where", "lang=en,fr",
                 "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("workbench: error: "), err
    return lines[0]


@pytest.fixture
def dense_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.tiny import byte_tokenizer

    d = tmp_path_factory.mktemp("dense")
    cfg = AutoConfig.for_model("llama", num_hidden_layers=2, hidden_size=32, intermediate_size=32,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=320)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    return d


def test_bad_inputs_are_one_line_errors(tiny_dir, dense_dir, tmp_path, capsys, monkeypatch):
    model = str(tiny_dir("qwen3_moe"))
    out = tmp_path / "never"
    cases = []
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "fine"}\n{"text": broken\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    no_text = tmp_path / "notext.jsonl"
    no_text.write_text('{"body": "x"}\n')
    dbrx = tmp_path / "dbrx"
    dbrx.mkdir()
    (dbrx / "config.json").write_text(json.dumps({"model_type": "dbrx"}))
    cases = [
        (["capture", str(tmp_path / "nope"), "--data", "x.txt"], "does not exist"),
        (["capture", model, "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["capture", model, "--data", str(bad_jsonl)], f"{bad_jsonl}:2"),
        (["capture", model, "--data", str(empty)], "no non-empty text"),
        (["capture", model, "--data", str(no_text)], f"{no_text}:1"),
        (["capture", model, "--data", "no_such_dataset"], "bundled datasets:"),
        (["capture", str(dense_dir), "--data", "x.txt"], "no MoE layers"),
        (["capture", str(dbrx), "--data", "x.txt"], "dbrx is not supported"),
        (["capture", model, "--data", "x.txt", "--probes", "routing,nonsense"], "unknown probe"),
        (["tiny", "llama", "--out", str(tmp_path / "t")], "no tiny recipe"),
        (["tiny", "mixtral", "--out", str(tmp_path / "t"), "--top-k", "9"], "larger than --experts"),
    ]
    (tmp_path / "x.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # the fixtures' "Writing model shards" bars are not the CLI's output
    for argv, needle in cases:
        if argv[0] == "capture":
            argv = argv + ["--out", str(out), "--no-progress"]
        assert main(argv) == 2, argv
        line = _error_line(capsys)
        assert needle in line, (needle, line)
    assert not out.exists()  # nothing written for a capture that failed on its input


def test_cli_process_exit_code_and_single_line(tmp_path):
    r = subprocess.run(WB + ["capture", str(tmp_path / "absent_model"), "--data", "x.txt", "--out",
                             str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_tiny_is_deterministic_and_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a = wb.tiny("qwen3_moe", tmp_path / "a", seed=3)
    b = wb.tiny("qwen3_moe", tmp_path / "b", seed=3)
    c = wb.tiny("qwen3_moe", tmp_path / "c", seed=4)
    read = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)
    model = AutoModelForCausalLM.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    text = "héllo wörld 你好"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert model.config.num_experts == 8


def test_generic_family_is_found_by_structure(tmp_path):
    """A family outside the table but with the standard router/experts structure is 'generic'."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.tiny import byte_tokenizer

    cfg = AutoConfig.for_model("flex_olmo", num_hidden_layers=2, hidden_size=32, intermediate_size=32,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=320, num_experts=4, pad_token_id=257,
                               num_experts_per_tok=2)
    d = tmp_path / "flex"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    run = wb.capture(str(d), ["some text here"], tmp_path / "r", progress=False)
    assert run.manifest["model"]["family"] == "generic"
    df = run.routing.collect()
    assert df.height == len("some text here") * 2
    assert df["experts"].list.len().unique().to_list() == [2]
    assert df.select(pl.col("experts").list.max()).max().item() < 4
