"""The web console in a real browser (Playwright driving Debian's chromium) against real
servers and tiny real models: each page's main action end to end, the key gate, the hub's
offline message, and that no page logs a JavaScript error or fails a request."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Models
from tests.fake_hub import FakeHub, repo_from_folder
from tests.server import ROOT, Server, start_server

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

expect = playwright.expect
Page = playwright.Page
PAGES = {"/": "Dashboard", "/models": "Models", "/profiles": "Profiles", "/chat": "Chat"}
PAGES |= {"/logs": "Logs", "/keys": "Keys"}
DOCS = ROOT / "docs"
WAIT = 20_000  # ms: the longest a live change may take to show (a load takes a few seconds)
expect.set_options(timeout=WAIT)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def hub(models: Models) -> Iterator[FakeHub]:
    hub = FakeHub().start()
    hub.add(repo_from_folder("mlx-community/tiny-chat-4bit", models.path("tiny-a"), downloads=42))
    hub.add(repo_from_folder("mlx-community/tiny-slow", models.path("tiny-big"), downloads=7))
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def srv(models: Models, hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("console")
    env = models.env(tmp / "home")
    env |= {"HF_HUB_CACHE": str(tmp / "hf"), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    server = start_server(tmp / "home", env)
    yield server
    server.stop()


@dataclass
class Watch:
    """What went wrong in a page: console errors, uncaught exceptions, failed requests and
    answers of 400 or more (but those `allowed`)."""

    allowed: set[tuple[str, int]] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("console", self._console)
        page.on(
            "requestfailed",
            lambda r: (
                None
                if "ERR_ABORTED" in (r.failure or "")  # a navigation away, or the chat's Stop
                else self.problems.append(f"request failed: {r.url} {r.failure}")
            ),
        )
        page.on("response", self._response)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        if "401" in message.text and any(s == 401 for _, s in self.allowed):
            return  # the browser's own note of the gate's expected 401
        self.problems.append(f"console error: {message.text}")

    def _response(self, response: Any) -> None:
        path = httpx.URL(response.url).path
        if response.status >= 400 and (path, response.status) not in self.allowed:
            self.problems.append(f"{response.status} from {response.url}")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture()
def page(browser: Any) -> Iterator[tuple[Any, Watch]]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(WAIT)
    watch = Watch()
    watch.attach(page)
    yield page, watch
    context.close()
    watch.check()


def row(scope: Any, name: str) -> Any:
    """The table row headed by `name` (a row's accessible name starts with its header)."""
    return scope.get_by_role(
        "row", name=re.compile("^" + re.escape(name).replace("/", r"\/") + "( |$)")
    )


def test_every_page_loads_clean_fast_and_under_the_csp(
    srv: Server, page: tuple[Any, Watch], tmp_path: Path
) -> None:
    """Each page: its title and navigation, its data shown, the CSP header; no error; its
    first load measured; a screenshot (kept in docs/ with MLX_MANAGER_SCREENSHOTS=1)."""
    p, _ = page
    httpx.post(srv.url + "/admin/load", json={"model": "tiny-a"}, timeout=60).raise_for_status()
    timings = {}
    for path, name in PAGES.items():
        response = p.goto(srv.url + path)
        assert response.status == 200
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        expect(p).to_have_title(re.compile("mlx-manager"))
        nav = p.get_by_role("navigation")
        for label in PAGES.values():
            expect(nav.get_by_role("link", name=label, exact=True)).to_be_visible()
        expect(p.get_by_role("heading", level=1, name=name)).to_be_visible()
        p.wait_for_load_state("networkidle")
        timings[name] = p.evaluate(
            "() => { const t = performance.getEntriesByType('navigation')[0];"
            " return Math.round(t.loadEventEnd - t.startTime); }"
        )
        shot = tmp_path / f"console-{name.lower()}.png"
        p.screenshot(path=str(shot), full_page=True)
        if os.environ.get("MLX_MANAGER_SCREENSHOTS"):
            DOCS.mkdir(exist_ok=True)
            shutil.copy(shot, DOCS / shot.name)
    print("first load (ms):", timings)
    assert all(ms < 5000 for ms in timings.values()), timings
    # Static assets are cached; page shells are not.
    r = httpx.get(srv.url + "/static/vendor/htmx.min.js")
    assert r.status_code == 200 and "max-age" in r.headers["cache-control"]
    # No inline script or handler anywhere in what the console serves.
    for path in PAGES:
        html = httpx.get(srv.url + path).text
        assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"\son\w+=", html)


