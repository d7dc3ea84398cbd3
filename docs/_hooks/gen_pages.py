"""mkdocs hook: the reference pages are generated from the code at every build, never edited by hand.

- reference/cli.md       from the argparse parser (`workbench.cli.build_parser`)
- reference/analyses.md  from the analysis registry (`workbench.analysis.registry.ANALYSES`) when present,
                         else from `workbench.analysis.MODULES` and the modules' docstrings
- reference/run-format.md from the table schemas (`workbench.store.SCHEMAS`) and the typed manifest
                         (`workbench.manifest`) when present
- reference/benchmark-results.md  every recorded result in benchmarks/results/ (what, where, when, the JSON)
- errors/index.md        the list of error pages under docs/errors/

Each is added to the build as a generated file (mkdocs >= 1.6), so nothing is written into docs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import os
import re
from pathlib import Path

from mkdocs.structure.files import File

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps no public accessor for sub-commands
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_page() -> str:
    cli = importlib.import_module("workbench.cli")
    parser = cli.build_parser()
    out = ["# Command-line reference", "",
           "Generated from the parser at build time (`workbench COMMAND --help` prints the same).", "",
           "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subparsers(parser).items():
        out += [f"## `workbench {name}`", ""]
        nested = _subparsers(sub)
        out += ["```text", sub.format_help().rstrip(), "```", ""]
        for nname, nsub in nested.items():
            out += [f"### `workbench {name} {nname}`", "", "```text", nsub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def _prose(text: str) -> str:
    """Docstring text as markdown: `[layer][physical]` must not read as a reference link."""
    return text.replace("][", "]\\[")


def _analysis_options() -> dict[str, str]:
    """`workbench analyze NAME --help` for every analysis the parser knows."""
    cli = importlib.import_module("workbench.cli")
    analyze = _subparsers(cli.build_parser()).get("analyze")
    return {name: sub.format_help().rstrip() for name, sub in (_subparsers(analyze) if analyze else {}).items()}


def analyses_page() -> str:
    out = ["# Analyses reference", "",
           "Generated from the analysis registry at build time: every analysis the CLI, the dashboard, export "
           "and the demo know, with its command-line options. The pages under *Analyses* explain each method.", ""]
    options = _analysis_options()
    try:
        registry = importlib.import_module("workbench.analysis.registry")
        specs = list(getattr(registry, "ANALYSES").values()) if isinstance(getattr(registry, "ANALYSES"), dict) \
            else list(getattr(registry, "ANALYSES"))
    except (ImportError, AttributeError):
        specs = None
    if specs:
        out += ["| name | summary | needs | runs |", "|---|---|---|---|"]
        for s in specs:
            needs = ", ".join(list(getattr(s, "requires_tables", ()) or ()) + list(getattr(s, "requires_labels", ()) or ()))
            if getattr(s, "needs_model", False):
                needs = (needs + ", " if needs else "") + "the model"
            out.append(f"| `{s.name}` | {getattr(s, 'summary', '')} | {needs or '-'} | {getattr(s, 'runs', 1)} |")
        out.append("")
        for s in specs:
            out += [f"## `{s.name}`", "", _prose(str(getattr(s, "description", "") or getattr(s, "summary", ""))), ""]
            if getattr(s, "capture_hint", None):
                out += [f"Capture it with: `{s.capture_hint}`", ""]
            examples = getattr(s, "examples", None) or ()
            if examples:
                out += ["```bash", *([examples] if isinstance(examples, str) else examples), "```", ""]
            if s.name in options:
                out += ["```text", options[s.name], "```", ""]
        return "\n".join(out)
    analysis = importlib.import_module("workbench.analysis")
    for name, modname in getattr(analysis, "MODULES", {}).items():
        mod = importlib.import_module(modname if "." in modname else f"workbench.analysis.{modname}")
        doc = inspect.getdoc(mod) or ""
        out += [f"## `{name}`", "", _prose(doc), ""]
        if name in options:
            out += ["```text", options[name], "```", ""]
    return "\n".join(out)


def _type_name(t) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def run_format_page() -> str:
    store = importlib.import_module("workbench.store")
    out = ["# Run format", "",
           "Generated from the code at build time. A run is a folder: `manifest.json` plus one folder of Parquet "
           "part files per table. Everything is readable by polars, DuckDB, pandas or Spark without this package.",
           "", f"Schema version: **{store.SCHEMA_VERSION}**.", "", "## Tables", ""]
    for table, schema in store.SCHEMAS.items():
        out += [f"### `{table}/`", "", "| column | type |", "|---|---|"]
        out += [f"| `{f.name}` | `{f.type}` |" for f in schema]
        out.append("")
    out += ["`tokens/` also holds one column per label field of the input records (`lang`, `set`, ...). "
            "`routing/` may hold `logits` (list<float32> [E]) when captured with `--logits`.", ""]
    try:
        manifest = importlib.import_module("workbench.manifest")
    except ImportError:
        manifest = None
    if manifest is not None:
        out += ["## `manifest.json`", ""]
        for name, cls in inspect.getmembers(manifest, inspect.isclass):
            if not dataclasses.is_dataclass(cls) or cls.__module__ != manifest.__name__:
                continue
            out += [f"### `{name}`", "", inspect.getdoc(cls) or "", "", "| field | type |", "|---|---|"]
            out += [f"| `{f.name}` | `{_type_name(f.type)}` |" for f in dataclasses.fields(cls)]
            out.append("")
    return "\n".join(out)


def benchmarks_page(root: Path) -> str:
    import json

    out = ["# Benchmark results", "",
           "Generated at build time from `benchmarks/results/*.json` in the repository: one section per recorded "
           "result, with the script that wrote it (`benchmarks/`), the machine and the versions it records. The "
           "[benchmarks page](../benchmarks.md) explains the methods and the targets.", ""]
    for f in sorted((root / "benchmarks" / "results").glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            continue
        head = data if isinstance(data, dict) else {}
        what = head.get("benchmark") or head.get("what") or head.get("method") or ""
        where = head.get("device") or head.get("machine") or ""
        when = head.get("date") or ""
        out += [f"## `{f.name}`", ""]
        for label, value in (("what", what), ("machine", where), ("date", when)):
            if value:
                text = json.dumps(value) if not isinstance(value, str) else value
                out.append(f"- **{label}:** {text[:300]}")
        body = json.dumps(data, indent=1)
        cut = body if len(body) <= 4000 else body[:4000] + "\n... (cut; the file has the rest)"
        out += ["", "```json", cut, "```", ""]
    return "\n".join(out)


def errors_index(docs_dir: Path) -> str:
    out = ["# Error messages", "",
           "Errors you can fix print one sentence and exit with code 2. Each page below quotes a message as the "
           "workbench prints it, says why it happens and what to do.", ""]
    for p in sorted((docs_dir / "errors").glob("*.md")):
        if p.name == "index.md":
            continue
        first = p.read_text(encoding="utf-8").splitlines()[0]
        title = re.sub(r"^#\s*", "", first)
        out.append(f"- [{title}]({p.name})")
    return "\n".join(out) + "\n"


def on_files(files, config):
    docs_dir = Path(config["docs_dir"])
    pages = {
        "reference/cli.md": cli_page,
        "reference/analyses.md": analyses_page,
        "reference/run-format.md": run_format_page,
        "reference/benchmark-results.md": lambda: benchmarks_page(docs_dir.parent),
        "errors/index.md": lambda: errors_index(docs_dir),
    }
    for uri, make in pages.items():
        files.append(File.generated(config, uri, content=make()))
    return files
