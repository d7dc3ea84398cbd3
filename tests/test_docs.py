"""The documentation site (issue 26): builds strictly offline, loads nothing from the network, and every error
page quotes a message the code really prints."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.skipif(shutil.which("mkdocs") is None and
                                subprocess.run([sys.executable, "-c", "import mkdocs"]).returncode != 0,
                                reason="mkdocs is not installed (pip install -e '.[docs]')")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
                          timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_the_site_builds_strictly_and_has_the_generated_references(site):
    cli = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    for command in ("capture", "analyze", "steer", "app", "export", "import", "demo"):
        assert f"workbench {command}" in cli, f"the CLI reference misses `workbench {command}`"
    fmt = (site / "reference" / "run-format" / "index.html").read_text(encoding="utf-8")
    for table in ("tokens/", "routing/", "expert_stats/", "hidden/", "attention/"):
        assert table in fmt
    analyses = (site / "reference" / "analyses" / "index.html").read_text(encoding="utf-8")
    for name in ("stats", "super-experts", "lrc", "multilingual", "behavior"):
        assert name in analyses
    assert "load_model" in (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")


def test_the_site_requests_nothing_from_the_network(site):
    """Offline at view time: no script, stylesheet, font or image from another host."""
    loads = re.compile(r"""<(?:script|img|iframe)\b[^>]*\bsrc=["']https?://|<link\b[^>]*\brel=["'](?:stylesheet|preload|icon)["'][^>]*\bhref=["']https?://""", re.I)
    offenders = [str(p.relative_to(site)) for p in site.rglob("*.html") if loads.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"pages load remote resources: {offenders[:5]}"
    css = "".join(p.read_text(encoding="utf-8", errors="replace") for p in site.rglob("*.css"))
    assert "fonts.googleapis.com" not in css and "fonts.gstatic.com" not in css


def _source_text() -> str:
    return "".join(p.read_text(encoding="utf-8") for folder in ("workbench", "probes", "app")
                   for p in (ROOT / folder).rglob("*.py"))


def test_every_error_page_quotes_a_message_the_code_prints():
    pages = [p for p in (DOCS / "errors").glob("*.md") if p.name != "index.md"]
    assert len(pages) >= 10
    source = re.sub(r"\"\s*\n\s*f?\"", "", _source_text())  # join implicitly concatenated string literals
    for p in pages:
        m = re.search(r"^\*\*Message:\*\* `([^`]+)`", p.read_text(encoding="utf-8"), re.M)
        assert m, f"{p.name} has no **Message:** line"
        assert m.group(1) in source, f"{p.name}: the message {m.group(1)!r} is not in the code any more"


def test_the_network_check_is_not_vacuous():
    """The pattern above catches what the material theme's offline plugin would add (a CDN script)."""
    loads = re.compile(r"""<(?:script|img|iframe)\b[^>]*\bsrc=["']https?://""", re.I)
    assert loads.search('<script src="https://unpkg.com/iframe-worker/shim"></script>')


def test_workbench_docs_serves_the_site_on_loopback(site):
    """`workbench docs` serves the built site from 127.0.0.1 (search included), not from file://."""
    import threading
    import urllib.request

    from workbench.docs_site import server

    httpd = server(site, port=0)
    assert httpd.server_address[0] == "127.0.0.1"
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{httpd.server_address[1]}/"
        assert b"MoE Workbench" in urllib.request.urlopen(base, timeout=10).read()
        assert urllib.request.urlopen(base + "reference/cli/", timeout=10).status == 200
        assert urllib.request.urlopen(base + "search/search_index.json", timeout=10).status == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_workbench_docs_refuses_a_folder_without_a_site(tmp_path):
    from workbench.docs_site import server
    from workbench.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="holds no built site"):
        server(tmp_path, port=0)
