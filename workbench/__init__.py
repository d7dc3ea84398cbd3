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

__all__ = ["MoEModel", "Run", "WorkbenchError", "capture", "capture_generate", "dataset", "load_model", "open_run",
           "tiny", "wrap_model"]


def dataset(data, where: dict | None = None, first_keys: int | None = None, limit: int | None = None):
    """A bundled dataset name or file, optionally narrowed: `wb.dataset("multilingual", where={"lang":
    ["en", "de"]}, first_keys=20)` keeps 20 aligned paragraphs in English and German."""
    from .data import load_dataset, subset

    ds = load_dataset(data)
    return subset(ds, where=where, first_keys=first_keys, limit=limit) if (where or first_keys or limit) else ds


def tiny(model_type: str, out, **kwargs):
    """Write a tiny random checkpoint (see `workbench tiny`); returns its folder."""
    from .models.tiny import make_tiny

    return make_tiny(model_type, out, **kwargs)