def test_load_unload_and_a_change_made_elsewhere_shows(
    srv: Server, page: tuple[Any, Watch]
) -> None:
    p, _ = page
    httpx.post(srv.url + "/admin/unload", json={"model": "tiny-b"}, timeout=30)
    p.goto(srv.url + "/models")
    p.get_by_role("button", name="Load tiny-b", exact=True).click()
    expect(p.get_by_role("button", name="Unload tiny-b", exact=True)).to_be_visible()
    expect(p.get_by_role("status")).to_contain_text("Loaded tiny-b")
    # Details: model_info.
    p.get_by_role("button", name="Details of tiny-b", exact=True).click()
    expect(p.locator("#details")).to_contain_text("context_length")
    p.get_by_role("button", name="Unload tiny-b", exact=True).click()
    expect(p.get_by_role("button", name="Load tiny-b", exact=True)).to_be_visible()
    # A load through the API shows on the open page and on the dashboard, without a reload.
    httpx.post(srv.url + "/admin/load", json={"model": "tiny-b"}, timeout=60).raise_for_status()
    expect(p.get_by_role("button", name="Unload tiny-b", exact=True)).to_be_visible()
    p.get_by_role("link", name="Dashboard").click()
    expect(row(p, "tiny-b")).to_contain_text("ready")
    httpx.post(srv.url + "/admin/unload", json={"model": "tiny-b"}, timeout=30)
    expect(row(p, "tiny-b")).to_have_count(0)


def test_chat_streams_markdown_and_stop_cancels(srv: Server, page: tuple[Any, Watch]) -> None:
    p, _ = page
    p.goto(srv.url + "/chat")
    model = p.get_by_label("Model", exact=True)
    expect(model.locator("option[value='tiny-a']")).to_have_count(1)
    model.select_option("tiny-a")
    p.get_by_text("Settings").click()
    p.get_by_label("Temperature").fill("0")
    p.get_by_label("Max tokens").fill("12")
    p.get_by_label("Message").fill("hello")
    p.get_by_role("button", name="Send").click()
    answer = p.locator("article.msg-assistant").last
    expect(answer.locator(".stats")).to_contain_text("tokens", timeout=60_000)
    expect(answer.locator(".stats")).to_contain_text("first token")
    assert answer.locator(".answer").inner_text().strip() or "finish" in answer.inner_text()
    # A long answer, stopped: the server cancels the generation (the request log says 499).
    p.get_by_label("Max tokens").fill("30000")
    p.get_by_label("Message").fill("tell me more")
    p.get_by_role("button", name="Send").click()
    expect(p.get_by_role("button", name="Stop")).to_be_enabled()
    p.get_by_role("button", name="Stop").click()
    stats = p.locator("article.msg-assistant").last.locator(".stats")
    expect(stats).to_contain_text("stopped")
    expect(p.get_by_role("button", name="Send")).to_be_enabled()

    def cancelled() -> bool:
        rows = httpx.get(srv.url + "/admin/requests", params={"limit": 5}).json()["data"]
        return any(r["endpoint"] == "/v1/chat/completions" and r["status"] == 499 for r in rows)

    srv.wait_for(cancelled, what="the stopped chat to be cancelled on the server")
    srv.wait_for(lambda: (srv.worker("tiny-a") or {}).get("in_flight") == 0, what="idle")
    p.get_by_role("button", name="New chat").click()
    expect(p.locator("article.msg")).to_have_count(0)


