"""How many CPU threads torch uses, chosen on purpose.

torch starts one intra-op thread per core it sees, ignoring what else runs on the machine. On a
shared 2-core machine at load 5-7 that oversubscribes the cores and a plain forward of the demo
model ran 5-20x slower than with one thread (benchmarks/results/threads_cpu.json). So the workbench
picks the count itself: the cores this process may actually use (CPU affinity, and a cgroup CPU
quota when one is readable), minus the cores other processes keep busy (the 1-minute load average),
at least 1. `--threads N` (CLI) or WORKBENCH_THREADS=N override it; OMP_NUM_THREADS / MKL_NUM_THREADS
are respected as the user's own choice, and in Python the automatic choice only ever lowers torch's
current count (so an earlier torch.set_num_threads(k) still caps it) and yields to any later change.
Imports nothing heavy: the CLI calls `configure` before torch is loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

from .errors import WorkbenchError

ENV = "WORKBENCH_THREADS"
_USER_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_chosen: int | None = None  # set by configure(): the CLI's (or a caller's) decision, applied to torch
_torch_at_import: int | None = None  # torch's thread count when this module first saw torch
_automatic = False  # configure() took the default (no --threads, WORKBENCH_THREADS or OMP/MKL_NUM_THREADS)


def available_cpus() -> int:
    """Cores this process may run on: affinity mask, capped by a cgroup v2/v1 CPU quota if present."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            q, p = f.read().split()[:2]
        return None if q == "max" else int(q) / int(p)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            q = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            p = int(f.read())
        return None if q <= 0 or p <= 0 else q / p
    except (OSError, ValueError):
        return None


def default_threads(load: float | None = None, cpus: int | None = None) -> int:
    """Available cores minus the cores other processes keep busy (1-minute load average), >= 1."""
    cpus = available_cpus() if cpus is None else cpus
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cpus, int(cpus - load + 0.5)))


def parse_threads(value, what: str = "--threads") -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        raise WorkbenchError(f"{what} must be a whole number of threads, got {value!r}") from None
    if n < 1:
        raise WorkbenchError(f"{what} must be at least 1, got {n}")
    return n


def _requested(threads) -> int | None:
    if threads is not None:
        return parse_threads(threads)
    if os.environ.get(ENV, "").strip():
        return parse_threads(os.environ[ENV], ENV)
    return None


def configure(threads: int | str | None = None) -> int | None:
    """The CLI's start: decide the count once (explicit, WORKBENCH_THREADS, else the default unless
    OMP/MKL_NUM_THREADS say otherwise) and apply it; returns it (None: left to the user's env vars)."""
    global _chosen, _automatic
    n = _requested(threads)
    if n is None and any(os.environ.get(v) for v in _USER_ENV):
        return None
    _automatic = n is None
    _chosen = default_threads() if n is None else n
    if "torch" in sys.modules:
        _set(_chosen)
    else:  # torch reads these when it starts its pools; nothing to import now (fast --help)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_chosen)
    return _chosen


def automatic() -> bool:
    """Whether the CLI's thread count is the automatic choice (the user set none), so a command may adapt it."""
    return _automatic


def note_torch() -> None:
    """Remember torch's thread count as first seen, to tell a later torch.set_num_threads() apart."""
    global _torch_at_import
    if _torch_at_import is None and "torch" in sys.modules:
        _torch_at_import = sys.modules["torch"].get_num_threads()


def ensure(threads: int | str | None = None) -> int:
    """For library users (load_model): apply the workbench's choice once, unless the user made their own
    (OMP/MKL_NUM_THREADS, or torch.set_num_threads() since the workbench last looked)."""
    global _chosen
    import torch

    n = _requested(threads)
    if n is None:
        cur = torch.get_num_threads()
        if _torch_at_import is not None and cur != _torch_at_import:
            return cur
        if _chosen is not None:
            n = _chosen
        elif any(os.environ.get(v) for v in _USER_ENV):
            return cur
        else:  # never above torch's current count: a torch.set_num_threads(k) we could not see still caps it
            n = min(default_threads(), cur)
    _chosen = n
    _set(n)
    return n


def analysis_threads(threads: int | str | None = None, current: int | None = None) -> int:
    """Threads for an analysis's own parallel work: explicit, else WORKBENCH_THREADS, else the CLI's
    choice, else `current` (torch's count, when a caller has one), else the cores free."""
    return _requested(threads) or _chosen or current or default_threads()


@contextlib.contextmanager
def numba_parallel():
    """Around numba `parallel=True` kernels (lrc, UMAP), once per analysis (also as a decorator): run them
    on the workbench's thread count, and leave torch's count as it was.

    Numba's OpenMP threading layer shares torch's OpenMP runtime and sets its thread count to
    NUMBA_NUM_THREADS (every core) at each launch: afterwards torch ran on that many threads, ignoring
    the load-aware choice, and later forwards in the same process (a notebook, the dashboard, the
    demo) gave other float rounding than before the analysis.
    """
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    import numba

    n = analysis_threads(current=before)
    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(prev)
        if before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _set(n: int) -> None:
    import torch

    global _torch_at_import
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _torch_at_import = n  # our own setting is not a user's choice
