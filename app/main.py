"""The Dash app: one shell (navigation + router), one module per page, all state per run cached."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from dash import Dash, Input, Output, dcc, html

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
    from . import analyses, export, overview, steering_lab, tokens

    return [overview.PAGE, tokens.PAGE, *analyses.PAGES, steering_lab.PAGE, export.PAGE]


def _model(model, device: str | None = None, dtype: str | None = None):
    """A loaded MoEModel from a spec (or the model itself)."""
    if isinstance(model, str):
        from ..models.loading import load_model

        return load_model(model, device=device, dtype=dtype)
    return model


def make_app(run, model=None, analysis_options: dict | None = None, warm=("stats",), *,
             service: ModelService | None = None, siblings: dict[str, str] | None = None, **dash_kwargs) -> Dash:
    """The dashboard for `run` (a Run or a run folder); `model` (MoEModel or spec) enables the Steering lab.

    In Jupyter: `make_app("runs/cal", model="demo").run(jupyter_mode="inline")`.
    `analysis_options` maps an analysis name to keyword arguments for its `analyze`.
    `service` shares one loaded model between several apps; `siblings` (run name -> URL prefix) adds a
    run switcher to the navigation (see `make_multi_app`).
    """
    if not isinstance(run, Run):
        run = open_run(run)
    if service is None and model is not None:
        service = ModelService(_model(model))
    app = Dash(__name__, title="MoE Workbench", suppress_callback_exceptions=True, index_string=INDEX,
               update_title=None, **dash_kwargs)
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
            html.Div(id="wb-page"),
        ])

    app.layout = shell

    @app.callback(Output("wb-page", "children"), Output("wb-nav", "children"), Input("url", "pathname"))
    def route(pathname):
        rel = "/" + (app.strip_relative_path(pathname or "/") or "").strip("/")
        page = by_path.get(rel)
        nav = [html.Span("MoE Workbench", className="brand")]
        nav += [dcc.Link(p.title, href=ctx.href(p.path), className="active" if p is page else "") for p in pages]
        nav.append(_run_switch(run.path.name, siblings, page.path if page else "/"))
        if page is None:
            return html.Div([html.H2("Page not found"), dcc.Link("back to the overview", href=ctx.href("/"))]), nav
        try:
            return page.layout(ctx), nav
        except WorkbenchError as e:
            from .state import Unavailable
            from .ui import notice

            return notice(Unavailable(str(e))), nav

    for p in pages:
        p.register(app, ctx)
    from .analyses import register_async

    register_async(app, ctx)
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


def make_multi_app(runs, model=None, analysis_options: dict | None = None, warm=("stats",)):
    """One server, one app per run under `/<run name>/`, one shared model; `/` goes to the first run.

    Returns the Flask server; `server.workbench_apps` maps run name -> Dash app.
    """
    from flask import Flask, redirect

    paths = _run_names(resolve_runs(runs))
    server = Flask("workbench")
    service = ModelService(_model(model)) if model is not None else None
    prefixes = {name: f"/{name}/" for name in paths}
    apps = {name: make_app(path, analysis_options=analysis_options, warm=warm, service=service, siblings=prefixes,
                           server=server, url_base_pathname=prefixes[name]) for name, path in paths.items()}
    first = next(iter(prefixes.values()))
    server.add_url_rule("/", "workbench_index", lambda: redirect(first))
    server.workbench_apps = apps
    return server


def serve(run_path, model=None, host: str = "127.0.0.1", port: int = 8050, debug: bool = False,
          device: str | None = None, dtype: str | None = None) -> None:
    """`workbench app RUN [RUN ...] [--model MODEL]`: serve the dashboard (loopback only unless `host` says otherwise).

    Several runs (or a folder of runs) share one server and one model, with a run switcher in the bar.
    """
    runs = resolve_runs(run_path)
    model = _model(model, device, dtype)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"workbench: serving on {host}:{port}; the dashboard has no login, anyone who reaches it can "
              "use the model")
    if len(runs) > 1:
        server = make_multi_app(runs, model=model)
        print(f"workbench: {len(runs)} runs on http://{host}:{port}/ : " + ", ".join(server.workbench_apps))
        server.run(host=host, port=port, debug=debug, threaded=True)
        return
    app = make_app(runs[0], model=model)
    # No version check: it calls plotly's server from the browser, and the workbench runs offline.
    app.run(host=host, port=port, debug=debug, dev_tools_hot_reload=False, dev_tools_disable_version_check=True)