def test_markdown_is_rendered_and_sanitised(srv: Server, page: tuple[Any, Watch]) -> None:
    """Model text is untrusted: the renderer the chat uses drops scripts and handlers."""
    p, watch = page
    p.goto(srv.url + "/chat")
    expect(p.get_by_role("button", name="Send")).to_be_visible()
    html = p.evaluate(
        "() => DOMPurify.sanitize(marked.parse("
        "'# T\\n```py\\nx = 1\\n```\\n<img src=x onerror=alert(1)><script>alert(2)</script>'))"
    )
    assert "<pre><code" in html and "onerror" not in html and "<script" not in html


def test_profile_created_edited_and_deleted(srv: Server, page: tuple[Any, Watch]) -> None:
    p, _ = page
    p.goto(srv.url + "/profiles")
    p.get_by_role("button", name="New profile").click()
    p.get_by_label("Name", exact=True).fill("console-writer")
    p.get_by_label("Model", exact=True).fill("tiny-a")
    p.get_by_label("Temperature").fill("5")
    p.get_by_label("System prompt").fill("Write well.")
    p.get_by_role("button", name="Save").click()
    # The catalogue's refusal, next to its field.
    error = p.locator("#pf-temperature-error")
    expect(error).to_contain_text("temperature")
    expect(p.get_by_label("Temperature")).to_have_attribute("aria-invalid", "true")
    p.get_by_label("Temperature").fill("0.5")
    p.get_by_label("Aliases").fill("cw, writer2")
    p.get_by_role("button", name="Save").click()
    expect(p.get_by_role("status")).to_contain_text("Saved profile console-writer")
    expect(row(p, "console-writer")).to_contain_text("cw, writer2")
    assert httpx.get(srv.url + "/admin/profiles/console-writer").json()["temperature"] == 0.5
    # Edit: a new max tokens, the aliases emptied.
    p.get_by_role("button", name="Edit console-writer").click()
    expect(p.get_by_label("Name", exact=True)).to_have_value("console-writer")
    p.get_by_label("Max tokens").fill("64")
    p.get_by_label("Aliases").fill("")
    p.get_by_role("button", name="Save").click()
    expect(row(p, "console-writer")).to_contain_text("64")
    saved = httpx.get(srv.url + "/admin/profiles/console-writer").json()
    assert saved["max_tokens"] == 64 and saved["aliases"] == []
    assert saved["system_prompt"] == "Write well."
    p.get_by_role("button", name="Delete console-writer").click()
    expect(row(p, "console-writer")).to_have_count(0)
    assert httpx.get(srv.url + "/admin/profiles/console-writer").status_code == 404


def test_hub_search_and_a_download_with_progress(
    srv: Server, hub: FakeHub, page: tuple[Any, Watch]
) -> None:
    p, _ = page
    p.goto(srv.url + "/models")
    p.get_by_label("Search the hub").fill("tiny")
    p.get_by_label("Search the hub").press("Enter")
    results = p.locator("#hub-results")
    expect(row(results, "mlx-community/tiny-slow")).to_contain_text("no")  # not downloaded
    hub.delay = 0.05  # ~1.3 MB/s: the weights take seconds, so progress shows
    try:
        p.get_by_role("button", name="Download mlx-community/tiny-slow").click()
        progress = p.locator("#downloads li", has_text="mlx-community/tiny-slow").first
        expect(progress).to_contain_text("running")
        expect(progress).to_contain_text(re.compile(r"/s · ETA \d"))
        expect(progress.get_by_role("progressbar")).to_be_visible()
        done = progress.get_by_role("progressbar")
        assert int(done.get_attribute("max") or 0) > 1_000_000
    finally:
        hub.delay = 0
    expect(progress).to_contain_text("done", timeout=60_000)
    # It is now a local model, loadable; and deleting it while loaded is refused, with why.
    load = p.get_by_role("button", name="Load mlx-community/tiny-slow", exact=True)
    expect(load).to_be_visible()
    load.click()
    expect(
        p.get_by_role("button", name="Unload mlx-community/tiny-slow", exact=True)
    ).to_be_visible()
    p.get_by_role("button", name="Delete mlx-community/tiny-slow", exact=True).click()
    expect(p.get_by_role("alert")).to_contain_text("is loaded; unload it first")
    p.get_by_role("button", name="Unload mlx-community/tiny-slow", exact=True).click()
    expect(p.get_by_role("button", name="Load mlx-community/tiny-slow", exact=True)).to_be_visible()
    p.get_by_role("button", name="Delete mlx-community/tiny-slow", exact=True).click()
    expect(p.get_by_role("status")).to_contain_text("Deleted mlx-community/tiny-slow")
    expect(row(p.locator("#models"), "mlx-community/tiny-slow")).to_have_count(0)


