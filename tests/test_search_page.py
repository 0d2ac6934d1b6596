"""The search page in a real headless Chromium: ask, answer the clarifying question, see the matched turn."""

from __future__ import annotations

import shutil

import pytest

from tests.test_clarify import two_hikes
from tests.test_serve import Server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Debian chromium and chromium-driver "
                                "(`make system-deps` installs them)")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # This machine's network is closed: without these Chromium keeps trying Google's hosts at start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_ask_answer_the_question_and_see_the_matched_turn(tmp_path, embedder, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    from ops.runtime.assemble import open_engine
    from ops.runtime.config import Config
    from ops.serve.app import Limits
    from ops.serve.keys import KeyStore

    engine = open_engine(Config(data_dir=tmp_path / "data", vector_store="sqlite"), embedder=embedder)
    engine.ingest(two_hikes())
    keys = KeyStore(None, tmp_path / "data")
    server = Server(engine, keys, Limits())
    try:
        key = keys.create("t1")[1]
        browser.get(f"http://127.0.0.1:{server.port}/#key={key}&user=u1")
        wait = WebDriverWait(browser, 120)
        browser.find_element(By.ID, "query").send_keys("the glacier hike")
        browser.find_element(By.CSS_SELECTOR, "#ask button[type=submit]").click()
        wait.until(ready.visibility_of_element_located((By.ID, "question")))
        assert "which" in browser.find_element(By.ID, "question-text").text.lower()
        options = {b.text: b for b in browser.find_elements(By.CSS_SELECTOR, "#options button")}
        assert set(options) == {"with Ann", "with Cem"}
        options["with Cem"].click()
        wait.until(lambda d: not d.find_element(By.ID, "question").is_displayed()
                   and "fragments for" in d.find_element(By.ID, "status").text)
        first = browser.find_element(By.CSS_SELECTOR, "#results .fragment")
        assert first.find_element(By.CSS_SELECTOR, ".meta").text.startswith("c2")
        matched = first.find_elements(By.CSS_SELECTOR, ".turn.match")
        assert any("glacier" in turn.text for turn in matched)
        assert all(turn.find_element(By.CSS_SELECTOR, ".who").text == "Cem" for turn in matched)
        roles = [li.get_attribute("data-role") for li in browser.find_elements(By.CSS_SELECTOR, "#conversation li")]
        assert roles == ["user", "assistant", "user"]
        # The key came in the URL fragment and does not stay in the address bar.
        assert key not in browser.current_url
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        server.stop()
        engine.close()
        keys.close()
