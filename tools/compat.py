"""Compatibility smoke: the workbench on the oldest supported and the newest served transformers.

Each transformers version goes into its own `pip install --target` folder (never the environment
that runs this script), with only those of its dependencies that the environment does not already
satisfy; the smoke tests then run with that folder first on PYTHONPATH:

- routing capture exact against the router's own output on the nine families (tests/test_capture.py),
- ban / force steering on the nine families (tests/test_steering.py),
- expert statistics (tests/test_stats.py) and the family-contract checks (tests/test_compat.py),
- `workbench demo --quick --no-serve`.

It rewrites the table in docs/compat.md (between its markers) and benchmarks/results/compat.json, and
with --constraints rewrites constraints.txt from the environment that passed the main suite.

    python tools/compat.py                       # oldest (pyproject floor) and newest on the index
    python tools/compat.py --versions 5.5.0 5.12.0 --no-demo --out /tmp/probe   # probing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe",
            "granitemoe"]
# Test selections per column of the table; a family column passes when all its parametrized cases pass.
CHECKS = {
    "capture": "tests/test_capture.py::test_routing_equals_independent_recomputation",
    "ban": "tests/test_steering.py::test_ban_prefill",
    "force": "tests/test_steering.py::test_force_prefill",
    "stats": "tests/test_stats.py",
    "contract": "tests/test_compat.py",
}


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args], check=True)


def _dists(path: str | None) -> dict[str, metadata.Distribution]:
    found = metadata.distributions(path=[path]) if path else metadata.distributions()
    return {_norm(d.metadata["Name"]): d for d in found}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Optional packages transformers uses whenever they are importable: when the environment has one, it
# must be a version this transformers accepts (transformers 5.5 with kernels 0.19 fails at import).
PICKED_UP = {"kernels", "accelerate"}


def _unsatisfied(target: str) -> list[str]:
    """Requirements of what is in `target` that neither `target` nor this environment satisfies."""
    here, env = _dists(target), _dists(None)
    out = []
    for name, dist in here.items():
        for r in dist.requires or []:
            req = Requirement(r)
            optional = req.marker is not None and not req.marker.evaluate({"extra": ""})
            if optional and not (name == "transformers" and _norm(req.name) in PICKED_UP and _norm(req.name) in env):
                continue
            have = here.get(_norm(req.name)) or env.get(_norm(req.name))
            if have is None or not req.specifier.contains(have.version, prereleases=True):
                req.marker = None
                if str(req) not in out:
                    out.append(str(req))
    return out


def install(version: str, target: Path) -> list[str]:
    """transformers==version into `target`, plus the dependencies the environment lacks; returns what
    went in besides transformers (e.g. an older huggingface-hub)."""
    wanted = [f"transformers=={version}"]
    if target.exists():
        shutil.rmtree(target)
    _pip("--no-deps", "--target", str(target), *wanted)
    for _ in range(20):  # each round adds what the previous round's packages need
        missing = [r for r in _unsatisfied(str(target)) if r not in wanted]
        if not missing:
            return wanted[1:]
        wanted += missing
        _pip("--no-deps", "--upgrade", "--target", str(target), *missing)
    raise SystemExit(f"compat: could not close the dependencies of transformers {version}: {missing}")


def newest_served() -> str:
    """The newest transformers release the configured index serves."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers",
                          "--disable-pip-version-check"], capture_output=True, text=True, check=True).stdout
    return re.search(r"transformers \(([^)]+)\)", out).group(1)


def declared() -> dict:
    """The tested range pyproject declares: the floor of the transformers dependency, and
    [tool.moe-workbench.compat]."""
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = {_norm(Requirement(d).name): Requirement(d) for d in py["project"]["dependencies"]}
    floor = next(s.version for s in deps["transformers"].specifier if s.operator == ">=")
    return {"floor": floor, "tested": py.get("tool", {}).get("moe-workbench", {}).get("compat", {})}


