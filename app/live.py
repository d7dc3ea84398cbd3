"""A dashboard that grows while it serves: runs are added as their captures finish.

`workbench demo` serves the first run as soon as it is captured and adds the others later; a run not
captured yet answers with a page that says where it stands and reloads itself. One WSGI entry point
dispatches `/<run name>/...` to that run's Dash app (each on its own Flask server, so an app can be
added after the first request, which Flask forbids on a server that has served one); every app sees
all of them through `server.workbench_apps` (the Compare page, the run switcher).
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

from .main import LOOPBACK_NAMES, install_host_check, make_app, wsgi_server
from .ui import CSS


class LiveDashboard:
    """WSGI app: `/` goes to the first ready run, `/<name>/` to that run's dashboard or its waiting page."""

    def __init__(self, names, service=None, allowed_hosts=LOOPBACK_NAMES):
        from flask import Flask, redirect

        self.names = list(names)
        self.prefixes = {n: f"/{n}/" for n in self.names}  # the run switcher of every app: same dict
        self.apps: dict = {}  # name -> Dash app, in the order they became ready
        self.state = {n: ("queued", None) for n in self.names}  # name -> (what is happening, since when)
        self.service = service
        self.allowed_hosts = allowed_hosts
        self._lock = threading.Lock()
        self.http = None  # the waitress server, once `start` has made it
        self.root = Flask("workbench")
        install_host_check(self.root, allowed_hosts)
        self.root.workbench_apps = self.apps
        self.root.workbench_live = self

        @self.root.route("/")
        def index():
            first = next(iter(self.apps), None) or self.names[0]
            return redirect(self.prefixes[first])

        @self.root.route("/<name>")
        @self.root.route("/<name>/")
        @self.root.route("/<name>/<path:rest>")
        def waiting(name, rest=""):
            if name in self.apps:  # became ready between dispatch and here, or the prefix without its slash
                return redirect(self.prefixes[name] + rest)
            if name not in self.prefixes:
                return "No such run here.", 404
            return self.waiting_page(name)

    def set_state(self, name: str, what: str) -> None:
        """What is happening to a run not served yet ("capturing 29,443 tokens", "queued")."""
        with self._lock:
            self.state[name] = (what, time.time())

    def add(self, name: str, path: str | Path, **app_kwargs):
        """Serve the captured run at `path` under `/<name>/`; returns its Dash app."""
        from flask import Flask

        server = Flask(f"workbench-{name}")
        install_host_check(server, self.allowed_hosts)
        server.workbench_apps = self.apps
        server.workbench_live = self  # pages name the runs still to come
        app = make_app(path, service=self.service, siblings=self.prefixes, server=server,
                       url_base_pathname=self.prefixes[name], **app_kwargs)
        with self._lock:
            self.apps[name] = app  # published whole: a request sees no app or a complete one
            self.state[name] = ("ready", time.time())
        return app

    def pending(self) -> list[str]:
        return [n for n in self.names if n not in self.apps]

    def waiting_page(self, name: str) -> str:
        what, since = self.state.get(name, ("queued", None))
        secs = f" (for {time.time() - since:.0f} s)" if since else ""
        links = " · ".join(f"<a href='{self.prefixes[n]}'>{html.escape(n)}</a>" + ("" if n in self.apps else " (waiting)")
                           for n in self.names)
        return (f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='2'>"
                f"<title>MoE Workbench: {html.escape(name)}</title><style>{CSS}</style></head><body>"
                f"<div id='wb-nav'><span class='brand'>MoE Workbench</span>"
                f"<span style='color:#8b93a7;font-size:13px'>runs: {links}</span></div>"
                f"<div id='wb-page'><h2>Run {html.escape(name)}</h2><div class='computing'>This run is not captured "
                f"yet: {html.escape(what)}{secs}. This page reloads every 2 s and becomes the run's dashboard "
                f"when the capture is done; the runs above without '(waiting)' are ready now.</div></div>"
                "</body></html>")

    def __call__(self, environ, start_response):
        seg = (environ.get("PATH_INFO") or "/").lstrip("/").split("/", 1)[0]
        app = self.apps.get(seg)
        rest = (environ.get("PATH_INFO") or "/").lstrip("/")[len(seg):]
        if app is not None and rest.startswith("/"):
            return app.server.wsgi_app(environ, start_response)
        return self.root.wsgi_app(environ, start_response)


def start(dashboard: LiveDashboard, host: str = "127.0.0.1", port: int = 8050):
    """Serve `dashboard` through waitress on a daemon thread; returns (server, url)."""
    srv = dashboard.http = wsgi_server(dashboard, host=host, port=port)
    threading.Thread(target=srv.run, name="workbench-http", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    return srv, f"http://{shown}:{getattr(srv, 'effective_port', port)}/"
