"""The chat page at ``GET /``, in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) against a real server on the bundled model."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from openelm_mlx.loading import load
from openelm_mlx.server.app import Settings
from openelm_mlx.server.cli import build_server
from openelm_mlx.server.protocol import Limits, ServedModel

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
from selenium.webdriver.common.by import By  # noqa: E402

BUNDLED = Path(__file__).resolve().parents[1] / "openelm_mlx" / "bundled" / "openelm-tiny-kjv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
# Where the screenshot goes: $OPENELM_TEST_ARTIFACTS, else the pytest temporary directory.
ARTIFACTS = os.environ.get("OPENELM_TEST_ARTIFACTS")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no headless browser here: install Debian's chromium and chromium-driver (.ci/run tries to)",
)


@pytest.fixture(scope="module")
def served():
    model, tok = load(BUNDLED)
    models = {"openelm-tiny-kjv": ServedModel("openelm-tiny-kjv", model, tok)}
    settings = Settings(limits=Limits(default_max_tokens=64, max_tokens_limit=400), max_concurrency=4)
    server = build_server(models, settings=settings, log_level="warning", grace=0.5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.server.started:
        assert thread.is_alive()
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.sock.getsockname()[1]}"
    server.stop()
    thread.join(30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # nothing left in /tmp
    # Without LD_PRELOAD: CI preloads OpenBLAS for the in-process tests, and Chromium crashes with it.
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    driver = webdriver.Chrome(service=Service(DRIVER, env=env), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def page(browser, served):
    browser.get(served + "/")
    browser.execute_script("localStorage.clear(); sessionStorage.clear();")
    browser.get(served + "/")
    wait(lambda: browser.find_element(By.CSS_SELECTOR, "#model option"))
    return browser


def wait(cond, timeout: float = 30.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except Exception:  # the element is not there yet
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "timed out waiting for the page"
        time.sleep(step)


def set_value(driver, element_id: str, value: str) -> None:
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];e.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def bubbles(driver, role: str) -> list[str]:
    return [e.text for e in driver.find_elements(By.CSS_SELECTOR, f".msg.{role} .content")]


def idle(driver) -> bool:
    return driver.find_element(By.ID, "stop").get_attribute("disabled") is not None


def cancelled(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("openelm_sequences_cancelled_total "):
            return float(line.split()[1])
    return 0.0


def test_chat_streams_persists_and_starts_over(page, served, tmp_path):
    set_value(page, "temperature", "0")
    set_value(page, "max-tokens", "120")
    send(page, "And God said")
    lengths = []
    while not (idle(page) and bubbles(page, "assistant") and bubbles(page, "assistant")[-1]):
        texts = bubbles(page, "assistant")
        if texts and texts[-1] and (not lengths or len(texts[-1]) != lengths[-1]):
            lengths.append(len(texts[-1]))
        time.sleep(0.01)
    assert len(lengths) >= 2, "the reply did not grow in steps"
    reply = bubbles(page, "assistant")[-1]
    meta = page.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    assert "tokens" in meta and "tokens/s" in meta
    # The same request through the API gives the same text (greedy, page settings).
    body = {"messages": [{"role": "user", "content": "And God said"}], "temperature": 0, "max_tokens": 120}
    body["repetition_penalty"] = 1.2
    api = httpx.post(f"{served}/v1/chat/completions", json=body, timeout=60).json()
    assert reply == api["choices"][0]["message"]["content"].strip()  # Selenium's .text is stripped

    send(page, "And the evening and the morning")
    wait(lambda: idle(page) and len(bubbles(page, "assistant")) == 2 and bubbles(page, "assistant")[1])
    shot = Path(ARTIFACTS) if ARTIFACTS else tmp_path
    shot.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(shot / "chat-page.png"))

    page.refresh()  # the conversation survives a reload
    wait(lambda: len(bubbles(page, "assistant")) == 2)
    assert bubbles(page, "user") == ["And God said", "And the evening and the morning"]
    assert bubbles(page, "assistant")[0] == reply

    page.find_element(By.ID, "new-chat").click()
    assert bubbles(page, "user") == [] and bubbles(page, "assistant") == []
    page.refresh()
    wait(lambda: page.find_element(By.CSS_SELECTOR, "#model option"))
    assert bubbles(page, "user") == []


def test_stop_aborts_the_reply_and_frees_the_slot(page, served):
    before = cancelled(served)
    set_value(page, "temperature", "0")
    set_value(page, "max-tokens", "400")
    set_value(page, "repetition-penalty", "1")
    send(page, "In the beginning")
    wait(lambda: bubbles(page, "assistant") and len(bubbles(page, "assistant")[-1]) > 10)
    page.find_element(By.ID, "stop").click()
    wait(lambda: idle(page))
    meta = page.find_element(By.CSS_SELECTOR, ".msg.assistant .meta").text
    assert "(stopped)" in meta
    wait(lambda: cancelled(served) > before, timeout=10)  # the server cancelled the sequence


def test_text_is_never_html(page, served):
    hostile = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'
    # An assistant reply holding markup, as a stored conversation would bring it back.
    stored = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": hostile}]}
    page.execute_script("localStorage.setItem('openelm-mlx-chat', arguments[0]);", json.dumps(stored))
    page.refresh()
    wait(lambda: bubbles(page, "assistant"))
    set_value(page, "max-tokens", "4")
    send(page, hostile)  # and the user's own text
    wait(lambda: idle(page) and len(bubbles(page, "user")) == 2)
    time.sleep(0.3)
    assert page.execute_script("return window.__pwned === undefined")
    assert page.find_elements(By.CSS_SELECTOR, "#log img, #log script, #log b") == []
    assert bubbles(page, "assistant")[0] == hostile and bubbles(page, "user")[1] == hostile


def test_server_errors_are_shown(page):
    set_value(page, "max-tokens", "100000")  # over the server's --max-tokens-limit
    send(page, "And God said")
    error = wait(lambda: page.find_element(By.ID, "error").text)
    assert error.startswith("400:") and "max_tokens" in error
    assert bubbles(page, "assistant") == []  # no empty reply left behind


def test_no_ui_and_api_key(browser):
    model, tok = load(BUNDLED)
    models = {"m": ServedModel("m", model, tok)}
    for settings, status in ((Settings(ui=False), 404), (Settings(api_key="k"), 200)):
        server = build_server(models, settings=settings, log_level="warning")
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.sock.getsockname()[1]}"
        try:
            r = httpx.get(url + "/")
            assert r.status_code == status
            if status == 200:  # the page loads without the key; the API behind it needs it
                assert "<title>openelm-mlx chat</title>" in r.text
                assert httpx.get(url + "/v1/models").status_code == 401
                browser.get(url + "/")
                assert "API key" in wait(lambda: browser.find_element(By.ID, "error").text)
                assert browser.find_element(By.ID, "api-key").is_displayed()
                set_value(browser, "api-key", "k")
                wait(lambda: browser.find_element(By.CSS_SELECTOR, "#model option").text == "m")
        finally:
            server.stop()
            thread.join(30)
