"""Settings: ports and numeric values are checked when the configuration is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenwire.config import ConfigError, load_settings


@pytest.mark.parametrize("value", ["abc", "8000x", "0", "-1", "65536", "99999", "80.5"])
def test_bad_port_from_the_environment(value: str, tmp_path: Path) -> None:
    """A TOKENWIRE_PORT that is not a port from 1 to 65535 is a ConfigError naming the variable."""
    with pytest.raises(ConfigError) as raised:
        load_settings(data_dir=tmp_path, env={"TOKENWIRE_PORT": value})
    assert "TOKENWIRE_PORT" in raised.value.message and repr(value) in raised.value.message


def test_port_from_the_environment(tmp_path: Path) -> None:
    """A valid TOKENWIRE_PORT replaces the configured port; 1 and 65535 are both valid."""
    for value in ("1", "8123", "65535"):
        settings = load_settings(data_dir=tmp_path, env={"TOKENWIRE_PORT": value})
        assert settings.server.port == int(value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ("[server]\nport = 0", "server.port"),
        ("[server]\nport = 99999", "server.port"),
        ("[server]\nport = -1", "server.port"),
        ("[server]\nkey_cache_ttl_s = -1", "server.key_cache_ttl_s"),
        ("[server]\nmax_body_bytes = -1", "server.max_body_bytes"),
        ("[server]\nmax_body_bytes = 0", "server.max_body_bytes"),
        ("[server]\nsse_heartbeat_s = 0", "server.sse_heartbeat_s"),
        ("[server]\nstream_grace_s = -0.5", "server.stream_grace_s"),
        ("[server]\nstream_max_events = -1", "server.stream_max_events"),
        ("[server]\nws_send_timeout_s = -30", "server.ws_send_timeout_s"),
        ("[server]\nws_max_concurrent_requests = 0", "server.ws_max_concurrent_requests"),
        ("[server]\nws_ping_interval_s = 0", "server.ws_ping_interval_s"),
        ("[server]\nheader_timeout_s = -1", "server.header_timeout_s"),
        ("[server]\nmax_connections = -1", "server.max_connections"),
        ("[limits]\nwindow_s = -60", "limits.window_s"),
        ("[limits]\nauth_failures_per_window = -1", "limits.auth_failures_per_window"),
        ("[accounting]\ndefault_max_tokens = -1", "accounting.default_max_tokens"),
        ("[accounting]\nwebhook_tolerance_s = -1", "accounting.webhook_tolerance_s"),
        ("[routing]\nmax_attempts = 0", "routing.max_attempts"),
        ("[routing]\nbackoff_base_s = -0.1", "routing.backoff_base_s"),
        ("[providers.sim]\nkind = 'sim'\nitl_ms = -5", "providers.sim.itl_ms"),
        (
            "[providers.up]\nkind = 'openai'\nbase_url = 'http://x'\nconnect_timeout_s = -1",
            "providers.up.connect_timeout_s",
        ),
        ("[providers.local]\nkind = 'local'\nmax_queue = -1", "providers.local.max_queue"),
    ],
)
def test_values_out_of_range_name_the_key(overrides: str, key: str, tmp_path: Path) -> None:
    """A port outside 1-65535, a negative number, or a zero where zero means nothing is refused at load, naming the key."""
    with pytest.raises(ConfigError) as raised:
        load_settings(data_dir=tmp_path, env={}, overrides=overrides)
    assert f"$.{key}`" in raised.value.message, raised.value.message


def test_zero_is_kept_where_it_means_something(tmp_path: Path) -> None:
    """Zero stays valid where it has a meaning: no key cache, no grace, instant simulated tokens."""
    settings = load_settings(
        data_dir=tmp_path,
        env={},
        overrides=(
            "[server]\nkey_cache_ttl_s = 0\ndisconnect_grace_s = 0\nstream_grace_s = 0\n"
            "[providers.sim]\nkind = 'sim'\nttft_ms = 0\nitl_ms = 0\n"
        ),
    )
    assert settings.server.key_cache_ttl_s == 0 and settings.providers["sim"].itl_ms == 0


def test_operations_settings_from_the_environment(tmp_path: Path) -> None:
    """TOKENWIRE_LOG_FORMAT, TOKENWIRE_METRICS_HOST and TOKENWIRE_METRICS_PORT set the
    [server] log_format, metrics_host and metrics_port; by default there is no listener."""
    default = load_settings(data_dir=tmp_path, env={}).server
    assert (default.log_format, default.metrics_host, default.metrics_port) == (
        "auto",
        "127.0.0.1",
        None,
    )
    env = {
        "TOKENWIRE_LOG_FORMAT": "text",
        "TOKENWIRE_METRICS_HOST": "0.0.0.0",
        "TOKENWIRE_METRICS_PORT": "9464",
    }
    server = load_settings(data_dir=tmp_path, env=env).server
    assert (server.log_format, server.metrics_host, server.metrics_port) == (
        "text",
        "0.0.0.0",
        9464,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TOKENWIRE_LOG_FORMAT": "yaml"}, "TOKENWIRE_LOG_FORMAT: 'yaml' is not one of"),
        ({"TOKENWIRE_METRICS_PORT": "65536"}, "TOKENWIRE_METRICS_PORT: '65536'"),
        ({"TOKENWIRE_METRICS_PORT": "8000"}, "the API's port too"),
    ],
)
def test_bad_operations_settings_name_what_is_wrong(
    env: dict[str, str], message: str, tmp_path: Path
) -> None:
    """A bad log format or metrics port is a ConfigError naming it."""
    with pytest.raises(ConfigError) as raised:
        load_settings(data_dir=tmp_path, env=env)
    assert message in raised.value.message
