"""costcalc: exact USD parsing and workload cost, price and margin projections, checked against
hand arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest

from tokenwire.accounting.costcalc import (
    Workload,
    daily_amount,
    parse_share,
    parse_usd,
    project,
    round_half_up,
)
from tokenwire.accounting.plans import PlanBook
from tokenwire.config import ModelEntry, Plan, Price, load_settings

AT_COST = PlanBook.at_cost().plan(None)


def entry(model: str, input_usd: str, output_usd: str) -> ModelEntry:
    return ModelEntry(
        id=model,
        provider="sim",
        upstream_model=model,
        input_micro_per_mtok=parse_usd(input_usd),
        output_micro_per_mtok=parse_usd(output_usd),
    )


def test_parse_usd_is_exact() -> None:
    """USD strings and JSON numbers become exact micro-dollars; no float rounding creeps in."""
    assert parse_usd("12.50") == 12_500_000
    assert parse_usd("0.000001") == 1
    assert parse_usd(" 3 ") == 3_000_000
    assert parse_usd(0.1) == 100_000
    assert parse_usd(0.3) == 300_000  # 0.1 + 0.2 style float errors do not appear
    assert parse_usd(7) == 7_000_000
    assert parse_usd("1000000000") == 10**15
    assert parse_usd("0") == 0


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("-1", "negative"),
        (-0.5, "negative"),
        ("1.0000001", "6 decimals"),
        (1e-7, "6 decimals"),
        ("1e3", "6 decimals"),
        ("NaN", "6 decimals"),
        ("Infinity", "6 decimals"),
        ("", "6 decimals"),
        ("1,000", "6 decimals"),
        ("1000000000.5", "at most"),
        ("9" * 5000, "at most"),
        (True, "string"),
        (None, "string"),
        ([1], "string"),
    ],
)
def test_parse_usd_refuses(value: object, reason: str) -> None:
    """Negative, over-precise, non-decimal, oversized and non-numeric amounts raise ValueError saying why."""
    with pytest.raises(ValueError, match=reason):
        parse_usd(value)


def test_parse_usd_positive() -> None:
    """positive=True refuses zero (a top-up of nothing)."""
    with pytest.raises(ValueError, match="greater than 0"):
        parse_usd("0.000000", positive=True)
    assert parse_usd("0.000001", positive=True) == 1


def test_parse_share() -> None:
    """Shares are exact fractions in [0, 1]."""
    assert parse_share("0.5") == Fraction(1, 2)
    assert parse_share("1/3") == Fraction(1, 3)
    assert parse_share("0") == 0 and parse_share("1") == 1
    for bad in ("1.5", "-0.1", "half", "1/0"):
        with pytest.raises(ValueError):
            parse_share(bad)


def test_round_half_up() -> None:
    """Halves round up, everything else to the nearest integer."""
    assert [round_half_up(Fraction(n, 2)) for n in range(5)] == [0, 1, 1, 2, 2]
    assert round_half_up(Fraction(4, 3)) == 1 and round_half_up(Fraction(5, 3)) == 2


def test_catalog_projection_by_hand() -> None:
    """1000 users x 50 requests x 1000 tokens, half output, 30 days, on the built-in catalog
    and the default plan (the reseller's flat list).

    Per day: 50,000 requests, 50,000,000 tokens = 25M input + 25M output.
    gpt-4.1 costs ($2.00 / $8.00 per 1M) 25 x 2.00 + 25 x 8.00 = $250.00 a day, $7,500.00 in 30
    days; sold at $8.00 flat: 50 x 8.00 = $400.00 a day ($12,000.00), a margin of $150.00.
    deepseek-v3.2 costs ($0.28 / $0.42) 7.00 + 10.50 = $17.50 a day, $525.00; sold at $0.42:
    50 x 0.42 = $21.00 a day ($630.00), a margin of $3.50 ($105.00).
    """
    workload = Workload(users=1000, requests_per_user=50, tokens_per_request=1000)
    assert workload.requests_per_day == 50_000
    assert workload.input_tokens_per_day == workload.output_tokens_per_day == 25_000_000
    settings = load_settings(env={})
    plan = PlanBook.from_settings(settings).plan(None)
    rows = {c.model: c for c in project(settings.models.values(), plan, workload)}
    gpt = rows["gpt-4.1"]
    assert (gpt.daily_cost_micro, gpt.period_cost_micro) == (250_000_000, 7_500_000_000)
    assert (gpt.daily_price_micro, gpt.period_price_micro) == (400_000_000, 12_000_000_000)
    assert (gpt.daily_margin_micro, gpt.period_margin_micro) == (150_000_000, 4_500_000_000)
    deepseek = rows["deepseek-v3.2"]
    assert (deepseek.daily_cost_micro, deepseek.period_cost_micro) == (17_500_000, 525_000_000)
    assert (deepseek.daily_price_micro, deepseek.period_price_micro) == (21_000_000, 630_000_000)
    assert deepseek.daily_margin_micro == 3_500_000
    assert (
        rows["claude-sonnet-4.5"].daily_price_micro,
        rows["gemini-2.5-flash"].daily_price_micro,
    ) == (
        750_000_000,
        125_000_000,
    )
    assert rows["sim"].daily_cost_micro == rows["sim"].period_price_micro == 0


def test_an_input_output_plan_projects_per_kind() -> None:
    """A plan with input/output prices ($1.00 / $3.00) on a model costing $0.50 / $1.50:
    1M input + 1M output tokens a day cost $2.00 and sell for $4.00."""
    model = entry("m", "0.50", "1.50")
    plan = Plan("pro", prices={"m": Price(1_000_000, 3_000_000, 1_000_000, 1_000_000)})
    (row,) = project([model], plan, Workload(1000, 1, 2000))
    assert (row.daily_cost_micro, row.daily_price_micro, row.daily_margin_micro) == (
        2_000_000,
        4_000_000,
        2_000_000,
    )


def test_rounding_happens_once_per_figure() -> None:
    """A day costing 0.4 micro-dollars rounds to 0, but 30 such days are 12, not 30 x 0."""
    cheap = entry("cheap", "0.000001", "0")  # 1 micro-dollar per 1M input tokens
    workload = Workload(
        users=1, requests_per_user=4, tokens_per_request=100_000, output_share=Fraction(0)
    )
    assert daily_amount(cheap.cost, workload) == Fraction(2, 5)
    (cost,) = project([cheap], AT_COST, workload)
    assert (cost.daily_cost_micro, cost.period_cost_micro) == (0, 12)
    assert (cost.daily_price_micro, cost.period_price_micro) == (0, 12)


def test_uneven_share_is_exact() -> None:
    """A third of 3 tokens per request as output: 1 output and 2 input tokens, priced exactly."""
    model = entry("m", "1.00", "3.00")
    workload = Workload(1_000_000, 1, 3, output_share=Fraction(1, 3), days=7)
    (cost,) = project([model], AT_COST, workload)
    assert cost.daily_cost_micro == 2_000_000 + 3_000_000
    assert cost.period_cost_micro == 35_000_000


def test_workload_refuses_negative_numbers() -> None:
    """Negative counts and shares outside [0, 1] are refused."""
    with pytest.raises(ValueError, match="users"):
        Workload(users=-1, requests_per_user=1, tokens_per_request=1)
    with pytest.raises(ValueError, match="output_share"):
        Workload(1, 1, 1, output_share=Fraction(3, 2))
