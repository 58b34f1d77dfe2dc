"""GET /v1/usage and GET /v1/admin/usage after real priced completions, on SQLite and PostgreSQL.

The model ``priced-sim`` costs the operator $1.00 / $5.00 per 1M tokens and the default plan
charges $3.00 / $15.00, i.e. 3 and 15 micro-dollars per prompt and completion token: a
completion of N tokens with a prompt of P tokens is charged 3P + 15N micro-dollars, costs
P + 5N, and leaves a margin of 2P + 10N. The plan ``flat`` charges $10.00 per 1M tokens of
either kind: 10 (P + N).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from tokenwire.testing import FAST_SIM, GatewayServer

PRICED = (
    FAST_SIM
    + """
[[models]]
id = "priced-sim"
provider = "sim"
upstream_model = "sim"
input_usd_per_mtok = "1.00"
output_usd_per_mtok = "5.00"

[plans.standard]
models."priced-sim" = { input_usd_per_mtok = "3.00", output_usd_per_mtok = "15.00" }

[plans.flat]
models."priced-sim" = { usd_per_mtok = "10.00" }
"""
)
GRANT_MICRO = 1000 * 1_000_000  # GatewayServer's default grant_usd


@pytest.fixture
def gw(database_url: str, tmp_path: Path) -> Iterator[GatewayServer]:
    """A gateway with ``priced-sim``, on SQLite or PostgreSQL."""
    with GatewayServer(tmp_path / "gw", overrides=PRICED, database_url=database_url) as server:
        yield server


def charge(prompt: int, completion: int) -> int:
    """What the default plan charges for a completion (see the module docstring)."""
    return 3 * prompt + 15 * completion


def cost(prompt: int, completion: int) -> int:
    """What a completion costs the operator."""
    return prompt + 5 * completion


def usage(gw: GatewayServer, key: str | None, query: str = "") -> requests.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return requests.get(f"{gw.base_url}/v1/usage{query}", headers=headers, timeout=10)


def stream(
    gw: GatewayServer,
    content: str,
    max_tokens: int,
    model: str = "priced-sim",
    key: str | None = None,
) -> dict[str, int]:
    """A streamed completion read to [DONE] (with the API key, or ``key``); its usage chunk."""
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key or gw.api_key}"},
        json={
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
        },
        stream=True,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    lines = [str(line) for line in response.iter_lines(decode_unicode=True)]
    data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    result: dict[str, int] = json.loads(data[-2])["usage"]
    return result


def wait_for_requests(
    gw: GatewayServer, count: int, deadline_s: float = 10.0, key: str | None = None
) -> dict[str, Any]:
    """Poll /v1/usage until ``count`` completions of the key are settled in the ledger."""
    end = time.monotonic() + deadline_s
    while True:
        body: dict[str, Any] = usage(gw, key or gw.api_key, "?limit=1000").json()
        if len(body.get("data", ())) >= count or time.monotonic() > end:
            return body
        time.sleep(0.02)


def test_usage_shows_exact_charges_totals_and_balance(gw: GatewayServer) -> None:
    """Three priced streams are charged 3P + 15N micro-dollars each in the ledger rows, the
    totals and the balance; the operator's cost (P + 5N) appears nowhere in the answer."""
    prompts = [("one two three", 5), ("a much longer prompt with nine words in it", 12), ("hi", 1)]
    usages = [stream(gw, text, n) for text, n in prompts]
    for (text, n), used in zip(prompts, usages, strict=True):
        assert used["prompt_tokens"] == 4 + len(text.split())
        assert used["completion_tokens"] == n
    expected = {
        (u["prompt_tokens"], u["completion_tokens"]): charge(
            u["prompt_tokens"], u["completion_tokens"]
        )
        for u in usages
    }
    assert expected == {(7, 5): 96, (13, 12): 219, (5, 1): 30}

    body = wait_for_requests(gw, 3)
    assert body["object"] == "list" and len(body["data"]) == 3
    for row in body["data"]:
        assert row["key_id"] == gw.api_key_id
        assert (row["model"], row["transport"], row["status"]) == ("priced-sim", "sse", "completed")
        assert row["charge_micro"] == expected[(row["prompt_tokens"], row["completion_tokens"])]
        assert row["charge_usd"] == f"0.{row['charge_micro']:06d}"
        assert (row["cost_micro"], row["cost_usd"]) == (row["charge_micro"], row["charge_usd"])
        assert row["plan"] == "standard"
        assert row["completion_id"].startswith("chatcmpl-")
        operator_cost = cost(row["prompt_tokens"], row["completion_tokens"])
        assert operator_cost not in (v for k, v in row.items() if k.endswith("_micro"))
    assert [r["created_at"] for r in body["data"]] == sorted(
        (r["created_at"] for r in body["data"]), reverse=True
    )
    total_cost = sum(expected.values())
    assert body["total"] == {
        "requests": 3,
        "prompt_tokens": 7 + 13 + 5,
        "completion_tokens": 5 + 12 + 1,
        "cache_write_tokens": 0,
        "cache_read_tokens": 0,
        "charge_micro": total_cost,
        "charge_usd": "0.000345",
        "cost_micro": total_cost,
        "cost_usd": "0.000345",
    }
    assert body["balance_micro"] == GRANT_MICRO - total_cost
    assert body["balance_usd"] == "999.999655"


