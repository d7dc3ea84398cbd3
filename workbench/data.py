"""Input text for captures: bundled dataset names, .txt / .jsonl / .parquet files, or Python lists.

Every record is a dict with a `text` field; all other fields are labels carried into `tokens/`.
The same rules hold for every source, and are checked before a run folder exists:
- files are UTF-8 (a BOM is allowed): a byte that is not gives "FILE:LINE: not valid UTF-8", never a
  silent replacement character, in .txt and .jsonl alike (Parquet strings are UTF-8 by format);
- `text` is a string of at most MAX_TEXT_CHARS characters; longer documents than the model's context
  are cut by the capture with a warning that counts them (see capture.build_sequences);
- labels are scalars (string, number, boolean, null) named differently from the `tokens/` columns; a
  label whose records mix types is stored as text (one warning), mixed ints and floats as floats.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError, WorkbenchWarning

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
if not DATASETS_DIR.is_dir():  # installed (non-editable): datasets/ ships as workbench.datasets
    DATASETS_DIR = Path(__file__).resolve().parent / "datasets"

_SUFFIXES = (".jsonl", ".parquet", ".txt")
MAX_TEXT_CHARS = 16_000_000  # ~4M tokens: far beyond any context; a bigger "document" is a file in one line
RESERVED = ("doc_id", "pos", "token_id", "token", "phase", "src_doc")  # tokens/ columns the capture writes
_INT64 = (-(2**63), 2**63 - 1)


@dataclass
class Dataset:
    name: str
    records: list[dict]
    sha256: str
    source: str

    @property
    def label_columns(self) -> list[str]:
        cols: dict[str, None] = {}
        for r in self.records:
            for k in r:
                if k != "text":
                    cols[k] = None
        return list(cols)

    @property
    def content_sha256(self) -> str:
        """Hash of the selected records themselves: the same rows reached by another selection (e.g.
        `--limit 64` vs a `--where` that keeps the same 64) are the same data."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
            h.update(b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "records": len(self.records),
                "label_columns": self.label_columns, "content_sha256": self.content_sha256}


def bundled_datasets() -> dict[str, Path]:
    """Bundled dataset name -> file (`datasets/<name>.jsonl` or `.parquet`)."""
    out = {}
    if DATASETS_DIR.is_dir():
        for f in sorted(DATASETS_DIR.iterdir()):
            if f.suffix in (".jsonl", ".parquet") and not f.name.startswith("."):
                out[f.stem] = f
    return out


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _lines(path: Path, raw: bytes):
    """(line number, text) of each line, decoded strictly: a non-UTF-8 byte names its line."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WorkbenchError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{line[e.start]:02x} at column "
                                 f"{e.start + 1}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None
        yield lineno, text.removesuffix("\r")


def _read_txt(path: Path, raw: bytes) -> list[dict]:
    records = []
    for lineno, t in _lines(path, raw):
        if t.strip():
            records.append({"text": t})
            _check_record(records[-1], f"{path}:{lineno}")
    return records


def _read_jsonl(path: Path, raw: bytes) -> list[dict]:
    records = []
    for lineno, line in _lines(path, raw):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        except RecursionError:
            raise WorkbenchError(f"{path}:{lineno}: JSON nested too deeply") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            got = _json_type(rec) if not isinstance(rec, dict) else (
                "no 'text'" if "text" not in rec else f"'text' of type {_json_type(rec['text'])}")
            raise WorkbenchError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field "
                                 f"(got {got})")
        _check_record(rec, f"{path}:{lineno}")
        records.append(rec)
    return records


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _check_record(rec: dict, where: str) -> None:
    """One record's text and labels, before anything is written: see the module docstring."""
    if len(rec["text"]) > MAX_TEXT_CHARS:
        raise WorkbenchError(f"{where}: a document of {len(rec['text']):,} characters is over the limit of "
                             f"{MAX_TEXT_CHARS:,}; split it into several documents (lines)")
    for k, v in rec.items():
        if k == "text":
            continue
        if not isinstance(k, str) or not k.strip():
            raise WorkbenchError(f"{where}: label names must be non-empty strings, got {k!r}")
        if k in RESERVED:
            raise WorkbenchError(f"{where}: the label {k!r} clashes with a column the capture writes "
                                 f"({', '.join(RESERVED)}); rename it")
        if isinstance(v, (dict, list, tuple, set)):
            raise WorkbenchError(f"{where}: label {k!r} holds a nested value ({_json_type(v) if not isinstance(v, (tuple, set)) else 'array'}); "
                                 "labels must be strings, numbers, booleans or null: flatten it or store it as a string")
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise WorkbenchError(f"{where}: label {k!r} has an unsupported type {type(v).__name__}; labels must be "
                                 "strings, numbers, booleans or null")
        if isinstance(v, int) and not isinstance(v, bool) and not _INT64[0] <= v <= _INT64[1]:
            raise WorkbenchError(f"{where}: label {k!r} = {v} does not fit a 64-bit integer; store it as a string")


