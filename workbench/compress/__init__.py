"""From "which experts matter" to a smaller model: saliency, pruning and merging into real checkpoints,
and their evaluation on held-out text (docs/guides/compress.md)."""

from .prune import exactness, load_info, prune
from .saliency import CRITERIA

__all__ = ["CRITERIA", "exactness", "load_info", "prune"]
