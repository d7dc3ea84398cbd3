"""The Dash app: one shell (navigation + router), one module per page, all state per run cached."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from dash import Dash, Input, Output, dcc, html, set_props

from ..errors import WorkbenchError
from ..store import Run, open_run
from .service import ModelService
from .state import RunData
from .ui import INDEX

log = logging.getLogger("workbench.app")


@dataclass
class AppContext:
    """What every page callback needs; one per app (the run is fixed when the app is made)."""

    app: Dash
    data: RunData
    service: ModelService | None

    @property
    def run(self) -> Run:
        return self.data.run

    def href(self, path: str) -> str:
        return self.app.get_relative_path(path)


def _pages():
    from . import analyses, compare, export, fidelity, overview, placement, pruning, steering_lab, tokens

    return [overview.PAGE, tokens.PAGE, *analyses.PAGES, placement.PAGE, compare.PAGE, fidelity.PAGE, steering_lab.PAGE,
            pruning.PAGE, export.PAGE]


def _model(model, device: str | None = None, dtype: str | None = None):
    """A loaded MoEModel from a spec (or the model itself)."""
    if isinstance(model, str):
        from ..models.loading import load_model

        return load_model(model, device=device, dtype=dtype)
    return model


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def is_loopback(host: str) -> bool:
    import ipaddress

    host = (host or "").strip("[]").lower()
    if host in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts_for(host: str, extra=()) -> tuple[str, ...] | str:
    """The Host header names a server bound to `host` answers to (see `install_host_check`).

    Loopback names always; the bound name itself; for a wildcard bind ("0.0.0.0", "::") also this
    machine's names. IP literals of any address are accepted then too (a DNS-rebinding page can only
    send a host *name*, so literals are safe).
    """
    import socket

    names = {*LOOPBACK_NAMES, *(h.lower() for h in extra)}
    if host not in WILDCARD_HOSTS:
        names.add(host.strip("[]").lower())
    else:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower(), "<ip>"}
    return tuple(sorted(names))


def _host_name(header: str) -> str:
    """'Example.com:8050' -> 'example.com'; '[::1]:8050' -> '::1'."""
    h = (header or "").strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def install_host_check(server, allowed=LOOPBACK_NAMES) -> None:
    """Answer only requests whose Host header names this server (against DNS rebinding: a web page on
    evil.example that re-points its name at 127.0.0.1 would otherwise read a loopback dashboard).

    `allowed`: host names ("<ip>" = any IP literal), or "*" to accept any (behind a proxy you trust).
    Calling it again on the same Flask server replaces the list (several apps can share one server).
    """
    import ipaddress

    from flask import request

    server.workbench_allowed_hosts = allowed
    if getattr(server, "_workbench_host_check", False):
        return
    server._workbench_host_check = True

    @server.before_request
    def _check_host():
        names = server.workbench_allowed_hosts
        if names == "*":
            return None
        host = _host_name(request.host)
        if host in names or is_loopback(host):
            return None
        if "<ip>" in names:
            try:
                ipaddress.ip_address(host)
                return None
            except ValueError:
                pass
        return (f"This dashboard does not answer to the host name {host!r}; open it through one of: "
                + ", ".join(n for n in names if n != "<ip>") + " (or serve it with --host NAME).\n",
                403, {"Content-Type": "text/plain; charset=utf-8"})


MAX_REQUEST_BYTES = 8 << 20  # every request body: Dash callbacks send kilobytes; waitress allowed 1 GB


def _text(msg: str, code: int):
    return msg.rstrip() + "\n", code, {"Content-Type": "text/plain; charset=utf-8"}


def install_request_limits(server, max_bytes: int = MAX_REQUEST_BYTES) -> None:
    """Cap request bodies (Flask answers 413 before reading more) and answer malformed requests with a
    4xx and one sentence instead of an HTML error page or a 500 (waitress caps bodies too: wsgi_server)."""
    if getattr(server, "_workbench_limits", False):
        return
    server._workbench_limits = True
    server.config["MAX_CONTENT_LENGTH"] = max_bytes
    server.register_error_handler(413, lambda e: _text(
        f"Request refused: its body is larger than the dashboard accepts ({max_bytes >> 20} MB).", 413))
    server.register_error_handler(400, lambda e: _text(
        "Bad request: the body is not valid JSON of a dashboard callback.", 400))
    server.register_error_handler(415, lambda e: _text(
        "Unsupported request: dashboard callbacks send application/json.", 415))
    server.register_error_handler(405, lambda e: _text("This address does not accept that method.", 405))


def _dash_body_problem(body, callback_map) -> str | None:
    """Why a POST to _dash-update-component is not a callback request of this app, or None."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    out = body.get("output")
    if not isinstance(out, str) or out not in callback_map:
        return "it names no callback of this dashboard"
    if not isinstance(body.get("outputs"), (dict, list)):
        return "its outputs are malformed"
    for key in ("inputs", "state", "changedPropIds"):
        v = body.get(key, [])
        if not isinstance(v, list):
            return f"its {key} is not a list"
    for item in body.get("inputs", []) + body.get("state", []):
        rows = item if isinstance(item, list) else [item]  # pattern-matching inputs come as lists
        if not all(isinstance(r, dict) and "id" in r and isinstance(r.get("property"), str) for r in rows):
            return "an input or state entry is malformed"
    if not all(isinstance(c, str) for c in body.get("changedPropIds", [])):
        return "its changedPropIds are malformed"
    spec = callback_map[out]
    for key in ("inputs", "state"):
        if isinstance(spec.get(key), list) and len(body.get(key, [])) != len(spec[key]):
            return f"its {key} do not match the callback's ({len(spec[key])} expected)"
    return None


