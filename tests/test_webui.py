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
from helpers import ROOT, admin_headers, free_port, http_json, run_script, running_server
from test_adapters import base, base_gguf, checkpoints, exported  # noqa: F401 (fixtures: the tiny base, adapters)

pytestmark = needs_llama_cpp

CHROMIUM = Path(os.environ.get("LORA_SHIP_CHROMIUM", "/usr/bin/chromium"))
# Chromium as root in a container: no sandbox, no GPU, no reliance on a small /dev/shm, nothing fetched in the
# background
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
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
        ADMIN[url] = admin_headers(tmp, url)  # for GET /slots, an admin route (patches/llama.cpp/0015)
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


def body_text(response) -> str:
    """A response's body as text. Chromium hands over a body whose type names no charset (llama-server's
    text/event-stream) decoded as windows-1252, the web's Latin-1 (bytes it leaves undefined become U+0080-U+009F);
    the page's own TextDecoder reads it as UTF-8, as the server meant. Undo the one, do the other."""
    text, raw = response.body().decode(), bytearray()
    for ch in text:
        try:
            raw += ch.encode("cp1252")
        except UnicodeEncodeError:
            if ord(ch) > 0xff:
                return text  # decoded as UTF-8 after all
            raw.append(ord(ch))
    return raw.decode("utf-8")


def streamed_text(sse: str) -> str:
    """The answer in a /v1/chat/completions event stream: its content deltas, joined."""
    chunks = [json.loads(line[5:]) for line in sse.splitlines() if line.startswith("data:") and "[DONE]" not in line]
    return "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c.get("choices"))


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


ADMIN: dict[str, dict] = {}  # server URL -> headers with its admin key


def slots(url: str) -> list[dict]:
    return http_json(url + "/slots", headers=ADMIN[url])[1]


def assert_slots_freed(url: str) -> None:
    """The closed connection frees the slot on the server, long before the 16000 tokens asked for."""
    deadline = time.monotonic() + 10
    while any(s["is_processing"] for s in slots(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(s["is_processing"] for s in slots(url)), slots(url)


def test_stop_aborts_mid_stream_and_the_server_frees_the_slot(page, server, tmp_path_factory):
    p = page.page
    # a long answer whatever the model says: ignore_eos added to the page's request on its way (still streamed)
    p.route("**/v1/chat/completions",
            lambda route: route.continue_(post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})))
    page.settings(**{"max-tokens": 16000})
    page.ask("Tell me a very long tale")
    body = p.locator(".answer .body")
    p.wait_for_function("() => document.querySelector('.answer .body').textContent.length > 0")
    assert any(s["is_processing"] for s in slots(server))  # the answer is being generated now
    shown = len(body.text_content())
    p.wait_for_function("n => document.querySelector('.answer .body').textContent.length > n", arg=shown)
    p.click("#stop")
    [answer] = page.answers("stopped")
    assert answer.locator(".stats").text_content().endswith("stopped")
    assert p.locator("#send").is_visible() and p.locator("#stop").is_hidden()
    assert_slots_freed(server)
    # Escape stops too
    page.ask("Again")
    p.wait_for_function("() => document.querySelector('.turn:last-child .answer .body').textContent.length > 0")
    p.keyboard.press("Escape")
    page.answers("stopped")
    assert_slots_freed(server)
    page.settings(**{"max-tokens": 8})
    p.unroute("**/v1/chat/completions")
    page.ask("Another one")
    page.answers()  # the next request is served at once
    assert page.errors == []


@pytest.fixture(scope="module")
def compare_server(request, tmp_path_factory):
    """The tiny models' server, or (`make screenshot`: LORA_SHIP_WEBUI_BASE, a GGUF, and LORA_SHIP_WEBUI_ADAPTERS,
    a folder of adapter GGUFs) a real base with its adapters, so that the README's screenshot reads as text."""
    gguf, adapters = os.environ.get("LORA_SHIP_WEBUI_BASE"), os.environ.get("LORA_SHIP_WEBUI_ADAPTERS")
    if not gguf:
        yield request.getfixturevalue("server"), 40
        return
    alias = os.environ.get("LORA_SHIP_WEBUI_ALIAS", "base")
    with running_server(Path(gguf), tmp_path_factory.mktemp("webui-real"),
                        extra=("--adapters", adapters, "--alias", alias)) as url:
        yield url, 120


