"""Fuzz of every CLI entry point's arguments and of dataset files (issue 12, items 4-6 and the fuzz).

Each case must end in one sentence on stderr (`workbench ...: error: ...`), exit code 2, no
traceback, and no file created or changed outside the run folder. The CLI is driven in-process
through `workbench.cli.main(argv)` (hypothesis), plus a few real `workbench` processes.

Where a case is refused, the expected reason is computed independently from how the input was
built (which line is the first bad one, which column is unknown), not read back from the code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench import data as wdata
from workbench.cli import ANALYSES, build_parser, main
from workbench.errors import WorkbenchError

FUZZ = settings(max_examples=int(os.environ.get("WB_FUZZ_EXAMPLES", "60")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _run(argv, cwd: Path) -> tuple[int, str, str]:
    """main(argv) in `cwd`, returning (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def _one_sentence(rc: int, err: str, argv) -> str:
    assert rc == 2, (argv, rc, err)
    assert "Traceback" not in err, (argv, err)
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("workbench: warning:")]
    assert len(lines) == 1, (argv, err)
    assert lines[0].startswith("workbench") and ": error: " in lines[0], (argv, err)
    return lines[0]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------ arguments

_ODD = ["", " ", "0", "-1", "-0", "1", "2", "3", "00", "+5", "1_000", "65536", "65535", "65536000", "2147483648",
        "99999999999999999999999", "-99999999999999", "0.5", "-0.5", "1.0", "1e3", "1e400", "-1e400", "nan", "inf",
        "-inf", "NaN", "0x10", "abc", "L1:E1", "L0:E0,L1:E1", "L1:E1=0.5", "L1:E1=1e300", "L1:E1=nan", "L99:E99",
        "l1:e-1", "L1:E", "E1", "L1:E1,", ",", ",,", "a=b", "lang=en", "lang=", "=en", "domain=code,prose",
        "1,3", "0-2", "3-1", "L2-L5", "4,16,64", "4,0", "auto", "all", "float32", "bf16", "int8", "cuda:9",
        "routing", "routing,experts", "routing,nonsense", "\u00e9\u00e8", "\x00", "a b", "--", "-x", "'", "%s",
        "%(prog)s", "{}", "[1]", "../../etc", "/", "ü" * 40]
VALUE = st.one_of(st.sampled_from(_ODD), st.integers(-10**20, 10**20).map(str),
                  st.floats(allow_nan=True, allow_infinity=True).map(repr),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))


def _commands() -> dict:
    """COMMAND (or 'analyze NAME') -> (positionals, {option: takes_value}) read from the real parser."""
    import argparse

    out = {}

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs:
            for name, p in subs[0].choices.items():
                walk(p, prefix + [name])
            return
        pos = [a.dest for a in parser._actions if not a.option_strings]
        opts = {a.option_strings[-1]: a.nargs != 0 for a in parser._actions
                if a.option_strings and a.dest not in ("help", "version")}
        out[" ".join(prefix)] = (pos, opts)

    walk(build_parser(), [])
    return out


COMMANDS = _commands()
# Required options get a sensible value most of the time, so the fuzzed option is what fails.
_REQUIRED = {"--data": "calibration", "--out": "OUT", "--prompt": "Hello"}


@st.composite
def argvs(draw):
    name = draw(st.sampled_from(sorted(COMMANDS)))
    pos, opts = COMMANDS[name]
    argv = name.split()
    for p in pos:  # every positional points at something that does not exist (nothing real is run)
        argv += {"model": ["MISSING_MODEL"], "run": ["MISSING_RUN"], "model_type": ["no_such_family"]}.get(p, ["X"])
    chosen = draw(st.lists(st.sampled_from(sorted(opts)), max_size=4, unique=True)) if opts else []
    for req, val in _REQUIRED.items():
        if req in opts and req not in chosen:
            argv += [req, val if draw(st.integers(0, 4)) else draw(VALUE)]
    for o in chosen:
        argv += [o] + ([draw(VALUE)] if opts[o] else [])
    return argv


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """An empty working folder; `demo`, `app` and `docs` are stubbed (they would run or serve for minutes):
    their arguments are still parsed and checked by the real parser."""
    import workbench.cli as cli

    def stub(args):
        raise WorkbenchError("stubbed command reached with valid arguments")

    monkeypatch.setitem(cli.COMMANDS, "demo", stub)
    monkeypatch.setitem(cli.COMMANDS, "app", stub)
    monkeypatch.setitem(cli.COMMANDS, "docs", stub)  # builds the site, then serves until Ctrl-C
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    box = tmp_path / "box"
    box.mkdir()
    return box


