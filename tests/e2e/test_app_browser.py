"""The dashboard in headless Chromium: pages load cleanly, tokens show routes, steering works per session."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest

from .conftest import console_errors, css, dash_idle, screenshot, wait_for

PAGES = ["/", "/tokens", "/experts", "/super-experts", "/locality", "/multilingual", "/behavior", "/atlas",
         "/steering", "/export"]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def torch_one_thread():
    """Two shared cores: one intra-op thread keeps tiny-model generation fast under load."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    from workbench.app.synthetic import write_synthetic_run

    return write_synthetic_run(tmp_path_factory.mktemp("e2e") / "run", n_tokens=4000, n_layers=4, n_experts=16,
                               top_k=2, seq_len=200)


@pytest.fixture(scope="module")
def strong_model(tiny_dir, torch_one_thread):
    """Tiny qwen3_moe with experts scaled up so that switching one off visibly changes greedy text."""
    import torch

    from workbench.models.loading import load_model

    mm = load_model(str(tiny_dir("qwen3_moe", layers=2, experts=8, top_k=2, hidden=64)))
    with torch.no_grad():
        for layer in mm.layers:
            layer.experts.down_proj.mul_(40)
    return mm


@pytest.fixture(scope="module")
def dash_app(e2e_run, strong_model):
    from workbench.app import make_app

    app = make_app(e2e_run, model=strong_model)
    # Dev tools on: callback exceptions and invalid props show up in the page, where the test looks.
    app.enable_dev_tools(debug=True, dev_tools_hot_reload=False, dev_tools_ui=True, dev_tools_props_check=True,
                         dev_tools_disable_version_check=True)
    return app


def _dom_id(**kw) -> str:
    """Dash's DOM id for a dict id (JSON, keys sorted, no spaces)."""
    return json.dumps(dict(sorted(kw.items())), separators=(",", ":"))


def _by_id(driver, dom_id):
    # getElementById: Dash's JSON ids are not valid CSS selectors
    return driver.execute_script("return document.getElementById(arguments[0]);", dom_id)


def _settled(driver, timeout=300):
    """The page's callbacks are done and no section is still computing. Generous: on a fresh install
    the first atlas compiles UMAP with numba, which takes minutes on 2 busy cores."""
    def ok(d):
        return dash_idle(d) and not css(d, ".computing") and css(d, "#wb-page h2")
    wait_for(driver, ok, timeout, f"the page {driver.current_url} to settle")
    time.sleep(0.3)


def _dev_errors(driver) -> list[str]:
    counts = [e.text for e in css(driver, ".dash-debug-menu__error-count") if e.text.strip() not in ("", "0")]
    return counts + [e.text for e in css(driver, ".dash-fe-error__title")]


def test_every_page_loads_without_browser_errors(dash_app, live_server, browser):
    srv = live_server(dash_app)
    d = browser()
    for path in PAGES:
        d.get(srv.url + path)
        _settled(d)
        shot = screenshot(d, "page_" + (path.strip("/") or "overview"))
        assert shot.stat().st_size > 5000
        errs = console_errors(d)
        assert not errs, f"{path}: browser console errors {errs}"
        assert not _dev_errors(d), f"{path}: Dash reported errors {_dev_errors(d)}"
        assert "Traceback" not in d.page_source
        active = [a.text for a in css(d, "#wb-nav a.active")]
        assert len(active) == 1, path
    # Navigation inside the single-page app (no reload) reaches every page too.
    d.get(srv.url + "/")
    _settled(d)
    for link in ["Tokens", "Locality", "Steering lab", "Overview"]:
        wait_for(d, lambda d: [a for a in css(d, "#wb-nav a") if a.text == link], 10, link)[0].click()
        wait_for(d, lambda d: [a for a in css(d, "#wb-nav a.active") if a.text == link], 20, f"{link} active")
        _settled(d)
    assert not console_errors(d)