def _env(target: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("USE_HUB_KERNELS", None)  # the smoke runs what a user gets by default
    if target is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _versions(env: dict, target: Path | None) -> dict:
    code = "import json, torch, transformers; print(json.dumps([transformers.__version__, torch.__version__, transformers.__file__]))"
    tv, pv, where = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                              check=True).stdout)
    from_target = target is not None and Path(where).resolve().is_relative_to(target.resolve())
    return {"transformers": tv, "torch": pv, "transformers_from": "target folder" if from_target else "environment"}


FINGERPRINT = """
import hashlib, json, torch
from workbench.models.loading import load_model
mm = load_model("demo", threads=1)
texts = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\\n    return a + b\\n",
         "Der schnelle braune Fuchs springt \u00fcber den faulen Hund.", "2 + 2 = 4, and 3 * 7 = 21."]
seen, lm = [], hashlib.sha256()
hooks = [l.router.register_forward_hook(lambda m, a, o: seen.append((o[2].sort(-1).values, o[1]))) for l in mm.layers]
with torch.no_grad():
    for t in texts:
        lm.update(mm.model(torch.tensor([mm.tokenize(t)])).logits.numpy().tobytes())
ex = hashlib.sha256(b"".join(i.numpy().tobytes() for i, _ in seen)).hexdigest()[:16]
w = hashlib.sha256(b"".join(w.numpy().tobytes() for _, w in seen)).hexdigest()[:16]
print(json.dumps({"experts": ex, "weights": w, "lm_logits": lm.hexdigest()[:16]}))
"""


def fingerprint(env: dict) -> dict:
    """Hashes of the demo model's routing (expert ids, weights) and output logits on four texts (CPU, fp32):
    equal hashes mean the figures the docs quote from the demo model do not depend on the release."""
    r = subprocess.run([sys.executable, "-c", FINGERPRINT], env=env, cwd=ROOT, capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}


def smoke(target: Path | None, out: Path, demo: bool, reference: dict | None = None) -> dict:
    env = _env(target)
    info = _versions(env, target)
    xml = out / f"junit-{info['transformers']}.xml"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *CHECKS.values()]
    tests = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    info["tests_s"] = round(time.perf_counter() - t0, 1)
    cases = _junit(xml) if xml.exists() else {}
    info["n_tests"] = len(cases)
    info["failures"] = [f"{k}: {v}" for k, v in cases.items() if v != "passed"][:20]
    if not cases:
        info["failures"].append("pytest did not run: " + (tests.stdout + tests.stderr).strip().splitlines()[-1][:300])
    info["checks"] = _columns(cases)
    if reference is not None:
        info["demo_fingerprint"] = fp = fingerprint(env)
        info["demo_routing_same_as_env"] = fp == reference
    if demo:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="wb_compat_demo_") as d:
            r = subprocess.run([sys.executable, "-m", "workbench.cli", "demo", "--quick", "--no-serve", "--out", d],
                               env=env, cwd=ROOT, capture_output=True, text=True)
        info["demo_s"] = round(time.perf_counter() - t0, 1)
        info["checks"]["demo --quick"] = "pass" if r.returncode == 0 else "FAIL"
        if r.returncode:
            info["failures"].append("demo: " + ((r.stderr or r.stdout).strip().splitlines() or ["?"])[-1][:300])
    info["passed"] = all(v == "pass" for v in info["checks"].values())
    return info