def test_the_fuzz_reaches_every_entry_point():
    names = set(COMMANDS)
    assert {"capture", "steer", "export", "tiny", "app", "demo", "datasets"} <= names
    assert {f"analyze {a}" for a in ANALYSES} <= names
    assert sum(len(o) for _, o in COMMANDS.values()) > 100  # every option of every command is drawn from


@FUZZ
@given(argv=argvs())
def test_cli_arguments_fuzz(sandbox, argv):
    if argv == ["datasets"]:
        return  # the one command with nothing to get wrong
    before = _tree(sandbox)
    rc, _, err = _run(argv, sandbox)
    if argv[0] == "datasets":  # extra arguments
        _one_sentence(rc, err, argv)
        return
    _one_sentence(rc, err, argv)
    assert _tree(sandbox) == before, argv  # nothing written: OUT, MISSING_* never created


@pytest.mark.parametrize("argv, needle", [
    (["capture", "M", "--data", "calibration", "--out", "o", "--limit", "0"], "--limit"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--limit", "-3"], "--limit"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--seq-len", "1"], "--seq-len"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--part-tokens", "0"], "--part-tokens"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--max-tokens", "-1"], "--max-tokens"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--layers", "2-1"], "--layers"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--ban", "L1:E1=2"], "--ban"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--boost", "L1:E1=nan"], "--boost"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--dtype", "int8"], "--dtype"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--where", "nope=1"], "'nope'"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--where", "lang=xx"], "match lang=xx"),
    (["capture", "M", "--data", "calibration", "--out", "o", "--interleave", "nope"], "'nope'"),
    (["analyze", "lrc", "R", "--m", "4,0"], "--m"),
    (["analyze", "lrc", "R", "--seq-len", "1"], "--seq-len"),
    (["analyze", "lrc", "R", "--n-boot", "-1"], "--n-boot"),
    (["analyze", "stats", "R", "--top-n", "0"], "--top-n"),
    (["analyze", "stats", "R", "--always-on", "1.5"], "--always-on"),
    (["analyze", "behavior", "R", "--fdr", "0"], "--fdr"),
    (["analyze", "behavior", "R", "--seeds", "0"], "--seeds"),
    (["analyze", "multilingual", "R", "--tau", "2"], "--tau"),
    (["analyze", "multilingual", "R", "--middle-layers", "x"], "--middle-layers"),
    (["analyze", "super-experts", "R", "--percentile", "0"], "--percentile"),
    (["analyze", "atlas", "R", "--n-neighbors", "1"], "--n-neighbors"),
    (["steer", "M", "--prompt", "x", "--max-new-tokens", "0", "--ban", "L1:E1"], "--max-new-tokens"),
    (["steer", "M", "--prompt", "x", "--temperature", "0", "--ban", "L1:E1"], "--temperature"),
    (["steer", "M", "--prompt", "x"], "at least one intervention"),
    (["app", "R", "--port", "70000"], "--port"),
    (["tiny", "qwen3_moe", "--out", "t", "--layers", "0"], "--layers"),
    (["tiny", "qwen3_moe", "--out", "t", "--experts", "-2"], "--experts"),
])
def test_hand_picked_wrong_values(sandbox, argv, needle):
    rc, _, err = _run(argv, sandbox)
    line = _one_sentence(rc, err, argv)
    assert needle in line, line
    assert not any(sandbox.iterdir())


def test_where_names_the_column_and_the_available_ones(sandbox):
    _, _, err = _run(["capture", "M", "--data", "calibration", "--out", "o", "--where", "nope=1"], sandbox)
    labels = wdata.load_dataset("calibration").label_columns  # domain, lang
    assert all(c in err for c in labels) and "'nope'" in err


# ---------------------------------------------------------------------------------- dataset files

