"""Torch reference for the fused row statistics: what the Triton kernel must reproduce.

For every row y of a [N, H] tensor: max |y|, the first channel reaching it, ||y||_2 (fp32
accumulation), and optionally a compact copy of the row (fp16, or int8 with a per-row scale
maxabs / 127, rounded half away from zero). Used on CPU and as the oracle in tests.
"""

from __future__ import annotations

import torch


def row_stats_reference(x: torch.Tensor, out_index: torch.Tensor | None = None, n_out: int | None = None,
                        copy: str | None = None):
    """Returns (maxabs f32, argmax i32, l2 f32, copy or None, scale or None).

    out_index: stats of row i go to position out_index[i] of outputs of length n_out (a scatter,
    so the caller can undo a permutation for free); the copy keeps the input row order.
    """
    if x.ndim != 2:
        raise ValueError(f"row_stats expects a 2-D tensor, got shape {tuple(x.shape)}")
    xf = x.float()
    a = xf.abs()
    n, h = xf.shape
    if h == 0:
        raise ValueError("row_stats needs at least one column")
    arg = a.argmax(dim=1)  # documented: first occurrence of the maximum
    mx = a.gather(1, arg[:, None])[:, 0]
    l2 = xf.pow(2).sum(dim=1).sqrt()
    arg = arg.to(torch.int32)
    cp = scale = None
    if copy == "fp16":
        cp = x.to(torch.float16)
    elif copy == "int8":
        scale = mx / 127.0
        inv = torch.where(mx > 0, 127.0 / mx, torch.zeros_like(mx))
        q = xf * inv[:, None]
        cp = (torch.sign(q) * torch.floor(q.abs() + 0.5)).clamp_(-127, 127).to(torch.int8)
    elif copy is not None:
        raise ValueError(f"unknown copy format {copy!r}; use fp16 or int8")
    if out_index is not None:
        m = n if n_out is None else n_out
        outs = []
        for v in (mx, arg, l2):
            o = torch.zeros(m, dtype=v.dtype, device=v.device)
            o[out_index.long()] = v
            outs.append(o)
        mx, arg, l2 = outs
    return mx, arg, l2, cp, scale
