"""Thread counts chosen on purpose (workbench.threads): the arithmetic by hand, and who wins."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from workbench import threads as th
from workbench.errors import WorkbenchError


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.setattr(th, "_chosen", None)
    monkeypatch.setattr(th, "_torch_at_import", n)
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", th.ENV):
        monkeypatch.delenv(v, raising=False)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("load,cpus,want", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (5.0, 2, 1), (7.0, 2, 1),
                                            (1.6, 4, 2), (0.0, 16, 16), (30.0, 16, 1), (0.0, 1, 1)])
def test_default_is_the_free_cores(load, cpus, want):
    assert th.default_threads(load=load, cpus=cpus) == want


def test_available_cpus_reads_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(th.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(th, "_cgroup_quota", lambda: None)
    assert th.available_cpus() == 6
    monkeypatch.setattr(th, "_cgroup_quota", lambda: 2.5)  # "250000 100000" in cpu.max
    assert th.available_cpus() == 3
    monkeypatch.setattr(th, "_cgroup_quota", lambda: 0.2)
    assert th.available_cpus() == 1


def test_explicit_env_and_user_choices(monkeypatch):
    monkeypatch.setattr(th, "default_threads", lambda: 2)
    assert th.ensure(3) == 3 and torch.get_num_threads() == 3
    monkeypatch.setattr(th, "_chosen", None)
    monkeypatch.setenv(th.ENV, "1")
    assert th.ensure() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv(th.ENV)
    torch.set_num_threads(2)  # the user's own call after the workbench looked: respected
    monkeypatch.setattr(th, "_chosen", 1)
    assert th.ensure() == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(th, "_torch_at_import", 2)
    monkeypatch.setattr(th, "_chosen", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert th.configure() is None  # OMP_NUM_THREADS is the user's choice
    monkeypatch.setenv(th.ENV, "zero")
    with pytest.raises(WorkbenchError, match="WORKBENCH_THREADS must be a whole number"):
        th.ensure()


def test_cli_threads_option(tiny_dir, capsys):
    from workbench.cli import main

    assert main(["--threads", "1", "datasets"]) == 0 and torch.get_num_threads() == 1
    assert main(["--threads", "0", "datasets"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_load_model_applies_the_choice_once(tiny_dir, monkeypatch):
    from workbench.models.loading import load_model

    monkeypatch.setattr(th, "default_threads", lambda: 1)
    load_model(str(tiny_dir("olmoe")))
    assert torch.get_num_threads() == 1
    load_model(str(tiny_dir("olmoe")), threads=None)  # None: torch left alone
    assert torch.get_num_threads() == 1


def test_lrc_and_umap_leave_torch_thread_count_as_it_was():
    """numba's OpenMP layer used to set the shared OpenMP thread count to every core at each launch:
    torch ran on 2 threads after an lrc analysis or a UMAP although 1 was chosen, and later forwards rounded
    differently. Runs in a fresh process: the effect is on process-wide state."""
    code = textwrap.dedent("""
        import numpy as np, torch
        assert torch.get_num_threads() == 1
        from workbench.analysis import lrc
        from workbench.analysis.atlas import embed
        rng = np.random.default_rng(0)
        assert embed(rng.normal(size=(300, 16)), seed=0, n_neighbors=10)[1] == "umap"
        print(torch.get_num_threads())
        ex = rng.integers(0, 8, (400, 2, 2))
        seqs = [ex[i:i + 100] for i in range(0, 400, 100)]
        lrc.srp(seqs, m=[4, 8], n_boot=20, n_experts=8, progress=False)
        print(torch.get_num_threads())
        lrc.sch(seqs, m=[4], stride=1, n_boot=20, n_experts=8, progress=False)
        print(torch.get_num_threads())
    """)
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="1")  # as the CLI's configure() leaves it
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1", "1"], r.stdout  # after UMAP, SRP, SCH
