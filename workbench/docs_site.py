"""`workbench docs`: build the documentation site (mkdocs, from the checkout's docs/) and open it locally.

The site is served from 127.0.0.1 rather than opened as files, so search works without any CDN shim.
"""

from __future__ import annotations

import functools
import http.server
import importlib.util
import subprocess
import sys
import threading
import webbrowser
from pathlib import Path

from .errors import WorkbenchError


def project_root() -> Path:
    """The checkout holding mkdocs.yml (the docs are not part of an installed wheel)."""
    here = Path(__file__).resolve().parent.parent
    if not (here / "mkdocs.yml").is_file():
        raise WorkbenchError("the documentation sources (mkdocs.yml, docs/) are not next to this install; "
                             "run `workbench docs` from a clone of the repository installed with pip install -e")
    return here


def build(out: Path | None = None, strict: bool = True) -> Path:
    """Build the site into `out` (default: <checkout>/site) and return that folder."""
    if importlib.util.find_spec("mkdocs") is None:
        raise WorkbenchError("building the docs needs mkdocs: pip install -e '.[docs]'")
    root = project_root()
    out = Path(out) if out is not None else root / "site"
    cmd = [sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(out.resolve())] + (["--strict"] if strict else [])
    print(f"building the documentation into {out} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise WorkbenchError(f"mkdocs build failed: {last[0]}")
    return out


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would drown the terminal
        pass


def server(site: Path, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A loopback-only static server of `site` (port 0 picks a free one)."""
    if not (site / "index.html").is_file():
        raise WorkbenchError(f"{site} holds no built site (index.html); run workbench docs without --no-build")
    handler = functools.partial(_Quiet, directory=str(site))
    try:
        return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise WorkbenchError(f"cannot listen on 127.0.0.1:{port} ({e.strerror or e}); pass another --port") from None


def docs_command(out: str | None = None, port: int = 8000, no_build: bool = False, no_open: bool = False,
                 build_only: bool = False) -> None:
    site = Path(out) if out else project_root() / "site"
    if not no_build:
        build(site)
    if build_only:
        print(f"built {site / 'index.html'}")
        return
    httpd = server(site, port)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    print(f"documentation at {url} (Ctrl-C stops)", flush=True)
    if not no_open:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
