"""The command line as a newcomer meets it (issue 18 items 6-8): fast help, --version, help text and
examples everywhere, capture of selected layers, input cut with a counted warning, offline at once."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib.metadata import version

import numpy as np
import polars as pl
import pytest

import workbench as wb
from workbench.cli import build_parser, main

HEAVY = ("torch", "transformers", "polars", "dash", "numpy", "pyarrow", "plotly")


def _walk(parser, prefix=()):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, p in a.choices.items():
                yield prefix + (name,), p
                yield from _walk(p, prefix + (name,))


def test_help_and_argument_errors_import_nothing_heavy():
    """`--help`, `--version`, a wrong value, and a SPEC or layer list the demo's config.json already
    rules out are answered before torch & co. load (the slow part)."""
    code = ("import sys, io, contextlib\nfrom workbench.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "    codes = [main(['--help']), main(['--version']), main(['capture', 'demo', '--data', 'x', '--out', 'o',"
            " '--limit', '0']), main(['analyze', '--help']), main(['steer', 'demo', '--prompt', 'x']),"
            " main(['steer', 'demo', '--prompt', 'x', '--ban', 'L99:E1']),"
            " main(['capture', 'demo', '--data', 'calibration', '--out', 'o', '--layers', '7-8'])]\n"
            f"print(codes, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - t
    assert r.stdout.strip() == "[0, 0, 2, 0, 2, 2, 2] []", r.stdout + r.stderr
    print(f"seven CLI answers without heavy imports: {took:.2f} s")


def test_version_matches_the_installed_distribution(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"workbench {version('moe-workbench')}"
    assert wb.__version__ == version("moe-workbench")


def test_every_option_has_help_and_a_checked_type():
    """No option without help; no bare int/float (a bare int accepts 0 and -5 for a count)."""
    missing, bare = [], []
    for path, p in [((), build_parser())] + list(_walk(build_parser())):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction) or a.dest in ("help", "version"):
                continue
            if not a.help:
                missing.append((path, a.option_strings or a.dest))
            if a.type in (int, float):
                bare.append((path, a.option_strings))
    assert not missing, missing
    assert not bare, bare


def test_every_subcommand_has_a_description_and_examples():
    for path, p in _walk(build_parser()):
        assert p.description and len(p.description) > 40, path
        assert p.description != f"{path[-1]} analysis", path
        if path != ("datasets",):
            assert p.epilog and "workbench " in p.epilog, path


def test_lazy_package_attributes_still_work():
    import workbench.capture  # noqa: F401  (the submodule import must not replace the function)

    assert callable(wb.capture) and wb.capture.__name__ == "capture"
    assert wb.open_run.__module__ == "workbench.store" and "load_model" in dir(wb)


# ------------------------------------------------------------------------------ capture --layers

def test_capture_selected_layers_only(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("qwen3_moe"))  # 4 decoder layers, all MoE
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "k": i}) + "\n" for i, t in
                            enumerate(["The quick brown fox.", "def f(x): return x", "Ein kleiner Test."])))
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["capture", model, "--data", str(data), "--out", str(full), "--no-progress"]) == 0
    assert main(["capture", model, "--data", str(data), "--out", str(part), "--no-progress", "--layers", "1,3",
                 "--probes", "routing,experts"]) == 0
    run_f, run_p = wb.open_run(full), wb.open_run(part)
    key = ["doc_id", "pos", "layer"]
    rf = run_f.routing.collect().filter(pl.col("layer").is_in([1, 3])).sort(key)
    rp = run_p.routing.collect().sort(key)
    assert sorted(rp["layer"].unique().to_list()) == [1, 3]
    assert rp.select(key + ["experts"]).equals(rf.select(key + ["experts"]))  # same choices, only those layers
    assert np.allclose(np.stack(rp["weights"].to_list()), np.stack(rf["weights"].to_list()))
    assert sorted(run_p.expert_stats.collect()["layer"].unique().to_list()) == [1, 3]
    m = run_p.manifest
    assert m["settings"]["layers"] == [1, 3] and m["model"]["moe_layers"] == [1, 3]
    assert m["model"]["model_moe_layers"] == [0, 1, 2, 3] and "layers" not in run_f.manifest["settings"]
    capsys.readouterr()
    assert main(["analyze", "stats", str(part)]) == 0  # analyses read the layers the run holds
    out = capsys.readouterr().out
    assert "L0:" not in out and "L2:" not in out  # no layer the run does not hold is reported
    # a filter that keeps nothing says so (it used to map "0 points")
    assert main(["analyze", "atlas", str(part), "--phase", "decode", "--what", "experts", "--recompute"]) == 2
    assert "has no decode tokens" in capsys.readouterr().err
    # a layer that is not there: one sentence, no run folder
    bad = tmp_path / "bad"
    assert main(["capture", model, "--data", str(data), "--out", str(bad), "--layers", "2-5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "layer 4 does not exist" in err and not bad.exists()


def test_dense_layer_is_refused(tiny_dir, tmp_path, capsys):
    model = str(tiny_dir("deepseek_v2"))  # layer 0 is dense in the tiny recipe
    assert main(["capture", model, "--data", "calibration", "--limit", "1", "--out", str(tmp_path / "r"),
                 "--layers", "0", "--no-progress"]) == 2
    assert "layer 0 is not an MoE layer" in capsys.readouterr().err


# ------------------------------------------------------------------------- long documents, offline

def test_long_document_cut_with_a_counted_warning(tiny_dir, tmp_path, capsys):
    """The byte-level tiny tokenizer has one token per ASCII byte and a 2048-token context: a
    3000-byte line loses 952 tokens; the other line (9 bytes) is kept whole. With --seq-len nothing
    is cut: 3000 + 9 tokens + one end-of-text per document are captured."""
    model = str(tiny_dir("qwen3_moe"))
    data = tmp_path / "long.txt"
    data.write_text("x" * 3000 + "\nshort one\n")
    assert main(["capture", model, "--data", str(data), "--out", str(tmp_path / "cut"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert ("1 of 2 documents of long.txt are longer than the model's context of 2048 tokens and were cut "
            "(952 of 3,009 tokens dropped); pass --seq-len 2048") in err
    assert wb.open_run(tmp_path / "cut").tokens.collect().height == 2048 + 9
    assert main(["capture", model, "--data", str(data), "--out", str(tmp_path / "packed"), "--seq-len", "2048",
                 "--no-progress"]) == 0
    assert "longer than" not in capsys.readouterr().err
    assert wb.open_run(tmp_path / "packed").tokens.collect().height == 3000 + 9 + 2


def test_offline_hub_id_is_one_immediate_sentence(capsys, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    t = time.perf_counter()
    assert main(["steer", "someorg/not-cached-model", "--prompt", "x", "--ban", "L1:E1"]) == 2
    took = time.perf_counter() - t
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "not in the local Hugging Face cache" in err and "Retry" not in err
    assert took < 30  # no retry back-off (five retries took 30 s before)


def test_stats_on_an_old_run_with_nested_labels(tiny_model, tmp_path, monkeypatch, capsys):
    """Runs captured before labels were checked can hold nested label columns; stats leaves them out
    (and names them when asked for one) instead of failing in polars."""
    import workbench.data as wdata

    monkeypatch.setattr(wdata, "_check_record", lambda rec, where: None)  # the old, unchecked input path
    recs = [{"text": "hello there", "meta": {"a": 1}, "tags": ["x"]}, {"text": "more words", "meta": {"a": 2},
                                                                       "tags": ["y", "z"]}]
    out = tmp_path / "old"
    wb.capture(tiny_model("qwen3_moe"), recs, out, progress=False)
    capsys.readouterr()
    assert main(["analyze", "stats", str(out)]) == 0
    assert "not split by tags (nested values, not a label)" in capsys.readouterr().out
    assert main(["analyze", "stats", str(out), "--labels", "meta"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("workbench: error: label column 'meta'") and "Traceback" not in err


def test_no_middle_layers_without_a_u_shape(tmp_path, capsys):
    """Languages routed alike in layers 0-1 and apart in 2-3: the curve is lowest at the start, so
    there is no U shape and the summary must not call L0-L1 'middle layers (detected)'."""
    import random

    from test_multilingual import LANG_EXPERTS, write_run

    docs = []
    for lang in LANG_EXPERTS:
        for key in range(12):
            toks = []
            for pos in range(8):
                routes = {}
                for layer in range(4):
                    shared = random.Random(hash((key, pos, layer)) & 0xFFFF).sample(range(8), 2)
                    routes[layer] = (list(LANG_EXPERTS[lang]) if layer >= 2 else shared, (0.6, 0.4))
                toks.append(routes)
            docs.append(({"lang": lang, "key": key}, toks))
    run = write_run(tmp_path / "run", docs, range(4), 8, 2)
    assert main(["analyze", "multilingual", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "middle layers (detected)" not in out
    assert "middle layers: none (no U shape: divergence is lowest at the first layers, L0-L1" in out


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`workbench datasets | head`: the reader leaving early is not an error."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "workbench", "datasets"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait() == 0
    assert "Traceback" not in err and "BrokenPipe" not in err