def _normalise_labels(records: list[dict], name: str) -> None:
    """One type per label column (Parquet needs it): ints+floats -> floats, other mixes -> strings."""
    kinds: dict[str, set] = {}
    for r in records:
        for k, v in r.items():
            if k != "text" and v is not None:
                kinds.setdefault(k, set()).add(bool if isinstance(v, bool) else type(v))
    for k, ts in kinds.items():
        if len(ts) < 2:
            continue
        if ts == {int, float}:
            for r in records:
                if r.get(k) is not None:
                    r[k] = float(r[k])
            continue
        for r in records:
            v = r.get(k)
            if v is not None and not isinstance(v, str):
                r[k] = json.dumps(v) if isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)) \
                    else str(v)
        kinds_txt = ", ".join(sorted({"boolean" if t is bool else t.__name__ for t in ts}))
        warnings.warn(f"label {k!r} of {name} mixes types ({kinds_txt}); stored as text", WorkbenchWarning,
                      stacklevel=3)


def _read_parquet(path: Path) -> list[dict]:
    import polars as pl

    try:
        df = pl.read_parquet(path)
    except Exception as e:  # polars raises several types for damaged files
        raise WorkbenchError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    if "text" not in df.columns:
        raise WorkbenchError(f"{path}: no 'text' column (columns: {', '.join(df.columns)})")
    if df.schema["text"] not in (pl.Utf8, pl.Null):
        raise WorkbenchError(f"{path}: the 'text' column holds {df.schema['text']}, not strings")
    nested = [c for c, t in df.schema.items() if c != "text" and t.is_nested()]
    if nested:
        raise WorkbenchError(f"{path}: label column {nested[0]!r} is nested ({df.schema[nested[0]]}); labels must be "
                             "strings, numbers, booleans or null")
    nulls = df["text"].is_null().arg_true()
    if len(nulls):
        raise WorkbenchError(f"{path}: row {int(nulls[0])} has no text (null)")
    records = df.to_dicts()
    if records:
        _check_record(max(records, key=lambda r: len(r["text"])), f"{path}")
        _check_record(records[0], f"{path}")  # label names, once (a Parquet column has one type)
    return records


