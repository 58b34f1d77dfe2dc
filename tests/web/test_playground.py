"""The playground in a real browser: both transports, Stop, the race, resume after a reload,
hostile model output, the model picker and keyboard use."""

from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect
from tests.web.conftest import (
    WebGateway,
    assert_clean,
    open_context,
    sim_text,
    stored,
    use_key,
    wait_for_words,
    wait_until,
    watch,
)

TRANSPORTS = ("sse", "ws")
NAMES = {"sse": "SSE", "ws": "WebSocket"}


def ask(
    page: Page,
    prompt: str,
    *,
    model: str = "sim",
    transport: str = "sse",
    max_tokens: int | None = None,
) -> None:
    """Fill the form and send."""
    page.select_option("#model", model)
    page.check(f"input[name=transport][value={transport}]")
    if max_tokens is not None:
        page.click(".params summary")
        page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.click("#send")


def answer_words(page: Page, selector: str = "#single .answer") -> int:
    return len(page.inner_text(selector).split())


def stat(page: Page, name: str, panel: str = "#single") -> str:
    return page.inner_text(f"{panel} [data-stat={name}] dd")


def latest_row(web: WebGateway, key: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = web.usage(key, limit="1")["data"]
    return rows[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_answer_streams_over_each_transport(web: WebGateway, page: Page, transport: str) -> None:
    """The answer arrives over the chosen transport with its figures, and is billed as such."""
    key_id, key = web.new_key(f"stream-{transport}")
    page.goto(web.base_url + "/")
    use_key(page, key)
    ask(page, f"Hello over {transport}", transport=transport)
    expect(page.locator("#single")).to_have_attribute("data-state", "done")
    assert page.inner_text("#single .answer") == sim_text(f"Hello over {transport}")
    assert stat(page, "finish") == "stop"
    assert stat(page, "transport") == NAMES[transport]
    assert stat(page, "tokens").startswith("16 out")
    assert stat(page, "ttft").endswith("ms")
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    row = latest_row(web, key)
    assert (row["key_id"], row["transport"], row["status"]) == (key_id, transport, "completed")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_cancels_the_upstream_request(web: WebGateway, page: Page, transport: str) -> None:
    """Stop ends the answer as cancelled, the upstream sees its request closed, the ledger says cancelled."""
    _, key = web.new_key(f"stop-{transport}")
    cancelled_before = web.upstream_stats()["cancelled_streams"]
    page.goto(web.base_url + "/")
    use_key(page, key)
    ask(page, "A long answer, please", model="upstream-sim", transport=transport, max_tokens=3000)
    wait_for_words(page, 4)
    page.click("#stop")
    expect(page.locator("#single")).to_have_attribute("data-state", "cancelled")
    assert stat(page, "finish") == "cancelled"
    words = answer_words(page)
    assert 3 < words < 3000
    wait_until(
        lambda: web.upstream_stats()["cancelled_streams"] == cancelled_before + 1,
        "the upstream's cancel",
    )
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    row = latest_row(web, key)
    assert row["status"] == "cancelled"
    assert words <= row["completion_tokens"] < 3000


def test_the_race_fills_both_columns_and_the_plot(web: WebGateway, page: Page) -> None:
    """Racing SSE against WebSocket shows the same answer twice, figures for each, and a plot line each."""
    page.goto(web.base_url + "/")
    use_key(page, web.server.api_key)
    ask(page, "Race me", model="paced-sim", transport="race")
    expect(page.locator("#race-sse")).to_have_attribute("data-state", "done")
    expect(page.locator("#race-ws")).to_have_attribute("data-state", "done")
    expected = sim_text("Race me")
    for column, name in (("#race-sse", "SSE"), ("#race-ws", "WebSocket")):
        assert page.inner_text(f"{column} .answer") == expected
        assert stat(page, "transport", column) == name
        assert stat(page, "ttft", column).endswith("ms")
    lines = page.locator("#race-plot polyline")
    assert lines.count() == 2
    for index, series in enumerate(("sse", "ws")):
        line = lines.nth(index)
        assert line.get_attribute("data-series") == series
        points = int(line.get_attribute("data-points") or 0)
        assert 1 < points <= 16  # paced: one chunk per token, unless a client fell behind
        assert len((line.get_attribute("points") or "").split()) == 2 * points + 1
    expect(page.locator("#race-verdict")).to_have_text(
        re.compile(
            r"^(SSE|WebSocket)'s first token arrived [0-9.]+ ms sooner\.$|^Both first tokens"
        )
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_reload_mid_answer_resumes_the_exact_text(
    web: WebGateway, page: Page, transport: str
) -> None:
    """Reloading while an answer streams picks it up where it was: the exact text, one generation, billed once."""
    _, key = web.new_key(f"reload-{transport}")
    page.goto(web.base_url + "/")
    use_key(page, key)
    prompt = f"Keep going over {transport}"
    ask(page, prompt, model="paced-sim", transport=transport, max_tokens=50)
    wait_for_words(page, 4)
    saved = stored(page, "tokenwire.pending")
    assert saved is not None and saved["transport"] == transport
    page.reload()
    expect(page.locator("#single")).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.inner_text("#single .answer") == sim_text(prompt, max_tokens=50)
    assert stat(page, "finish") == "length"
    assert stat(page, "tokens").startswith("50 out")
    assert stored(page, "tokenwire.pending") is None
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    usage = web.usage(key)
    assert usage["total"]["completion_tokens"] == 50  # one generation, read twice, billed once


@pytest.mark.parametrize("csp", ["enforced", "bypassed"])
def test_model_output_with_html_is_shown_as_text(
    web: WebGateway, browser: Browser, csp: str
) -> None:
    """An answer holding <img onerror>, <script>, <svg onload> and a javascript: link renders as text; nothing runs.

    With the page's CSP bypassed too, so the renderer alone is what keeps the script out.
    """
    context = open_context(browser, bypass_csp=csp == "bypassed")
    calls: list[str] = []
    context.expose_function("pwned", lambda source: calls.append(source))
    page = context.new_page()
    seen = watch(page)
    try:
        page.goto(web.base_url + "/")
        use_key(page, web.server.api_key)
        ask(page, "Say something hostile", model="hostile")
        expect(page.locator("#single")).to_have_attribute("data-state", "done")
        answer = page.locator("#single .answer")
        text = answer.inner_text()
        assert "<img src=x onerror=window.pwned('img')>" in text
        assert "<script>window.pwned('script')</script>" in text
        assert "<svg onload=window.pwned('svg')>" in text
        for tag in (
            "img",
            "script",
            "svg",
            "iframe",
            "[onerror]",
            "[onload]",
            "a[href^='javascript']",
        ):
            assert answer.locator(tag).count() == 0, tag
        assert answer.locator("h1").inner_text() == "Reply"
        assert answer.locator("strong").inner_text() == "bold"
        assert answer.locator("code").inner_text() == "<b>code</b>"
        assert answer.locator("li").count() == 1
        page.wait_for_load_state("networkidle")  # an <img src=x> would have failed to load by now
        assert calls == []
        assert page.evaluate("typeof window.pwned") == "function"  # the hook was there to call
        assert_clean(page, seen)
    finally:
        context.close()


def test_the_model_picker_shows_prices_and_availability(web: WebGateway, page: Page) -> None:
    """Models come from /v1/models with their prices on the caller's plan (one figure for a
    flat price); unavailable ones are disabled with the reason."""
    page.goto(web.base_url + "/")
    use_key(page, web.server.api_key)
    gpt = page.locator("#model option[value='gpt-4.1']")
    expect(gpt).to_be_disabled()
    assert gpt.inner_text() == "gpt-4.1 · $8.00 (unavailable)"  # the default plan's flat price
    priced = page.locator("#model option[value='priced-sim']")
    expect(priced).to_be_enabled()
    page.select_option("#model", "priced-sim")
    expect(page.locator("#model-info")).to_have_text("sim · $3.00 in / $15.00 out per 1M tokens")
    page.select_option("#model", "sim")
    expect(page.locator("#model-info")).to_contain_text("$0.00 in")


def test_the_cost_of_an_answer_is_the_ledger_cost(web: WebGateway, page: Page) -> None:
    """The cost shown under an answer is what the ledger charged for it."""
    _, key = web.new_key("cost", credits_usd="1.00")
    page.goto(web.base_url + "/")
    use_key(page, key)
    ask(page, "What does this cost", model="priced-sim", transport="ws")
    expect(page.locator("#single")).to_have_attribute("data-state", "done")
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    row = latest_row(web, key)
    assert row["cost_micro"] > 0
    assert stat(page, "cost") == f"${row['cost_micro'] / 1e6:.6f}"


def test_the_playground_works_from_the_keyboard(web: WebGateway, page: Page) -> None:
    """Tab to the key field, paste, Enter; Tab to the prompt, Ctrl+Enter sends; Escape stops."""
    page.goto(web.base_url + "/")

    def tab_to(element_id: str) -> None:
        for _ in range(30):
            if page.evaluate("document.activeElement?.id") == element_id:
                return
            page.keyboard.press("Tab")
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("key-input")
    page.keyboard.type(web.server.api_key)
    page.keyboard.press("Enter")
    expect(page.locator("#model")).to_be_enabled()
    tab_to("model")
    page.keyboard.type("sim")  # a select's type-ahead
    expect(page.locator("#model")).to_have_value("sim")
    tab_to("prompt")
    page.keyboard.type("Typed, not clicked")
    page.keyboard.press("Control+Enter")
    expect(page.locator("#single")).to_have_attribute("data-state", "done")
    assert page.inner_text("#single .answer") == sim_text("Typed, not clicked")
    page.select_option("#model", "upstream-sim")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    wait_for_words(page, 1)
    page.keyboard.press("Escape")
    expect(page.locator("#single")).to_have_attribute("data-state", "cancelled")