def _junit(path: Path) -> dict[str, str]:
    """{"tests/test_x.py::test_name[param]": "passed" | "failed: first line" | "skipped"}"""
    out = {}
    for case in ET.parse(path).iter("testcase"):
        name = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        bad = next((c for c in case if c.tag in ("failure", "error")), None)
        skip = next((c for c in case if c.tag == "skipped"), None)
        if bad is not None:
            out[name] = "failed: " + (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else "failed"
        else:
            out[name] = "skipped" if skip is not None else "passed"
    return out


def _columns(cases: dict[str, str]) -> dict[str, str]:
    cols = {}
    for col, sel in CHECKS.items():
        mine = {k: v for k, v in cases.items() if k.startswith(sel.split("::")[0]) and
                ("::" not in sel or k.split("::")[1].startswith(sel.split("::")[1]))}
        if col in ("capture", "ban", "force"):
            for fam in FAMILIES:
                fam_cases = [v for k, v in mine.items() if k.endswith(f"[{fam}]")]
                key = f"{col} {fam}"
                cols[key] = "pass" if fam_cases and all(v == "passed" for v in fam_cases) else "FAIL"
        else:
            ran = [v for v in mine.values() if v != "skipped"]
            cols[col] = "pass" if ran and all(v == "passed" for v in ran) else "FAIL"
    return cols


def table(results: list[dict]) -> str:
    """Markdown: one row per transformers x torch, one column per check (families grouped)."""
    head = ("| transformers | torch | capture exact (9 families) | ban (9) | force (9) | stats | contract | "
            "demo --quick | demo routing vs .venv | time |")
    lines = [head, "|" + "---|" * 10]
    for r in results:
        c = r["checks"]

        def fam(col):
            bad = [f for f in FAMILIES if c.get(f"{col} {f}") != "pass"]
            return "pass" if not bad else "FAIL: " + ", ".join(bad)

        t = r.get("install_s", 0) + r.get("tests_s", 0) + r.get("demo_s", 0)
        same = {True: "bit-identical", False: "DIFFERS", None: "-"}[r.get("demo_routing_same_as_env")]
        lines.append(f"| {r['transformers']} ({r['role']}) | {r['torch']} | {fam('capture')} | {fam('ban')} | "
                     f"{fam('force')} | {c.get('stats', '-')} | {c.get('contract', '-')} | {c.get('demo --quick', '-')} | "
                     f"{same} | {t:.0f} s |")
    return "\n".join(lines) + "\n"


def write_constraints(path: Path) -> None:
    """Exact versions of this environment (the one the main suite just passed in), minus ourselves."""
    skip = {"moe-workbench", "pip", "setuptools", "wheel"}
    lines = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                   if _norm(d.metadata["Name"]) not in skip and "+" not in d.version)
    torch_v = metadata.version("torch")
    head = ["# Exact versions of the environment .ci/run tested: written by tools/compat.py --constraints after the",
            f"# main suite and the compatibility job passed ({time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"Python {platform.python_version()}, torch {torch_v}).",
            "# Use: pip install torch==2.13.0 && pip install -c constraints.txt -e \".[test]\"",
            "# (torch is left out when it is a local build such as +cpu; install it first as the README says)."]
    path.write_text("\n".join(head + sorted(set(lines), key=str.lower)) + "\n")


START, END = "<!-- compat-table:start (generated by tools/compat.py; do not edit) -->", "<!-- compat-table:end -->"


def render(doc: dict) -> str:
    env = doc.get("environment", {})
    return (f"Last run {doc['date_utc']} UTC on Python {doc['machine']['python']}, {doc['machine']['cpus']} CPUs: "
            f"{doc['total_s']:.0f} s in all, installs included. \"demo routing vs .venv\" compares the demo model's "
            f"expert choices, weights and output logits with those of the test environment (transformers "
            f"{env.get('transformers', '?')}, torch {env.get('torch', '?')}), where the documentation's figures "
            f"come from.\n\n" + table(doc["results"]))


