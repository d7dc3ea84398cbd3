"""The analysis registry (workbench.analysis.registry) and the one run-and-cache entry, analysis.analyze."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

import workbench as wb
from workbench.analysis import MODULES, analyze, module
from workbench.analysis.registry import ANALYSES, cli_analyses, spec
from workbench.errors import WorkbenchError


def test_every_row_names_a_module_with_the_protocol():
    for name, s in ANALYSES.items():
        assert s.name == name
        mod = module(name)
        assert mod.__name__ == f"workbench.analysis.{s.module}"
        assert callable(mod.analyze) and callable(mod.figures)
        if s.command == "analyze":  # its options come from the module
            assert callable(mod.add_arguments) and callable(mod.options_from_args)
        assert s.runs in (1, 2) and s.summary and s.description and s.examples and s.title
    assert MODULES == {n: s.module for n, s in ANALYSES.items()}
    with pytest.raises(WorkbenchError, match="unknown analysis 'nope'; choose from stats"):
        spec("nope")


def test_every_example_parses_with_the_real_parser():
    """The examples shown under --help are commands the CLI accepts, for the analysis they document."""
    from workbench.cli import build_parser

    for name, s in ANALYSES.items():
        for line in s.examples:
            argv = shlex.split(line)
            assert argv[0] == "workbench" and argv[1] == s.command
            args = build_parser(argv[1:]).parse_args(argv[1:])
            if s.command == "analyze":
                assert args.analysis == name


def test_cli_subcommands_and_help_come_from_the_table(capsys):
    from workbench.cli import main

    assert set(cli_analyses()) == {n for n, s in ANALYSES.items() if s.command == "analyze"}
    assert main(["analyze", "lrc", "--help"]) == 0
    out = capsys.readouterr().out
    assert ANALYSES["lrc"].description.split()[0] in out and ANALYSES["lrc"].examples[-1] in out
    assert main(["analyze", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in cli_analyses()) and "compare" not in out.split("ANALYSIS")[1].split("\n\n")[0]


def test_reading_the_table_imports_nothing_heavy():
    code = ("import sys, workbench.analysis.registry, workbench.cli; workbench.cli.build_parser(['capture']); "
            "print(','.join(m for m in ('numpy', 'polars', 'torch', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_app_hints_and_requirements_come_from_the_table():
    from workbench.app.analyses import SECTIONS
    from workbench.app.export import NOT_FROM_ONE_RUN
    from workbench.app.state import CAPTURE_HINTS

    assert CAPTURE_HINTS["super-experts"] == ANALYSES["super-experts"].capture_hint
    assert SECTIONS["super-experts"].requires == ("expert_stats",)
    assert SECTIONS["multilingual"].requires_labels == ("lang",)
    assert SECTIONS["locality"].requires == () and SECTIONS["locality"].requires_labels == ()
    assert NOT_FROM_ONE_RUN == {"compare": "workbench compare A B", "attribution": "workbench attribute"}


def test_analyze_runs_after_on_computed_and_reused_results(tiny_dir, tmp_path):
    """placement's `after` writes --export-json: the file appears whether the result is computed or reused."""
    model = tiny_dir("qwen3_moe")
    run = wb.capture(str(model), ["a b c d e f g h i j k l m n o p"] * 4, tmp_path / "run", progress=False)
    f1, f2 = tmp_path / "p1.json", tmp_path / "p2.json"
    first = analyze("placement", run, ep=2, window=16, export=str(f1))
    assert not first.meta.get("reused") and f1.is_file()
    f1.unlink()
    again = analyze("placement", run, ep=2, window=16, export=str(f1))
    assert again.meta.get("reused") and f1.is_file()
    # the stored result's placement is what the file holds, for a fresh export path as well
    analyze("placement", run, ep=2, window=16, export=str(f2))
    assert json.loads(f2.read_text()) == json.loads(f1.read_text())
    fresh = analyze("placement", run, reuse=False, ep=2, window=16)
    assert not fresh.meta.get("reused")
    assert fresh.table.equals(first.table)


def test_every_command_module_has_a_parser_and_a_run():
    import importlib

    from workbench.cli import COMMANDS, TABLE, build_parser

    assert set(COMMANDS) == set(TABLE)
    for name, modname in TABLE.items():
        mod = importlib.import_module(f"workbench.cli.{modname}")
        assert callable(mod.add_parser) and callable(mod.run), name
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == list(TABLE)  # `workbench --help` lists them in the table's order