def test_usage_filters(gw: GatewayServer) -> None:
    """model, limit, start and end narrow the rows; the totals follow the filters but not the limit; other keys see nothing."""
    stream(gw, "priced one", 3)
    stream(gw, "priced two", 4)
    stream(gw, "free", 6, model="sim")
    body = wait_for_requests(gw, 3)
    assert body["total"]["requests"] == 3

    priced = usage(gw, gw.api_key, "?model=priced-sim").json()
    assert {r["model"] for r in priced["data"]} == {"priced-sim"}
    assert priced["total"]["requests"] == 2
    assert priced["total"]["charge_micro"] == charge(6, 3) + charge(6, 4)
    free = usage(gw, gw.api_key, "?model=sim").json()
    assert free["total"]["charge_micro"] == 0 and free["total"]["completion_tokens"] == 6

    limited = usage(gw, gw.api_key, "?limit=1").json()
    assert len(limited["data"]) == 1 and limited["total"]["requests"] == 3
    assert limited["data"][0]["created_at"] == max(r["created_at"] for r in body["data"])

    now = datetime.now(UTC)
    hour_ago = (now - timedelta(hours=1)).isoformat()
    in_an_hour = int((now + timedelta(hours=1)).timestamp())
    window = usage(gw, gw.api_key, f"?start={quote(hour_ago)}&end={in_an_hour}").json()
    assert window["total"]["requests"] == 3
    # An unencoded "+00:00" arrives as " 00:00"; it is read as the offset it was.
    unencoded = usage(gw, gw.api_key, f"?start={hour_ago}").json()
    assert unencoded["total"]["requests"] == 3
    zoned = (now + timedelta(minutes=30)).astimezone(timezone(timedelta(hours=2))).isoformat()
    assert usage(gw, gw.api_key, f"?end={quote(zoned)}").json()["total"]["requests"] == 3
    assert usage(gw, gw.api_key, f"?start={quote(zoned)}").json()["total"]["requests"] == 0
    future = usage(gw, gw.api_key, f"?start={in_an_hour}").json()
    assert future["data"] == [] and future["total"]["requests"] == 0
    assert future["balance_micro"] == body["balance_micro"]
    naive = usage(gw, gw.api_key, "?end=2000-01-01T00:00:00").json()
    assert naive["total"]["requests"] == 0

    others = usage(gw, gw.admin_key).json()
    assert others["data"] == [] and others["total"]["requests"] == 0


def test_usage_bad_parameters(gw: GatewayServer) -> None:
    """Bad limit, times and unknown parameters are 400 naming the parameter; no key is 401."""
    for query, param in [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=-1", "limit"),
        ("?start=last-tuesday", "start"),
        ("?end=99999999999999", "end"),
        ("?start=2025-02-01&end=2025-01-01", "end"),
        ("?key_id=key_other", "key_id"),
        ("?since=2025-01-01", "since"),
    ]:
        response = usage(gw, gw.api_key, query)
        assert response.status_code == 400, (query, response.text)
        assert response.json()["error"]["param"] == param
    assert usage(gw, gw.api_key, "?limit=1000").status_code == 200
    assert usage(gw, None).status_code == 401
    assert usage(gw, "tw-wrong").status_code == 401