def guard_callbacks(app) -> None:
    """Wrap the app's callback endpoint: a request that is not one of its callbacks (wrong shape, unknown
    output) gets 400 and a sentence; an error in Dash's own dispatch (malformed values it trips on) too.
    Errors inside a callback are not affected: `_on_callback_error` shows them on the page."""
    from dash.exceptions import DashException, PreventUpdate
    from flask import request

    endpoint = app.config.routes_pathname_prefix + "_dash-update-component"
    view = app.server.view_functions.get(endpoint)
    if view is None or getattr(view, "_workbench_guarded", False):
        return

    def guarded(*args, **kwargs):
        body = request.get_json(silent=True)  # None for invalid JSON; 413 raised for an oversized body
        why = _dash_body_problem(body, app.callback_map)
        if why:
            return _text(f"Bad request: {why}.", 400)
        try:
            return view(*args, **kwargs)
        except PreventUpdate:
            raise
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, DashException) as e:
            log.warning("malformed dashboard request: %s: %s", type(e).__name__, e)
            return _text(f"Bad request: the callback's values are malformed ({type(e).__name__}).", 400)
        except BaseException as e:  # a Rust panic in polars (pyo3's PanicException is no Exception)
            if type(e).__name__ != "PanicException":
                raise
            log.error("a library panicked while reading the run", exc_info=e)
            return _text("The run could not be read (a library panicked); if it was being replaced, reload the "
                         "page once that has finished.", 503)

    guarded._workbench_guarded = True
    app.server.view_functions[endpoint] = guarded


def _on_callback_error(err: Exception):
    """Any exception in a page callback: show one sentence in the page's error bar instead of HTTP 500.

    A WorkbenchError (bad input, damaged run part) is shown as it is; anything else says its type and
    goes to the server log with its traceback.
    """
    from dash import set_props

    if isinstance(err, WorkbenchError):
        msg = str(err)
    else:
        log.error("dashboard callback failed", exc_info=err)
        msg = f"Something failed on the server ({type(err).__name__}: {err}); the details are in the server log."
    set_props("wb-error", {"children": msg, "style": {"display": "block"}})
    return None  # every output of the failed callback: no_update


