"""Imports as classes of hostile input, generated (issue reliability-2, items 3 and 7): id overflow and
declared-size bombs. Either the run stores exactly what the input says, or the import is refused in one
sentence and leaves no folder; never a wrapped id, never an allocation the payload does not back.

Payloads as vLLM emits them (vllm/outputs.py CompletionOutput.routed_experts [tokens, layers, top_k]; the
OpenAI server from 0.22: base64 of np.save bytes, vllm/entrypoints/openai/protocol.py).
"""

from __future__ import annotations

import base64
import io
import itertools
import tracemalloc
from types import SimpleNamespace as NS

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.errors import WorkbenchError
from workbench.importers import import_routed_experts

_n = itertools.count()
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _out(tmp_path_factory):
    return tmp_path_factory.mktemp("bounds") / f"run{next(_n)}"


@SETTINGS
@given(expert=st.integers(0, 2**40).filter(lambda v: v != 2), token=st.integers(0, 2**40),
       n_experts=st.one_of(st.none(), st.integers(1, 70000)))
def test_ids_are_stored_exactly_or_refused(tmp_path_factory, expert, token, n_experts):
    ex = np.tile(np.array([[0, 1], [2, 3]], np.int64), (4, 1, 1))
    ex[2, 1, 1] = expert  # beside 2: a repeated id would read as an empty (zero-filled) row
    outputs = [NS(request_id="r", prompt_token_ids=[1, token, 3], outputs=[NS(index=0, token_ids=[4, 5],
                                                                              routed_experts=ex)])]
    out = _out(tmp_path_factory)
    E = n_experts if n_experts is not None else max(expert, 3) + 1
    ok = token <= 2**31 - 1 and max(expert, 3) < E <= 2**15 and (n_experts is None or n_experts <= 2**15)
    try:
        run = import_routed_experts(outputs, out, engine="vllm", n_experts=n_experts, progress=False)
    except WorkbenchError as e:
        assert not ok, e
        assert "\n" not in str(e) and not out.exists()
        return
    assert ok
    got = np.stack(run.routing.sort("pos", "layer").collect()["experts"].to_list())
    assert (got == ex.reshape(-1, 2)).all() and run.n_experts == E
    assert run.tokens.sort("pos").collect()["token_id"].to_list() == [1, token, 3, 4]


@SETTINGS
@given(shape=st.tuples(st.integers(0, 10**9), st.integers(1, 64), st.integers(1, 16)),
       dtype=st.sampled_from(["|u1", "<u2", "<i2", "<i4", "<i8"]), carried=st.integers(0, 4096))
def test_declared_npy_shapes_are_backed_by_bytes(tmp_path_factory, shape, dtype, carried):
    """A .npy header may declare any shape; the bytes after it decide. Refused unless they match, with
    no allocation of the declared size (np.load would make it first)."""
    hdr = io.BytesIO()
    np.lib.format.write_array_header_1_0(hdr, {"descr": dtype, "fortran_order": False, "shape": shape})
    payload = hdr.getvalue() + bytes(carried)
    resp = {"id": "c", "choices": [{"index": 0, "prompt_token_ids": [1, 2, 3], "token_ids": [4, 5],
                                    "routed_experts": base64.b64encode(payload).decode()}]}
    backed = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize == carried
    out = _out(tmp_path_factory)
    tracemalloc.start()
    try:
        import_routed_experts([resp], out, engine="vllm", progress=False)
    except WorkbenchError as e:
        assert "\n" not in str(e) and not out.exists()
        if not backed:
            assert "declares shape" in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64e6
