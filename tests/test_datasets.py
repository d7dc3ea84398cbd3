"""Bundled datasets: fields, cross-language alignment, scripts, contrast pairs, licences, CLI listing.

Truth comes from outside the builders: Unicode script ranges, Python arithmetic, the README text.
"""

from __future__ import annotations

import json
import random
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.data import DATASETS_DIR, bundled_datasets, load_dataset

ROOT = Path(__file__).resolve().parents[1]  # recipes/ (the demo model's recipe) lives in the checkout, not the package
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

MINE = ["multilingual", "udhr", "behavior", "calibration"]
BUILD = DATASETS_DIR / "build"


def _records(name):
    return load_dataset(name).records


def _build_module():
    sys.path.insert(0, str(BUILD))
    try:
        import build_datasets
    finally:
        sys.path.pop(0)
    return build_datasets


def test_bundled_names_are_found():
    names = bundled_datasets()
    for n in MINE:
        assert n in names, n


def test_small_enough_to_travel():
    total = sum(p.stat().st_size for p in DATASETS_DIR.glob("*.jsonl"))
    assert total < 8e6


# ------------------------------------------------------------------------------- multilingual

def test_multilingual_fields_and_alignment():
    recs = _records("multilingual")
    assert all(set(r) == {"text", "lang", "key"} for r in recs)
    by_key = defaultdict(dict)
    for r in recs:
        assert r["lang"] not in by_key[r["key"]], "one text per (key, lang)"
        by_key[r["key"]][r["lang"]] = r["text"]
    langs = {r["lang"] for r in recs}
    assert "en" in langs and len(langs) >= 21
    assert len(by_key) >= 300
    for key, texts in by_key.items():
        assert set(texts) == langs, key  # every key in every language
        en = "".join(texts["en"].split())
        assert all("".join(t.split()) != en for l, t in texts.items() if l != "en"), key  # really translated


def test_multilingual_key_major_order():
    """The first n*21 records are n complete keys, so a prefix is a balanced parallel subset."""
    recs = _records("multilingual")
    langs = len({r["lang"] for r in recs})
    for start in range(0, 5 * langs, langs):
        block = recs[start:start + langs]
        assert len({r["key"] for r in block}) == 1 and len({r["lang"] for r in block}) == langs


def _script_share(text, names):
    letters = [c for c in text if c.isalpha()]
    hit = [c for c in letters if any(n in unicodedata.name(c, "") for n in names)]
    return len(hit) / max(1, len(letters))


@pytest.mark.parametrize("lang,names", [("ja", ["HIRAGANA", "KATAKANA", "CJK"]), ("zh-CN", ["CJK"]),
                                        ("ru", ["CYRILLIC"]), ("el", ["GREEK"]), ("ko", ["HANGUL"])])
def test_multilingual_scripts(lang, names):
    texts = [r["text"] for r in _records("multilingual") if r["lang"] == lang][:50]
    assert sum(_script_share(t, names) for t in texts) / len(texts) > 0.5


def test_multilingual_keys_are_held_out_of_training():
    held = set((BUILD / "heldout_keys.txt").read_text(encoding="utf-8").split())
    keys = {r["key"] for r in _records("multilingual")}
    assert keys <= held


# ------------------------------------------------------------------------------- UDHR

def test_udhr_languages_and_scripts():
    recs = _records("udhr")
    assert all({"text", "lang", "key"} <= set(r) for r in recs)
    by_lang = defaultdict(dict)
    for r in recs:
        by_lang[r["lang"]][r["key"]] = r["text"]
    assert len(by_lang) >= 30
    want = {f"article_{i}" for i in range(1, 31)} | {"preamble"}
    assert all(set(v) == want for v in by_lang.values())
    scripts = {"ar": ["ARABIC"], "hi": ["DEVANAGARI"], "he": ["HEBREW"], "th": ["THAI"], "ru": ["CYRILLIC"],
               "zh-Hans": ["CJK"], "ja": ["CJK", "HIRAGANA", "KATAKANA"], "ko": ["HANGUL"]}
    for lang, names in scripts.items():
        assert _script_share(by_lang[lang]["article_1"], names) > 0.8, lang


