"""Issue 22 items 1-2: the workbench deletes only regular files it created, inside the run's real folder, never
through a link; a run whose tables or analyses are links out of it is refused in one sentence.

Every test plants a folder OUTSIDE the run (a stand-in for the user's home), links it into the run the way
the fault campaign did, runs the command, and compares the outside folder byte for byte with its snapshot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest

import workbench as wb
from workbench import safefs
from workbench.analysis import AnalysisResult, persist
from workbench.app.synthetic import write_synthetic_run
from workbench.cli import main
from workbench.errors import WorkbenchError

from reliability._faults import cli as _cli, cli_sentence as _sentence, corpus, snapshot  # tests/ is on sys.path


def _home(root: Path) -> Path:
    """A folder of user files with sub-folders that hold no result.json (what stale-result cleanup removed)."""
    home = root / "home"
    for sub in ("photos", "thesis", "code/.git"):
        (home / sub).mkdir(parents=True)
        (home / sub / "precious.txt").write_text(f"user data in {sub}\n")
    (home / "part-000000.parquet").write_bytes(b"not ours")  # named like a part: still not ours to delete
    return home


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("links")
    return write_synthetic_run(root / "pristine", n_tokens=1200, n_layers=2, n_experts=4, part_tokens=400,
                               probes=("routing",))


def _copy(syn, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(syn.path, run, ignore=shutil.ignore_patterns(".workbench*"))
    return run


def test_analyses_folder_linked_out_is_refused_and_nothing_outside_is_deleted(syn, tmp_path):
    """Item 1: `analyze stats RUN` with RUN/analyses/stats -> ~ deleted every sub-folder of ~ (exit 0)."""
    run, home = _copy(syn, tmp_path), _home(tmp_path)
    before = snapshot(home)
    (run / "analyses").mkdir()
    os.symlink(home, run / "analyses" / "stats")
    rc, _, err = _cli("analyze", "stats", run)
    _sentence(rc, err, "symbolic link out of the run folder")
    for argv in (("export", run, "--out", tmp_path / "exp"), ("check", run), ("check", run, "--repair")):
        rc, _, err = _cli(*argv)
        _sentence(rc, err, "analyses/stats")
    assert snapshot(home) == before and (home / "photos").is_dir() and (home / "code" / ".git").is_dir()
    # the whole analyses folder as a link: the same
    os.unlink(run / "analyses" / "stats")
    os.rmdir(run / "analyses")
    os.symlink(home, run / "analyses")
    _sentence(*_cli("analyze", "stats", run)[::2], "analyses")
    assert snapshot(home) == before


def test_persisted_cleanup_on_an_open_run_never_follows_a_link(syn, tmp_path):
    """Even for a Run opened before the link appeared (a notebook, the dashboard), storing and cleaning stale
    results does not read, write or delete through it."""
    run_dir, home = _copy(syn, tmp_path), _home(tmp_path)
    run = wb.open_run(run_dir)
    before = snapshot(home)
    (run_dir / "analyses").mkdir()
    os.symlink(home, run_dir / "analyses" / "stats")
    res = AnalysisResult("stats", {"t": pl.DataFrame({"a": [1]})}, "t")
    assert persist.store(res, run, {}) is None  # not stored through the link
    persist._drop_stale(run, run_dir / "analyses" / "stats", "x")
    assert snapshot(home) == before
    # a real analyses/stats folder holding a link to home and a user's file: cleanup keeps both and home
    os.unlink(run_dir / "analyses" / "stats")
    stale = run_dir / "analyses" / "stats" / "oldkey"
    stale.mkdir(parents=True)
    (stale / "result.json").write_text(json.dumps({"run": "an older state"}))
    (stale / "0.parquet").write_bytes(b"x")
    (stale / "notes.txt").write_text("mine")
    os.symlink(home, run_dir / "analyses" / "stats" / "linked")
    assert persist.store(res, run, {}) is not None
    assert snapshot(home) == before
    assert (stale / "notes.txt").exists() and not (stale / "result.json").exists() and not (stale / "0.parquet").exists()
    assert os.path.islink(run_dir / "analyses" / "stats" / "linked")


def test_check_repair_never_deletes_through_a_linked_table_folder(syn, tmp_path):
    """Item 2: a manifest entry under a linked folder made `check --repair` delete the file it points to."""
    run, home = _copy(syn, tmp_path), _home(tmp_path)
    (home / "part-000001.parquet").write_bytes((run / "routing" / "part-000001.parquet").read_bytes())
    before = snapshot(home)
    m = json.loads((run / "manifest.json").read_text())
    m["parts"][1]["files"]["routing"] = "linked/part-000001.parquet"
    (run / "manifest.json").write_text(json.dumps(m))
    os.symlink(home, run / "linked")
    for argv in (("check", run, "--repair"), ("analyze", "stats", run)):
        _sentence(*_cli(*argv)[::2], "linked")
    assert snapshot(home) == before


def test_check_repair_removes_only_regular_files_inside_the_run(syn, tmp_path):
    """A damaged part that is a link to a file outside (within a real table folder) is dropped from the manifest,
    but the link's target is never touched."""
    run, home = _copy(syn, tmp_path), _home(tmp_path)
    target = home / "precious.parquet"
    shutil.copy(run / "routing" / "part-000002.parquet", target)
    target.write_bytes(target.read_bytes()[:-10])  # damaged, so repair drops the part
    before = snapshot(home)
    (run / "routing" / "part-000002.parquet").unlink()
    os.symlink(target, run / "routing" / "part-000002.parquet")
    rc, out, err = _cli("check", run)
    assert rc == 2 and "link out of the run" in out + err
    assert _cli("check", run, "--repair")[0] == 0
    assert snapshot(home) == before
    assert os.path.islink(run / "routing" / "part-000002.parquet")  # a link is not ours to remove either