def _preload() -> None:
    """Import, on this thread, the libraries that other libraries look up in sys.modules without importing.

    plotly (through narwhals) checks `sys.modules.get("pandas")`: while an analysis on the background
    worker is importing pandas for the first time, a request thread drawing a figure would find it half
    initialised ("partially initialized module 'pandas' has no attribute 'Series'"; seen under load).
    """
    import importlib

    for name in ("pandas", "pyarrow", "pyarrow.parquet"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def make_app(run, model=None, analysis_options: dict | None = None, warm=("stats",), *,
             service: ModelService | None = None, siblings: dict[str, str] | None = None,
             allowed_hosts=LOOPBACK_NAMES, **dash_kwargs) -> Dash:
    """The dashboard for `run` (a Run or a run folder); `model` (MoEModel or spec) enables the Steering lab.

    In Jupyter: `make_app("runs/cal", model="demo").run(jupyter_mode="inline")`.
    `analysis_options` maps an analysis name to keyword arguments for its `analyze`.
    `service` shares one loaded model between several apps; `siblings` (run name -> URL prefix) adds a
    run switcher to the navigation (see `make_multi_app`). `allowed_hosts`: the Host names the server
    answers to (loopback only by default; "*" behind a proxy such as JupyterHub's).
    """
    if not isinstance(run, Run):
        run = open_run(run)
    _preload()
    if service is None and model is not None:
        service = ModelService(_model(model))
    app = Dash(__name__, title="MoE Workbench", suppress_callback_exceptions=True, index_string=INDEX,
               update_title=None, on_error=_on_callback_error, **dash_kwargs)
    if "server" not in dash_kwargs:  # a shared server gets its check from whoever made it
        install_host_check(app.server, allowed_hosts)
    install_request_limits(app.server)
    ctx = AppContext(app=app, data=RunData(run, analysis_options), service=service)
    app.workbench = ctx  # tests and notebooks reach the caches through this
    pages = _pages()
    by_path = {p.path: p for p in pages}

    def shell():
        return html.Div([
            dcc.Location(id="url", refresh=False),
            # Per browser tab: the steering toggles and an id so a newer request supersedes an older one.
            dcc.Store(id="steer-state", storage_type="session", data={"items": []}),
            dcc.Store(id="session-id", storage_type="session", data=uuid.uuid4().hex),
            html.Div(id="wb-nav"),
            # Filled by _on_callback_error: a failed callback says what went wrong here, never HTTP 500.
            html.Div(id="wb-error", className="notice failed", style={"display": "none"}),
            html.Div(id="wb-page"),
        ])

    app.layout = shell

    @app.callback(Output("wb-page", "children"), Output("wb-nav", "children"), Input("url", "pathname"))
    def route(pathname):
        pathname = pathname if isinstance(pathname, str) else "/"  # a malformed request's value: the overview
        rel = "/" + (app.strip_relative_path(pathname or "/") or "").strip("/")
        page = by_path.get(rel)
        set_props("wb-error", {"children": "", "style": {"display": "none"}})  # an old error: gone on navigation
        nav = [html.Span("MoE Workbench", className="brand")]
        nav += [dcc.Link(p.title, href=ctx.href(p.path), className="active" if p is page else "") for p in pages]
        nav.append(_run_switch(run.path.name, siblings, page.path if page else "/"))
        if page is None:
            return html.Div([html.H2("Page not found"), dcc.Link("back to the overview", href=ctx.href("/"))]), nav
        from .state import Unavailable
        from .ui import notice

        try:
            return page.layout(ctx), nav
        except WorkbenchError as e:  # e.g. a damaged part of the run: the sentence names it
            return notice(Unavailable(str(e))), nav
        except Exception as e:  # a bug in one page must not take the dashboard down
            log.error("page %s failed", rel, exc_info=e)
            return notice(Unavailable(f"This page failed: {type(e).__name__}: {e} (details in the server log).",
                                      kind="failed")), nav

    for p in pages:
        p.register(app, ctx)
    from .analyses import register_async

    register_async(app, ctx)
    guard_callbacks(app)
    if warm:
        ctx.data.warm([w for w in warm])
    return app


def _run_switch(current: str, siblings: dict[str, str] | None, page_path: str):
    style = {"color": "#8b93a7", "marginLeft": "auto", "fontSize": "13px"}
    if not siblings or len(siblings) < 2:
        return html.Span(f"run: {current}", style=style)
    # Plain links (full page load): each run is its own Dash app under its own prefix.
    links = [html.A(name, href=prefix.rstrip("/") + page_path, className="run-link",
                    style={"fontWeight": "bold", "color": "#e6e6e6"} if name == current else
                    {"color": "#8b93a7", "marginLeft": "0"}) for name, prefix in siblings.items()]
    out = [html.Span("runs: ", style={"marginRight": "4px"})]
    for i, a in enumerate(links):
        out += ([html.Span(" · ")] if i else []) + [a]
    return html.Span(out, id="wb-runs", style=style)


def _run_names(paths: list[Path]) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for p in paths:
        name, i = p.name or "run", 2
        while name in names:
            name, i = f"{p.name}-{i}", i + 1
        names[name] = p
    return names


def resolve_runs(paths) -> list[Path]:
    """Run folders from CLI arguments: a run folder, or a folder of runs (e.g. `demo_out/runs`)."""
    out: list[Path] = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if (p / "manifest.json").exists():
            out.append(p)
        elif p.is_dir() and (found := sorted(q.parent for q in p.glob("*/manifest.json"))):
            out.extend(found)
        else:
            raise WorkbenchError(f"{p} is not a run folder (no manifest.json) nor a folder of runs")
    return out


def make_multi_app(runs, model=None, analysis_options: dict | None = None, warm=("stats",),
                   allowed_hosts=LOOPBACK_NAMES):
    """One server, one app per run under `/<run name>/`, one shared model; `/` goes to the first run.

    Returns the Flask server; `server.workbench_apps` maps run name -> Dash app.
    """
    from flask import Flask, redirect

    paths = _run_names(resolve_runs(runs))
    server = Flask("workbench")
    install_host_check(server, allowed_hosts)
    install_request_limits(server)
    service = ModelService(_model(model)) if model is not None else None
    prefixes = {name: f"/{name}/" for name in paths}
    apps = {name: make_app(path, analysis_options=analysis_options, warm=warm, service=service, siblings=prefixes,
                           server=server, url_base_pathname=prefixes[name]) for name, path in paths.items()}
    first = next(iter(prefixes.values()))
    server.add_url_rule("/", "workbench_index", lambda: redirect(first))
    server.workbench_apps = apps
    return server


def check_serve_options(host: str, debug: bool = False, allow_remote: bool = False) -> None:
    """Refuse, in one sentence, what would expose the dashboard by accident (checked before any loading)."""
    if not is_loopback(host) and not allow_remote:
        raise WorkbenchError(f"--host {host} makes the dashboard reachable from other machines, with no login "
                             "(and, with --model, a live model); pass --allow-remote to confirm")
    if debug and not is_loopback(host):
        raise WorkbenchError("--debug turns on the Werkzeug debugger, which runs Python code for whoever opens "
                             "the page; it only binds a loopback --host")


def wsgi_server(server, host: str = "127.0.0.1", port: int = 8050, threads: int = 8):
    """A waitress server for the Flask `server` (not started: call `.run()`; `.close()` stops it).

    waitress, not Flask's development server (which says itself it is not for deployment): a fixed
    pool of request threads, bounded connections, no debugger. Port 0 picks a free port
    (`.effective_port`).
    """
    from waitress import create_server

    return create_server(server, host=host, port=port, threads=threads, ident="workbench",
                         connection_limit=200, channel_timeout=60, clear_untrusted_proxy_headers=True,
                         max_request_body_size=MAX_REQUEST_BYTES)


def serve(run_path, model=None, host: str = "127.0.0.1", port: int = 8050, debug: bool = False,
          device: str | None = None, dtype: str | None = None, allow_remote: bool = False,
          allowed_hosts=(), threads: int = 8) -> None:
    """`workbench app RUN [RUN ...] [--model MODEL]`: serve the dashboard through waitress.

    Loopback only unless `host` says otherwise and `allow_remote` confirms it; requests must name an
    allowed host (`install_host_check`; `allowed_hosts` adds names, e.g. a reverse proxy's). Several
    runs (or a folder of runs) share one server and one model, with a run switcher in the bar.
    `debug` uses Flask's development server with the Werkzeug debugger instead (with a warning).
    """
    import sys

    check_serve_options(host, debug, allow_remote)
    runs = resolve_runs(run_path)
    model = _model(model, device, dtype)
    allowed = allowed_hosts_for(host, allowed_hosts)
    if not is_loopback(host):
        print(f"workbench: serving on {host}:{port}; the dashboard has no login, anyone who reaches it can "
              "use the model", file=sys.stderr)
    if debug:
        print("workbench: warning: --debug serves through Flask's development server with the Werkzeug "
              "debugger, which runs Python code for anyone who can open the page (other users of this machine "
              "included); use it only to debug", file=sys.stderr)
    if len(runs) > 1:
        server = make_multi_app(runs, model=model, allowed_hosts=allowed)
        print(f"workbench: {len(runs)} runs: " + ", ".join(server.workbench_apps))
        if debug:
            server.run(host=host, port=port, debug=True, threaded=True)
            return
    else:
        app = make_app(runs[0], model=model, allowed_hosts=allowed)
        if debug:
            # No version check: it calls plotly's server from the browser, and the workbench runs offline.
            app.run(host=host, port=port, debug=True, dev_tools_hot_reload=False,
                    dev_tools_disable_version_check=True)
            return
        server = app.server
    srv = wsgi_server(server, host=host, port=port, threads=threads)
    shown = f"[{host}]" if ":" in host else host
    print(f"workbench: dashboard on http://{shown}:{getattr(srv, 'effective_port', port)}/ (Ctrl-C to stop)",
          flush=True)
    try:
        srv.run()
    finally:
        srv.close()
