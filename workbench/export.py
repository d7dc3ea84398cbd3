"""`workbench export RUN --format {parquet,csv,json} --out DIR [--what ...]`.

Writes the run's raw tables (streamed from its part files, never whole in memory) and every table of
every analysis that applies to the run, plus SCHEMA.md and schema.json describing each file. Parquet
output loads with polars, pandas, DuckDB, Spark and `datasets.load_dataset("parquet", data_files=...)`;
json is JSON Lines (one object per row, `.jsonl`); csv joins list cells with ';'.

The export is built in a hidden sibling `.OUT.partial-PID/` and renamed into place; one left behind by a
killed export (its process is gone) is removed by the next export to the same OUT. Replacing an older
export deletes only the files that export listed, never through a link (workbench.safefs); an OUT holding
anything else is refused. The run is read under its readers lock (`store.reading`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import polars as pl

from .errors import WorkbenchError
from .safefs import pid_alive, remove_file, remove_tree
from .store import TABLES, DamagedRun, Run, io_error, open_run, reading

FORMATS = {"parquet": ".parquet", "csv": ".csv", "json": ".jsonl"}

# What the columns mean, for the schema note (names are shared across tables on purpose).
COLUMN_DOCS = {
    "doc_id": "document (sequence) id", "pos": "token position in its document", "token_id": "tokenizer id",
    "token": "decoded token", "phase": "prefill (prompt) or decode (generated)",
    "layer": "decoder-layer index (never a position among MoE layers); null on model-level rows",
    "experts": "experts the model selected, in its own order", "weights": "routing weights of those experts",
    "logits": "router logits over all experts (fp32)", "slot": "position among the token's selected experts (-1 = shared)",
    "margin": "router margin: k-th minus (k+1)-th selection score (logit for softmax routers); small = near-tie",
    "expert": "expert id (-1 = shared expert); null on layer/model rows", "weight": "routing weight of that slot",
    "out_maxabs": "max |down_proj output| of the expert for the token, before the routing weight",
    "out_argmax": "channel of out_maxabs", "out_l2": "L2 norm of the expert's down_proj output",
    "maxabs": "max |hidden state| after the layer", "argmax": "channel of maxabs", "head": "attention head",
    "sink_share": "mean attention mass on position 0",
    "label": "label column a row is split by (null: all tokens)", "value": "value of that label column",
    "count": "number of selections", "share": "share of the layer's selections",
    "token_share": "share of tokens selecting the expert", "mean_weight": "mean routing weight when selected",
    "is_dead": "never (or below --dead) selected", "is_always_on": "selected by at least --always-on of tokens",
    "cv": "coefficient of variation of expert counts in the layer", "entropy_norm": "entropy of expert shares / log E",
    "level": "expert, layer or model", "m": "window (segment) length in tokens", "srp": "segment routing best performance",
    "srp_low": "basic bootstrap 95% lower bound", "srp_high": "basic bootstrap 95% upper bound",
    "alpha": "activation threshold that attains SRP", "rho": "SRP: m*C/F at the best alpha; SCH: cache size / active experts",
    "cache_size": "cache capacity in experts", "sch": "segment cache best hit rate", "hit_rate": "cache hit rate",
    "policy": "cache replacement policy", "max_abs": "max |output| (super experts) or |h| (massive activations)",
    "channel": "hidden channel of max_abs", "is_super_expert": "meets the super-expert rule", "se_rank": "rank among super experts",
    "ppl": "perplexity", "d_sink": "attention-sink decay 1 - mean(after/before)",
}


def _nested_to_text(lf: pl.LazyFrame) -> pl.LazyFrame:
    schema = lf.collect_schema()
    exprs = []
    for c, t in schema.items():
        if isinstance(t, (pl.List, pl.Array)):
            exprs.append(pl.col(c).cast(pl.List(pl.Utf8)).list.join(";"))
        elif isinstance(t, pl.Struct):
            exprs.append(pl.col(c).struct.json_encode())
    return lf.with_columns(exprs) if exprs else lf


def _write(frame, path: Path, fmt: str) -> None:
    lf = frame.lazy() if isinstance(frame, pl.DataFrame) else frame
    if fmt == "parquet":
        lf.sink_parquet(path, compression="zstd")
    elif fmt == "csv":
        _nested_to_text(lf).sink_csv(path)
    else:
        lf.sink_ndjson(path)


def _describe(path: Path, fmt: str, source: str, table: str, schema: pl.Schema, rows: int, out: Path) -> dict:
    return {"path": str(path.relative_to(out)), "source": source, "table": table, "rows": rows,
            "columns": [{"name": c, "type": str(t), "description": COLUMN_DOCS.get(c, "")} for c, t in schema.items()]}


def _rows(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())
    if fmt == "csv":
        return int(pl.scan_csv(path).select(pl.len()).collect().item())
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _selection(what: str) -> tuple[list[str], list[str]]:
    from .analysis.registry import ANALYSES as MODULES

    items = [w.strip() for w in (what or "all").split(",") if w.strip()]
    raw, analyses = [], []
    for w in items:
        key = w.replace("_", "-")
        if w == "all":
            raw += list(TABLES)
            analyses += list(MODULES)
        elif w == "raw":
            raw += list(TABLES)
        elif w == "analyses":
            analyses += list(MODULES)
        elif w in TABLES:
            raw.append(w)
        elif key in MODULES:
            analyses.append(key)
        else:
            raise WorkbenchError(f"--what {w!r}: name a table ({', '.join(TABLES)}), an analysis "
                                 f"({', '.join(MODULES)}), raw, analyses or all")
    return list(dict.fromkeys(raw)), list(dict.fromkeys(analyses))


def export_run(run, out, fmt: str = "parquet", what: str = "all", options: dict | None = None,
               progress: bool = True) -> dict:
    """Export `run` to folder `out`; returns the schema dict also written to out/schema.json.

    options: {analysis name: analyze() keyword arguments}. Analyses that do not apply to the run
    (missing tables or labels: they raise WorkbenchError) are listed under "skipped".
    """
    if fmt not in FORMATS:
        raise WorkbenchError(f"--format {fmt!r}: choose parquet, csv or json")
    if not isinstance(run, Run):
        run = open_run(run)
    final = Path(out)
    _check_target(final)
    raw, analyses = _selection(what)
    _clean_stale(final)
    with reading(run):  # a capture --overwrite of this run waits for us (it is refused) instead of mixing parts
        for name in TABLES:  # verify the parts (checksums) before anything is written or shown
            run.files(name)
        # Everything goes to a hidden sibling folder renamed into place at the end: a failed export
        # (damaged run, disk full, Ctrl-C) leaves no output that looks valid.
        tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
        try:
            remove_tree(final.parent, tmp.name)
            tmp.mkdir(parents=True)
            schema = _export(run, tmp, fmt, raw, analyses, what, options, progress)
            _replace(tmp, final)
        except OSError as e:
            e.filename = str(final)  # the user named this folder, not the hidden one beside it
            raise io_error(e, final, "exporting to") from None
        finally:
            remove_tree(final.parent, tmp.name)
    return schema


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)$")


def _clean_stale(out: Path) -> None:
    """Remove `.OUT.partial-PID/` and `.OUT.old-PID/` folders that an export killed (kill -9, power loss)
    left beside OUT: those whose process is gone. Only what an export writes is deleted, never via a link."""
    parent = out.parent if str(out.parent) else Path(".")
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for d in entries:
        m = _LEFTOVER.match(d.name)
        if not m or m["name"] != out.name or d.is_symlink() or not d.is_dir():
            continue
        if not pid_alive(int(m["pid"])) or int(m["pid"]) == os.getpid():
            _remove_export(parent, d.name)


def _export_files(folder: Path) -> list[str] | None:
    """The files an export folder's schema.json lists (plus the schema files), or None if it has none."""
    try:
        schema = json.loads((folder / "schema.json").read_text())
        return [f["path"] for f in schema.get("files", [])] + ["schema.json", "SCHEMA.md"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _remove_export(parent: Path, name: str) -> None:
    """Delete an export folder: the files its schema lists when it has one (a partial one is all ours),
    then the folders once empty; regular files only, inside `parent`'s real folder, never through a link."""
    if ".partial-" in name:  # everything in a partial export was written by that export
        remove_tree(parent, name)
        return
    for rel in _export_files(parent / name) or []:
        remove_file(parent, Path(name) / rel)
    remove_tree(parent, name, keep=lambda n: True)  # the folders, once empty


def _check_target(out: Path) -> None:
    if out.is_symlink():
        raise WorkbenchError(f"--out {out} is a symbolic link; name the folder itself (an older export there "
                             "would be replaced through it)")
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        listed = _export_files(out)
        if listed is None:
            raise WorkbenchError(f"--out {out} is a non-empty folder that is not an export; use another path")
        keep = {str(Path(p)) for p in listed}
        extra = [str(f.relative_to(out)) for f in sorted(out.rglob("*"))
                 if (f.is_symlink() or not f.is_dir()) and str(f.relative_to(out)) not in keep]
        if extra:
            raise WorkbenchError(f"--out {out} holds {extra[0]}, which the export there did not write; move it "
                                 "out or use another path (an export replaces its folder as a whole)")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished export into place; an older export there is replaced as a whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    _remove_export(out.parent, old.name)


def _export(run: Run, out: Path, fmt: str, raw: list[str], analyses: list[str], what: str, options, progress) -> dict:
    from tqdm.auto import tqdm

    from .analysis import module

    ext = FORMATS[fmt]
    files, skipped = [], {}
    explicit = (what or "all") not in ("all", "raw", "analyses")
    for name in tqdm(raw, desc="export tables", disable=not progress, dynamic_ncols=True):
        if not run.has(name):
            if explicit:
                skipped[name] = "the run has no such table"
            continue
        path = out / f"{name}{ext}"
        lf = run.table(name)
        _write(lf, path, fmt)
        files.append(_describe(path, fmt, "raw", name, lf.collect_schema(), _rows(path, fmt), out))
    bar = tqdm(analyses, desc="export analyses", disable=not progress, dynamic_ncols=True)
    for name in bar:
        bar.set_description(f"export analyses: {name} (computed if not stored yet)")  # one can take a minute
        try:
            module(name)  # importable? (an optional dependency may be missing)
        except ImportError as e:
            skipped[name] = f"not available ({e})"
            continue
        try:
            from .analysis import analyze

            # computed once and stored in the run folder (reused by a later export, the CLI and the app)
            result = analyze(name, run, **dict((options or {}).get(name, {})))
        except DamagedRun:
            raise  # damage is not "does not apply": the export fails as a whole
        except WorkbenchError as e:
            skipped[name] = str(e)
            continue
        folder = out / "analysis" / name
        folder.mkdir(parents=True, exist_ok=True)
        for tname, df in result.tables.items():
            path = folder / f"{tname}{ext}"
            _write(df, path, fmt)
            desc = _describe(path, fmt, name, tname, df.schema, df.height, out)
            desc["main"] = tname == result.main
            files.append(desc)
    schema = {"run": str(run.path), "note": run.note, "model": run.model_info.get("spec"), "model_type": run.model_info.get("model_type"),
              "dataset": (run.manifest.get("dataset") or {}).get("name"), "format": fmt,
              "exported": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, "skipped": skipped}
    (out / "schema.json").write_text(json.dumps(schema, indent=1, default=str))
    (out / "SCHEMA.md").write_text(_schema_md(schema))
    return schema


def _schema_md(schema: dict) -> str:
    fmt = schema["format"]
    lines = [f"# Export of {schema['run']}", "",
             f"Model `{schema['model']}` ({schema['model_type']}), dataset `{schema['dataset']}`, format {fmt}, "
             f"exported {schema['exported']}. Raw tables have one row per: `tokens` token; `routing` token x MoE "
             "layer; `expert_stats` token x MoE layer x routed slot; `hidden` token x decoder layer; `attention` "
             "document x layer x head (every column is described below). Analysis tables are under "
             "`analysis/<name>/`. "
             "`layer` is always the decoder-layer index; it is null on model-level rows, `expert` -1 is a shared expert.",
             ""]
    load = {"parquet": "pl.read_parquet(path)  |  datasets.load_dataset('parquet', data_files=path)",
            "csv": "pl.read_csv(path)  (list cells are joined with ';')",
            "json": "pl.read_ndjson(path)  |  datasets.load_dataset('json', data_files=path)"}[fmt]
    lines += [f"Load: `{load}`", ""]
    for f in schema["files"]:
        main = " (main table)" if f.get("main") else ""
        lines += [f"## `{f['path']}`{main}", "", f"source: {f['source']}, rows: {f['rows']}", "",
                  "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c['name']}` | {c['type']} | {c['description']} |" for c in f["columns"]]
        lines.append("")
    if schema["skipped"]:
        lines += ["## Not exported", ""] + [f"- {k}: {v}" for k, v in schema["skipped"].items()] + [""]
    return "\n".join(lines)


def export_command(run: str, out: str, fmt: str = "parquet", what: str = "all") -> None:
    """`workbench export RUN --out DIR [--format F] [--what W]`: export, then list the files and what was skipped."""
    import sys

    path = out
    run = open_run(run)
    run.read_note()
    if sys.stderr.isatty():  # the checksums of every part are read before the first progress bar
        print(f"workbench: verifying the parts of {run.path.name} ...", file=sys.stderr, flush=True)
    schema = export_run(run, path, fmt=fmt, what=what)
    n = len(schema["files"])
    print(f"exported {n} tables ({fmt}) to {path}; schema in {Path(path) / 'SCHEMA.md'}")
    for k, v in schema["skipped"].items():
        print(f"  skipped {k}: {v}")
