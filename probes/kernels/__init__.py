"""Fused per-row statistics of activations: Triton on CUDA, a torch reference elsewhere.

`row_stats(x)` -> (maxabs f32[N], argmax i32[N], l2 f32[N], copy | None, scale | None).
Set WORKBENCH_KERNEL=reference to force the torch path on CUDA (debugging, A/B timing).
"""

from __future__ import annotations

import functools
import os

import torch

from .reference import row_stats_reference


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from . import triton_stats  # noqa: F401
    except Exception:  # triton missing or broken: the reference still gives the same numbers
        return False
    return True


def uses_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and os.environ.get("WORKBENCH_KERNEL", "auto") != "reference" and triton_available()


def row_stats(x: torch.Tensor, out_index: torch.Tensor | None = None, n_out: int | None = None,
              copy: str | None = None):
    """Per-row max |x|, first argmax channel, L2 norm, optional fp16/int8 copy; see reference.py."""
    if uses_triton(x):
        from .triton_stats import row_stats_triton

        return row_stats_triton(x, out_index=out_index, n_out=n_out, copy=copy)
    return row_stats_reference(x, out_index=out_index, n_out=n_out, copy=copy)


__all__ = ["row_stats", "row_stats_reference", "triton_available", "uses_triton"]
