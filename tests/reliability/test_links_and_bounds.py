"""Second campaign (issue 22), as generated classes rather than one example each:

- symlinks: any table folder, the analyses folder, an analysis' folder, an entry inside it or a part file made
  a link to a folder of user files outside the run; any read or repair command. Nothing outside changes, and
  the command either works or says why in one sentence (exit 2, no traceback).
- declared-size bombs: a part whose footer declares more rows (or more list values) than the manifest's token
  count allows, checksum resealed. `check` names it, every reader refuses it in one sentence, before decoding.
- cache growth: the dashboard's bounded caches under any sequence of keys and sizes keep their bounds and
  their accounting; the callback endpoint answers any JSON body with a 4xx sentence or a result, never a 500.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.app.synthetic import write_synthetic_run
from workbench.cli import main
from workbench.store import file_checksum

from ._faults import snapshot

N = int(os.environ.get("WB_FUZZ_EXAMPLES", "60"))
GEN = settings(max_examples=max(N // 3, 8), deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _ok_or_one_sentence(rc: int, err: str, argv) -> str | None:
    assert "Traceback" not in err, (argv, err[-1500:])
    if rc == 0:
        return None
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("workbench")]
    assert rc == 2 and len(lines) == 1 and ": error: " in lines[0], (argv, rc, err[-1500:])
    return lines[0]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A small run with a stored analysis (so analyses/<name>/<key>/ exists to be linked)."""
    root = tmp_path_factory.mktemp("campaign2")
    run = write_synthetic_run(root / "pristine", n_tokens=900, n_layers=2, n_experts=4, part_tokens=300,
                              probes=("routing",))
    assert _cli("analyze", "stats", run.path)[0] == 0
    return run.path


def _fresh(pristine: Path, box: Path) -> tuple[Path, Path]:
    if box.exists():
        shutil.rmtree(box)
    run, home = box / "run", box / "home"
    shutil.copytree(pristine, run, ignore=shutil.ignore_patterns(".workbench*"))
    for sub in ("photos", "thesis", "stats", "0", "routing"):
        (home / sub).mkdir(parents=True)
        (home / sub / "precious.txt").write_text(sub)
        (home / sub / "part-000001.parquet").write_bytes(b"named like ours")
        (home / sub / "result.json").write_text("{}")
    return run, home


# --------------------------------------------------------------------------------------------- symlinks

def _link_targets(run: Path) -> list[str]:
    entry = next(p for p in (run / "analyses" / "stats").iterdir() if not p.name.startswith("."))
    return ["routing", "tokens", "analyses", "analyses/stats", f"analyses/stats/{entry.name}",
            f"analyses/stats/{entry.name}/0.parquet", "routing/part-000001.parquet", "analyses/stats/extra"]


COMMANDS = [("analyze", "stats", "{run}"), ("analyze", "stats", "{run}", "--recompute"), ("check", "{run}"),
            ("check", "{run}", "--repair"), ("export", "{run}", "--out", "{box}/exp", "--what", "routing,stats"),
            ("analyze", "lrc", "{run}", "--m", "4", "--n-boot", "10", "--no-sch")]


@GEN
@given(which=st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True),
       into=st.sampled_from(["photos", "stats", "0", "routing", "photos/precious.txt"]),
       cmds=st.lists(st.sampled_from(range(len(COMMANDS))), min_size=1, max_size=3))
def test_links_out_of_a_run_never_cost_a_file_outside(pristine, tmp_path, which, into, cmds):
    run, home = _fresh(pristine, tmp_path / "box")
    targets = _link_targets(run)
    for i in which:
        rel = targets[i]
        p = run / rel
        if p.is_symlink() or not p.parent.is_dir() or p.parent.is_symlink():
            continue  # already replaced by a link higher up
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        os.symlink(home / into, p)
    before = snapshot(home)
    for c in cmds:
        argv = [a.format(run=run, box=tmp_path / "box") for a in COMMANDS[c]]
        rc, _, err = _cli(*argv)
        _ok_or_one_sentence(rc, err, argv)
        assert snapshot(home) == before, (which, into, argv)


# ----------------------------------------------------------------------------------- declared-size bombs