def test_click_token_shows_its_route(dash_app, live_server, browser, e2e_run):
    srv = live_server(dash_app)
    d = browser()
    d.get(srv.url + "/tokens")
    _settled(d)
    span = wait_for(d, lambda d: _by_id(d, _dom_id(type="tok", pos=5)), 30, "token 5")
    span.click()
    wait_for(d, lambda d: "position 5" in _by_id(d, "tok-route-title").text, 20, "the route title")
    _settled(d)
    screenshot(d, "tokens_route")
    cells = [c.text for c in css(d, "#tok-route-table td")]
    # independent truth: the run's routing rows for doc 0, position 5
    want = (e2e_run.routing.filter((pl.col("doc_id") == 0) & (pl.col("pos") == 5)).sort("layer").collect())
    assert len(cells) == 2 * want.height
    for i, row in enumerate(want.iter_rows(named=True)):
        assert cells[2 * i] == str(row["layer"])
        shown = cells[2 * i + 1]
        for e, w in zip(row["experts"], row["weights"]):
            assert f"E{e} ({w:.3f})" in shown
    # the clicked token is outlined (spans are re-rendered, so look it up again)
    assert "selected" in _by_id(d, _dom_id(type="tok", pos=5)).get_attribute("class")
    assert len(css(d, ".tok.selected")) == 1
    assert not console_errors(d)


def _status(d):
    el = _by_id(d, "steer-status")
    return el.text if el else ""


def _wait_done(d, timeout=120):
    wait_for(d, lambda d: _status(d).startswith("done"), timeout, "generation to finish")
    _settled(d)


def _texts(d):
    """The texts as the page holds them (textContent): Selenium's `.text` is the rendered text, which
    folds a generated newline inside an inline token span and so differs from the library's string."""
    get = "return arguments[0].textContent;"
    return (d.execute_script(get, _by_id(d, "steer-baseline")), d.execute_script(get, _by_id(d, "steer-steered")))