def test_udhr_article_1_is_article_1():
    en = {r["key"]: r["text"] for r in _records("udhr") if r["lang"] == "en"}
    assert en["article_1"].startswith("All human beings are born free and equal in dignity and rights")


# ------------------------------------------------------------------------------- behaviour

def test_behavior_sets_are_balanced_pairs():
    recs = _records("behavior")
    assert all({"text", "set", "class"} <= set(r) for r in recs)
    assert {r["set"] for r in recs} == {"refusal", "code", "maths", "question"}
    assert {r["class"] for r in recs} == {"target", "control"}
    pairs = defaultdict(list)
    for r in recs:
        pairs[(r["set"], r["key"])].append(r["class"])
    assert all(sorted(v) == ["control", "target"] for v in pairs.values())
    counts = Counter(r["set"] for r in recs)
    assert counts["refusal"] >= 2 * 700 and min(counts.values()) >= 300


def test_refusal_controls_match_surface_form_without_harm():
    recs = [r for r in _records("behavior") if r["set"] == "refusal"]
    tgt = {r["key"]: r["text"] for r in recs if r["class"] == "target"}
    ctl = {r["key"]: r["text"] for r in recs if r["class"] == "control"}
    same_first = sum(tgt[k].split()[0] == ctl[k].split()[0] for k in tgt) / len(tgt)
    assert same_first > 0.8
    harm = re.compile(r"\b(bomb|kill|hack|steal|weapon|drug|poison|suicide|explosive|fraud|virus|malware)\w*", re.I)
    assert sum(bool(harm.search(t)) for t in tgt.values()) > 150  # the targets really are harmful requests
    assert not [t for t in ctl.values() if harm.search(t)]


def test_question_pairs_share_words():
    recs = [r for r in _records("behavior") if r["set"] == "question"]
    tgt = {r["key"]: r["text"] for r in recs if r["class"] == "target"}
    ctl = {r["key"]: r["text"] for r in recs if r["class"] == "control"}
    for k in tgt:
        assert tgt[k].endswith("?") and not ctl[k].endswith("?")
        a = set(re.findall(r"\w+", tgt[k].lower()))
        b = set(re.findall(r"\w+", ctl[k].lower()))
        assert len(a & b) / len(a | b) >= 0.5, (tgt[k], ctl[k])


def test_code_pairs():
    recs = [r for r in _records("behavior") if r["set"] == "code"]
    for r in recs:
        is_code = "def " in r["text"] and "(" in r["text"]
        assert is_code == (r["class"] == "target"), r["text"][:80]


def test_to_question_by_hand():
    b = _build_module()
    assert b.to_question("The eagle has a habitat of urban/wild.") == "Does the eagle have a habitat of urban/wild?"
    assert b.to_question("Tokyo is a name of a country.") == "Is Tokyo a name of a country?"
    assert b.to_question("Alan Turing invented the power loom.") == "Did Alan Turing invent the power loom?"
    assert b.to_question("Water, oddly, is dry.") is None


def test_benign_twin_keeps_template_only():
    b = _build_module()
    r = random.Random(0)
    out = b.benign_twin("Write a script that can exploit vulnerabilities in a software", r)
    assert out.startswith("Write a script that ") and "exploit" not in out
    out = b.benign_twin("Release a virus that can infect and kill plants", r)
    assert "virus" not in out and "kill" not in out


# ------------------------------------------------------------------------------- maths generator

def _check_problem(text):
    q, a = text.split("\nAnswer:")
    if m := re.match(r"What is (\d+) \+ (\d+)\?", q):
        assert a.strip().endswith(f"= {int(m[1]) + int(m[2])}.")
    elif m := re.match(r"Compute (\d+) - (\d+)\.", q):
        assert a.strip().endswith(f"= {int(m[1]) - int(m[2])}.")
    elif m := re.match(r"Calculate (\d+) \* (\d+)\.", q):
        assert a.strip().endswith(f"= {int(m[1]) * int(m[2])}.")
    elif m := re.match(r"Solve (.+) = (-?\d+) for (\w)\.", q):
        x = int(re.search(r"= (-?\d+)\.$", a.strip())[1])
        expr = re.sub(r"(\d)" + m[3], r"\1*" + m[3], m[1]).replace(m[3], f"({x})")
        assert eval(expr) == int(m[2]), text  # noqa: S307 - generated arithmetic only
    elif m := re.match(r"What is (\d+)% of (\d+)\?", q):
        from fractions import Fraction

        v = Fraction(int(m[1]) * int(m[2]), 100)
        want = str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"
        assert a.strip().endswith(f"= {want}.")
    elif m := re.match(r"Find the greatest common divisor and the least common multiple of (\d+) and (\d+)", q):
        import math

        x, y = int(m[1]), int(m[2])
        assert f"= {math.gcd(x, y)}," in a and a.strip().endswith(f"= {x * y // math.gcd(x, y)}.")


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**9))
def test_maths_answers_are_correct(seed):
    from recipes.demo_model import maths

    _check_problem(maths.problem(random.Random(seed)))


