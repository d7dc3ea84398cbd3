"""From "which experts matter" to a smaller model: saliency, pruning and merging into real checkpoints,
and their evaluation on held-out text (docs/guides/compress.md).

Submodules load on first use (`workbench.compress.prune`, ...), so the CLI's parser stays light.
"""

from __future__ import annotations

import importlib

# functions named like their modules (prune.prune, merge.merge, evaluate.evaluate) are reached through the
# modules: once imported, a submodule shadows a package attribute of the same name
_LAZY = {"exactness": "prune", "load_info": "prune", "scores": "saliency", "CRITERIA": "saliency"}


def __getattr__(name):
    if name in _LAZY:
        mod = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(mod, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
