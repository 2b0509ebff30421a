"""The playground page in a real headless Chromium against a real server (open: no API keys).

Needs Debian's chromium and the playwright package (CI: `apt-get install -y chromium` and
`pip install playwright`); skipped with the reason when either is missing. The screenshot is
saved to test-artifacts/playground.png.
"""

import shutil
import time
from pathlib import Path

import groq
import httpx
import pytest

from openlpu.serve.app import create_app, running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def base_url():
    from openlpu.runtime.engine import Engine

    with running_server(create_app(Engine.load())) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(base_url + "/")
        yield page
        browser.close()


def set_field(page, selector: str, value: str) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)


def test_chat_in_the_browser_matches_the_api(page, base_url):
    page.wait_for_selector("#model option", state="attached")
    model = page.eval_on_selector("#model", "el => el.value")
    assert model == httpx.get(base_url + "/openai/v1/models").json()["data"][0]["id"]
    page.fill("#system", "Answer briefly.")
    set_field(page, "#temperature", "0")
    set_field(page, "#maxtokens", "12")
    set_field(page, "#seed", "5")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
    reply = page.inner_text(".msg.assistant .body")
    # the same request through the SDK: the page must show exactly the API's text
    expected = groq.Groq(base_url=base_url, api_key="unused").chat.completions.create(
        model=model, temperature=0, seed=5, max_completion_tokens=12,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
    assert reply == expected.strip() or reply == expected  # innerText may trim edge whitespace
    assert page.inner_text("#ntok") != "–" and page.is_hidden("#lpuwrap")  # no Program: no LPU figure
    assert page.inner_text(".msg.user .body") == "What is the capital of France?"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground.png"))


def test_stop_button_ends_the_stream_and_frees_the_slot(page, base_url):
    set_field(page, "#temperature", "1")
    set_field(page, "#maxtokens", "2000")
    page.fill("#prompt", "Tell me a long story about a lighthouse.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant .body')[1]?.textContent.length > 0",
                           timeout=60_000)
    page.click("#stop")
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=10_000)
    deadline = time.monotonic() + 5
    while httpx.get(base_url + "/health").json()["active_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(base_url + "/health").json()["active_sequences"] == 0
    assert len(page.query_selector_all(".msg.assistant")) == 2  # the history keeps both turns


def test_a_failed_turn_stays_out_of_the_conversation(page, base_url):
    """A prompt past the context window gets the API's error on the page; the next turn is sent without it
    (it was kept, and every later turn failed the same way until Clear), so its reply is the API's for that
    turn alone."""
    page.click("#clear")
    page.fill("#system", "Answer briefly.")
    set_field(page, "#temperature", "0")
    set_field(page, "#maxtokens", "12")
    set_field(page, "#seed", "5")
    page.fill("#prompt", "word " * 10_000)
    page.click("#send")
    page.wait_for_selector(".msg.error", timeout=60_000)
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=10_000)
    assert "context" in page.inner_text(".msg.error .body")
    page.fill("#prompt", "What is the capital of France?")
    page.click("#send")
    page.wait_for_function("!document.querySelector('#send').disabled", timeout=60_000)
    model = page.eval_on_selector("#model", "el => el.value")
    expected = groq.Groq(base_url=base_url, api_key="unused").chat.completions.create(
        model=model, temperature=0, seed=5, max_completion_tokens=12,
        messages=[{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content
    reply = page.query_selector_all(".msg.assistant .body")[-1].inner_text()
    assert reply == expected.strip() or reply == expected