_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1), st.text(max_size=6),
                    st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def jsonl_lines(draw):
    """(bytes of one line, why it is bad or None). Bad kinds are the ones the issue lists."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "blank", "not_object", "no_text", "text_type", "nested",
                                 "bad_utf8", "malformed", "huge", "big_int", "reserved"]))
    labels = draw(st.dictionaries(st.sampled_from(["lang", "set", "n", "flag"]), _SCALAR, max_size=3))
    text = draw(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
    rec = {"text": text, **labels}
    blank_text = not text.strip()
    if kind == "ok":
        return json.dumps(rec).encode(), ("blank" if blank_text else None)
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t"])), "blank"
    if kind == "not_object":
        return json.dumps(draw(st.sampled_from([1, "text", [1, 2], None, True]))).encode(), "bad"
    if kind == "no_text":
        return json.dumps({"body": text, **labels}).encode(), "bad"
    if kind == "text_type":
        return json.dumps({"text": draw(st.sampled_from([1, 2.5, None, ["a"], {"a": 1}, True]))}).encode(), "bad"
    if kind == "nested":
        return json.dumps({**rec, "meta": draw(st.sampled_from([{"a": 1}, [1, 2], [], {}]))}).encode(), "bad"
    if kind == "bad_utf8":
        raw = json.dumps(rec).encode()
        i = draw(st.integers(0, len(raw)))
        return raw[:i] + draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\x80abc", b"\xed\xa0\x80"])) + raw[i:], "utf8"
    if kind == "malformed":
        return draw(st.sampled_from([b"{", b'{"text": "a",}', b"{'text': 'a'}", b'{"text": "a"} x', b"nul"])), "bad"
    if kind == "huge":  # over the limit the test sets (1000 characters; 16 million in use)
        return json.dumps({"text": "y" * 1001}).encode(), "bad"
    if kind == "big_int":
        return json.dumps({**rec, "n": 2**64}).encode(), "bad"
    return json.dumps({**rec, "pos": 3}).encode(), "bad"


def _expected(lines):
    """(first bad line number and its kind, or None; number of records kept)."""
    for i, (_, why) in enumerate(lines, 1):
        if why in ("bad", "utf8"):
            return (i, why), None
    kept = sum(1 for _, why in lines if why is None)
    return None, kept


@FUZZ
@given(lines=st.lists(jsonl_lines(), min_size=1, max_size=8), crlf=st.booleans(), bom=st.booleans())
def test_jsonl_files_fuzz(tmp_path_factory, monkeypatch, lines, crlf, bom):
    monkeypatch.setattr(wdata, "MAX_TEXT_CHARS", 1000)  # the rule, at a size a fuzz can afford
    folder = tmp_path_factory.mktemp("jsonl")
    path = folder / "data.jsonl"
    body = (b"\r\n" if crlf else b"\n").join(raw for raw, _ in lines) + b"\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body)
    bad, kept = _expected(lines)
    try:
        ds = wdata.load_dataset(str(path))
    except WorkbenchError as e:
        msg = str(e)
        assert "\n" not in msg
        if bad is None:
            assert kept == 0 and "no non-empty text" in msg, msg
        else:
            assert f"{path}:{bad[0]}:" in msg, (msg, bad)
            assert ("not valid UTF-8" in msg) == (bad[1] == "utf8"), msg
        return
    assert bad is None, (bad, [r for r in ds.records])
    assert len(ds.records) == kept
    types: dict = {}
    for r in ds.records:
        assert isinstance(r["text"], str) and r["text"].strip()
        for k, v in r.items():
            assert v is None or isinstance(v, (str, int, float, bool)), (k, v)
            if k != "text" and v is not None:
                types.setdefault(k, set()).add(type(v))
    assert all(len(t) == 1 for t in types.values()), types  # one type per label column (Parquet can hold it)


@FUZZ
@given(lines=st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=30).map(str.encode),
                                st.binary(max_size=30)), min_size=1, max_size=8))
def test_txt_files_fuzz(tmp_path_factory, lines):
    lines = [ln.replace(b"\n", b" ") for ln in lines]
    path = tmp_path_factory.mktemp("txt") / "data.txt"
    path.write_bytes(b"\n".join(lines))
    first_bad = next((i for i, ln in enumerate(lines, 1) if not _utf8(ln)), None)
    expect = [ln.decode().removesuffix("\r") for ln in lines if _utf8(ln)]
    expect = [t for t in expect if t.strip()]
    if lines and lines[0].startswith(b"\xef\xbb\xbf") and first_bad is None:
        return  # a BOM is dropped; covered by the hand-written tests
    try:
        ds = wdata.load_dataset(str(path))
    except WorkbenchError as e:
        if first_bad is not None:
            assert f"{path}:{first_bad}: not valid UTF-8" in str(e)
        else:
            assert not expect and "no non-empty text" in str(e)
        return
    assert first_bad is None
    assert [r["text"] for r in ds.records] == expect


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@FUZZ
@given(text=st.sampled_from(["str", "int", "null_row", "all_null", "missing"]),
       label=st.sampled_from(["int", "str", "list", "struct", "none"]))
def test_parquet_files_fuzz(tmp_path_factory, text, label):
    import polars as pl

    cols = {"text": {"str": ["a", "b"], "int": [1, 2], "null_row": ["a", None], "all_null": [None, None],
                     "missing": None}[text]}
    cols["lbl"] = {"int": [1, 2], "str": ["x", "y"], "list": [[1], [2, 3]], "struct": [{"a": 1}, {"a": 2}],
                   "none": None}[label]
    df = pl.DataFrame({k: v for k, v in cols.items() if v is not None})
    if not df.width:
        return
    path = tmp_path_factory.mktemp("pq") / "data.parquet"
    df.write_parquet(path)
    ok = text == "str" and label in ("int", "str", "none")
    try:
        ds = wdata.load_dataset(str(path))
    except WorkbenchError as e:
        assert not ok, e
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert ok
    assert [r["text"] for r in ds.records] == ["a", "b"]


def test_bad_files_through_the_cli(sandbox):
    """The same refusals reach the CLI as one sentence, before any model or run folder."""
    files = {"bad.jsonl": b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "bad.txt": b"fine\ncaf\xe9\n",
             "nested.jsonl": b'{"text": "a", "meta": {"k": [1]}}\n', "type.jsonl": b'{"text": 3}\n',
             "arr.jsonl": b"[1, 2]\n", "deep.jsonl": b"[" * 100_000 + b"\n"}
    for name, body in files.items():
        (sandbox.parent / name).write_bytes(body)
    for name in files:
        argv = ["capture", "MISSING", "--data", str(sandbox.parent / name), "--out", "o"]
        rc, _, err = _run(argv, sandbox)
        line = _one_sentence(rc, err, argv)
        assert name in line
    _, _, err = _run(["capture", "M", "--data", str(sandbox.parent / "bad.jsonl"), "--out", "o"], sandbox)
    _, _, err2 = _run(["capture", "M", "--data", str(sandbox.parent / "bad.txt"), "--out", "o"], sandbox)
    assert "bad.jsonl:2: not valid UTF-8 (byte 0xe9" in err and "bad.txt:2: not valid UTF-8 (byte 0xe9" in err2
    assert not any(sandbox.iterdir())


# ------------------------------------------------------------------------------- real processes

WB = [sys.executable, "-m", "workbench.cli"]


@pytest.mark.parametrize("argv", [
    ["capture", "MISSING", "--data", "calibration", "--out", "o", "--limit", "0"],
    ["capture", "MISSING", "--data", "calibration", "--out", "o", "--where", "nope=x"],
    ["analyze", "lrc", "MISSING_RUN", "--m", "4,-16"],
    ["steer", "MISSING", "--prompt", "x", "--ban", "L1:X"],
    ["tiny", "qwen3_moe", "--out", "t", "--hidden", "7"],
    ["export", "MISSING_RUN", "--out", "e", "--format", "xml"],
])
def test_real_processes_one_sentence(tmp_path, argv):
    t = time.perf_counter()
    r = subprocess.run(WB + argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    _one_sentence(r.returncode, r.stderr, argv)
    assert r.stdout == ""
    assert not any(tmp_path.iterdir())
    print(f"{' '.join(argv[:2])}: {time.perf_counter() - t:.2f} s")
