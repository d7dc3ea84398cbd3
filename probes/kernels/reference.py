"""Torch reference for the fused row statistics: what the Triton kernel must reproduce.

For every row y of a [N, H] tensor: max |y|, the first channel reaching it, ||y||_2 (fp32
accumulation), and optionally a compact copy of the row (fp16, or int8 with a per-row scale
maxabs / 127, rounded half away from zero). Used on CPU and as the oracle in tests.

int8 for tiny rows: below max|y| = 2^-119 (~1.5e-36) 127 / max|y| overflows float32 and max|y| / 127
is subnormal (or 0 below ~8.9e-44), so such rows take a second path: the scale is max|y| / 127 rounded
*up* to a multiple of 2^-149 (the subnormal grid; never 0), and y / scale is computed on the row
scaled by 2^64 (exact), so no intermediate under- or overflows. Every row then satisfies
|q * scale - y| <= scale / 2 (+ float32 rounding of the product for normal rows); e.g. [1e-41, 3e-42]
-> q [125, 38], scale 57 * 2^-149. An all-zero row gives scale 0 and q 0. The Triton kernel does
the same arithmetic (int8_params below, mirrored there).
"""

from __future__ import annotations

import torch


TINY = 2.0 ** -119  # rows with 0 < max|y| < TINY quantise on the subnormal grid
_UP, _GRID = 2.0 ** 64, 2.0 ** -85  # row pre-scale (exact); 2^-149 on the pre-scaled row


def int8_params(mx: torch.Tensor):
    """Per row (pre, inv, scale) from max|y| (float32): q = round((y * pre) * inv), y ~ q * scale."""
    tiny = (mx < TINY) & (mx > 0)
    # tiny rows: k = ceil(max|y| * 2^149 / 127) steps of 2^-149, everything computed on the row * 2^64
    # (an integer ceil-division: m < 2^30 is exact in float32, m / 127 in float32 is not)
    m = (torch.where(tiny, mx * _UP, 0.0) * 2.0 ** 85).to(torch.int32)  # 0 elsewhere: no int overflow
    k = ((m + 126) // 127).float()
    step = torch.where(tiny, k * _GRID, 1.0)  # the scale on the pre-scaled row: normal, exact
    pre = torch.where(tiny, _UP, 1.0)
    inv = torch.where(tiny, 1.0 / step, torch.where(mx > 0, 127.0 / torch.where(mx > 0, mx, 1.0), 0.0))
    scale = torch.where(tiny, step * (1.0 / _UP), mx / 127.0)
    return pre.float(), inv.float(), scale.float()


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
        pre, inv, scale = int8_params(mx)
        q = (xf * pre[:, None]) * inv[:, None]
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