def _reseal(run: Path, part: int, table: str, new: pa.Table) -> None:
    m = json.loads((run / "manifest.json").read_text())
    f = run / m["parts"][part]["files"][table]
    pq.write_table(new, f, compression="zstd")
    m["parts"][part]["bytes"][table] = f.stat().st_size
    m["parts"][part]["checksums"][table] = file_checksum(f)
    (run / "manifest.json").write_text(json.dumps(m))


@GEN
@given(table=st.sampled_from(["routing", "tokens"]), part=st.integers(0, 2),
       kind=st.sampled_from(["rows", "list"]), factor=st.integers(2, 400))
def test_declared_size_bombs_are_refused_before_decoding(pristine, tmp_path, table, part, kind, factor):
    run, _ = _fresh(pristine, tmp_path / "box")
    m = json.loads((run / "manifest.json").read_text())
    t = pq.read_table(run / m["parts"][part]["files"][table])
    if kind == "rows" or table == "tokens":  # tokens has no list column: repeat its rows
        idx = pa.array(np.repeat(np.arange(t.num_rows), factor))
        bomb = t.take(idx)
        needle = f"holds {bomb.num_rows} rows"
    else:
        width = 4 + factor * 8  # far more experts a row than the model has
        col = pa.array([list(range(width))] * t.num_rows, pa.list_(pa.int16()))
        bomb = t.set_column(t.schema.get_field_index("experts"), "experts", col)
        needle = "values in its list column experts"
    _reseal(run, part, table, bomb)
    rc, out, err = _cli("check", run)
    assert rc == 2 and needle in out and m["parts"][part]["files"][table] in out, (out, err[-800:])
    for argv in (("analyze", "stats", run, "--recompute"), ("export", run, "--out", tmp_path / "box" / "exp")):
        t0 = time.perf_counter()
        rc, _, err = _cli(*argv)
        line = _ok_or_one_sentence(rc, err, argv)
        assert line is not None and needle in line, (argv, err[-800:])
        assert time.perf_counter() - t0 < 30


# ---------------------------------------------------------------------------------------- cache growth

@settings(max_examples=N, deadline=None, derandomize=True)
@given(ops=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 5000)), max_size=200),
       max_entries=st.integers(1, 12), max_bytes=st.integers(1, 20_000))
def test_bounded_cache_keeps_its_bounds_under_any_keys(ops, max_entries, max_bytes):
    from workbench.app.state import BoundedCache

    evicted = []
    c = BoundedCache(max_entries, max_bytes, sizeof=lambda v: v[1], on_evict=lambda k, v: evicted.append(k))
    model: dict = {}
    for key, size in ops:
        c[key] = (key, size)
        model[key] = size
        keys = c.keys()
        assert keys[-1] == key  # the newest is kept (even alone over the byte budget)
        assert len(keys) <= max_entries
        assert c.nbytes == sum(model[k] for k in keys)  # accounting matches what is held
        assert c.nbytes <= max_bytes or len(keys) == 1


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5),
                    max_leaves=25)


@pytest.fixture(scope="module")
def dash_client(pristine):
    import logging

    from workbench.app import make_app

    logging.getLogger("workbench.app").setLevel(logging.CRITICAL)
    app = make_app(str(pristine), warm=())
    return app, app.server.test_client()


@settings(max_examples=N, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=JSON, keep_output=st.booleans(), field=st.sampled_from(["inputs", "state", "outputs", "changedPropIds"]))
def test_any_json_body_gets_a_sentence_or_a_result_never_a_500(dash_client, body, keep_output, field):
    app, c = dash_client
    if keep_output:  # a real callback with one field replaced by generated JSON: reaches Dash's dispatch
        out = "..wb-page.children...wb-nav.children.."
        body = {"output": out, "outputs": [{"id": "wb-page", "property": "children"},
                                           {"id": "wb-nav", "property": "children"}],
                "inputs": [{"id": "url", "property": "pathname", "value": "/"}], "changedPropIds": [], "state": [],
                field: body}
    r = c.post("/_dash-update-component", data=json.dumps(body), content_type="application/json")
    assert r.status_code < 500, (body, r.status_code, r.get_data(as_text=True)[:300])
    if r.status_code >= 400:
        text = r.get_data(as_text=True)
        assert text.count("\n") == 1 and "<" not in text, text[:300]
