"""Routing fidelity: are recorded routes what the model would choose, and how fragile are its choices?

- `replay(model, run)`: force a run's recorded routes (a capture, or a vLLM / SGLang import) on the model
  and measure per layer how often its own top-k agrees, and what the forced routes do to the next-token
  distribution and the loss.
- `stability(model, data, vary=...)`: the same tokens under other dtypes, batch sizes, experts
  implementations or devices; per layer the share of flipped decisions, first flips told apart from
  inherited ones, and the flip rate against each decision's router margin.

torch loads on first use, so `workbench --help` stays fast.
"""

import sys
import types

__all__ = ["replay", "stability"]


def __getattr__(name: str):
    if name in __all__:
        import importlib

        value = getattr(importlib.import_module(f".{name}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'workbench.fidelity' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule `fidelity.replay` must not replace the function `fidelity.replay` (the same
    for stability)."""

    def __setattr__(self, name, value):
        if name in __all__ and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
