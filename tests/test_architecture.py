"""The package's shape, read from its source with `ast` (nothing is imported):

- no import cycle between the package's modules, counting imports inside functions too (a cycle hidden
  by a function-level import is still a cycle: each side needs the other);
- no module imports another module's private name (`from x import _name`) or reads one through a module
  it imported (`x._name`);
- the counts the [architecture] issue named stay gone: one run-and-cache call site (analysis.analyze),
  the router output read only through RouterOut, no private `_decoder_layers` import.

Known offenders that another change is removing are listed in ALLOWED with the reason; the test also
fails when an allowed entry no longer occurs, so the list only shrinks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's source lives (pyproject's package-dir)
SOURCES = {"workbench": ROOT / "workbench", "workbench.probes": ROOT / "probes", "workbench.app": ROOT / "app"}

# Known offenders in code other changes are rewriting now; each entry says which. The test fails when one
# no longer occurs, so the lists only shrink.
ALLOWED_PRIVATE: set[tuple[str, str, str]] = set()
ALLOWED_CYCLES: set[tuple[str, ...]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in SOURCES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if any(p in ("__pycache__",) for p in parts):
                continue
            name = ".".join([pkg] + parts)
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            if any(name.startswith(other + ".") or name == other for other in SOURCES if other != pkg
                   and other.startswith(pkg + ".")):
                continue  # e.g. workbench/probes does not exist; app and probes map by package-dir
            out[name] = f
    return out


MODULES = _modules()


def _resolve(mod: str, is_pkg: bool, level: int, target: str | None) -> str:
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    if level:
        base = base[: len(base) - (level - 1)]
        return ".".join(base + ([target] if target else []))
    return target or ""


def _type_checking(node) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(mod: str):
    """(imported module, [names], line) for every import in `mod`, function-level ones included,
    `if TYPE_CHECKING:` blocks excluded; relative imports resolved."""
    path = MODULES[mod]
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _type_checking(node):
            skip.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            yield _resolve(mod, is_pkg, node.level, node.module), [a.name for a in node.names], node.lineno


def _graph():
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    private = []
    for mod in MODULES:
        for target, names, line in _imports(mod):
            # `from pkg import sub` needs the submodule, not the package's own code (a parent package is
            # always initialised first anyway); any other imported name is a dependency on the module
            if target in MODULES and target != mod and not (names and all(f"{target}.{n}" in MODULES for n in names)):
                edges[mod].add(target)
            for n in names:
                sub = f"{target}.{n}"
                if sub in MODULES:
                    if sub != mod:
                        edges[mod].add(sub)
                elif n.startswith("_") and not n.startswith("__") and target in MODULES and target != mod:
                    private.append((mod, target, n, line))
    return edges, private


def _cycles(edges) -> list[tuple[str, ...]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(tuple(sorted(comp)))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _private_attributes():
    """`x._name` where x is bound by `import workbench.y as x` / `from workbench import y`."""
    found = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for target, names, _ in _imports(mod):
            if target in MODULES and not names:
                pass
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                target = _resolve(mod, path.name == "__init__.py", node.level, node.module)
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != mod):
                found.append((mod, aliases[node.value.id], node.attr, node.lineno))
    return found


def test_the_walker_sees_the_package():
    assert {"workbench.cli", "workbench.models.hooks", "workbench.probes.routing", "workbench.app.state"} <= set(MODULES)
    edges, _ = _graph()
    assert "workbench.models.hooks" in edges["workbench.models.loading"]  # a module-level import
    assert "workbench.probes.interventions" in edges["workbench.models.loading"]  # a function-level one
    # the cycle finder on a hand-made graph
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]


def test_no_import_cycle():
    edges, _ = _graph()
    found = set(_cycles(edges))
    assert found - ALLOWED_CYCLES == set(), "import cycles: " + "; ".join(" <-> ".join(c) for c in found - ALLOWED_CYCLES)
    assert ALLOWED_CYCLES - found == set(), f"no longer cycles, drop them from ALLOWED_CYCLES: {ALLOWED_CYCLES - found}"


def test_no_private_cross_module_import():
    _, private = _graph()
    private += _private_attributes()
    found = {(m, t, n) for m, t, n, _ in private}
    bad = sorted(found - ALLOWED_PRIVATE)
    assert not bad, "private names used across modules: " + "; ".join(f"{m} uses {t}.{n}" for m, t, n in bad)
    assert ALLOWED_PRIVATE - found == set(), f"gone, drop them from ALLOWED_PRIVATE: {ALLOWED_PRIVATE - found}"


def _calls(name: str):
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    yield mod, node.lineno


def test_one_run_and_cache_entry():
    """persist.cached is called by analysis.analyze only (it was written out six times)."""
    assert {m for m, _ in _calls("cached")} == {"workbench.analysis"}


def test_router_output_is_read_through_router_out():
    """No `out[1]`, `out[2]` or `out[:3]` in a forward hook fn(module, args, out): a router's (logits, weights,
    index) is read by RouterOut.of (models/hooks.py). A decoder layer's `out[0]` (hidden states) is fine."""
    found = []
    for mod, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.Lambda)):
                continue
            args = [a.arg for a in fn.args.args]
            if len(args) < 3 or args[-1] not in ("out", "output"):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == args[-1]
                        and (isinstance(node.slice, ast.Slice)
                             or isinstance(node.slice, ast.Constant) and node.slice.value in (1, 2))):
                    found.append(f"{mod}:{node.lineno}")
    assert not found, f"router tuples unpacked by hand: {found}"


def _manifest_literals(tree) -> list[int]:
    """Lines of dict literals (or dict(...) calls) that name both "identity" and "versions": a run manifest."""
    lines = []
    for node in ast.walk(tree):
        keys = set()
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            keys = {k.arg for k in node.keywords}
        if {"identity", "versions"} <= keys:
            lines.append(node.lineno)
    return lines


def test_one_manifest_builder():
    """A new run's manifest is built by Manifest.new only (capture, generation capture and the importers each
    wrote their own dict before)."""
    found = [f"{mod}:{line}" for mod, path in MODULES.items() if mod != "workbench.manifest"
             for line in _manifest_literals(ast.parse(path.read_text()))]
    assert not found, f"manifest dicts built outside workbench.manifest: {found}"
    old = ast.parse('m = {"identity": i, "model": mm.describe(), "versions": versions()}')
    assert _manifest_literals(old) == [1]  # the check sees the shape the old builders had
