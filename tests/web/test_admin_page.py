"""The admin page in a real browser: the key lifecycle, the 403 for other keys, live figures."""

from __future__ import annotations

import re
import time
from typing import Any

from playwright.sync_api import Page, Request, Route, expect
from prometheus_client.parser import text_string_to_metric_families
from tests.web.conftest import WebGateway, use_key, wait_until

SAMPLE_METRICS = """\
# HELP tokenwire_ttft_seconds Time to first token.
# TYPE tokenwire_ttft_seconds histogram
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="sse",le="0.005"} 0
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="sse",le="0.01"} 5
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="sse",le="0.025"} 10
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="sse",le="+Inf"} 10
tokenwire_ttft_seconds_count{model="sim",provider="sim",transport="sse"} 10
tokenwire_ttft_seconds_sum{model="sim",provider="sim",transport="sse"} 0.12
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="ws",le="0.005"} 2
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="ws",le="0.01"} 2
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="ws",le="0.025"} 2
tokenwire_ttft_seconds_bucket{model="sim",provider="sim",transport="ws",le="+Inf"} 4
tokenwire_ttft_seconds_bucket{model="x",provider="sim",transport="ws",le="0.005"} 0
tokenwire_ttft_seconds_bucket{model="x",provider="sim",transport="ws",le="0.01"} 0
tokenwire_ttft_seconds_bucket{model="x",provider="sim",transport="ws",le="0.025"} 0
tokenwire_ttft_seconds_bucket{model="x",provider="sim",transport="ws",le="+Inf"} 0
# TYPE tokenwire_open_streams gauge
tokenwire_open_streams{transport="sse"} 3
tokenwire_open_streams{transport="ws"} 1
# TYPE tokenwire_open_websockets gauge
tokenwire_open_websockets{mode="envelope"} 2
# TYPE tokenwire_requests_total counter
tokenwire_requests_total{model="sim",provider="sim",transport="sse",outcome="ok"} 9
tokenwire_requests_total{model="sim",provider="sim",transport="ws",outcome="ok"} 3
tokenwire_requests_total{model="sim",provider="sim",transport="sse",outcome="upstream_error"} 1
tokenwire_limit_refusals_total{reason="rpm"} 7
"""


def open_admin(web: WebGateway, page: Page) -> None:
    page.goto(web.base_url + "/admin")
    use_key(page, web.server.admin_key)
    expect(page.locator("#admin-content")).to_be_visible()


def key_row(page: Page, name: str) -> Any:
    return page.locator(
        "#keys-table tbody tr", has=page.locator("td", has_text=re.compile(f"^{name}"))
    )


def test_admin_creates_tops_up_and_revokes_a_key(web: WebGateway, page: Page) -> None:
    """Create a key with limits and credits (its secret shown once), top it up, revoke it: the revoked key then gets 401."""
    open_admin(web, page)
    page.click("#create-details summary")
    page.fill("#create-name", "flow-key")
    page.fill("#create-credits", "2.50")
    page.fill("#create-rpm", "60")
    page.check("#create-models input[value='priced-sim']")
    page.click("#create-form button[type=submit]")
    expect(page.locator("#secret-box")).to_be_visible()
    secret = page.inner_text("#secret-value")
    assert secret.startswith("tw-")
    row = key_row(page, "flow-key")
    expect(row).to_have_count(1)
    key_id = row.get_attribute("data-key-id")
    own = web.api("GET", "/v1/key", secret).json()
    assert own["id"] == key_id and own["rpm"] == 60 and own["models"] == ["priced-sim"]
    assert own["balance_micro"] == 2_500_000
    expect(row.locator("[data-balance]")).to_have_text("$2.50")

    page.click("#dismiss-secret")
    expect(page.locator("#secret-box")).to_be_hidden()
    assert page.inner_text("#secret-value") == ""  # not left in the page

    row.get_by_role("button", name="Top up flow-key").click()
    expect(page.locator("#topup-dialog")).to_be_visible()
    page.fill("#topup-amount", "5")
    page.fill("#topup-note", "browser test")
    page.click("#topup-form button[type=submit]")
    expect(page.locator("#topup-dialog")).to_be_hidden()
    expect(row.locator("[data-balance]")).to_have_attribute("data-balance", "7500000")
    assert web.api("GET", "/v1/key", secret).json()["balance_micro"] == 7_500_000

    row.get_by_role("button", name="Revoke flow-key").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.click("#confirm-ok")
    expect(page.locator("#confirm-dialog")).to_be_hidden()
    expect(row).to_have_attribute("data-status", "revoked")
    expect(row.get_by_role("button", name="Top up flow-key")).to_be_disabled()
    refused = web.api("GET", "/v1/models", secret)
    assert refused.status_code == 401


