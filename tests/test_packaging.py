"""An installed (non-editable) wheel holds every subpackage: setuptools ships only the packages pyproject lists,
and `workbench.importers` was once missing from that list, so `workbench import` worked only in a checkout."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_package_of_the_tree_is_listed_in_pyproject():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    expected = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            sub = ".".join(rel.parts)
            pkg = f"{name}.{sub}" if sub else name
            if "__pycache__" not in rel.parts and not any(pkg.startswith(d + ".") for d in dirs if d != name and d.startswith(name + ".")):
                expected.add(pkg)
    missing = sorted(expected - listed)
    assert not missing, f"pyproject.toml [tool.setuptools] packages misses {missing}: an installed wheel lacks them"
