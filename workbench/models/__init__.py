"""Model loading, the per-family adapter table, and the named hook sites."""

from .families import FAMILIES, Family
from .hooks import RouterOut, RoutingTrace, decoder_layers
from .loading import MoEModel, load_model, resolve_model_path

__all__ = ["FAMILIES", "Family", "MoEModel", "RouterOut", "RoutingTrace", "decoder_layers", "load_model",
           "resolve_model_path"]
