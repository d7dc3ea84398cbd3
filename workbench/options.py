"""argparse `type=` helpers: every numeric, list and label option is checked here, in one place.

Each helper returns the parsed value or raises argparse.ArgumentTypeError with one sentence, which
the CLI prints as `workbench CMD: error: argument --x: ...` with exit code 2, before any library or
model is loaded. Keep this module free of heavy imports (it runs on every `workbench` call).
"""

from __future__ import annotations

import argparse
import math
import re

__all__ = ["at_least", "between", "column", "columns", "dtype", "expert_spec", "int_list", "layer_list",
           "port", "seed", "seq_len", "seq_len_or_zero", "text_of", "where"]

_MAX_INT = 2**62  # beyond any token count, and still an int64 for numpy and torch


def _int(text: str) -> int:
    try:
        return int(str(text).strip().replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        x = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return x


def at_least(lo: int, hi: int = _MAX_INT, note: str = ""):
    """A whole number in [lo, hi]; `note` says what the lowest value means (e.g. '0 skips it')."""

    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            span = f"at least {lo}" if hi == _MAX_INT else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be a whole number {span}{note}, got {text!r}")
        return v

    parse.__name__ = f"int>={lo}"  # argparse names the type in some messages
    return parse


def between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    """A finite number in the interval lo..hi (open ends where asked)."""

    def parse(text: str) -> float:
        x = _float(text)
        if (x < lo or (lo_open and x == lo)) or (x > hi or (hi_open and x == hi)):
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}")
        return x

    parse.__name__ = "number"
    return parse


seed = at_least(0, 2**32 - 1)
port = at_least(1, 65535)


def seq_len(text: str) -> int:
    """A sequence of one token has no neighbour, no next-token target and no routing locality."""
    v = _int(text)
    if not 2 <= v <= _MAX_INT:
        raise argparse.ArgumentTypeError(f"must be a whole number of tokens, at least 2, got {text!r}")
    return v


def seq_len_or_zero(text: str) -> int:
    """As seq_len, or 0 where 0 means one sequence per record."""
    return 0 if str(text).strip() == "0" else seq_len(text)


def int_list(text: str) -> list[int]:
    """'4,16,64' -> [4, 16, 64]: positive whole numbers, duplicates dropped, order kept."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers such as 4,16,64, got {text!r}")
    out = [at_least(1)(s) for s in items]
    return list(dict.fromkeys(out))


def layer_list(text: str) -> list[int]:
    """'1,3' or '0-2' or 'L4-L9' -> sorted decoder-layer indices (checked against the model later)."""
    out: set[int] = set()
    items = [s.strip() for s in str(text).split(",")]
    for it in items:
        m = re.fullmatch(r"[Ll]?(\d+)(?:\s*-\s*[Ll]?(\d+))?", it)
        if not m:
            raise argparse.ArgumentTypeError(f"expected layer numbers such as 1,3 or 0-2, got {text!r}")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a or b - a > 100_000:
            raise argparse.ArgumentTypeError(f"the layer range {it!r} is empty or reversed")
        out.update(range(a, b + 1))
    return sorted(out)


_NAME = re.compile(r"[^\s=,]+(?:[^=,]*[^\s=,])?")


def column(text: str) -> str:
    """A label column name: not empty, no '=' or ',' (those separate names and values)."""
    name = str(text).strip()
    if not _NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected a label column name, got {text!r}")
    return name


def columns(text: str) -> list[str]:
    """'lang,set' -> ['lang', 'set']."""
    items = [s.strip() for s in str(text).split(",")]
    if any(not s for s in items):
        raise argparse.ArgumentTypeError(f"expected a comma list of label column names, got {text!r}")
    return list(dict.fromkeys(column(s) for s in items))


def where(text: str) -> tuple[str, list[str]]:
    """'lang=en,de' -> ('lang', ['en', 'de'])."""
    col, eq, vals = str(text).partition("=")
    values = [v for v in vals.split(",") if v != ""]
    if not eq or not col.strip() or not values:
        raise argparse.ArgumentTypeError(f"expected COLUMN=VALUE[,VALUE...], got {text!r}")
    return column(col), values


DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def dtype(text: str) -> str:
    t = str(text).strip().lower().removeprefix("torch.")
    if t not in DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(DTYPES[:4])}, got {text!r}")
    return t


_EXPERT = re.compile(r"L(\d+):E(-1|\d+)", re.IGNORECASE)


def expert_spec(valued: bool):
    """SPEC syntax (L<layer>:E<expert>[=value],...) checked before the model loads; whether the
    layers and experts exist is checked against the model later, by the interventions module."""

    def parse(text: str) -> str:
        items = str(text).split(",")
        if not str(text).strip() or any(not s.strip() for s in items):
            raise argparse.ArgumentTypeError(f"expected L<layer>:E<expert>[,...] such as L3:E54,L4:E38, got {text!r}")
        for it in items:
            name, eq, val = it.partition("=")
            if not _EXPERT.fullmatch(re.sub(r"\s+", "", name)):
                raise argparse.ArgumentTypeError(f"malformed expert {name.strip()!r}: write L<layer>:E<expert>, "
                                                 "e.g. L3:E54 (E-1 = shared expert)")
            if eq and not valued:
                raise argparse.ArgumentTypeError(f"takes no values (only --boost and --scale do), got {text!r}")
            if eq:
                _float(val)
        return text

    parse.__name__ = "SPEC"
    return parse


def text_of(check, also: tuple[str, ...] = ()):
    """Validate with `check` but keep the text (for options whose module parses the text itself);
    the words in `also` (e.g. 'auto', 'all') pass unchecked."""

    def parse(text: str) -> str:
        if str(text).strip() not in also:
            check(text)
        return text

    parse.__name__ = getattr(check, "__name__", "value")
    return parse
