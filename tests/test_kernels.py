"""Row-stats kernels: the torch reference against a brute-force Python loop, and Triton against the
reference (on CUDA; or on CPU under TRITON_INTERPRET=1 where triton is importable; else skipped)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from workbench.probes.kernels import row_stats
from workbench.probes.kernels.reference import row_stats_reference


def _brute(x: np.ndarray):
    out = []
    for row in x.astype(np.float64):
        best, arg = -1.0, 0
        for j, v in enumerate(row):
            if abs(v) > best:  # strict: first occurrence wins ties
                best, arg = abs(v), j
        out.append((best, arg, math.sqrt(sum(v * v for v in row))))
    return out


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 40)),
              elements=st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 0.125, 3.0, -7.0])))
def test_reference_matches_brute_force_with_ties(x):
    mx, arg, l2, _, _ = row_stats_reference(torch.from_numpy(x))
    for i, (b, a, n) in enumerate(_brute(x)):
        assert mx[i].item() == b
        assert arg[i].item() == a
        assert l2[i].item() == pytest.approx(n, rel=1e-6)


# Rows of every magnitude, tiny and subnormal ones included on every run (not by luck): each row is
# integers times 2^e, so its values are exact float32 and e reaches down to the subnormal grid 2^-149.
@st.composite
def _rows_of_any_magnitude(draw):
    n, h = draw(st.integers(1, 5)), draw(st.integers(1, 30))
    rows = []
    for _ in range(n):
        e = draw(st.one_of(st.integers(-149, -100), st.integers(-30, 30), st.sampled_from([-149, -140, -126, -120])))
        ints = draw(st.lists(st.integers(-(2 ** 20), 2 ** 20), min_size=h, max_size=h))
        rows.append([math.ldexp(v, e) for v in ints])
    return np.array(rows, dtype=np.float32)


def _check_int8(t: torch.Tensor):
    mx, _, _, q, scale = row_stats_reference(t, copy="int8")
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.all((scale > 0) == (mx > 0)) and torch.all(scale[mx == 0] == 0)  # never underflows to 0
    back = q.double() * scale.double()[:, None]
    # float64 product: exact for the tiny rows (q * k * 2^-149), so the bound is the quantisation alone
    assert torch.all((back - t.double()).abs() <= scale.double()[:, None] * 0.5 * (1 + 1e-6)), (t, q, scale)
    normal = mx >= 2.0 ** -119
    np.testing.assert_allclose(scale[normal].numpy(), mx[normal].numpy() / 127, rtol=1e-7)
    tiny = ~normal & (mx > 0)
    # tiny rows: scale = max/127 rounded up to the 2^-149 grid; the max maps to 127 unless that grid is coarse
    k = scale[tiny].double() / 2.0 ** -149
    assert torch.equal(k, torch.ceil(mx[tiny].double() / 2.0 ** -149 / 127))
    return q, scale


@settings(max_examples=40, deadline=None)
@given(st.one_of(arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 30)),
                        elements=st.floats(-1e3, 1e3, width=32)),
                 arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 30)),
                        elements=st.floats(-2.0 ** -120, 2.0 ** -120, width=32, allow_subnormal=True)),
                 _rows_of_any_magnitude()))
@example(np.array([[1e-45]], np.float32))  # found by hypothesis once: the scale underflowed to 0
@example(np.array([[1e-41, 3e-42]], np.float32))  # quantised to [127, 127]
@example(np.array([[0.0, 0.0], [1e-45, -1e-45], [3.7e-37, 1e-38]], np.float32))
@example(np.array([[-0.0, 0.0, 0.0]], np.float32))
def test_reference_int8_round_trip(x):
    _check_int8(torch.from_numpy(x))


def test_int8_tiny_rows_hand_worked():
    # 1e-41 is 7137 * 2^-149 and 3e-42 is 2141 * 2^-149 in float32; ceil(7137 / 127) = 57
    q, scale = _check_int8(torch.tensor([[1e-41, 3e-42], [1e-45, 0.0], [0.0, -0.0], [1.0, -0.5]]))
    assert q.tolist() == [[125, 38], [1, 0], [0, 0], [127, -64]]
    assert scale[0].item() == math.ldexp(57, -149) and scale[1].item() == math.ldexp(1, -149)
    assert scale[2].item() == 0 and scale[3].item() == np.float32(1 / 127)


@pytest.mark.parametrize("e", [-149, -140, -130, -126, -125, -122, -120, -119, -118, -110, -100, 0, 100])
def test_int8_every_magnitude(e):
    """The same integer row at every power-of-two scale: the quantised values agree while the scale
    is fine enough (2^e * 1000 / 127 >= 2^-149 * 2^23) and the error bound holds everywhere."""
    ints = torch.tensor([[1000.0, -999.0, 500.0, 3.0, 0.0, -1000.0]])
    q, scale = _check_int8(ints * 2.0 ** e)
    if e >= -119:
        assert q.tolist() == [[127, -127, 64, 0, 0, -127]]


def test_reference_scatter_and_fp16_copy():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 9, generator=g)
    perm = torch.randperm(7, generator=g)
    mx, arg, l2, cp, _ = row_stats_reference(x, out_index=perm, n_out=8, copy="fp16")
    plain = row_stats_reference(x)
    assert torch.equal(mx[perm], plain[0]) and torch.equal(arg[perm], plain[1]) and torch.equal(l2[perm], plain[2])
    assert mx[7] == 0 and arg[7] == 0 and l2[7] == 0  # a position no row maps to stays zero
    assert torch.equal(cp, x.half())


def _triton_device():
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
            return "cuda"
        except ImportError:
            return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
            return "cpu"
        except ImportError:
            return None
    return None


TRITON_DEV = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEV is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1 with triton)")

SHAPES = [(1, 1), (3, 17), (37, 100), (64, 2048), (5, 5000), (130, 768)]
if TRITON_DEV == "cuda":
    SHAPES += [(4096, 2048), (1000, 7168), (257, 16384)]
# every shape with bf16 and each copy format; the other dtypes on the statistics alone (compile time)
CASES = [(s, torch.bfloat16, c) for s in SHAPES for c in (None, "fp16", "int8")] + \
        [(s, d, None) for s in SHAPES for d in (torch.float32, torch.float16)]


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype,copy", CASES)
def test_triton_matches_reference(shape, dtype, copy):
    from workbench.probes.kernels.triton_stats import row_stats_triton

    g = torch.Generator().manual_seed(hash((shape, str(dtype), copy)) % 2**31)
    x = (torch.randn(shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 50).to(dtype)
    x[0, shape[1] // 2] = 300  # a planted outlier
    if shape[0] > 2 and shape[1] > 3:
        x[1, 1] = x[1, 3] = -900  # a planted tie: first occurrence must win
    n_out = shape[0] + 3
    perm = torch.randperm(shape[0], generator=g)
    xd, pd = x.to(TRITON_DEV), perm.to(TRITON_DEV)
    for idx in (None, pd):
        got = row_stats_triton(xd, out_index=idx, n_out=n_out if idx is not None else None, copy=copy)
        ref = row_stats_reference(x, out_index=perm if idx is not None else None,
                                  n_out=n_out if idx is not None else None, copy=copy)
        assert torch.equal(got[0].cpu(), ref[0])  # max of exactly representable values: exact
        assert torch.equal(got[1].cpu(), ref[1])
        torch.testing.assert_close(got[2].cpu(), ref[2], rtol=1e-5, atol=0)
        if copy == "fp16":
            assert torch.equal(got[3].cpu(), ref[3])
        if copy == "int8":
            assert (got[3].cpu().int() - ref[3].int()).abs().max() <= 1
            torch.testing.assert_close(got[4].cpu(), ref[4], rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,config", [(6, None), (3000, None), (3000, (1, 1024, 4)), (20000, None)])
def test_triton_int8_tiny_and_subnormal_rows(dtype, h, config):
    """Tiny and subnormal rows (and an all-zero one) quantise as the reference does, on the single-tile
    path, the two-pass path of wide rows, and a forced chunked config."""
    from workbench.probes.kernels.triton_stats import row_stats_triton

    if dtype == torch.bfloat16 and TRITON_DEV == "cpu":
        pytest.skip("Triton's interpreter converts bf16 subnormals to float32 wrongly (_convert_float); CUDA only")
    g = torch.Generator().manual_seed(h)
    base = torch.randint(-(2 ** 7), 2 ** 7, (8, h), generator=g).float()
    exps = torch.tensor([-149, -140, -133, -126, -121, -119, 0, 0])[:, None]
    x = (base * torch.pow(2.0, exps.float())).to(dtype)
    x[6] = 0
    x[7, :2] = torch.tensor([1e-41, 3e-42], dtype=torch.float32).to(dtype)
    x[7, 2:] = 0
    got = row_stats_triton(x.to(TRITON_DEV), copy="int8", config=config)
    ref = row_stats_reference(x, copy="int8")
    assert torch.equal(got[0].cpu(), ref[0])
    assert torch.equal(got[4].cpu()[:6], ref[4][:6])  # tiny rows: exact multiples of 2^-149
    assert got[4][6].item() == 0 and torch.all(got[3][6] == 0)  # all-zero row: scale 0, values 0
    assert (got[3].cpu().int() - ref[3].int()).abs().max() <= 1
    nonzero = (x[:6] != 0).any(dim=1)  # bf16 cannot hold 2^-149-scale values: such a row is all zero there
    assert torch.equal(got[4].cpu()[:6] > 0, nonzero)  # a scale never underflows to 0 on a non-zero row
    if dtype == torch.float32:
        assert got[3][7, :2].tolist() == [125, 38]


@needs_triton
@pytest.mark.gpu
def test_triton_strided_rows_and_configs():
    from workbench.probes.kernels.triton_stats import row_stats_triton

    g = torch.Generator().manual_seed(5)
    base = torch.randn(50, 300, generator=g)
    x = base[:, 20:220]  # row stride 300, not contiguous as a whole
    for cfg in [(1, 64, 1), (2, 128, 4), (16, 256, 8)]:
        got = row_stats_triton(x.to(TRITON_DEV), config=cfg)
        ref = row_stats_reference(x)
        assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])
        torch.testing.assert_close(got[2].cpu(), ref[2], rtol=1e-5, atol=0)


def test_dispatch_uses_reference_on_cpu():
    x = torch.randn(4, 8)
    for a, b in zip(row_stats(x)[:3], row_stats_reference(x)[:3]):
        assert torch.equal(a, b)
