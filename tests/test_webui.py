"""The chat page (web/index.html) in a real browser: headless Chromium from Debian's `chromium` package, driven by
Playwright (its PyPI wheel; never `playwright install`), against llama-server serving the page (serve.py passes
--path web) and a tiny base with two adapters (as tests/test_adapters.py serves them).

Without Chromium or Playwright these tests skip with one line naming the package; with LORA_SHIP_CI=1 (.ci/run,
which installs chromium) they fail instead."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import ROOT, free_port, http_json, run_script, running_server
from test_adapters import base, base_gguf, checkpoints, exported  # noqa: F401 (fixtures: the tiny base, adapters)

pytestmark = needs_llama_cpp

CHROMIUM = Path(os.environ.get("LORA_SHIP_CHROMIUM", "/usr/bin/chromium"))
# Chromium as root in a container: no sandbox, no GPU, nothing fetched in the background
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# where the compare view's screenshot goes (`make screenshot` copies it to docs/img/compare.png)
SCREENSHOTS = Path(os.environ.get("LORA_SHIP_SCREENSHOTS", ROOT / "out" / "webui"))


def missing(what: str):
    if os.environ.get("LORA_SHIP_CI") == "1":
        pytest.fail(f"{what} (CI installs it: .ci/run)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("no playwright (pip install -r requirements.local.txt)")
    if not CHROMIUM.exists():
        missing(f"no browser at {CHROMIUM}: install Debian's chromium package (apt-get install chromium)")
    with sync_playwright() as p:
        # a fresh profile each launch (Playwright's temporary user-data-dir)
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(base_gguf, exported, tmp_path_factory):
    """The tiny base (served as "tiny") with the adapters alpha and beta, chosen per request by name."""
    tmp = tmp_path_factory.mktemp("webui-server")
    with running_server(base_gguf["f16"], tmp, extra=("--adapters", exported[0]["f16"], "--alias", "tiny")) as url:
        yield url


class Page:
    """A browser page on the chat page, collecting console errors and uncaught exceptions."""

    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url + "/")

    def settings(self, **values):
        for field, value in values.items():
            self.page.fill(f"#{field}", str(value))

    def ask(self, text: str):
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def answers(self, status: str = "done", n: int = 1, timeout: float = 60_000) -> list:
        """The answers of the last turn once n of them have that status."""
        self.page.wait_for_function(
            "([status, n]) => { const t = [...document.querySelectorAll('.turn')].pop();"
            " return t && t.querySelectorAll(`.answer[data-status=${status}]`).length === n; }",
            arg=[status, n], timeout=timeout)
        return self.page.locator(".turn").last.locator(".answer").all()


@pytest.fixture
def page(browser, server):
    p = Page(browser, server, viewport={"width": 1280, "height": 800})
    p.page.wait_for_selector("#status.ok")
    yield p
    p.context.close()


def api_answer(url: str, model: str, messages: list, **sampling) -> str:
    _, out = http_json(url + "/v1/chat/completions", {"model": model, "messages": messages, **sampling})
    return out["choices"][0]["message"]["content"]


def plain(text: str) -> str:
    """Text without the Markdown marks the page renders as formatting (the tiny model may produce a few)."""
    return re.sub(r"[`*]", "", text)


def test_the_server_serves_the_page_at_root(server):
    import urllib.request
    with urllib.request.urlopen(server + "/") as r:
        html = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert "<title>lora-ship chat</title>" in html
    # nothing fetched from elsewhere: no src/href to another origin, and the page's CSP allows none
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "default-src 'none'" in html and "connect-src 'self'" in html


def test_the_pages_csp_names_its_script():
    """The CSP lets the inline script run by its hash: a stale hash would leave the page dead."""
    run_script("tools/web_csp.py", "--check")


def test_chat_streams_answers_with_history_regenerate_and_clear(page, server):
    p = page.page
    assert [o.text_content() for o in p.locator("#model option").all()] == ["tiny", "alpha", "beta"]
    p.select_option("#model", "alpha")
    page.settings(temperature=0, **{"max-tokens": 24, "seed": 7})
    with p.expect_request("**/v1/chat/completions") as first:
        page.ask("Once upon a time")
    body = first.value.post_data_json
    assert body["stream"] is True and body["model"] == "alpha" and body["seed"] == 7
    [answer] = page.answers()
    text = answer.locator(".body").text_content()
    sampling = {"temperature": 0, "max_tokens": 24, "seed": 7, "top_p": 0.95}
    want = api_answer(server, "alpha", [{"role": "user", "content": "Once upon a time"}], **sampling)
    assert text and plain(text) == plain(want)  # the chat template is the server's: same answer as the API's
    stats = answer.locator(".stats").text_content()
    assert re.search(r"first token \d+ ms · [\d.]+ tokens/s · 24 tokens · seed 7", stats), stats

    # a second turn carries the first (multi-turn history, the model's own answer)
    with p.expect_request("**/v1/chat/completions") as second:
        page.ask("And then?")
    assert second.value.post_data_json["messages"] == [
        {"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": want},
        {"role": "user", "content": "And then?"}]
    page.answers()
    # regenerate asks again with the same history and replaces the last answer
    with p.expect_request("**/v1/chat/completions") as again:
        p.click("#regenerate")
    assert again.value.post_data_json["messages"] == second.value.post_data_json["messages"]
    page.answers()
    assert p.locator(".turn").count() == 2 and p.locator(".answer").count() == 2
    p.click("#clear")
    assert p.locator(".turn").count() == 0 and p.locator("#empty").is_visible()
    assert page.errors == []
