"""Every ```python block of README.md and of the docs site (docs/**/*.md) runs as written (issues 18, 26).

Contract (also in docs/install.md): blocks run in order (README first, then the docs pages in the order of
mkdocs.yml's nav, then any page not in the nav, sorted), each in a fresh namespace, all in one temporary
working folder, so a block may open a run an earlier block wrote (`runs/cal`) but never uses an earlier
block's variables. A block is skipped only when the line
right before its fence is `<!-- snippet: skip (REASON) -->`, and REASON must say it needs a GPU or a
hub download. Two calls that would never return are stubbed: `Dash.run` (serves until stopped; the
stub still checks its arguments) and plotly's `Figure.show` (would open a browser; the stub still
serialises the figure).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"^<!--\s*snippet:\s*skip\s*\((?P<why>[^)]*)\)\s*-->$")
ALLOWED_SKIPS = ("gpu", "hub")


def snippets(text: str | None = None) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) for every ```python block."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i + 1, []
            prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            m = SKIP.match(prev)
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            out.append((start, "\n".join(body) + "\n", m.group("why") if m else None))
        i += 1
    return out


def pages() -> list[Path]:
    """README.md, then docs pages in nav order, then the rest of docs/ (generated reference pages have no code)."""
    nav = re.findall(r":\s*([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M) \
        if (ROOT / "mkdocs.yml").exists() else []
    docs = ROOT / "docs"
    listed = [docs / n for n in nav if (docs / n).exists()]
    rest = sorted(p for p in docs.rglob("*.md") if p not in listed and "_hooks" not in p.parts) if docs.exists() else []
    return [README, *listed, *rest]


def all_snippets() -> list[tuple[str, int, str, str | None]]:
    """(page relative to the repo, line, code, skip reason) for every python block of every page."""
    return [(str(p.relative_to(ROOT)), line, code, why)
            for p in pages() for line, code, why in snippets(p.read_text(encoding="utf-8"))]


SNIPPETS = all_snippets()
_done: dict[int, BaseException | None] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module", autouse=True)
def _stubs():
    """Dash.run and Figure.show would block or open a browser: stubs that still check their input."""
    import dash
    import plotly.basedatatypes as pbt

    calls = []

    def run(self, *a, jupyter_mode=None, port=None, **k):
        assert jupyter_mode in (None, "inline", "external", "tab", "jupyterlab")
        assert port is None or 0 < int(port) < 65536
        assert self.layout is not None
        calls.append((jupyter_mode, port))

    def show(self, *a, **k):
        self.to_json()  # the figure must at least serialise

    old_run, old_show = dash.Dash.run, pbt.BaseFigure.show
    dash.Dash.run, pbt.BaseFigure.show = run, show
    try:
        yield calls
    finally:
        dash.Dash.run, pbt.BaseFigure.show = old_run, old_show


def _run_block(index: int, workdir: Path) -> None:
    """Run block `index` after every earlier runnable block (files on disk may carry over)."""
    for j in range(index + 1):
        if j in _done:
            continue
        page, line, code, why = SNIPPETS[j]
        if why is not None:
            _done[j] = None
            continue
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            exec(compile(code, f"{page}:{line}", "exec"), {"__name__": f"snippet_{j}"})
            _done[j] = None
        except BaseException as e:  # noqa: BLE001 - recorded so later blocks name the one that broke
            _done[j] = e
        finally:
            os.chdir(cwd)
    err = _done[index]
    if err is not None:
        raise err
    broken = [f"{SNIPPETS[j][0]}:{SNIPPETS[j][1]}" for j in range(index) if _done.get(j) is not None]
    assert not broken, f"earlier blocks failed ({broken})"


def test_the_docs_have_snippets_and_only_allowed_skips():
    assert len(SNIPPETS) >= 8
    assert any(page == "README.md" for page, *_ in SNIPPETS), "the README keeps a runnable Python taste"
    for page, line, _, why in SNIPPETS:
        if why is not None:
            assert any(w in why.lower() for w in ALLOWED_SKIPS), f"{page}:{line}: skip reason {why!r}"


def test_snippet_parser_hand_worked():
    text = ("x\n```python\na = 1\n```\n<!-- snippet: skip (needs GPU) -->\n\n```python\nb = 2\n```\n"
            "```bash\nls\n```\n<!-- snippet: skip (needs a hub download) -->\n```python\nc\n```\n")
    assert snippets(text) == [(2, "a = 1\n", None), (7, "b = 2\n", "needs GPU"), (14, "c\n", "needs a hub download")]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[f"{s[0]}:{s[1]}" for s in SNIPPETS])
def test_snippet_runs(index, workdir, monkeypatch):
    page, line, _, why = SNIPPETS[index]
    if why is not None:
        pytest.skip(f"{page}:{line}: {why}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _run_block(index, workdir)


def test_find_super_experts_refuses_n_layers_that_contradict_the_run(tiny_model, tmp_path):
    """The README once called it with n_layers=48 on the 8-layer demo and got three wrong super experts."""
    from workbench import capture
    from workbench.analysis import super_experts as se
    from workbench.errors import WorkbenchError

    mm = tiny_model("olmoe")  # 4 decoder layers
    run = capture(mm, ["The quick brown fox jumps over the lazy dog."] * 2, tmp_path / "r",
                  probes=["routing", "experts"], progress=False)
    table = se.expert_max(run)
    assert se.find_super_experts(table, n_layers=4)[1]["candidate_layers"] == 3
    for bad in (48, 5, 3):
        with pytest.raises(WorkbenchError, match=f"n_layers={bad} contradicts the run, whose model has 4"):
            se.find_super_experts(table, n_layers=bad)
    plain = table.filter(table["layer"] >= 0)  # a derived frame no longer knows its run ...
    with pytest.raises(WorkbenchError, match="impossible for a table with layer 3"):
        se.find_super_experts(plain, n_layers=3)  # ... but a layer beyond n_layers is still caught
