"""Amounts in integer micro-dollars: exact, rounded once per completion, cache tokens apart."""

from __future__ import annotations

import pytest

from tokenwire.accounting.budget import completion_budget
from tokenwire.accounting.plans import PlanBook
from tokenwire.accounting.pricing import amount_micro, usd, worst_case_micro
from tokenwire.config import ConfigError, ModelEntry, Price, load_settings, usd_to_micro
from tokenwire.errors import PlanUnavailable
from tokenwire.streams.events import PromptUsage, Usage

GPT41 = ModelEntry("gpt-4.1", "openai", "gpt-4.1", 2_000_000, 8_000_000)
CHEAP = ModelEntry("d", "deepseek", "d", 280_000, 420_000)  # $0.28 / $0.42
SONNET = ModelEntry(
    "claude-sonnet-4.5",
    "anthropic",
    "claude-sonnet-4-5",
    3_000_000,
    15_000_000,
    cache_write_micro_per_mtok=3_750_000,
    cache_read_micro_per_mtok=300_000,
)


def test_amount_is_tokens_times_price_per_million() -> None:
    """1,000 prompt and 500 completion tokens of gpt-4.1 cost $0.002 + $0.004 = 6,000 µ$."""
    assert amount_micro(GPT41.cost, Usage(1000, 500)) == 6000
    assert amount_micro(GPT41.cost, Usage(0, 0)) == 0


def test_amount_rounds_half_up_once() -> None:
    """A fraction of a micro-dollar is rounded half up on the total, not per token."""
    # 3 * 0.28 + 1 * 0.42 = 1.26 µ$ -> 1; 1 * 0.28 + 1 * 0.42 = 0.70 -> 1; 1 * 0.28 -> 0
    assert amount_micro(CHEAP.cost, Usage(3, 1)) == 1
    assert amount_micro(CHEAP.cost, Usage(1, 1)) == 1
    assert amount_micro(CHEAP.cost, Usage(1, 0)) == 0
    # exactly half a micro-dollar goes up: 5 tokens at $0.10 per 1M = 0.5 µ$
    tenth = Price(100_000, 100_000, 100_000, 100_000)
    assert amount_micro(tenth, Usage(5, 0)) == 1
    assert amount_micro(tenth, Usage(4, 0)) == 0


def test_cache_tokens_are_priced_apart() -> None:
    """Sonnet: 1,000 uncached at $3, 2,000 written at $3.75, 10,000 read at $0.30, 100 out at
    $15: 3,000 + 7,500 + 3,000 + 1,500 = 15,000 µ$; the cache counts are parts of the prompt."""
    usage = Usage(13_000, 100, cache_write_tokens=2_000, cache_read_tokens=10_000)
    assert amount_micro(SONNET.cost, usage) == 3_000 + 7_500 + 3_000 + 1_500
    # without a cache price of its own a cached token costs the input price
    assert amount_micro(GPT41.cost, Usage(1000, 0, cache_write_tokens=500)) == 2_000
    # counts beyond the prompt (an upstream's mistake) are cut to it: no token priced twice
    odd = Usage(100, 0, cache_write_tokens=80, cache_read_tokens=80)
    assert amount_micro(SONNET.cost, odd) == 80 * 375 // 100 + 20 * 30 // 100  # 300 + 6


def test_worst_case_rounds_up_at_the_dearest_prompt_price() -> None:
    """The reservation never rounds down, and covers a prompt written to the cache entirely."""
    assert worst_case_micro(CHEAP.cost, 1, 0) == 1
    assert worst_case_micro(GPT41.cost, 1000, 4096) == 2000 + 32768
    bound = worst_case_micro(SONNET.cost, 1000, 0)
    assert bound == 3750
    assert amount_micro(SONNET.cost, Usage(1000, 0, cache_write_tokens=1000)) <= bound


def test_completion_budget_counts_the_cached_prompt_at_its_prices() -> None:
    """With 10,000 µ$ reserved and a 2,000-token prompt read from the cache (600 µ$), the
    answer may be (10,000,000,000 - 600,000,000) // 15,000,000 = 626 tokens."""
    cached = PromptUsage(2000, cache_read_tokens=2000)
    assert completion_budget(SONNET.cost, 10_000, cached) == 626
    assert completion_budget(SONNET.cost, 10_000, PromptUsage(2000)) == 266


