"""MoE Workbench: capture, analyse and steer the experts of Mixture-of-Experts language models.

    import workbench as wb
    mm = wb.load_model("demo")                     # or a hub id / local folder
    run = wb.capture(mm, "calibration", "runs/cal", probes=["routing", "experts"])
    run.routing.collect()                          # polars: doc_id, pos, layer, experts, weights
    with mm.steer(ban="L3:E5"): ...                # interventions around forward / generate / capture
"""

import sys
import types

from .errors import WorkbenchError

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("moe-workbench")
except PackageNotFoundError:  # a plain checkout that was never installed
    __version__ = "0+unknown"

# torch, transformers and polars load on first use, so `workbench --help` and argument errors stay fast.
_LAZY = {"capture": ".capture", "capture_generate": ".capture", "MoEModel": ".models.loading",
         "load_model": ".models.loading", "wrap_model": ".models.loading", "Run": ".store", "open_run": ".store",
         "replay": ".fidelity", "stability": ".fidelity"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # `capture` the function replaces the submodule attribute on purpose
        return value
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """Importing the submodule `workbench.capture` must not replace the function `workbench.capture`."""

    def __setattr__(self, name, value):
        if name == "capture" and isinstance(value, types.ModuleType):
            value = value.capture
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["MoEModel", "Run", "WorkbenchError", "capture", "capture_generate", "dataset", "load_model", "open_run",
           "replay", "stability", "tiny", "wrap_model"]


def dataset(data, where: dict | None = None, first_keys: int | None = None, limit: int | None = None):
    """A bundled dataset name or file, optionally narrowed: `wb.dataset("multilingual", where={"lang":
    ["en", "de"]}, first_keys=20)` keeps 20 aligned paragraphs in English and German."""
    from .data import load_dataset, subset

    ds = load_dataset(data)
    if where is None and first_keys is None and limit is None:
        return ds
    return subset(ds, where=where, first_keys=first_keys, limit=limit)  # limit=0 is refused there, not "all"


def tiny(model_type: str, out, **kwargs):
    """Write a tiny random checkpoint (see `workbench tiny`); returns its folder."""
    from .models.tiny import make_tiny

    return make_tiny(model_type, out, **kwargs)


def import_routed_experts(outputs, out, engine=None, model=None, **kwargs):
    """Routing a serving engine recorded (vLLM `RequestOutput`s, SGLang response dicts or recorder
    dumps, or files of them) as a run; see `workbench.importers.import_routed_experts`."""
    from .importers import import_routed_experts as _imp

    return _imp(outputs, out, engine=engine, model=model, **kwargs)
