"""The newcomer's wait: `workbench demo` from a fresh folder until the dashboard answers, and until all is done.

    .venv/bin/python benchmarks/first_hour.py --case "loaded, 8 other jobs"          # appends a row
    .venv/bin/python benchmarks/first_hour.py --case old --pythonpath /tmp/old_tree  # another checkout

Each run starts `workbench demo --out <fresh tmp> --port <free>` as its own process with a cold numba
cache (NUMBA_CACHE_DIR in a fresh folder, as on a fresh install) and records, from the process start:
`url_s` (the "[demo] dashboard: http://..." line), `first_page_s` (the URL answers HTTP 200 with the
first run's dashboard), `steps_s` (each "[demo]" line), `report_s` ("[demo] report:", everything
computed), the 1-minute load average at the start and the end, CPU count and versions. The demo is
then stopped with Ctrl-C (SIGINT). `--screenshot PATH` saves the overview of the first run at
1,440 px once its load figure is in (needs chromium, chromedriver and selenium). Results are appended
to benchmarks/results/first_hour_cpu.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "first_hour_cpu.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
        c.request("GET", u.path or "/")
        r = c.getresponse()
        if r.status in (301, 302, 303, 307, 308):
            c.close()
            return _answers(f"{u.scheme}://{u.netloc}{r.getheader('Location')}")
        return r.status == 200 and b"_dash-config" in r.read()
    except OSError:
        return False


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for m in ("torch", "transformers", "polars", "numba", "umap", "dash"):
        try:
            out[m] = __import__(m).__version__
        except Exception:
            pass
    return out


def _screenshot(url: str, path: Path, timeout: float = 600) -> bool:
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "chromium"
    for f in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1440,1100", "--disable-dev-shm-usage"):
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        d.get(url)
        end = time.time() + timeout
        while time.time() < end:
            if d.find_elements(By.CSS_SELECTOR, "#wb-page .js-plotly-plot") and \
                    not d.find_elements(By.CSS_SELECTOR, "#wb-page .computing"):
                time.sleep(1.5)
                path.parent.mkdir(parents=True, exist_ok=True)
                d.save_screenshot(str(path))
                return True
            time.sleep(1)
        return False
    finally:
        d.quit()


def measure(case: str, pythonpath: str | None, quick: bool, screenshot: Path | None) -> dict:
    port = _free_port()
    out = Path(tempfile.mkdtemp(prefix="wb_first_hour_"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", NUMBA_CACHE_DIR=str(out / "numba_cache"), USE_HUB_KERNELS="NO")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    # another checkout: its folder first on the path, and the editable install's finder out of the way
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
            if pythonpath else "import sys; ") + "from workbench.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "demo",
           "--out", str(out / "demo"), "--port", str(port)] + (["--quick"] if quick else [])
    load0 = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                         cwd=str(out))
    steps, url, first_page, report = [], None, None, None
    url_seen = threading.Event()

    def poll():
        nonlocal first_page
        target = f"http://127.0.0.1:{port}/"
        while p.poll() is None and first_page is None:
            if _answers(target):
                first_page = time.time() - t0
                return
            time.sleep(0.5)

    threading.Thread(target=poll, daemon=True).start()
    shot = None
    for line in p.stdout:
        t = time.time() - t0
        if line.startswith("[demo]"):
            steps.append([round(t, 1), line.strip()[7:][:120]])
        if url is None and "[demo] dashboard:" in line:
            url = t
            url_seen.set()
        if "[demo] report:" in line:
            report = t
            if screenshot is not None:
                shot = _screenshot(f"http://127.0.0.1:{port}/", screenshot)
            p.send_signal(signal.SIGINT)
            break
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
    if url is None and first_page is not None:  # an old demo serves after everything, without the line
        url = first_page
    return {"case": case, "quick": quick, "load_avg_1m_start": round(load0, 2),
            "load_avg_1m_end": round(os.getloadavg()[0], 2), "url_s": None if url is None else round(url, 1),
            "first_page_s": None if first_page is None else round(first_page, 1),
            "report_s": None if report is None else round(report, 1), "screenshot": bool(shot), "steps_s": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", required=True, help="what the machine was doing (quiet, loaded: N other jobs)")
    ap.add_argument("--pythonpath", help="run another checkout's workbench (its package folder first on the path)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--screenshot", type=Path)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    row = measure(a.case, a.pythonpath, a.quick, a.screenshot)
    print(json.dumps(row, indent=1))
    doc = json.loads(a.out.read_text()) if a.out.exists() else {
        "what": "workbench demo from a fresh folder (cold numba cache) on this machine: seconds from the process "
                "start until the dashboard URL is printed, until it answers, and until every analysis and the "
                "report are done",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(terse=True)}, "versions": _versions(),
        "runs": []}
    doc["runs"].append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