def test_compare_streams_two_models_side_by_side(browser, compare_server):
    server, max_tokens = compare_server
    page = Page(browser, server, viewport={"width": 1280, "height": 760})
    p = page.page
    p.wait_for_selector("#status.ok")
    models = [o.text_content() for o in p.locator("#model option").all()]
    p.check("#compare-on")
    assert p.locator("#model").is_disabled()
    # the first two models are ticked: the base and the first adapter
    assert [b.get_attribute("value") for b in p.locator("#compare-list input:checked").all()] == models[:2]
    page.settings(temperature=0.8, **{"max-tokens": max_tokens, "seed": 1234})
    responses = []
    p.on("response", lambda r: r.url.endswith("/v1/chat/completions") and responses.append(r))
    page.ask("Tell me a fairy tale")
    answers = page.answers(n=2, timeout=180_000)
    assert [a.get_attribute("data-model") for a in answers] == models[:2]
    # the same sampling settings and seed for both; only the model differs
    requests = [r.request.post_data_json for r in responses]
    assert len(requests) == 2 and {r.pop("model") for r in requests} == set(models[:2])
    assert requests[0] == requests[1] and requests[0]["seed"] == 1234 and requests[0]["temperature"] == 0.8
    # each column shows what the server streamed for its model (sampled tokens can differ from a later request's
    # with the same seed: two requests decoded in one batch round differently from one alone)
    streamed = {r.request.post_data_json["model"]: streamed_text(body_text(r)) for r in responses}
    texts = {a.get_attribute("data-model"): a.locator(".body").text_content() for a in answers}
    for model, text in texts.items():
        assert text and plain(text) == plain(streamed[model]), model
    assert texts[models[0]] != texts[models[1]]  # the adapter changes the answer
    one, two = (a.bounding_box() for a in answers)
    assert one["y"] == two["y"] and one["x"] + one["width"] <= two["x"]  # side by side
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    p.screenshot(path=str(SCREENSHOTS / "compare.png"))
    p.set_viewport_size({"width": 390, "height": 844})  # phone width: one above the other
    one, two = (a.bounding_box() for a in answers)
    assert one["x"] == two["x"] and one["y"] + one["height"] <= two["y"]
    assert page.errors == []
    page.context.close()


XSS = ["Hi <script>window.pwned = 'script'</script>", " <img src=x onerror=\"window.pwned = 'img'\">",
       " **bold <img src=x onerror=\"window.pwned = 'bold'\">** and `<b>code</b>`",
       "\n```html\n<script>window.pwned = 'fence'</script>\n<img src=x onerror=\"window.pwned = 'fence-img'\">\n```\n"]


def test_model_output_is_rendered_as_text(page):
    """An answer that "says" markup: the SSE stream is the server's format, answered by the browser's network
    layer (page.route) so that the renderer gets exactly these strings."""
    p = page.page
    chunks = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in XSS]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    p.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=sse))
    page.ask("Say something dangerous")
    [answer] = page.answers()
    body = answer.locator(".body")
    assert p.evaluate("window.pwned") is None
    assert body.locator("script, img, b").count() == 0  # no element made from the model's text
    text = body.text_content()
    for literal in ("<script>window.pwned = 'script'</script>", "<img src=x onerror=\"window.pwned = 'img'\">",
                    "<b>code</b>", "<img src=x onerror=\"window.pwned = 'fence-img'\">"):
        assert literal in text
    # the small Markdown subset still works, with the markup inside it as text
    assert body.locator("strong").text_content() == "bold <img src=x onerror=\"window.pwned = 'bold'\">"
    assert body.locator(":scope > code").text_content() == "<b>code</b>"
    assert "<script>window.pwned = 'fence'</script>" in body.locator("pre code").text_content()
    assert page.errors == []