def test_admin_edits_and_rotates_a_key(web: WebGateway, page: Page) -> None:
    """Edit changes only what was changed; rotate shows the new secret once and the old one gets 401."""
    key_id, old = web.new_key("edit-me", tpm=5000)
    open_admin(web, page)
    row = key_row(page, "edit-me")
    row.get_by_role("button", name="Edit edit-me").click()
    expect(page.locator("#edit-name")).to_have_value("edit-me")
    expect(page.locator("#edit-tpm")).to_have_value("5000")
    page.fill("#edit-name", "edited")
    page.fill("#edit-rpm", "10")
    page.fill("#edit-tpm", "")  # cleared: unlimited
    page.click("#edit-form button[type=submit]")
    expect(page.locator("#edit-dialog")).to_be_hidden()
    record = web.api("GET", f"/v1/admin/keys/{key_id}", web.server.admin_key).json()
    assert (record["name"], record["rpm"], record["tpm"]) == ("edited", 10, None)
    assert record["balance_micro"] == 10_000_000 and record["models"] is None
    row = key_row(page, "edited")
    expect(row.locator("td").nth(4)).to_have_text("10")

    row.get_by_role("button", name="Rotate edited").click()
    page.click("#confirm-ok")
    expect(page.locator("#secret-box")).to_be_visible()
    new = page.inner_text("#secret-value")
    assert new.startswith("tw-") and new != old
    assert web.api("GET", "/v1/key", old).status_code == 401
    assert web.api("GET", "/v1/key", new).json()["id"] == key_id


def test_a_key_without_admin_rights_gets_only_the_403_message(web: WebGateway, page: Page) -> None:
    """With a plain key the admin page shows the gateway's 403 and asks nothing more of the admin API."""
    admin_calls: list[str] = []
    page.on(
        "request",
        lambda request: (
            admin_calls.append(request.url)
            if "/v1/admin/" in request.url or request.url.endswith("/metrics")
            else None
        ),
    )
    page.goto(web.base_url + "/admin")
    use_key(page, web.server.api_key)
    denied = page.locator("#admin-denied")
    expect(denied).to_be_visible()
    expect(denied).to_contain_text("403")
    expect(denied).to_contain_text("admin key")
    expect(page.locator("#admin-content")).to_be_hidden()
    assert admin_calls == [web.base_url + "/v1/admin/keys"]
    assert page.locator("#keys-table tbody tr").count() == 0