def test_admin_usage_groups_by_key_model_and_day(gw: GatewayServer, database_url: str) -> None:
    """/v1/admin/usage totals of cost, charge and margin by key, model and day match the
    ledger, with the overall total beside them."""
    stream(gw, "priced one", 3)  # 6 prompt tokens: charged 18 + 45 = 63, cost 6 + 15 = 21
    stream(gw, "priced two", 4)  # charged 18 + 60 = 78, cost 6 + 20 = 26
    stream(gw, "free", 6, model="sim")
    wait_for_requests(gw, 3)
    admin = {"Authorization": f"Bearer {gw.admin_key}"}

    def report(query: str) -> dict[str, Any]:
        response = requests.get(f"{gw.base_url}/v1/admin/usage{query}", headers=admin, timeout=10)
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    by_model = report("?group_by=key,model")
    assert by_model["group_by"] == ["key_id", "model"]
    assert by_model["data"] == [
        {
            "key_id": gw.api_key_id,
            "model": "priced-sim",
            "requests": 2,
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "cache_write_tokens": 0,
            "cache_read_tokens": 0,
            "cost_micro": 47,
            "cost_usd": "0.000047",
            "charge_micro": 141,
            "charge_usd": "0.000141",
            "margin_micro": 94,
            "margin_usd": "0.000094",
        },
        {
            "key_id": gw.api_key_id,
            "model": "sim",
            "requests": 1,
            "prompt_tokens": 5,
            "completion_tokens": 6,
            "cache_write_tokens": 0,
            "cache_read_tokens": 0,
            "cost_micro": 0,
            "cost_usd": "0.000000",
            "charge_micro": 0,
            "charge_usd": "0.000000",
            "margin_micro": 0,
            "margin_usd": "0.000000",
        },
    ]
    total = by_model["total"]
    assert (total["requests"], total["cost_micro"], total["charge_micro"]) == (3, 47, 141)
    assert total["margin_micro"] == 94

    full = report("")
    assert full["group_by"] == ["key_id", "model", "day"]
    assert sum(r["requests"] for r in full["data"]) == 3
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert {r["day"] for r in full["data"]} <= {
        today,
        (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%d"),
    }

    only_priced = report(f"?group_by=model&model=priced-sim&key_id={gw.api_key_id}")
    assert [(r["model"], r["charge_micro"]) for r in only_priced["data"]] == [("priced-sim", 141)]
    by_provider = report("?group_by=provider,plan")
    assert [(r["provider"], r["plan"], r["margin_micro"]) for r in by_provider["data"]] == [
        ("sim", "standard", 94)
    ]
    nobody = report("?key_id=key_nobody&group_by=model")
    assert nobody["data"] == [] and nobody["total"]["requests"] == 0
    future = report(f"?start={int(time.time()) + 3600}")
    assert future["data"] == [] and future["total"]["cost_micro"] == 0


def test_two_keys_on_two_plans_are_charged_by_their_own_lists(gw: GatewayServer) -> None:
    """The API key (default plan: $3 / $15) and a key on the flat plan ($10 for every token)
    run the same completion: each is charged by its own list, exactly; the operator's cost is
    the same; the admin report's margins by plan add up to the total margin."""
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    created = requests.post(
        gw.base_url + "/v1/admin/keys",
        headers=admin,
        json={"name": "flat buyer", "plan": "flat", "credits_usd": "1.00"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    assert created.json()["plan"] == "flat"
    flat_key = created.json()["key"]
    models = requests.get(
        gw.base_url + "/v1/models/priced-sim",
        headers={"Authorization": f"Bearer {flat_key}"},
        timeout=10,
    ).json()
    assert models["pricing"]["plan"] == "flat" and models["pricing"]["flat"] is True
    assert models["pricing"]["input_usd_per_mtok"] == models["pricing"]["output_usd_per_mtok"] == 10

    default = stream(gw, "the same words", 9)
    flat = stream(gw, "the same words", 9, key=flat_key)
    assert default == flat  # the same usage: P = 7, N = 9
    p, n = default["prompt_tokens"], default["completion_tokens"]
    mine = wait_for_requests(gw, 1)
    theirs = wait_for_requests(gw, 1, key=flat_key)
    assert mine["total"]["charge_micro"] == charge(p, n) == 156
    assert theirs["total"]["charge_micro"] == 10 * (p + n) == 160
    assert theirs["balance_micro"] == 1_000_000 - 160
    assert [r["plan"] for r in theirs["data"]] == ["flat"]

    response = requests.get(
        f"{gw.base_url}/v1/admin/usage?group_by=plan", headers=admin, timeout=10
    )
    report = response.json()
    by_plan = {r["plan"]: r for r in report["data"]}
    assert {plan: (r["cost_micro"], r["charge_micro"]) for plan, r in by_plan.items()} == {
        "flat": (cost(p, n), 160),
        "standard": (cost(p, n), 156),
    }
    assert sum(r["margin_micro"] for r in report["data"]) == report["total"]["margin_micro"]
    assert report["total"]["margin_micro"] == 160 + 156 - 2 * cost(p, n)

    moved = requests.patch(
        f"{gw.base_url}/v1/admin/keys/{created.json()['id']}",
        headers=admin,
        json={"plan": None},
        timeout=10,
    )
    assert moved.status_code == 200 and moved.json()["plan"] is None
    stream(gw, "the same words", 9, key=flat_key)
    after = wait_for_requests(gw, 2, key=flat_key)
    assert after["data"][0]["plan"] == "standard"
    assert after["data"][0]["charge_micro"] == 156


def test_a_key_whose_plan_is_no_longer_configured_gets_503(gw: GatewayServer) -> None:
    """A key left on a plan the configuration no longer has is refused with 503
    plan_unavailable (never charged by another list), and nothing is reserved."""
    before = usage(gw, gw.api_key).json()["balance_micro"]
    moved = asyncio.run_coroutine_threadsafe(
        gw.state.keys.update(gw.api_key_id, plan="vanished"), gw.loop_of_server()
    )
    assert moved.result(timeout=10).plan == "vanished"
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {gw.api_key}"},
        json={"model": "priced-sim", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "plan_unavailable"
    models = requests.get(
        gw.base_url + "/v1/models", headers={"Authorization": f"Bearer {gw.api_key}"}, timeout=10
    )
    assert models.status_code == 503
    assert usage(gw, gw.api_key).json()["balance_micro"] == before


def test_own_usage_groups_by_model_and_day(gw: GatewayServer) -> None:
    """/v1/usage?group_by=model,day adds the caller's totals per model and day; the rows and total are unchanged; key is refused."""
    stream(gw, "priced one", 3)  # 63 micro-dollars
    stream(gw, "priced two", 4)  # 78
    stream(gw, "free", 6, model="sim")
    plain = wait_for_requests(gw, 3)
    assert "groups" not in plain
    grouped = usage(gw, gw.api_key, "?group_by=model,day").json()
    assert grouped["group_by"] == ["model", "day"]
    assert grouped["total"] == plain["total"] and grouped["data"] == plain["data"]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert {(g["model"], g["requests"], g["cost_micro"]) for g in grouped["groups"]} == {
        ("priced-sim", 2, 141),
        ("sim", 1, 0),
    }
    assert {g["day"] for g in grouped["groups"]} <= {
        today,
        (datetime.now(UTC) - timedelta(minutes=1)).strftime("%Y-%m-%d"),
    }
    by_day = usage(gw, gw.api_key, "?group_by=day").json()
    assert sum(g["requests"] for g in by_day["groups"]) == 3
    assert sum(g["cost_micro"] for g in by_day["groups"]) == 141
    for bad in ("key", "key_id", "model,week"):
        response = usage(gw, gw.api_key, f"?group_by={bad}")
        assert response.status_code == 400, bad
        assert response.json()["error"]["param"] == "group_by"
        assert "model, day" in response.json()["error"]["message"]


def test_own_key_shows_limits_models_and_live_balance(gw: GatewayServer) -> None:
    """GET /v1/key answers the caller's own key (no secret), with the balance as spent so far; no key is 401."""
    admin = {"Authorization": f"Bearer {gw.admin_key}"}
    created = requests.post(
        f"{gw.base_url}/v1/admin/keys",
        headers=admin,
        json={
            "name": "mine",
            "rpm": 30,
            "tpm": 9000,
            "credits_usd": "2.00",
            "models": ["priced-sim"],
        },
        timeout=10,
    ).json()
    headers = {"Authorization": f"Bearer {created['key']}"}
    own = requests.get(f"{gw.base_url}/v1/key", headers=headers, timeout=10)
    assert own.status_code == 200
    body = own.json()
    assert body["id"] == created["id"] and body["name"] == "mine" and body["admin"] is False
    assert (body["rpm"], body["tpm"], body["max_concurrent_streams"]) == (30, 9000, None)
    assert body["models"] == ["priced-sim"] and body["status"] == "active"
    assert body["balance_micro"] == 2_000_000 and body["balance_usd"] == "2.000000"
    assert "key" not in body and not any("digest" in name for name in body)
    assert own.headers["x-content-type-options"] == "nosniff"
    assert own.headers["cache-control"] == "no-store"
    response = requests.post(
        gw.base_url + "/v1/chat/completions",
        headers=headers,
        json={
            "model": "priced-sim",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "one two three"}],
        },
        timeout=10,
    )
    assert response.status_code == 200
    end = time.monotonic() + 10
    while usage(gw, created["key"]).json()["total"]["requests"] < 1 and time.monotonic() < end:
        time.sleep(0.02)
    after = requests.get(f"{gw.base_url}/v1/key", headers=headers, timeout=10).json()
    assert after["balance_micro"] == 2_000_000 - 96  # 7 prompt x 3 + 5 completion x 15
    assert requests.get(f"{gw.base_url}/v1/key", timeout=10).status_code == 401
