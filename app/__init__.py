"""The MoE Workbench dashboard (Dash): every analysis of a run, plus a live Steering lab.

    workbench app RUN [--model MODEL]                    # serve on http://127.0.0.1:8050
    from workbench.app import make_app
    make_app("runs/cal", model="demo").run(jupyter_mode="inline")   # inside Jupyter
"""

from .main import make_app, serve

__all__ = ["make_app", "serve"]
