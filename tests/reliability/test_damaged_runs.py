"""Damaged runs (a part missing, truncated, bit-flipped; a manifest without parts or not JSON): every
reader names the damage in one sentence with exit code 2, `workbench check` finds it, `--repair` drops
it, and `--resume` then restores a run equal to the undamaged one. Nothing outside the run changes."""

from __future__ import annotations

import json
import shutil

import pytest

import workbench as wb
from workbench.cli import main
from workbench.store import DamagedRun

from ._faults import corpus, one_sentence, snapshot, tables_equal, unlisted
from ._faults import wb as wb_cli

PART = "routing/part-000001.parquet"


@pytest.fixture(scope="module")
def pristine(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    data = corpus(root / "data.jsonl", n=60)
    model = str(tiny_dir("mixtral"))
    args = ["capture", model, "--data", str(data), "--batch-size", "4", "--part-tokens", "150", "--no-progress"]
    run = root / "pristine"
    assert main(args + ["--out", str(run)]) == 0
    assert len(wb.open_run(run).manifest["parts"]) >= 4
    return run, args


def _damage(run, how: str) -> None:
    f = run / PART
    if how == "missing":
        f.unlink()
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "bitflip":  # same size, one bit changed in the middle of the data pages
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    elif how == "no_parts":
        m = json.loads((run / "manifest.json").read_text())
        del m["parts"]
        (run / "manifest.json").write_text(json.dumps(m))


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("workbench: error: "), err
    return lines[0]


@pytest.mark.parametrize("how", ["missing", "truncated", "bitflip", "no_parts"])
def test_damage_is_named_checked_repaired_and_resumed(pristine, tmp_path, capsys, how):
    src, args = pristine
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _damage(run, how)
    outside = snapshot(tmp_path, skip=run)
    needle = "lists no parts" if how == "no_parts" else PART

    # readers: analyses, export, the Python API
    assert main(["analyze", "stats", str(run)]) == 2
    assert needle in _err(capsys)
    assert main(["analyze", "lrc", str(run), "--m", "4"]) == 2
    assert needle in _err(capsys)
    exp = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(exp)]) == 2
    assert needle in _err(capsys)
    assert not exp.exists() and not list(tmp_path.glob(".exp*"))  # no valid-looking output, no leftovers
    with pytest.raises(DamagedRun, match=needle.replace(".", r"\.")):
        wb.open_run(run).routing.collect()

    # check finds it, --repair drops it, --resume captures it again
    assert main(["check", str(run)]) == 2
    assert needle in _err(capsys)
    assert main(["check", str(run), "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out
    assert main(["check", str(run)]) == 0
    assert main(["analyze", "stats", str(run)]) == (2 if how == "no_parts" else 0)  # no_parts: all unlisted
    assert "was repaired" in capsys.readouterr().err  # the one-line note
    assert snapshot(tmp_path, skip=run) == outside
    assert main(args + ["--out", str(run), "--resume"]) == 0
    assert not unlisted(run)
    fixed, good = wb.open_run(run), wb.open_run(src)
    assert fixed.complete
    tables_equal(fixed, good)
    assert snapshot(tmp_path, skip=run) == outside


def test_damage_in_a_real_process_is_one_sentence(pristine, tmp_path):
    """The same through the installed entry point: exit code 2, one line, no traceback."""
    src, _ = pristine
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _damage(run, "bitflip")
    one_sentence(wb_cli("analyze", "stats", run), needle=PART)
    one_sentence(wb_cli("export", run, "--out", tmp_path / "exp"), needle=PART)
    r = wb_cli("check", run)
    one_sentence(r, needle=PART)
    assert f"damaged: part 1: {PART}" in r.stdout
    assert not (tmp_path / "exp").exists()


def test_running_run_note(pristine, tmp_path, capsys):
    src, _ = pristine
    run = tmp_path / "run"
    shutil.copytree(src, run)
    m = json.loads((run / "manifest.json").read_text())
    m["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["analyze", "stats", str(run)]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note:")]  # (progress bars aside)
    assert len(notes) == 1 and "still running or was interrupted" in notes[0], err


def test_manifest_not_json_and_part_outside_run(pristine, tmp_path, capsys):
    src, _ = pristine
    run = tmp_path / "run"
    shutil.copytree(src, run)
    m = json.loads((run / "manifest.json").read_text())
    m["parts"][0]["files"]["routing"] = "../../etc/passwd"
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["analyze", "stats", str(run)]) == 2
    assert "points outside the run" in _err(capsys)
    (run / "manifest.json").write_text("{not json")
    assert main(["analyze", "stats", str(run)]) == 2
    assert "not valid JSON" in _err(capsys)


def test_dashboard_pages_on_a_damaged_run_show_the_sentence(pristine, tmp_path):
    """Every page answers 200 (no HTTP 500); those that read the damaged table show the store's sentence."""
    from workbench.app import make_app
    from workbench.app.main import _pages

    src, _ = pristine
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _damage(run, "bitflip")
    app = make_app(str(run), warm=())
    client = app.server.test_client()
    shown = []
    for page in _pages():
        body = {"output": "..wb-page.children...wb-nav.children..",
                "outputs": [{"id": "wb-page", "property": "children"}, {"id": "wb-nav", "property": "children"}],
                "inputs": [{"id": "url", "property": "pathname", "value": page.path}],
                "changedPropIds": ["url.pathname"], "state": []}
        r = client.post("/_dash-update-component", json=body)
        assert r.status_code == 200, (page.path, r.data[:300])
        if PART in json.dumps(r.get_json()).replace("\\/", "/"):
            shown.append(page.path)
    assert "/export" in shown and "/" in shown, shown
