"""Browser tests of the web pages: Playwright driving Debian's Chromium, headless, against a
real gateway on loopback (Playwright's own browser download is not used: /usr/bin/chromium).

Every page a test opens records uncaught exceptions and Content-Security-Policy violations;
either fails the test, so the pages are checked against their own policy throughout.
Screenshots go to ``test-artifacts/web/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    expect,
    sync_playwright,
)

from tokenwire.providers.sim import plan
from tokenwire.testing import FAST_SIM, GatewayServer, SimUpstreamServer, paced_sim, priced_model
from tokenwire.wire.schema import convert_chat_request

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}

HOSTILE_REPLY = (
    "# Reply\n",
    "Look: <img src=x onerror=window.pwned('img')> and ",
    "<script>window.pwned('script')</script> and ",
    "[a link](javascript:window.pwned('link')) and **bold** and `<b>code</b>`\n",
    "- <svg onload=window.pwned('svg')>\n",
)
"""What the ``hostile`` model answers: HTML and script that must be shown, never run."""


def web_overrides(upstream: str, hostile: str) -> str:
    """The test gateway's catalog: instant ``sim``, a slow ``paced-sim``, a priced model, a
    slow OpenAI-compatible upstream whose cancels it counts, and the hostile answerer."""
    return (
        FAST_SIM
        + paced_sim("paced", ttft_ms=20, itl_ms=40)
        + priced_model("priced-sim")
        + f"""
[[models]]
id = "paced-sim"
provider = "paced"
upstream_model = "sim"
input_usd_per_mtok = "1.00"
output_usd_per_mtok = "2.00"

[providers.upstream]
kind = "openai"
base_url = "{upstream}/v1"

[[models]]
id = "upstream-sim"
provider = "upstream"
upstream_model = "sim"
input_usd_per_mtok = "0"
output_usd_per_mtok = "0"

[providers.hostile]
kind = "openai"
base_url = "{hostile}/v1"

[[models]]
id = "hostile"
provider = "hostile"
upstream_model = "sim"
input_usd_per_mtok = "0"
output_usd_per_mtok = "0"
"""
    )


@dataclass
class WebGateway:
    """The gateway the browser tests use, and the upstreams behind it."""

    server: GatewayServer
    upstream: SimUpstreamServer  # slow: 20 ms between tokens; its /sim/stats count cancels
    hostile: SimUpstreamServer
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.server.base_url

    def api(self, method: str, path: str, key: str, **kwargs: Any) -> requests.Response:
        """A call to the gateway's API with ``key``."""
        return requests.request(
            method,
            self.base_url + path,
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
            **kwargs,
        )

    def new_key(self, name: str, **body: Any) -> tuple[str, str]:
        """A fresh key (id, plaintext) made through the admin API ($10 unless told)."""
        body = {"name": name, "credits_usd": "10.00", **body}
        response = self.api("POST", "/v1/admin/keys", self.server.admin_key, json=body)
        assert response.status_code == 201, response.text
        created = response.json()
        return created["id"], created["key"]

    def upstream_stats(self) -> dict[str, int]:
        stats: dict[str, int] = requests.get(
            self.upstream.base_url + "/sim/stats", timeout=10
        ).json()
        return stats

    def usage(self, key: str, **query: str) -> dict[str, Any]:
        response = self.api("GET", "/v1/usage", key, params=query)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebGateway]:
    """A gateway with the web catalog (fresh per module), on SQLite in a temp dir."""
    with (
        SimUpstreamServer(ttft_ms=10, itl_ms=20) as upstream,
        SimUpstreamServer(ttft_ms=0, itl_ms=1, reply=HOSTILE_REPLY) as hostile,
    ):
        data_dir = tmp_path_factory.mktemp("web")
        overrides = web_overrides(upstream.base_url, hostile.base_url)
        # Made in a thread of its own: it bootstraps keys with asyncio.run, and Playwright's
        # sync API keeps an event loop running in this one.
        with ThreadPoolExecutor(1) as pool:
            server = pool.submit(GatewayServer, data_dir, overrides=overrides).result()
        with server:
            yield WebGateway(server, upstream, hostile)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    """Playwright's driver, per module: its sync API keeps an event loop running in the main
    thread, which would break asyncio.run in the modules that run after these."""
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    """Debian's Chromium, headless."""
    assert CHROMIUM.exists(), "the test command installs Debian's chromium package"
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
    try:
        yield browser
    finally:
        browser.close()


WATCH_PAGE = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


@dataclass
class PageWatch:
    """What a page did wrong: uncaught exceptions and CSP violations."""

    errors: list[str] = field(default_factory=list)


def open_context(browser: Browser, **options: Any) -> BrowserContext:
    context = browser.new_context(viewport=DESKTOP, **options)
    context.set_default_timeout(20_000)
    context.add_init_script(WATCH_PAGE)
    return context


def watch(page: Page) -> PageWatch:
    seen = PageWatch()
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))
    return seen


def assert_clean(page: Page, seen: PageWatch) -> None:
    """No uncaught exception, no CSP violation in ``page``."""
    if not page.is_closed():
        seen.errors.extend(
            f"CSP violation: {v}" for v in page.evaluate("window.__cspViolations ?? []")
        )
    assert seen.errors == []


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context and page (its own sessionStorage), checked when the test ends."""
    context = open_context(browser)
    page = context.new_page()
    seen = watch(page)
    try:
        yield page
        assert_clean(page, seen)
    finally:
        context.close()


def use_key(page: Page, key: str) -> None:
    """Paste ``key`` into the key bar, as a person would, and wait until it is accepted."""
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")
    expect(page.locator("#key-status")).to_have_text(re.compile("^Key "))


def wait_for_words(page: Page, count: int, selector: str = "#single .answer") -> None:
    """Wait until ``selector`` shows at least ``count`` words (an answer under way)."""
    expect(page.locator(selector)).to_have_text(re.compile(rf"^\s*(\S+\s+){{{count - 1}}}\S"))


def sim_text(prompt: str, system: str | None = None, **params: Any) -> str:
    """The simulator's answer to what the playground sends for ``prompt``."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    body = {"model": "sim", "messages": messages, **params}
    return plan(convert_chat_request(body)).text


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``check`` (a server-side condition the page cannot show) until it holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def screenshot(page: Page, name: str) -> Path:
    """A full-page screenshot under test-artifacts/web/ (kept as a CI artifact)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


class CuttableProxy:
    """A TCP proxy on loopback in front of the gateway whose open connections a test can cut
    (the network lost mid-answer); new connections go through as before."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.port = 0
        self.cuts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        self._abort_all()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self._target)
        pair = (client_w, upstream_w)
        self._pairs.add(pair)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pipe(client_r, upstream_w), pipe(upstream_r, client_w))
        finally:
            self._pairs.discard(pair)

    def _abort_all(self) -> None:
        for client_w, upstream_w in list(self._pairs):
            client_w.transport.abort()
            upstream_w.transport.abort()

    def cut(self) -> None:
        """Abort every connection open now (both sides, no FIN: the network is gone)."""
        assert self._loop is not None
        done = threading.Event()

        def run() -> None:
            self._abort_all()
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)
        self.cuts += 1

    def __enter__(self) -> CuttableProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def stored(page: Page, item: str) -> Any:
    raw = page.evaluate(f"sessionStorage.getItem({json.dumps(item)})")
    return None if raw is None else json.loads(raw)