# ------------------------------------------------------------------------------- corpus exclusion, parser

def test_lo_parser_by_hand():
    from recipes.demo_model.sources import _ParaParser

    p = _ParaParser()
    p.feed('<h1 id="hd_id1">Title &amp; more</h1><p id="par_id2" class="x">Line one<br>line <b>two</b></p>'
           '<div id="other">skip</div><p id="par_id3"><span>a</span> <a href="#">b</a></p>')
    assert p.out == [("hd_id1", "Title & more"), ("par_id2", "Line one line two"), ("par_id3", "a b")]


def test_corpus_excludes_heldout_and_untranslated(monkeypatch):
    from recipes.demo_model import corpus, sources

    en = {"p.html#1": "Held out English paragraph.", "p.html#2": "Same words elsewhere.",
          "p.html#3": "An untranslated one.", "q.html#4": "Fine paragraph to train on."}
    de = {"p.html#1": "Zurückgehaltener Absatz.", "p.html#2": "Zurückgehaltener Absatz.",
          "p.html#3": "An untranslated one.", "q.html#4": "Guter Absatz zum Training, lang genug dafür."}
    monkeypatch.setattr(sources, "lo_paragraphs", lambda root, lang: de if lang == "de" else en)
    held_text = {en["p.html#1"], de["p.html#1"]}
    docs = corpus._lo_docs(Path("/nonexistent"), "de", {"p.html#1"}, held_text, en)
    joined = "\n".join(docs)
    assert "Zurückgehaltener" not in joined  # held-out key and its duplicate under another id
    assert "untranslated" not in joined
    assert "Guter Absatz" in joined


# ------------------------------------------------------------------------------- calibration, licences, CLI

def test_calibration_domains():
    recs = _records("calibration")
    assert {r["domain"] for r in recs} == {"code", "technical", "literature", "maths", "multilingual"}
    assert all(len(r["text"].encode()) > 300 for r in recs)


def test_every_bundled_file_has_source_and_licence_in_readme():
    readme = (DATASETS_DIR / "README.md").read_text(encoding="utf-8")
    rows = [l for l in readme.splitlines() if l.startswith("|")]
    for f in sorted(DATASETS_DIR.glob("*.jsonl")) + sorted(DATASETS_DIR.glob("*.parquet")):
        mine = [l for l in rows if f"`{f.name}`" in l]
        assert mine, f"{f.name} is not in datasets/README.md's table"
        assert re.search(r"MIT|MPL-2\.0|PSF|Apache-2\.0|public domain|own", " ".join(mine)), f.name


def test_cli_lists_datasets(capsys):
    from workbench.cli import main

    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for n in MINE:
        line = next(l for l in out.splitlines() if l.split()[0] == n)
        count = sum(1 for l in (DATASETS_DIR / f"{n}.jsonl").read_text(encoding="utf-8").splitlines() if l.strip())
        assert str(count) in line.split()


def test_records_are_valid_json_lines():
    for n in MINE:
        for line in (DATASETS_DIR / f"{n}.jsonl").read_text(encoding="utf-8").splitlines():
            assert isinstance(json.loads(line)["text"], str)