def test_offline_hub_says_so(server: Server, page: tuple[Any, Watch]) -> None:
    """The session server runs with HF_HUB_OFFLINE=1."""
    p, _ = page
    p.goto(server.url + "/models")
    p.get_by_label("Search the hub").fill("qwen")
    p.get_by_role("button", name="Search", exact=True).click()
    expect(p.get_by_role("alert")).to_contain_text("hub is off")


def test_logs_and_keys(srv: Server, page: tuple[Any, Watch]) -> None:
    p, _ = page
    httpx.post(
        srv.v1 + "/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    p.goto(srv.url + "/logs")
    expect(p.locator("#requests")).to_contain_text("/v1/chat/completions")
    p.get_by_label("Errors only").check()
    expect(p.locator("#requests tbody tr").first).to_contain_text("404")
    expect(p.locator("#usage")).to_contain_text("Per key")
    p.get_by_label("Model for worker log").fill("tiny-a")
    p.get_by_role("button", name="Show log").click()
    expect(p.locator("#worker-log pre")).to_be_visible()
    # Keys: made (shown once, with a copy button), then revoked. The first key turns the key
    # check on; the console keeps working with it.
    p.get_by_role("link", name="Keys").click()
    p.get_by_label("Key name").fill("console-test")
    p.get_by_role("button", name="Create key").click()
    secret = p.get_by_label("New API key")
    expect(secret).to_have_value(re.compile("^mlxm-"))
    expect(p.get_by_role("button", name="Copy")).to_be_visible()
    key = secret.input_value()
    assert httpx.get(srv.url + "/admin/workers").status_code == 401
    assert httpx.get(
        srv.url + "/admin/workers", headers={"Authorization": f"Bearer {key}"}
    ).is_success
    expect(row(p, "console-test")).to_be_visible()
    p.get_by_role("button", name="Revoke console-test").click()
    expect(row(p, "console-test")).to_have_count(0)
    assert httpx.get(srv.url + "/admin/workers").status_code == 200


def test_key_gate(models: Models, browser: Any, tmp_path: Path) -> None:
    """With a key required, pages show no data until a key is given; a wrong one is refused."""
    home = tmp_path / "home"
    server = start_server(home, models.env(home, api_key="right-key"))
    try:
        # No data without a key: the fragments answer 401; the shells and assets hold none.
        for path in ("/console/dashboard", "/console/models", "/console/keys", "/console/auth"):
            assert httpx.get(server.url + path).status_code == 401
        shell = httpx.get(server.url + "/models")
        assert shell.status_code == 200 and "tiny-a" not in shell.text
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(WAIT)
        watch = Watch(allowed={("/console/auth", 401)})
        watch.attach(page)
        data: list[str] = []
        page.on("request", lambda r: data.append(r.url) if "/console/" in r.url else None)
        page.goto(server.url + "/models")
        gate = page.get_by_label("API key", exact=True)
        expect(gate).to_be_visible()
        expect(gate).to_have_attribute("type", "password")
        assert all(u.endswith("/console/auth") for u in data), data
        expect(page.get_by_text("tiny-a")).to_have_count(0)
        gate.fill("wrong-key")
        gate.press("Enter")
        expect(page.get_by_role("alert")).to_contain_text("Invalid API key")
        page.get_by_label("API key", exact=True).fill("right-key")
        page.get_by_role("button", name="Enter").click()
        expect(page.get_by_role("button", name="Load tiny-a", exact=True)).to_be_visible()
        # Kept for the session: another page needs no key again.
        page.get_by_role("link", name="Dashboard").click()
        expect(page.get_by_role("heading", name="Memory")).to_be_visible()
        expect(page.get_by_label("API key", exact=True)).to_be_hidden()
        context.close()
        watch.check()
    finally:
        server.stop()
