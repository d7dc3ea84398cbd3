"""Analyses: pure functions from a run to tidy polars DataFrames, plus plotly figures made from them.

Every analysis has a row in `registry.ANALYSES` (name, module, help, what it needs) and a module
`workbench/analysis/<module>.py` that exposes:

    analyze(run, **options) -> AnalysisResult    # tables (polars DataFrames), main table name, summary
    figures(result) -> dict[str, plotly Figure]  # built only from result.tables
    add_arguments(parser)                        # its CLI options (workbench analyze <name> RUN ...)
    options_from_args(args) -> dict              # CLI namespace -> analyze() keyword arguments
    after(result, options)                       # optional: side effects of the options (files it writes)

plus the individual functions a notebook user calls directly. `analyze(name, run, ...)` below is the one
entry that runs an analysis and stores its result in the run. Analyses never touch hooks; those that
evaluate an intervention load the model through `workbench.steering`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WorkbenchError
from .registry import ANALYSES
from .result import AnalysisResult

if TYPE_CHECKING:
    import polars as pl

# name -> module (kept for callers of the old table; the registry is the source)
MODULES = {name: s.module for name, s in ANALYSES.items()}



def module(name: str):
    import importlib

    if name not in MODULES:  # MODULES, not ANALYSES: tests put a fake module here
        raise WorkbenchError(f"unknown analysis {name!r}; choose from {', '.join(MODULES)}")
    return importlib.import_module(f"workbench.analysis.{MODULES[name]}")


def analyze(name: str, run, reuse: bool = True, *, store_key: dict | None = None, **options) -> AnalysisResult:
    """`analyze("lrc", run, m=[4, 16])` — `workbench.analysis.lrc.analyze(run, m=[4, 16])`, computed once:
    the result is stored in `RUN/analyses/` and reused while the run and the options are unchanged
    (`reuse=False` recomputes and stores again; see workbench.analysis.persist). The module's `after`
    runs on every result, computed or reused (e.g. placement's --export-json, a file the stored result
    does not hold). store_key: what identifies the result when options hold objects (a loaded model)."""
    from ..store import Run, open_run
    from .persist import cached

    if not isinstance(run, Run):
        run = open_run(run)
    mod = module(name)
    result = cached(name, run, lambda **o: mod.analyze(run, **o), options, reuse=reuse, key=store_key)
    if hasattr(mod, "after"):
        mod.after(result, options)
    return result


def write_table(df: pl.DataFrame, path: str | Path) -> None:
    """Write a table in the format its extension names (.parquet, .csv, .json)."""
    import polars as pl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df.write_parquet(path)
    elif suffix == ".csv":
        df.with_columns(pl.col(c).cast(pl.List(pl.Utf8)).list.join(";") for c, t in df.schema.items()
                        if isinstance(t, pl.List)).write_csv(path)
    elif suffix == ".json":
        df.write_json(path)
    else:
        raise WorkbenchError(f"--out {path}: use a .parquet, .csv or .json file name")


def write_figures(figs: dict, folder: str | Path) -> list[Path]:
    """Figures as standalone HTML (plotly.js inlined once per file); PNG too when kaleido is installed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        import kaleido  # noqa: F401

        png = True
    except ImportError:
        png = False
    for name, fig in figs.items():
        p = folder / f"{name}.html"
        fig.write_html(p, include_plotlyjs=True, full_html=True)
        written.append(p)
        if png:
            try:
                fig.write_image(folder / f"{name}.png")
            except Exception:
                png = False
    return written


def analyze_command(name: str, run: str, options: dict, out: str | None = None, figures: str | None = None,
                    recompute: bool = False) -> None:
    """`workbench analyze NAME RUN ...`: main table to --out, summary to stdout, figures to --figures.
    options: the analysis' analyze() keywords (the CLI gets them from the module's options_from_args)."""
    from ..store import open_run

    mod = module(name)
    run = open_run(run)
    run.read_note()  # incomplete or repaired runs say so, on one line
    result = analyze(name, run, reuse=not recompute, **options)
    if result.meta.get("reused"):
        print(f"(reused the stored result in {run.path}/analyses/{name}/; --recompute to redo it)")
    if out:
        write_table(result.table, out)
    print(result.summary or repr(result))
    if out:
        print(f"wrote {result.main} ({result.table.height} rows) to {out}")
    if figures:
        paths = write_figures(mod.figures(result), figures)
        print(f"wrote {len(paths)} figures to {figures}")