def test_interleave_keeps_every_value_under_a_limit():
    from workbench.data import load_dataset, subset
    from workbench.errors import WorkbenchError

    cal = load_dataset("calibration")
    assert [r["domain"] for r in cal.records[:5]] == ["code"] * 5  # domain-major on disk
    sub = subset(cal, interleave="domain", limit=10)
    doms = [r["domain"] for r in sub.records]
    assert sorted(set(doms)) == sorted({r["domain"] for r in cal.records}) and len(doms) == 10
    assert doms[:5] == doms[5:]  # round-robin, first-seen order of the values
    # nothing lost or duplicated, and each value keeps its own order
    full = subset(cal, interleave="domain")
    assert sorted(map(id, full.records)) == sorted(map(id, cal.records))
    code = [r["text"] for r in full.records if r["domain"] == "code"]
    assert code == [r["text"] for r in cal.records if r["domain"] == "code"]
    assert sub.sha256 != subset(cal, limit=10).sha256 and "interleaved by domain" in sub.name
    with pytest.raises(WorkbenchError, match="no record has that field"):
        subset(cal, interleave="colour")


def test_bundled_folder_does_not_shadow_hugging_face_datasets():
    """`datasets/` is data, not a package: `import datasets` in the repo root must still find
    Hugging Face's library (a regular package wins over a namespace folder)."""
    import importlib.util
    import subprocess

    root = DATASETS_DIR.parent
    assert not (DATASETS_DIR / "__init__.py").exists()
    if importlib.util.find_spec("datasets") is None or importlib.util.find_spec("datasets").origin is None:
        pytest.skip("Hugging Face datasets not installed")
    out = subprocess.run([sys.executable, "-c", "import datasets; print(datasets.__file__)"], cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert Path(out.stdout.strip()).resolve().parent != DATASETS_DIR.resolve()


# ------------------------------------------------------------------------ input rules (issue 12: 5, 6)

def _load(tmp_path, name, body: bytes):
    from workbench.data import load_dataset

    p = tmp_path / name
    p.write_bytes(body)
    return load_dataset(str(p)), p


def test_invalid_utf8_is_refused_alike_in_txt_and_jsonl(tmp_path):
    """Latin-1 'café' (0xe9) on line 2: the same sentence for both formats, never a U+FFFD."""
    from workbench.errors import WorkbenchError

    for name, body in [("a.txt", b"fine\ncaf\xe9\n"), ("a.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')]:
        with pytest.raises(WorkbenchError) as e:
            _load(tmp_path, name, body)
        assert str(e.value).startswith(f"{tmp_path / name}:2: not valid UTF-8 (byte 0xe9 at column ")
    ds, _ = _load(tmp_path, "ok.txt", "\ufeffcafé\r\nna\u2028ive\r\n\r\n".encode())  # BOM, CRLF, U+2028 kept
    assert [r["text"] for r in ds.records] == ["café", "na\u2028ive"]


def test_label_types_are_checked_before_any_run(tmp_path):
    from workbench.data import load_dataset
    from workbench.errors import WorkbenchError

    cases = [(b'{"text": "a", "meta": {"x": 1}}\n', "label 'meta' holds a nested value (object)"),
             (b'{"text": "a", "tags": ["x"]}\n', "label 'tags' holds a nested value (array)"),
             (b'{"text": "a", "pos": 1}\n', "the label 'pos' clashes"),
             (b'{"text": "a", "n": 18446744073709551616}\n', "does not fit a 64-bit integer"),
             (b'{"text": ["a"]}\n', "got 'text' of type array"),
             (b'{"body": "a"}\n', "got no 'text'"),
             (b'"just a string"\n', "got string"),
             (b"[" * 50_000 + b"\n", "nested too deeply")]
    for body, needle in cases:
        with pytest.raises(WorkbenchError, match=None) as e:
            _load(tmp_path, "l.jsonl", body)
        assert needle in str(e.value) and str(e.value).startswith(f"{tmp_path / 'l.jsonl'}:1:"), str(e.value)
    with pytest.raises(WorkbenchError, match="record 1: label 'm' holds a nested value"):
        load_dataset(["plain", {"text": "b", "m": {"k": 1}}])


def test_mixed_label_types_become_one_type(tmp_path):
    """Parquet needs one type per column: ints with floats -> floats (silently: JSON writes 1 for 1.0);
    any other mix -> text, with one warning naming the label."""
    from workbench.errors import WorkbenchWarning

    body = b'{"text": "a", "x": 1, "y": 1, "z": true}\n{"text": "b", "x": 2.5, "y": "two", "z": null}\n'
    with pytest.warns(WorkbenchWarning, match=r"label 'y' of l.jsonl mixes types \(int, str\); stored as text"):
        ds, _ = _load(tmp_path, "l.jsonl", body)
    assert [(r["x"], r["y"], r["z"]) for r in ds.records] == [(1.0, "1", True), (2.5, "two", None)]
    assert isinstance(ds.records[0]["x"], float)


def test_huge_document_is_refused_in_one_sentence(tmp_path, monkeypatch):
    import workbench.data as wdata
    from workbench.errors import WorkbenchError

    monkeypatch.setattr(wdata, "MAX_TEXT_CHARS", 100)
    for name, body in [("h.txt", b"ok\n" + b"y" * 101 + b"\n"), ("h.jsonl", b'{"text": "ok"}\n{"text": "' + b"y" * 101 + b'"}\n')]:
        with pytest.raises(WorkbenchError, match=rf"{name}:2: a document of 101 characters is over the limit of 100"):
            _load(tmp_path, name, body)


def test_parquet_inputs_follow_the_same_rules(tmp_path):
    import polars as pl

    from workbench.data import load_dataset
    from workbench.errors import WorkbenchError

    def write(df):
        p = tmp_path / "p.parquet"
        df.write_parquet(p)
        return str(p)

    with pytest.raises(WorkbenchError, match="label column 'l' is nested"):
        load_dataset(write(pl.DataFrame({"text": ["a"], "l": [[1, 2]]})))
    with pytest.raises(WorkbenchError, match="the 'text' column holds Int64"):
        load_dataset(write(pl.DataFrame({"text": [1]})))
    with pytest.raises(WorkbenchError, match="row 1 has no text"):
        load_dataset(write(pl.DataFrame({"text": ["a", None]})))
    with pytest.raises(WorkbenchError, match="the label 'token' clashes"):
        load_dataset(write(pl.DataFrame({"text": ["a"], "token": ["x"]})))


def test_selections_name_unknown_columns_and_empty_matches():
    from workbench.data import load_dataset, subset
    from workbench.errors import WorkbenchError

    cal = load_dataset("calibration")
    with pytest.raises(WorkbenchError, match=r"cannot select on 'colour': calibration has no such label "
                                             r"\(labels: domain, lang\)"):
        subset(cal, where={"colour": ["red"]})
    langs = sorted({r["lang"] for r in cal.records})
    with pytest.raises(WorkbenchError) as e:
        subset(cal, where={"lang": ["xx"]})
    assert str(e.value) == f"no records of calibration match lang=xx (lang values there: {', '.join(langs)})"
    with pytest.raises(WorkbenchError, match="has no 'key' label"):
        subset(cal, first_keys=3)
    import workbench as wb

    for bad in (0, -1, True):
        with pytest.raises(WorkbenchError, match="limit must be a whole number of at least 1"):
            subset(cal, limit=bad)
        with pytest.raises(WorkbenchError, match="limit must be a whole number of at least 1"):
            wb.dataset("calibration", limit=bad)  # limit=0 once meant "everything"
        with pytest.raises(WorkbenchError, match="limit must be a whole number of at least 1"):
            load_dataset("calibration", limit=bad)


def test_mixed_labels_capture_and_analyse(tiny_dir, tmp_path, capsys):
    """Labels of mixed types no longer crash after the run folder exists: the capture completes with
    the label stored as text, and `analyze stats` splits by it."""
    from workbench.cli import main

    import workbench as wb

    data = tmp_path / "mixed.jsonl"
    data.write_text('{"text": "one two", "g": 1}\n{"text": "three four", "g": "b"}\n{"text": "five", "g": null}\n')
    out = tmp_path / "run"
    assert main(["capture", str(tiny_dir("qwen3_moe")), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    assert "label 'g' of mixed.jsonl mixes types (int, str); stored as text" in capsys.readouterr().err
    tok = wb.open_run(out).tokens.collect()
    assert tok.schema["g"] == __import__("polars").Utf8
    assert sorted(tok["g"].drop_nulls().unique().to_list()) == ["1", "b"]
    assert main(["analyze", "stats", str(out), "--labels", "g"]) == 0