def write_outputs(doc: dict, out: Path | None) -> None:
    """compat.json, and the table between the markers of docs/compat.md (or compat_table.md under `out`)."""
    md = render(doc)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "compat.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "compat_table.md").write_text(md)
    else:
        (ROOT / "benchmarks" / "results" / "compat.json").write_text(json.dumps(doc, indent=1) + "\n")
        page = ROOT / "docs" / "compat.md"
        text = page.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"compat: {page} lacks the table markers {START} ... {END}")
        head, rest = text.split(START, 1)
        page.write_text(head + START + "\n" + md + END + rest.split(END, 1)[1])
    print(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", nargs="*", help="transformers versions (default: the pyproject floor and the newest served)")
    ap.add_argument("--work", default=None, help="where the --target folders go (default: a temp folder, removed)")
    ap.add_argument("--out", default=None, help="folder for compat.json/compat_table.md (default: the repository's)")
    ap.add_argument("--no-demo", action="store_true")
    ap.add_argument("--constraints", action="store_true", help="also rewrite constraints.txt from this environment")
    ap.add_argument("--table-from", metavar="JSON", help="only rewrite the table of docs/compat.md from a compat.json")
    a = ap.parse_args(argv)
    if a.table_from:
        write_outputs(json.loads(Path(a.table_from).read_text()), None)
        return 0

    decl = declared()
    if a.versions:
        plan = [(v, "probe") for v in a.versions]
    else:
        newest = newest_served()
        plan = [(decl["floor"], "oldest")] + ([(newest, "newest")] if newest != decl["floor"] else [])
        tested = decl["tested"].get("transformers")
        if tested and tested[0] != decl["floor"]:
            print(f"compat: pyproject's transformers floor {decl['floor']} is not the oldest tested {tested[0]}")
            return 1
    work = Path(a.work or tempfile.mkdtemp(prefix="wb_compat_"))
    out = Path(a.out) if a.out else None
    logs = Path(tempfile.mkdtemp(prefix="wb_compat_junit_"))
    results = []
    t_all = time.perf_counter()
    reference = fingerprint(_env(None))  # the environment's own transformers: what the docs' figures came from
    env_versions = _versions(_env(None), None)
    for version, role in plan:
        t0 = time.perf_counter()
        target = work / f"transformers-{version}"
        extra = install(version, target)
        inst = round(time.perf_counter() - t0, 1)
        r = smoke(target, logs, demo=not a.no_demo, reference=reference)
        r.update(role=role, install_s=inst, extra_installed=extra)
        if r["transformers"] != version or r["transformers_from"] != "target folder":
            r["passed"] = False
            r["failures"].append(f"imported transformers {r['transformers']}, not {version} from the target folder")
        results.append(r)
        status = "passed" if r["passed"] else "FAILED: " + "; ".join(r["failures"][:5])
        print(f"compat: transformers {r['transformers']} ({role}) torch {r['torch']}: {status} "
              f"(install {inst}s, tests {r['tests_s']}s, demo {r.get('demo_s', '-')}s)", flush=True)
    total = round(time.perf_counter() - t_all, 1)
    newest_tested = decl["tested"].get("transformers", [None, None])[1]
    for r in results:
        if r["role"] == "newest" and r["passed"] and newest_tested and Version(r["transformers"]) > Version(newest_tested):
            print(f"compat: transformers {r['transformers']} passed; raise the newest tested release in pyproject "
                  f"[tool.moe-workbench.compat] and workbench.models.families.TESTED from {newest_tested}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    doc = {"generated_by": "tools/compat.py", "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
           "machine": {"python": platform.python_version(), "platform": platform.platform(terse=True),
                       "cpus": os.cpu_count()},
           "total_s": total, "environment": {**env_versions, "demo_fingerprint": reference}, "results": results}
    write_outputs(doc, out)
    ok = all(r["passed"] for r in results)
    if a.constraints and ok:
        ok = update_constraints(ROOT / "constraints.txt")
    return 0 if ok else 1


def update_constraints(path: Path) -> bool:
    """Write the constraints to a temporary file, check that pip resolves the README's install with them
    (a dry run, nothing installed), and only then replace `path`."""
    tmp = path.with_name(path.name + ".new")
    write_constraints(tmp)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                        "--disable-pip-version-check", "-c", str(tmp), f"torch=={metadata.version('torch').split('+')[0]}",
                        "-e", f"{ROOT}[test]"], capture_output=True, text=True)
    if r.returncode:
        tmp.unlink()
        print("compat: pip cannot resolve the install with the new constraints; constraints.txt kept: "
              + (r.stderr.strip().splitlines() or ["?"])[-1])
        return False
    tmp.replace(path)
    print(f"compat: {path.name} rewritten (pip resolves the README's install with it)")
    return True


if __name__ == "__main__":
    sys.exit(main())