def test_usd_strings_round_trip() -> None:
    """usd() and usd_to_micro() are exact inverses on six decimals."""
    for micro in (0, 1, 999_999, 1_000_000, 12_345_678, -5):
        assert usd_to_micro(usd(micro).lstrip("-"), what="x") == abs(micro)
    assert usd(32) == "0.000032"
    assert usd(-1_500_000) == "-1.500000"


def test_catalog_costs_are_the_upstream_list_prices() -> None:
    """The built-in catalog's prices are what the upstreams charge, cache prices included."""
    models = load_settings(env={}).models
    assert models["gpt-4.1"].cost == Price(2_000_000, 8_000_000, 2_000_000, 500_000)
    assert models["claude-sonnet-4.5"].cost == Price(3_000_000, 15_000_000, 3_750_000, 300_000)
    assert models["gemini-2.5-flash"].cost == Price(300_000, 2_500_000, 300_000, 30_000)
    assert models["deepseek-v3.2"].cost == Price(280_000, 420_000, 280_000, 28_000)
    assert models["deepseek-v3.2"].upstream_model == "deepseek-chat"
    assert models["deepseek-v3.2"].provider == "deepseek"
    assert models["sim"].cost.free and models["local"].cost.free


def test_default_plan_is_the_resellers_flat_list() -> None:
    """The default plan charges one price per 1M tokens: GPT-4.1 $8.00, Claude Sonnet 4.5
    $15.00, Gemini 2.5 Flash $2.50, DeepSeek V3.2 $0.42; free models stay free."""
    settings = load_settings(env={})
    plan = PlanBook.from_settings(settings).plan(None)
    assert plan.name == "standard" == settings.accounting.default_plan
    for model, flat in [
        ("gpt-4.1", 8_000_000),
        ("claude-sonnet-4.5", 15_000_000),
        ("gemini-2.5-flash", 2_500_000),
        ("deepseek-v3.2", 420_000),
    ]:
        assert plan.price(settings.models[model]) == Price(flat, flat, flat, flat, flat=True)
    assert plan.price(settings.models["sim"]).free
    at_cost = PlanBook.from_settings(settings).plan("at-cost")
    assert at_cost.price(settings.models["gpt-4.1"]) == settings.models["gpt-4.1"].cost
    with pytest.raises(PlanUnavailable) as missing:
        PlanBook.from_settings(settings).plan("gold")
    assert missing.value.http_status == 503


def test_a_model_a_plan_leaves_out_is_charged_at_cost() -> None:
    """A model added by the operator and not in the plan is charged what it costs."""
    settings = load_settings(
        env={},
        overrides='[[models]]\nid = "mine"\nprovider = "sim"\ninput_usd_per_mtok = "1.00"\n'
        'output_usd_per_mtok = "2.00"\n',
    )
    plan = PlanBook.from_settings(settings).plan(None)
    assert plan.price(settings.models["mine"]) == Price(1_000_000, 2_000_000, 1_000_000, 1_000_000)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[plans.x.models.sim]\nusd_per_mtok = "1"\ninput_usd_per_mtok = "1"\n', "not both"),
        ('[plans.x.models.sim]\ninput_usd_per_mtok = "1"\n', "both input_usd_per_mtok"),
        ('[plans.x.models.nope]\nusd_per_mtok = "1"\n', "no model 'nope'"),
        ('[plans.x.models.sim]\nusd_per_mtok = "-1"\n', "must be >= 0"),
        ('[accounting]\ndefault_plan = "gold"\n', "accounting.default_plan"),
        ('[signup]\nplan = "gold"\n', "signup.plan"),
        ('[signup]\nmodels = ["nope"]\n', "signup.models"),
        ('[currencies]\nCNY = "zero"\n', "currencies.CNY"),
        ('[currencies]\nCNY = "0"\n', "above 0"),
        ('[currencies]\ncny = "1"\n', "three-letter"),
        ('[currencies]\nUSD = "2"\n', "USD is always 1"),
        ("[currencies]\nCNY = 0.14\n", "Expected `str`"),
    ],
)
def test_bad_price_settings_stop_start_up(toml: str, message: str) -> None:
    """A malformed plan, default plan, sign-up or currency setting is a ConfigError naming it."""
    with pytest.raises(ConfigError) as raised:
        load_settings(env={}, overrides=toml)
    assert message in str(raised.value)