def test_the_page_asks_for_the_key_when_the_server_wants_one(browser, base_gguf, tmp_path):
    with running_server(base_gguf["f16"], tmp_path, extra=("--api-key", "s3cret", "--alias", "tiny")) as url:
        page = Page(browser, url, viewport={"width": 1280, "height": 800})
        p = page.page
        dialog = p.locator("#key-dialog")
        dialog.wait_for(state="visible")  # the page loaded without a key; /v1/models answered 401
        p.fill("#key", "wrong")
        p.press("#key", "Enter")
        p.wait_for_function("() => document.querySelector('#key-why').textContent.includes('refused')")
        assert dialog.is_visible()
        p.fill("#key", "s3cret")
        p.press("#key", "Enter")
        p.wait_for_selector("#status.ok")
        assert dialog.is_hidden()
        assert p.evaluate("sessionStorage.getItem('lora-ship.api-key')") == "s3cret"
        assert "s3cret" not in p.url
        # one model: nothing to compare, and the page says how to serve more
        assert p.locator("#compare-on").is_disabled() and p.locator("#compare-hint").is_visible()
        page.settings(**{"max-tokens": 8})
        page.ask("Hello")
        [answer] = page.answers()
        assert answer.locator(".body").text_content()
        # only the two refused /v1/models requests show as errors (the browser logs each 401)
        assert len(page.errors) == 2 and all("401" in e for e in page.errors), page.errors
        page.context.close()


def test_phone_width_dark_mode_and_keyboard(browser, server):
    page = Page(browser, server, viewport={"width": 390, "height": 844}, color_scheme="dark")
    p = page.page
    p.wait_for_selector("#status.ok")
    background = p.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert sum(map(int, re.findall(r"\d+", background)[:3])) < 3 * 64, background  # dark
    assert p.locator("#sidebar").is_hidden() and p.locator("#settings-toggle").is_visible()
    p.click("#settings-toggle")
    assert p.locator("#sidebar").is_visible() and p.get_attribute("#settings-toggle", "aria-expanded") == "true"
    page.settings(**{"max-tokens": 8})
    p.click("#settings-toggle")
    # by keyboard: Shift+Enter is a new line, Enter sends; the focus is visible
    p.focus("#prompt")
    p.keyboard.type("first line")
    p.keyboard.press("Shift+Enter")
    p.keyboard.type("second line")
    assert p.input_value("#prompt") == "first line\nsecond line" and p.locator(".turn").count() == 0
    assert p.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    p.keyboard.press("Enter")
    [answer] = page.answers()
    assert p.locator(".user").text_content() == "first line\nsecond line"
    width = p.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, width  # nothing wider than the phone
    assert page.errors == []
    page.context.close()
    light = Page(browser, server, viewport={"width": 1280, "height": 800}, color_scheme="light")
    background = light.page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert sum(map(int, re.findall(r"\d+", background)[:3])) > 3 * 192, background
    light.context.close()


def test_serve_prints_the_pages_url_and_opens_a_browser_only_when_asked(base_gguf, tmp_path):
    opened = tmp_path / "opened"
    # Python's webbrowser runs $BROWSER with the URL for %s
    env = {"BROWSER": f"/bin/sh -c 'echo \"$0\" >> {opened}' %s"}
    for extra in ((), ("--open",)):
        port = free_port()
        pid = tmp_path / f"{port}.pid"
        start = ("serve.py", "start", "--background", "--model", base_gguf["f16"], "--port", port, "--pid-file", pid,
                 "--log", tmp_path / "server.log", "--engine", "llama-server", *extra)
        proc = run_script(*start, env=env)
        assert f"Chat page: http://127.0.0.1:{port}/" in proc.stdout
        assert opened.exists() == bool(extra)
        again = run_script(*start, env=env)  # `make` again: the same server goes on; OPEN=1 still opens the page
        run_script("serve.py", "stop", "--pid-file", pid)
        assert f"already serving" in again.stdout and f"chat page: http://127.0.0.1:{port}/" in again.stdout
    assert opened.read_text() == f"http://127.0.0.1:{port}/\n" * 2


def test_the_page_waits_for_a_model_still_loading(browser, server):
    """llama-server serves / while the model loads and answers the API with 503 until then (a foreground
    `make serve` opened early): the page asks again. The first answer is the server's 503, made in the browser."""
    context = browser.new_context()
    p = context.new_page()
    loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
    calls = []

    def models(route):
        calls.append(route.request.url)
        if len(calls) == 1:
            route.fulfill(status=503, content_type="application/json", body=json.dumps(loading))
        else:
            route.continue_()
    p.route("**/v1/models", models)
    p.goto(server + "/")
    p.wait_for_selector("#status.ok")
    assert len(calls) == 2 and p.locator("#model option").count() == 3
    context.close()
