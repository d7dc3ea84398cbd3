"""MoE Workbench: capture, analyse and steer the experts of Mixture-of-Experts language models.

    import workbench as wb
    mm = wb.load_model("demo")                     # or a hub id / local folder
    run = wb.capture(mm, "calibration", "runs/cal", probes=["routing", "experts"])
    run.routing.collect()                          # polars: doc_id, pos, layer, experts, weights
    with mm.steer(ban="L3:E5"): ...                # interventions around forward / generate / capture
"""

from .capture import capture, capture_generate  # functions shadow the submodule name on purpose
from .errors import WorkbenchError
from .models.loading import MoEModel, load_model, wrap_model
from .store import Run, open_run

__all__ = ["MoEModel", "Run", "WorkbenchError", "capture", "capture_generate", "load_model", "open_run",
           "tiny", "wrap_model"]


def tiny(model_type: str, out, **kwargs):
    """Write a tiny random checkpoint (see `workbench tiny`); returns its folder."""
    from .models.tiny import make_tiny

    return make_tiny(model_type, out, **kwargs)