def load_dataset(data, limit: int | None = None) -> Dataset:
    """Resolve `data` (name, path, list of strings or dicts) to records plus a content hash."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (list, tuple)):
        records = [{"text": r} if isinstance(r, str) else dict(r) if isinstance(r, dict) else r for r in data]
        for i, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise WorkbenchError(f"record {i} is not a string or a dict with a string 'text' field")
            _check_record(r, f"record {i}")
        name, source = "<python>", "<python>"
        digest = _hash(json.dumps(records, sort_keys=True, default=str).encode())
    else:
        spec = str(data)
        bundled = bundled_datasets()
        path = Path(spec).expanduser()
        if spec in bundled:
            path = bundled[spec]
        elif not path.exists():
            if path.suffix in _SUFFIXES or "/" in spec:
                raise WorkbenchError(f"data file {spec} does not exist")
            names = ", ".join(bundled) or "(none installed)"
            raise WorkbenchError(f"unknown dataset {spec!r}; bundled datasets: {names}")
        if path.is_dir():
            raise WorkbenchError(f"--data {spec} is a folder; give a .txt, .jsonl or .parquet file")
        raw = path.read_bytes()
        if path.suffix == ".jsonl":
            records = _read_jsonl(path, raw)
        elif path.suffix == ".parquet":
            records = _read_parquet(path)
        elif path.suffix == ".txt":
            records = _read_txt(path, raw)
        else:
            raise WorkbenchError(f"--data {spec}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
        name, source, digest = (spec if spec in bundled else path.name), str(path.resolve()), _hash(raw)
    records = [r for r in records if r["text"].strip()]
    _normalise_labels(records, name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise WorkbenchError(f"limit must be a whole number of at least 1, got {limit!r}")
    if limit is not None:
        records = records[:limit]
    if not records:
        raise WorkbenchError(f"dataset {name} has no non-empty text records")
    return Dataset(name=name, records=records, sha256=digest, source=source)


def subset(ds: Dataset, where: dict | None = None, first_keys: int | None = None, limit: int | None = None,
           key: str = "key", interleave: str | None = None) -> Dataset:
    """Records matching `where` ({column: value or list}), the first `first_keys` distinct `key`
    values (keeps parallel translations together), reordered round-robin over the values of
    `interleave` (so a `limit` or a token cap keeps every value, e.g. every calibration domain), then
    the first `limit` records."""
    recs = ds.records
    desc = []
    for what, v in (("limit", limit), ("first_keys", first_keys)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise WorkbenchError(f"{what} must be a whole number of at least 1, got {v!r}")
    if where:
        known = ds.label_columns
        for col in where:
            if col not in known:
                raise WorkbenchError(f"cannot select on {col!r}: {ds.name} has no such label "
                                     f"(labels: {', '.join(known) or 'none'})")
        for col, val in where.items():
            vals = {str(v) for v in (val if isinstance(val, (list, tuple, set)) else [val])}
            before = recs
            recs = [r for r in recs if str(r.get(col)) in vals]
            desc.append(f"{col}={','.join(sorted(vals))}")
            if not recs:
                seen = sorted({str(r.get(col)) for r in before})
                more = f", ... ({len(seen)} values)" if len(seen) > 12 else ""
                raise WorkbenchError(f"no records of {ds.name} match {' '.join(desc)} ({col} values there: "
                                     f"{', '.join(seen[:12])}{more})")
    if first_keys is not None:
        if key not in ds.label_columns:
            raise WorkbenchError(f"cannot keep the first {first_keys} {key}s: {ds.name} has no {key!r} label "
                                 f"(labels: {', '.join(ds.label_columns) or 'none'})")
        keys: dict = {}
        for r in recs:
            if r.get(key) is not None and r[key] not in keys and len(keys) < first_keys:
                keys[r[key]] = None
        recs = [r for r in recs if r.get(key) in keys]
        desc.append(f"first {first_keys} {key}s")
    if interleave is not None:
        if not any(interleave in r for r in recs):
            raise WorkbenchError(f"cannot interleave {ds.name} by {interleave!r}: no record has that field "
                                 f"(labels: {', '.join(ds.label_columns) or 'none'})")
        groups: dict = {}
        for r in recs:
            groups.setdefault(str(r.get(interleave)), []).append(r)
        recs = [g[i] for i in range(max(map(len, groups.values()))) for g in groups.values() if i < len(g)]
        desc.append(f"interleaved by {interleave}")
    if limit is not None:
        recs = recs[:limit]
        desc.append(f"first {limit}")
    if not recs:
        raise WorkbenchError(f"the selection {' '.join(desc)} of {ds.name} is empty")
    digest = _hash((ds.sha256 + json.dumps(desc)).encode())
    return Dataset(name=f"{ds.name}[{'; '.join(desc)}]" if desc else ds.name, records=recs, sha256=digest,
                   source=ds.source)


def parse_where(items: list[str] | None) -> dict:
    """CLI `--where lang=en,de --where set=refusal` -> {"lang": ["en", "de"], "set": ["refusal"]}."""
    out: dict = {}
    for item in items or []:
        if "=" not in item:
            raise WorkbenchError(f"--where {item!r} must look like COLUMN=VALUE[,VALUE...]")
        col, vals = item.split("=", 1)
        out[col.strip()] = [v for v in vals.split(",") if v]
    return out
