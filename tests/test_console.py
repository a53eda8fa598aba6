"""The browser console in a real headless Chromium (Debian's `chromium`, driven by Playwright) against the
daemon on the simulated microscope, served by uvicorn on loopback with a real inference worker.

Everything is asserted from the page itself (canvas pixels, table rows, messages) and, for the effects of
the page's writes, through the API. Screenshots of each state go to test-artifacts/console/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_api import AUTH, TOKEN, served_daemon_with_a_worker

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "console"
WAIT_MS = 30_000  # a condition not met by then fails the test

# the page's own canvases, read back as pixels
NON_BLACK = """id => { const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const seen = new Set(); let lit = 0;
  for (let i = 0; i < d.length; i += 4) { if (d[i] + d[i + 1] + d[i + 2] > 0) lit++; seen.add(d[i]); }
  return {lit, levels: seen.size}; }"""
# pixels of one series colour in a plot canvas (the line drawn through the points)
COLOUR_PIXELS = """([i, rgb]) => { const c = document.querySelectorAll('#plots canvas')[i];
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let k = 0; k < d.length; k += 4) if (Math.abs(d[k] - rgb[0]) + Math.abs(d[k + 1] - rgb[1])
    + Math.abs(d[k + 2] - rgb[2]) < 40) n++;
  return n; }"""
SR_SPOTS = """() => { const c = document.getElementById('sr');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 0 && d[i] < 250) n++; return n; }"""


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    with served_daemon_with_a_worker(tmp_path_factory.mktemp("console")) as (base, client, daemon), \
            sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield base, client, daemon, browser
        finally:
            browser.close()


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _offline(page, base: str) -> list[str]:
    """Refuse every request that leaves the daemon; returns the list of refused URLs."""
    refused: list[str] = []

    def route(r):
        if r.request.url.startswith(base):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return refused


def test_docs_work_offline(console):
    base, _, _, browser = console
    page = browser.new_page()
    refused = _offline(page, base)
    page.goto(base + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=WAIT_MS)
    assert "smartscope" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_function("document.querySelectorAll('.opblock').length > 10", timeout=WAIT_MS)  # operations
    _shot(page, "docs-swagger")
    assert refused == []
    page.close()


def test_console_drives_a_run_and_shows_it_live(console):
    base, client, daemon, browser = console
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    refused = _offline(page, base)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('conn').textContent.includes('live')", timeout=WAIT_MS)
    page.wait_for_selector('[data-policy="focus"] input.enabled', timeout=WAIT_MS)
    _shot(page, "1-idle")

    # a wrong token: the page says why, and nothing started
    runs_before = len(client.get("/acquisitions").json())
    page.fill('#start-form input[name="frames"]', "3000")
    page.click("#start")
    page.fill("#token-input", "not-the-token")
    page.click("#token-ok")
    page.wait_for_function("document.getElementById('control-msg').textContent.includes('refused the token')",
                           timeout=WAIT_MS)
    assert "nothing changed" in page.inner_text("#control-msg")
    assert len(client.get("/acquisitions").json()) == runs_before
    _shot(page, "2-wrong-token")

    # the right token, asked again because the wrong one was forgotten: the run starts
    page.click("#start")
    page.fill("#token-input", TOKEN)
    page.click("#token-ok")
    page.wait_for_function("document.getElementById('control-msg').textContent.startsWith('started run')",
                           timeout=WAIT_MS)
    run_id = page.inner_text("#control-msg").split()[2].rstrip(":")
    assert client.get(f"/acquisitions/{run_id}").json()["state"] == "acquiring"

    # the live frame with its localizations, the plots, the growing SR image, a decision in the feed
    page.wait_for_function("document.getElementById('frame-caption').textContent.includes('localizations')",
                           timeout=WAIT_MS)
    caption = page.inner_text("#frame-caption")  # "frame N · t.. p0 .. · K localizations": the frame's own
    shown, drawn = int(caption.split()[1]), int(caption.split(" · ")[-1].split()[0])
    assert len(client.get(f"/results/{shown}", params={"acquisition": run_id}).json()["localizations"]) == drawn
    frame = page.evaluate(NON_BLACK, "frame")
    assert frame["lit"] > 0.5 * 480 * 480 and frame["levels"] > 50  # a 64 × 64 frame scaled up, auto-contrast
    page.wait_for_function(f"({SR_SPOTS})() > 200", timeout=WAIT_MS)
    page.wait_for_function("document.querySelectorAll('#decisions tbody tr').length > 0", timeout=WAIT_MS)
    page.wait_for_function(f"({COLOUR_PIXELS})([0, [79, 163, 255]]) > 50", timeout=WAIT_MS)  # emitters / frame
    assert page.evaluate(COLOUR_PIXELS, [5, [192, 200, 212]]) > 50  # the latency line
    first = page.locator("#decisions tbody tr").last.locator("td")
    assert first.nth(1).inner_text().isdigit()  # the frame that caused it
    assert first.nth(3).inner_text() in {"illumination", "focus", "frame_rate", "view_angle", "safe hold"}
    assert int(page.inner_text("#sr-caption").split()[0].replace(",", "")) > 0
    _shot(page, "3-running")

    # a policy switched off on the page is off in the API
    assert client.get("/policies/focus").json()["enabled"] is True
    page.uncheck('[data-policy="focus"] input.enabled')
    page.wait_for_function("document.getElementById('policy-msg').textContent === 'focus: disabled'",
                           timeout=WAIT_MS)
    assert client.get("/policies/focus").json()["enabled"] is False
    # a parameter out of range: the API's 422 on the page, nothing applied
    page.click('[data-policy="illumination"] summary')  # the parameters fold out
    page.fill('[data-policy="illumination"] input[data-key="set_point_emitters"]', "-5")
    page.click('[data-policy="illumination"] button')
    page.wait_for_function("document.getElementById('policy-msg').textContent.includes('422')", timeout=WAIT_MS)
    assert "set_point_emitters" in page.inner_text("#policy-msg")
    assert client.get("/policies/illumination").json()["params"]["set_point_emitters"] == 12
    _shot(page, "4-policy-changed")

    # stop ends the run
    page.click("#stop")
    page.wait_for_function("document.getElementById('state').textContent === 'cancelled'", timeout=WAIT_MS)
    info = client.get(f"/acquisitions/{run_id}").json()
    assert info["state"] == "cancelled" and 0 < info["frames_acquired"] < 3000
    page.wait_for_function(f"document.querySelector('#runs tbody').textContent.includes('{run_id}')",
                           timeout=WAIT_MS)
    _shot(page, "5-stopped")
    client.patch("/policies/focus", json={"enabled": True}, headers=AUTH)
    assert errors == [] and refused == []
    page.close()


def test_console_follows_the_mda_index_of_a_multi_dimensional_run(console):
    base, client, daemon, browser = console
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('conn').textContent.includes('live')", timeout=WAIT_MS)
    page.click("#token-button")
    page.fill("#token-input", TOKEN)
    page.click("#token-ok")
    page.click("#start-form summary")  # the MDA sequence, as JSON
    page.fill("#mda", '{"stage_positions": [{"x": 2, "y": 2}, {"x": 8, "y": 2}], "channels": ["SMLM", "Widefield"], '
                      '"time_plan": {"interval": 0.05, "loops": 400}}')
    page.click("#start")
    page.wait_for_function("document.getElementById('control-msg').textContent.startsWith('started run')",
                           timeout=WAIT_MS)
    run_id = page.inner_text("#control-msg").split()[2].rstrip(":")
    try:
        # the page learns the plan's positions and channels (names from the frames) and offers them
        page.wait_for_function("document.querySelectorAll('#pick-p option').length === 3", timeout=WAIT_MS)
        page.wait_for_function("[...document.querySelectorAll('#pick-c option')].some(o => o.text === '1: Widefield')",
                               timeout=WAIT_MS)
        page.select_option("#pick-c", "1")
        page.wait_for_function("/ c1 .*\\(Widefield\\)/.test(document.getElementById('frame-caption').textContent)",
                               timeout=WAIT_MS)
        assert "no inference result" in page.inner_text("#frame-caption")  # the models read SMLM frames only
        _shot(page, "6-mda-widefield")
        before = int(page.inner_text("#frame-caption").split()[1])
        page.select_option("#pick-c", "")
        page.select_option("#pick-p", "1")
        page.wait_for_function(f"""(() => {{ const c = document.getElementById('frame-caption').textContent;
            return c.includes(' p1 ') && Number(c.split(' ')[1]) > {before}; }})()""", timeout=WAIT_MS)
        page.wait_for_timeout(300)  # let the plots take up the choice
        # every plotted point is of position 1, and says so when hovered
        box = page.locator("#plots canvas").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
        tip = page.inner_text("#tooltip")
        assert " p1 " in f" {tip} " and " c0 " in f" {tip} ", tip
        shown = page.evaluate("S.points.filter(p => picked(p.index)).map(p => p.index.p)")
        assert shown and set(shown) == {1}
        _shot(page, "7-mda-position-1")
    finally:
        client.post("/acquisitions/current/stop", headers=AUTH)
    assert client.get(f"/acquisitions/{run_id}").json()["state"] == "cancelled"
    page.close()
