"""Browser tests: the dashboard served on a free local port, driven by headless Chromium via Selenium.

Skipped cleanly when chromium, chromedriver or selenium are missing. Screenshots of every page go to
$WORKBENCH_ARTIFACTS (default tests/e2e/artifacts/) to be looked at.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

BROWSER_OK = bool(CHROMIUM and DRIVER and HAVE_SELENIUM)
ARTIFACTS = Path(os.environ.get("WORKBENCH_ARTIFACTS", Path(__file__).parent / "artifacts"))


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason="needs chromium + chromedriver + selenium (apt-get install chromium chromium-driver)")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.browser)
            if not BROWSER_OK:
                item.add_marker(skip)


class LiveServer:
    """A Dash app on 127.0.0.1:<free port>, threaded like `workbench app`, stopped at teardown."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.srv = make_server("127.0.0.1", 0, app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self.srv.server_port}"
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.srv.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server():
    servers = []

    def start(app) -> LiveServer:
        s = LiveServer(app)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def browser(tmp_path):
    """browser() -> a fresh headless Chromium (own profile, so its sessionStorage is its own)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers = []

    def make(width=1400, height=1000):
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     f"--user-data-dir={tmp_path / f'profile{len(drivers)}'}"):
            opts.add_argument(flag)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        downloads = tmp_path / f"downloads{len(drivers)}"
        downloads.mkdir()
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                               "download.prompt_for_download": False})
        d = webdriver.Chrome(service=Service(DRIVER), options=opts)
        d.set_page_load_timeout(60)
        d.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        d.download_dir = downloads
        drivers.append(d)
        return d

    yield make
    for d in drivers:
        try:
            d.quit()
        except Exception:
            pass


def wait_for(driver, fn, timeout=30.0, what="condition"):
    """Poll fn(driver) until it returns something truthy; fail with `what` after timeout."""
    end = time.time() + timeout
    last_exc = None
    while time.time() < end:
        try:
            v = fn(driver)
            if v:
                return v
        except Exception as e:  # stale elements while Dash re-renders
            last_exc = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" ({last_exc})" if last_exc else ""))


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def console_errors(driver) -> list[str]:
    """SEVERE browser console entries (JS errors, failed requests such as a callback's HTTP 500)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def screenshot(driver, name: str) -> Path:
    """The whole page (not just the window) as ARTIFACTS/<name>.png."""
    import base64

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    p = ARTIFACTS / f"{name}.png"
    try:
        w, h = driver.execute_script("return [document.documentElement.scrollWidth, "
                                     "Math.min(document.documentElement.scrollHeight, 12000)];")
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}})
        p.write_bytes(base64.b64decode(shot["data"]))
    except Exception:  # an older driver without CDP: the visible window only
        driver.save_screenshot(str(p))
    return p


def dash_idle(driver) -> bool:
    """No Dash callback in flight (the renderer marks pending updates with data-dash-is-loading)."""
    return not css(driver, "[data-dash-is-loading='true']")