def _click_cell(d, layer, expert):
    """A real mouse click in the centre of heatmap cell (layer, expert)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    d.execute_script("document.getElementById('steer-map').scrollIntoView({block: 'center'});")
    time.sleep(0.3)
    x, y = d.execute_script("""
        const gd = document.getElementById('steer-map').querySelector('.js-plotly-plot');
        const fl = gd._fullLayout, r = gd.getBoundingClientRect();
        return [r.left + fl.xaxis._offset + fl.xaxis.l2p(arguments[1]),
                r.top + fl.yaxis._offset + fl.yaxis.l2p(arguments[0])];""", layer, expert)
    ab = ActionBuilder(d)
    ab.pointer_action.move_to_location(int(x), int(y))
    ab.pointer_action.click()
    ab.perform()


def _chips(d):
    el = _by_id(d, "steer-chips")
    return el.text if el else ""


def _changing_ban(mm) -> int:
    """An expert of layer 0 whose ban changes the greedy continuation (found offline, the truth source)."""
    from workbench.steering import compare

    for e in range(mm.n_experts):
        r = compare(mm, PROMPT, {"ban": [(0, e)]}, max_new_tokens=16)
        if r.steered_ids != r.baseline_ids:
            return e
    pytest.fail("no single ban changes the tiny model's text")


def test_toggling_an_expert_changes_the_text(dash_app, live_server, browser, strong_model):
    from workbench.steering import compare

    e = _changing_ban(strong_model)
    want = compare(strong_model, PROMPT, {"ban": [(0, e)]}, max_new_tokens=16)
    srv = live_server(dash_app)
    d = browser()
    d.get(srv.url + "/steering")
    _wait_done(d)
    base, steered = _texts(d)
    assert base == steered and "identical" in d.page_source
    _click_cell(d, 0, e)
    wait_for(d, lambda d: f"ban L0:E{e}" in _chips(d), 20, "the chip for the clicked cell")
    _wait_done(d)
    screenshot(d, "steering_ban")
    base2, steered2 = _texts(d)
    assert base2 == base and steered2 != base2
    assert steered2 == PROMPT + want.steered_text  # the browser shows exactly what the library computes
    assert css(d, "#steer-steered .tok.changed")
    assert css(d, "#steer-changes") and css(d, "#steer-kl")
    # clicking the same cell again switches it off: back to identical
    _click_cell(d, 0, e)
    wait_for(d, lambda d: "No experts selected" in _chips(d), 20, "the toggle to switch off")
    _wait_done(d)
    assert _texts(d)[0] == _texts(d)[1]
    assert not console_errors(d) and not _dev_errors(d)


def _add_spec(d, spec, mode="ban"):
    from selenium.webdriver.common.by import By

    def click(el):
        d.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
        time.sleep(0.2)
        el.click()

    click(d.find_element(By.CSS_SELECTOR, f"#steer-mode input[value='{mode}']"))
    box = _by_id(d, "steer-spec")
    box.clear()
    box.send_keys(spec)
    click(_by_id(d, "steer-add"))


def test_two_sessions_keep_separate_toggles(dash_app, live_server, browser):
    srv = live_server(dash_app)
    a, b = browser(), browser()
    for d in (a, b):
        d.get(srv.url + "/steering")
        _wait_done(d)
    _add_spec(a, "L1:E2")
    wait_for(a, lambda d: "ban L1:E2" in _chips(d), 20, "A's chip")
    _add_spec(b, "L0:E1", mode="force")
    wait_for(b, lambda d: "force L0:E1" in _chips(d), 20, "B's chip")
    _wait_done(a)
    _wait_done(b)
    assert "force" not in _chips(a) and "ban" not in _chips(b)
    # state survives a reload of the same tab (session storage) and stays per tab
    a.get(srv.url + "/steering")
    _wait_done(a)
    assert "ban L1:E2" in _chips(a) and "force" not in _chips(a)
    screenshot(a, "steering_session_a")
    screenshot(b, "steering_session_b")
    # a bad SPEC is one sentence in the page, not an error
    _add_spec(a, "L9:E0")
    wait_for(a, lambda d: _by_id(d, "steer-spec-error").text.strip(), 20, "the SPEC error")
    assert "layer" in _by_id(a, "steer-spec-error").text.lower()
    assert not console_errors(a) and not console_errors(b)


def test_long_generation_does_not_freeze_other_pages(dash_app, live_server, browser):
    srv = live_server(dash_app)
    svc = dash_app.workbench.service
    a, b = browser(), browser()
    svc.lock.acquire()  # the model is busy: a generation that does not end until released
    try:
        a.get(srv.url + "/steering")
        wait_for(a, lambda d: "generating" in _status(d), 30, "A to be generating")
        t0 = time.time()
        b.get(srv.url + "/tokens")
        span = wait_for(b, lambda d: _by_id(d, _dom_id(type="tok", pos=3)), 30, "tokens page in B")
        span.click()
        wait_for(b, lambda d: "position 3" in _by_id(d, "tok-route-title").text, 20, "B's route")
        assert time.time() - t0 < 20
        assert "generating" in _status(a)  # still waiting for the model
    finally:
        svc.lock.release()
    _wait_done(a)


def test_export_downloads_a_table(dash_app, live_server, browser, e2e_run):
    from selenium.webdriver.common.by import By

    srv = live_server(dash_app)
    d = browser()
    d.get(srv.url + "/export")
    _settled(d)
    d.find_element(By.CSS_SELECTOR, "#exp-format input[value='csv']").click()
    _by_id(d, "exp-go").click()  # the default choice is the run's tokens table
    path = wait_for(d, lambda d: [p for p in d.download_dir.glob("*.csv")], 30, "the CSV download")[0]
    got = pl.read_csv(path)
    want = e2e_run.tokens.collect()
    assert got.height == want.height and got["token_id"].to_list() == want["token_id"].to_list()
    assert not console_errors(d)


def test_closed_loop_button_starts_and_fills_in(tmp_path, strong_model, live_server, browser, monkeypatch):
    """Pruning results: the button starts the model-backed variant; the section polls until it lands."""
    import importlib.machinery
    import sys
    import types

    import workbench.analysis as wa
    from workbench.analysis import AnalysisResult
    from workbench.app import make_app
    from workbench.app.synthetic import write_synthetic_run

    def analyze(run, model=None, prune=False, **kw):
        tables = {"experts": pl.DataFrame({"layer": [0], "expert": [1], "max_abs": [9.0]})}
        if prune:
            assert model is strong_model
            time.sleep(1.5)  # long enough for the page to show "computing" first
            tables["prune"] = pl.DataFrame({"what": ["baseline", "super experts"], "ppl": [10.0, 60.0]})
        return AnalysisResult("super-experts", tables, "experts", summary="fake")

    mod = types.ModuleType("workbench.analysis._fake_se")
    mod.__spec__ = importlib.machinery.ModuleSpec(mod.__name__, None)
    mod.analyze, mod.figures = analyze, (lambda res: {})
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(wa.MODULES, "super-experts", "_fake_se")
    run = write_synthetic_run(tmp_path / "run", n_tokens=400, n_layers=2, n_experts=8, seq_len=100)
    srv = live_server(make_app(run, model=strong_model, warm=()))
    d = browser()
    d.get(srv.url + "/super-experts")
    _settled(d)
    button = _by_id(d, _dom_id(type="loop-go", sec="super-experts-loop"))
    assert button is not None and "prune (" not in d.page_source
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", button)
    button.click()
    wait_for(d, lambda d: "closed-loop analysis" in d.page_source, 10, "the computing notice")
    wait_for(d, lambda d: "prune (2 rows)" in d.page_source, 30, "the pruning table")
    _settled(d)
    screenshot(d, "super_experts_loop")
    assert not console_errors(d)


SHOTS = Path(__file__).parent / "screenshots"  # git-ignored; the docs reuse the overview


def _layout_problems(d) -> list[str]:
    """What a reader at this width would trip over: sideways scrolling, untitled axes, toolbar over title."""
    return d.execute_script("""
        const out = [];
        const doc = document.documentElement;
        if (doc.scrollWidth > window.innerWidth + 1) out.push('page scrolls sideways: ' + doc.scrollWidth + ' > ' + window.innerWidth);
        document.querySelectorAll('.js-plotly-plot').forEach((gd, i) => {
            const fl = gd._fullLayout; if (!fl || !gd._fullData) return;
            const id = (gd.parentElement && gd.parentElement.id) || ('graph ' + i);
            const cartesian = gd._fullData.some(t => t.visible !== false && ['scatter', 'scattergl', 'bar', 'box', 'heatmap'].includes(t.type));
            if (cartesian && gd._fullData.length) {
                for (const ax of ['xaxis', 'yaxis']) {
                    const t = fl[ax] && fl[ax].title && fl[ax].title.text;
                    if (!t || t === 'Click to enter ' + ax[0].toUpperCase() + ' axis title') out.push(id + ': ' + ax + ' has no title');
                }
            }
            const r = gd.getBoundingClientRect();
            if (r.right > window.innerWidth + 1) out.push(id + ': figure runs past the window');
            const title = gd.querySelector('.gtitle'), bar = gd.querySelector('.modebar');
            if (title && bar) {
                const a = title.getBoundingClientRect(), b = bar.getBoundingClientRect();
                if (b.width && a.right > b.left && a.left < b.right && a.bottom > b.top && a.top < b.bottom)
                    out.push(id + ': the toolbar covers the title');
            }
        });
        return out;""")


def _trace_colours(d) -> dict:
    """{trace name: set of marker colours} over every figure of the page (legend entries only)."""
    pairs = d.execute_script("""
        const out = [];
        document.querySelectorAll('.js-plotly-plot').forEach(gd => (gd._fullData || []).forEach(t => {
            if (t.showlegend && t.name && t.marker && typeof t.marker.color === 'string' && t.type !== 'heatmap')
                out.push([t.name, t.marker.color.toLowerCase()]);
        }));
        return out;""")
    seen: dict = {}
    for name, colour in pairs:
        seen.setdefault(name, set()).add(colour)
    return seen


@pytest.mark.parametrize("width", [1440])
def test_every_page_reads_at_1440px_titled_axes_colours_keyed_by_label(dash_app, live_server, browser, width):
    """A screenshot of every page at 1,440 px, and the layout properties a reader needs on each."""
    from workbench.plots import colour_of

    srv = live_server(dash_app)
    d = browser(width=width, height=1000)
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": 1000, "deviceScaleFactor": 1,
                                                             "mobile": False})
    problems, colours = [], {}
    SHOTS.mkdir(exist_ok=True)
    for path in PAGES + ["/compare", "/placement"]:
        d.get(srv.url + path)
        _settled(d)
        time.sleep(0.5)  # plotly finishes its layout after Dash is idle
        name = path.strip("/") or "overview"
        import shutil

        shutil.copy(screenshot(d, f"{width}_{name}"), SHOTS / f"{width}_{name}.png")
        problems += [f"{path}: {p}" for p in _layout_problems(d)]
        for trace, cs in _trace_colours(d).items():
            colours.setdefault(trace, set()).update(cs)
    assert not problems, problems
    # one colour per label across every page, and it is the shared palette's colour for that label
    labelled = {n: cs for n, cs in colours.items() if n in ("en", "de", "fr", "ru", "zh", "control", "target")}
    assert labelled, colours
    for trace, cs in labelled.items():
        assert cs == {colour_of(trace).lower()}, (trace, cs)
