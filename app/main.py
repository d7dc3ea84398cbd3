"""The Dash app: one shell (navigation + router), one module per page, all state per run cached."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

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


def make_app(run, model=None, analysis_options: dict | None = None, warm=("stats",), **dash_kwargs) -> Dash:
    """The dashboard for `run` (a Run or a run folder); `model` (MoEModel or spec) enables the Steering lab.

    In Jupyter: `make_app("runs/cal", model="demo").run(jupyter_mode="inline")`.
    `analysis_options` maps an analysis name to keyword arguments for its `analyze`.
    """
    if not isinstance(run, Run):
        run = open_run(run)
    mm = None
    if model is not None:
        if isinstance(model, str):
            from ..models.loading import load_model

            mm = load_model(model)
        else:
            mm = model
    app = Dash(__name__, title="MoE Workbench", suppress_callback_exceptions=True, index_string=INDEX,
               update_title=None, **dash_kwargs)
    ctx = AppContext(app=app, data=RunData(run, analysis_options), service=ModelService(mm) if mm else None)
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
        nav.append(html.Span(f"run: {run.path.name}", style={"color": "#8b93a7", "marginLeft": "auto",
                                                              "fontSize": "13px"}))
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


def serve(run_path, model=None, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    """`workbench app RUN [--model MODEL]`: serve the dashboard (loopback only unless `host` says otherwise)."""
    app = make_app(run_path, model=model)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"workbench: serving on {host}:{port}; the dashboard has no login, anyone who reaches it can "
              "use the model")
    # No version check: it calls plotly's server from the browser, and the workbench runs offline.
    app.run(host=host, port=port, debug=debug, dev_tools_hot_reload=False, dev_tools_disable_version_check=True)

