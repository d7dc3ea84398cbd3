"""Model loading and the per-family adapter table."""

from .families import FAMILIES, Family
from .loading import MoEModel, load_model, resolve_model_path

__all__ = ["FAMILIES", "Family", "MoEModel", "load_model", "resolve_model_path"]
