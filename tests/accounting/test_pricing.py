"""Costs in integer micro-dollars: exact, rounded once per completion."""

from __future__ import annotations

from tokenwire.accounting.pricing import cost_micro, is_free, usd, worst_case_micro
from tokenwire.config import ModelEntry, load_settings, usd_to_micro

GPT41 = ModelEntry("gpt-4.1", "openai", "gpt-4.1", 2_000_000, 8_000_000)


def test_cost_is_tokens_times_price_per_million() -> None:
    """1,000 prompt and 500 completion tokens of gpt-4.1 cost $0.002 + $0.004 = 6,000 µ$."""
    assert cost_micro(GPT41, 1000, 500) == 6000
    assert cost_micro(GPT41, 0, 0) == 0


def test_cost_rounds_half_up_once() -> None:
    """A fraction of a micro-dollar is rounded half up on the total, not per token."""
    cheap = ModelEntry("d", "deepseek", "d", 280_000, 420_000)  # $0.28 / $0.42
    # 3 * 0.28 + 1 * 0.42 = 1.26 µ$ -> 1; 5 * 0.28 + 0 = 1.4 -> 1; 2 * 0.28 + 2 * 0.42 = 1.4 -> 1
    assert cost_micro(cheap, 3, 1) == 1
    # 1 * 0.28 + 1 * 0.42 = 0.70 -> 1 (half up), 1 * 0.28 = 0.28 -> 0
    assert cost_micro(cheap, 1, 1) == 1
    assert cost_micro(cheap, 1, 0) == 0


def test_worst_case_rounds_up_and_free_models() -> None:
    """The reservation never rounds down; sim and local are free."""
    cheap = ModelEntry("d", "deepseek", "d", 280_000, 420_000)
    assert worst_case_micro(cheap, 1, 0) == 1
    assert worst_case_micro(GPT41, 1000, 4096) == 2000 + 32768
    catalog = load_settings(env={}).models
    assert is_free(catalog["sim"]) and is_free(catalog["local"])
    assert not is_free(catalog["gpt-4.1"])


def test_usd_strings_round_trip() -> None:
    """usd() and usd_to_micro() are exact inverses on six decimals."""
    for micro in (0, 1, 999_999, 1_000_000, 12_345_678, -5):
        assert usd_to_micro(usd(micro).lstrip("-"), what="x") == abs(micro)
    assert usd(32) == "0.000032"
    assert usd(-1_500_000) == "-1.500000"


def test_launch_catalog_prices() -> None:
    """The built-in catalog carries the launch table's output prices per 1M tokens."""
    models = load_settings(env={}).models
    assert models["gpt-4.1"].output_micro_per_mtok == 8_000_000
    assert models["claude-sonnet-4.5"].output_micro_per_mtok == 15_000_000
    assert models["gemini-2.5-flash"].output_micro_per_mtok == 2_500_000
    assert models["deepseek-v3.2"].output_micro_per_mtok == 420_000