def test_live_figures_say_when_the_gateway_has_no_metrics(web: WebGateway, page: Page) -> None:
    """Runtime counts show; a /metrics answering 404 is explained instead of failing the page."""
    page.route(
        "**/metrics",
        lambda route: route.fulfill(
            status=404,
            json={
                "error": {
                    "message": "Not Found",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
        ),
    )
    open_admin(web, page)
    expect(page.locator("#live-cards [data-card=live_generations] dd")).to_have_text(
        re.compile(r"^\d+$")
    )
    expect(page.locator("#metrics-note")).to_contain_text("404")
    assert page.locator("#metrics-box table").count() == 0


def test_live_figures_read_prometheus_metrics(web: WebGateway, page: Page) -> None:
    """Open streams and sockets, TTFT percentiles per transport and outcomes come from GET /metrics (sent with the admin key)."""
    seen: list[str | None] = []

    def serve(route: Route, request: Request) -> None:
        seen.append(request.headers.get("authorization"))
        route.fulfill(
            status=200, body=SAMPLE_METRICS, headers={"Content-Type": "text/plain; version=0.0.4"}
        )

    page.route("**/metrics", serve)
    open_admin(web, page)
    ttft = page.locator("#ttft-table")
    expect(ttft).to_be_visible()
    assert seen[0] == f"Bearer {web.server.admin_key}"
    sse = ttft.locator("tr[data-row=sse] td")
    assert [sse.nth(i).inner_text() for i in range(5)] == [
        "sse",
        "10",
        "10.0 ms",
        "22.0 ms",
        "24.7 ms",
    ]
    ws = ttft.locator("tr[data-row=ws] td")
    assert [ws.nth(i).inner_text() for i in range(5)] == ["ws", "4", "5.0 ms", "25.0 ms", "25.0 ms"]
    opened = page.locator("#open-table")
    expect(opened.locator("tr[data-row='streams (sse)'] td").nth(1)).to_have_text("3")
    expect(opened.locator("tr[data-row='WebSockets (envelope)'] td").nth(1)).to_have_text("2")
    outcomes = page.locator("#outcome-table")
    expect(outcomes.locator("tr[data-row=ok] td").nth(1)).to_have_text("12")
    expect(outcomes.locator("tr[data-row=upstream_error] td").nth(1)).to_have_text("1")
    expect(
        page.locator("#errors-table tr[data-row='limit refusals (rpm)'] td").nth(1)
    ).to_have_text("7")


def _page_usd(micro: int) -> str:
    """Micro-dollars as the pages write them (common.js formatUSD)."""
    whole, fraction = divmod(abs(micro), 1_000_000)
    digits = re.sub("0{1,4}$", "", f"{fraction:06d}").ljust(2, "0")
    return f"{'-' if micro < 0 else ''}${whole:,}.{digits}"


def test_admin_usage_shows_cost_charge_and_margin(web: WebGateway, page: Page) -> None:
    """The admin console's usage cards are the admin report's cost, charge and margin, and its
    charts can show the charge and the margin."""
    _, key = web.new_key("margin-buyer", credits_usd="1.00")
    answer = web.api(
        "POST",
        "/v1/chat/completions",
        key,
        json={"model": "priced-sim", "messages": [{"role": "user", "content": "a b c"}]},
    )
    assert answer.status_code == 200, answer.text
    wait_until(lambda: web.usage(key)["total"]["requests"] == 1, "the ledger row")
    open_admin(web, page)
    expect(page.locator("#totals [data-card=charge] dd")).not_to_be_empty()
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 29 * 86_400))
    report = web.api(
        "GET", f"/v1/admin/usage?start={day}&group_by=day,model,key", web.server.admin_key
    ).json()
    total = report["total"]
    assert total["charge_micro"] > 0
    for card, figure in (
        ("cost", "cost_micro"),
        ("charge", "charge_micro"),
        ("margin", "margin_micro"),
    ):
        expect(page.locator(f"#totals [data-card={card}] dd")).to_have_text(
            _page_usd(total[figure])
        )
    expect(page.locator("#totals [data-card=cost] dt")).to_have_text("Cost (upstream)")
    for measure in ("charge", "margin"):
        page.select_option("#measure", measure)
        figure = page.locator("#by-model")
        expect(figure).to_have_attribute("data-total", str(total[f"{measure}_micro"]))
        expect(figure.locator(".chart-total")).to_contain_text(measure)


def _ttft_count(web: WebGateway, transport: str) -> int:
    """The gateway's own TTFT observation count for ``transport`` (all models), from /metrics."""
    response = web.api("GET", "/metrics", web.server.admin_key)
    assert response.status_code == 200, response.text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(response.text)
            if family.name == "tokenwire_ttft_seconds"
            for sample in family.samples
            if sample.name.endswith("_count") and sample.labels.get("transport") == transport
        )
    )


def test_live_figures_match_the_gateway_s_real_metrics(web: WebGateway, page: Page) -> None:
    """After real streamed requests, the page's SSE TTFT row counts what the gateway's own /metrics counts."""
    _, key = web.new_key("live-metrics")
    before = _ttft_count(web, "sse")
    for _ in range(2):
        response = web.api(
            "POST",
            "/v1/chat/completions",
            key,
            json={"model": "sim", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    wait_until(lambda: _ttft_count(web, "sse") == before + 2, "two more SSE TTFT observations")
    open_admin(web, page)
    row = page.locator("#ttft-table tr[data-row=sse] td")
    expect(row.nth(1)).to_have_text(str(before + 2))
    assert re.fullmatch(r"[\d.]+ ms", row.nth(2).inner_text())  # a real p50, not a dash
