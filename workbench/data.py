"""Input text for captures: bundled dataset names, .txt / .jsonl / .parquet files, or Python lists.

Every record is a dict with a `text` field; all other fields are labels carried into `tokens/`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import WorkbenchError

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
if not DATASETS_DIR.is_dir():  # installed (non-editable): datasets/ ships as workbench.datasets
    DATASETS_DIR = Path(__file__).resolve().parent / "datasets"

_SUFFIXES = (".jsonl", ".parquet", ".txt")


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

    def describe(self) -> dict:
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "records": len(self.records),
                "label_columns": self.label_columns}


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


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise WorkbenchError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise WorkbenchError(f"{path}:{lineno}: each line must be a JSON object with a string 'text' field")
            records.append(rec)
    return records


def _read_parquet(path: Path) -> list[dict]:
    import polars as pl

    try:
        df = pl.read_parquet(path)
    except Exception as e:  # polars raises several types for damaged files
        raise WorkbenchError(f"{path}: not a readable Parquet file ({type(e).__name__})") from None
    if "text" not in df.columns:
        raise WorkbenchError(f"{path}: no 'text' column (columns: {', '.join(df.columns)})")
    return df.to_dicts()


def load_dataset(data, limit: int | None = None) -> Dataset:
    """Resolve `data` (name, path, list of strings or dicts) to records plus a content hash."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (list, tuple)):
        records = [{"text": r} if isinstance(r, str) else dict(r) for r in data]
        for i, r in enumerate(records):
            if not isinstance(r.get("text"), str):
                raise WorkbenchError(f"record {i} has no string 'text' field")
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
            records = _read_jsonl(path)
        elif path.suffix == ".parquet":
            records = _read_parquet(path)
        elif path.suffix == ".txt":
            records = [{"text": line} for line in raw.decode("utf-8", errors="replace").splitlines() if line.strip()]
        else:
            raise WorkbenchError(f"--data {spec}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
        name, source, digest = (spec if spec in bundled else path.name), str(path.resolve()), _hash(raw)
    records = [r for r in records if r["text"].strip()]
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
    if where:
        for col, val in where.items():
            vals = {str(v) for v in (val if isinstance(val, (list, tuple, set)) else [val])}
            recs = [r for r in recs if str(r.get(col)) in vals]
            desc.append(f"{col}={','.join(sorted(vals))}")
        if not recs:
            raise WorkbenchError(f"no records of {ds.name} match {' '.join(desc)}")
    if first_keys is not None:
        keys: dict = {}
        for r in recs:
            if r.get(key) is not None and r[key] not in keys and len(keys) < first_keys:
                keys[r[key]] = None
        recs = [r for r in recs if r.get(key) in keys]
        desc.append(f"first {first_keys} {key}s")
    if interleave is not None:
        if not any(interleave in r for r in recs):
            raise WorkbenchError(f"cannot interleave {ds.name} by {interleave!r}: no record has that field")
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
