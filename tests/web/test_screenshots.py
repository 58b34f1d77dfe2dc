"""Each page at desktop and phone widths, light and dark: screenshots as test artifacts
(test-artifacts/web/), nothing wider than a phone's screen, and both colour schemes applied."""

from __future__ import annotations

import pytest
from playwright.sync_api import Browser, expect
from tests.web.conftest import (
    DESKTOP,
    PHONE,
    WebGateway,
    assert_clean,
    open_context,
    screenshot,
    use_key,
    watch,
)

PAGES = ("playground", "usage", "admin")


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshots_of_every_page_at_desktop_and_phone_width(
    web: WebGateway, browser: Browser, scheme: str
) -> None:
    """Every page renders with data at 1280 and 390 px, fits a phone's width, and follows prefers-color-scheme."""
    _, key = web.new_key(f"screens-{scheme}")
    web.api(
        "POST",
        "/v1/chat/completions",
        key,
        json={
            "model": "priced-sim",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "for the charts"}],
        },
    )
    backgrounds = set()
    for size_name, size in (("desktop", DESKTOP), ("phone", PHONE)):
        context = open_context(browser, color_scheme=scheme)
        page = context.new_page()
        page.set_viewport_size(size)
        seen = watch(page)
        try:
            page.goto(web.base_url + "/")
            use_key(page, key)
            page.select_option("#model", "paced-sim")
            page.check("input[name=transport][value=race]")
            page.fill("#prompt", "Which transport wins?")
            page.click("#send")
            expect(page.locator("#race-ws")).to_have_attribute("data-state", "done")
            expect(page.locator("#race-sse")).to_have_attribute("data-state", "done")
            for name in PAGES:
                if name != "playground":
                    page.goto(f"{web.base_url}/{name}")
                    if name == "admin":
                        use_key(page, web.server.admin_key)
                    ready = "#usage-panel" if name == "usage" else "#live-cards .card >> nth=0"
                    expect(page.locator(ready)).to_be_visible()
                path = screenshot(page, f"{name}-{size_name}-{scheme}")
                assert path.stat().st_size > 10_000
                overflow = page.evaluate(
                    "() => document.documentElement.scrollWidth - window.innerWidth"
                )
                assert overflow <= 0, f"{name} is {overflow}px wider than a {size_name} screen"
                backgrounds.add(
                    page.evaluate("() => getComputedStyle(document.body).backgroundColor")
                )
            assert_clean(page, seen)
        finally:
            context.close()
    assert backgrounds == ({"rgb(246, 247, 249)"} if scheme == "light" else {"rgb(13, 17, 23)"})