@pytest.fixture(scope="module")
def captured(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cap")
    data = corpus(root / "data.jsonl", n=24)
    model = tiny_dir("mixtral")
    args = ["capture", str(model), "--data", str(data), "--batch-size", "4", "--part-tokens", "80", "--no-progress"]
    assert main(args + ["--out", str(root / "pristine")]) == 0
    return root / "pristine", args, model


@pytest.mark.parametrize("how", ["overwrite", "resume"])
def test_overwrite_and_resume_never_delete_through_a_linked_table_folder(captured, tmp_path, how):
    """Item 2: `capture --overwrite` deleted every part-*.parquet of a linked folder; `--resume` its 'orphans'."""
    src, args, _ = captured
    run, home = tmp_path / "run", _home(tmp_path)
    shutil.copytree(src, run, ignore=shutil.ignore_patterns(".workbench*"))
    shutil.move(run / "routing", home / "routing")
    (home / "routing" / "part-000099.parquet").write_bytes(b"an orphan by name, but outside")
    os.symlink(home / "routing", run / "routing")
    if how == "resume":
        m = json.loads((run / "manifest.json").read_text())
        m["status"], m["parts"] = "running", m["parts"][:1]
        (run / "manifest.json").write_text(json.dumps(m))
    before = snapshot(home)
    rc, _, err = _cli(*args, "--out", run, f"--{how}")
    _sentence(rc, err, "symbolic link out of the run folder")
    assert snapshot(home) == before


def test_resume_identity_is_the_model_content_not_its_spelling(captured, tmp_path, monkeypatch):
    """Item 9: ./m, m, /abs/m and m/ are one model; a complete capture of it is reused, an interrupted one resumes."""
    src, args, model = captured
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns(".workbench*"))
    monkeypatch.chdir(model.parent)
    i = args.index(str(model))
    for spelled in (f"./{model.name}", f"{model.name}/", f"./{model.name}/../{model.name}"):
        argv = args[:i] + [spelled] + args[i + 1:]
        rc, out, err = _cli(*argv, "--out", run)
        assert rc == 0 and "captured" in out, (spelled, err[-800:])  # the complete run, reused
    m = json.loads((run / "manifest.json").read_text())
    n = len(m["parts"])
    m["status"], m["parts"] = "running", m["parts"][:1]
    (run / "manifest.json").write_text(json.dumps(m))
    rc, out, err = _cli(*(args[:i] + [f"{model.name}/"] + args[i + 1:]), "--out", run, "--resume")
    assert rc == 0, err[-800:]
    assert len(wb.open_run(run).manifest["parts"]) == n and wb.open_run(run).complete


def test_an_option_without_its_probe_is_refused(captured, tmp_path):
    """Item 9: --dump-experts without the experts probe was silently ignored."""
    _, args, _ = captured
    for extra, needle in ((["--dump-experts", "L0:E1"], "--dump-experts needs the experts probe"),
                          (["--probes", "routing", "--dump-hidden", "1"], "--dump-hidden needs the hidden probe"),
                          (["--probes", "hidden", "--logits"], "--logits needs the routing probe")):
        rc, _, err = _cli(*args, "--out", tmp_path / "x", *extra)
        _sentence(rc, err, needle)
        assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------- the helper itself

def test_safefs_removes_regular_files_only_and_never_through_links(tmp_path):
    root, home = tmp_path / "run", _home(tmp_path)
    (root / "t").mkdir(parents=True)
    (root / "t" / "a.parquet").write_bytes(b"ours")
    os.symlink(home / "photos" / "precious.txt", root / "t" / "link.parquet")
    os.symlink(home, root / "ln")
    os.mkfifo(root / "t" / "fifo.parquet")
    before = snapshot(home)
    assert safefs.remove_file(root, "t/a.parquet") and not (root / "t" / "a.parquet").exists()
    assert not safefs.remove_file(root, "t/link.parquet")  # a link: left
    assert not safefs.remove_file(root, "ln/photos/precious.txt")  # through a linked folder: refused
    assert not safefs.remove_file(root, "t/fifo.parquet")  # not a regular file
    assert not safefs.remove_file(root, "../home/part-000000.parquet")  # outside
    assert not safefs.remove_file(root, home / "part-000000.parquet")  # absolute, outside
    assert not safefs.remove_tree(root, "ln")
    assert not safefs.remove_tree(root, "t")  # holds a link and a FIFO: they and the folder stay
    assert (root / "t").is_dir() and os.path.islink(root / "t" / "link.parquet")
    assert snapshot(home) == before
    # a run folder reached through a link of its own is fine: the real folder is where deletion happens
    os.symlink(root, tmp_path / "alias")
    (root / "t" / "b.parquet").write_bytes(b"ours")
    assert safefs.remove_file(tmp_path / "alias", "t/b.parquet")
    assert safefs.link_out(root, "ln") and safefs.link_out(root, "t/a.parquet") is None
    with pytest.raises(WorkbenchError, match="symbolic link out of the run"):
        safefs.refuse_links_out(root, ["t", "ln"])
