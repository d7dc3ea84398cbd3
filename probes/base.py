"""What every probe shares: the batch being processed, and the probe protocol.

A probe hooks the model, keeps what it sees on the device during the forward, hands device tensors
over in `harvest` (the engine copies them to pinned host memory asynchronously, so the GPU never
waits), and turns the host arrays into an Arrow table in `to_table`, on the writer thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch


@dataclass
class BatchContext:
    """The forward in flight. `valid` indexes the non-padding tokens of the flattened [B*S] batch."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    valid: torch.Tensor  # [Tv] long, on the model's device
    doc_ids: np.ndarray  # [B] int64
    pos: np.ndarray  # [Tv] int32, position of each valid token in its sequence
    doc: np.ndarray  # [Tv] int64
    phase: str = "prefill"
    extra: dict = field(default_factory=dict)

    @property
    def n_valid(self) -> int:
        return int(self.pos.shape[0])


@dataclass
class BatchMeta:
    """The host-side part of a BatchContext, safe to hand to the writer thread."""

    doc: np.ndarray
    pos: np.ndarray
    doc_ids: np.ndarray
    lengths: np.ndarray
    phase: str


class Probe:
    """Base class; subclasses fill `table`, `attach`, `harvest`, `to_table`."""

    table: str = ""
    tables: tuple[str, ...] = ()  # extra tables a probe may write (dumps)

    def __init__(self) -> None:
        self.handles: list = []
        self.ctx: BatchContext | None = None
        self.fired: set[int] = set()

    def check(self, mm) -> None:
        """Refuse settings this model cannot honour; called before the run folder is touched."""

    def attach(self, mm) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def begin(self, ctx: BatchContext) -> None:
        self.ctx = ctx
        self.fired = set()

    def harvest(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_table(self, arrays: dict[str, np.ndarray], meta: BatchMeta) -> dict[str, pa.Table]:
        raise NotImplementedError

    def settings(self) -> dict:
        return {}


def list_array(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """[N, K] numpy -> Arrow list<type> column without a Python loop."""
    n, k = values.shape
    flat = pa.array(values.reshape(-1), type=arrow_type)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat)


def to_ctx(t: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
    """Bring a tensor seen in a hook to the batch's device (a no-op unless the model is split by a
    device_map, where layers live on different GPUs, the CPU, or come from disk)."""
    dev = ctx.valid.device
    return t if t.device == dev else t.to(dev)


class ProbeDidNotFire(RuntimeError):
    """A hooked module was never called: the model does not route the way its adapter says."""
