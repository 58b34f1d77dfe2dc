"""The usage page in a real browser: balance, limits, charts and latest completions agree with
the ledger."""

from __future__ import annotations

from typing import Any

import requests
from playwright.sync_api import Page, expect
from tests.web.conftest import WebGateway, use_key, wait_until


def complete(web: WebGateway, key: str, model: str, prompt: str, max_tokens: int) -> None:
    response = requests.post(
        web.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text


def card(page: Page, panel: str, name: str) -> str:
    return page.inner_text(f"{panel} [data-card={name}] dd")


def bars(page: Page, figure: str) -> dict[str, int]:
    """The bars of a chart: label -> exact value."""
    rects = page.locator(f"{figure} rect.bar")
    return {
        str(rects.nth(i).get_attribute("data-label")): int(
            rects.nth(i).get_attribute("data-value") or 0
        )
        for i in range(rects.count())
    }


def test_usage_page_shows_the_ledger_totals(web: WebGateway, page: Page) -> None:
    """Balance, limits, totals, the by-day and by-model charts (cost, tokens, requests) and the latest rows match /v1/usage."""
    _, key = web.new_key("usage-page", credits_usd="5.00", rpm=120, max_concurrent_streams=4)
    complete(web, key, "priced-sim", "one two three", 5)  # 7 prompt tokens: 21 + 75 = 96
    complete(web, key, "priced-sim", "four five", 12)  # 6: 18 + 180 = 198
    complete(web, key, "sim", "free words", 3)
    wait_until(lambda: web.usage(key)["total"]["requests"] == 3, "three ledger rows")
    truth: dict[str, Any] = web.usage(key)
    assert truth["total"]["cost_micro"] == 96 + 198

    page.goto(web.base_url + "/usage")
    use_key(page, key)
    expect(page.locator("#usage-panel")).to_be_visible()
    assert card(page, "#key-cards", "balance") == "$4.999706"
    assert card(page, "#key-cards", "rpm") == "120"
    assert card(page, "#key-cards", "tpm") == "unlimited"
    assert card(page, "#key-cards", "streams") == "4"
    assert card(page, "#totals", "requests") == "3"
    assert card(page, "#totals", "prompt_tokens") == str(truth["total"]["prompt_tokens"])
    assert card(page, "#totals", "completion_tokens") == "20"
    assert card(page, "#totals", "cost") == "$0.000294"

    expected = {
        "cost": (294, {"priced-sim": 294, "sim": 0}, "$0.000294"),
        "tokens": (
            truth["total"]["prompt_tokens"] + 20,
            {"priced-sim": 7 + 5 + 6 + 12, "sim": 6 + 3},
            f"{truth['total']['prompt_tokens'] + 20} tokens",
        ),
        "requests": (3, {"priced-sim": 2, "sim": 1}, "3 requests"),
    }
    for measure, (total, by_model, caption) in expected.items():
        page.select_option("#measure", measure)
        for figure in ("#by-day", "#by-model"):
            expect(page.locator(figure)).to_have_attribute("data-total", str(total))
            expect(page.locator(f"{figure} .chart-total")).to_have_text(f"total {caption}")
            assert sum(bars(page, figure).values()) == total
        assert bars(page, "#by-model") == by_model
        assert len(bars(page, "#by-day")) == 30  # every day of the period, zeros included

    rows = page.locator("#latest tbody tr")
    assert rows.count() == 3
    assert [rows.nth(i).get_attribute("data-completion") for i in range(3)] == [
        row["completion_id"] for row in truth["data"]
    ]
    assert rows.nth(0).locator("td").nth(1).inner_text() == "sim"
    assert rows.nth(1).locator("td").last.inner_text() == "$0.000198"

    page.select_option("#range", "7")
    expect(page.locator("#by-day rect.bar")).to_have_count(7)
