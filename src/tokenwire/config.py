"""Settings: the built-in ``default_config.toml``, a user TOML file laid over it, then env vars.

Environment variables (all optional):

``TOKENWIRE_CONFIG``        path of a TOML file laid over the defaults
``TOKENWIRE_DATA_DIR``      where the SQLite database and the server secret live
``TOKENWIRE_DATABASE_URL``  a SQLAlchemy URL (e.g. ``postgresql+asyncpg://…``) instead of SQLite
``TOKENWIRE_HOST``, ``TOKENWIRE_PORT``  where ``tokenwire serve`` listens
``TOKENWIRE_WORKERS``       processes ``tokenwire serve`` runs: N or ``auto`` (``server.workers``)
``TOKENWIRE_REDIS_URL``     share rate limits, resumable streams and WebSocket tickets through
                           Redis (sets ``limits.backend`` and ``server.stream_backend`` to
                           ``"redis"``)
``TOKENWIRE_LOG_FORMAT``    ``json``, ``text`` or ``auto`` (``server.log_format``)
``TOKENWIRE_METRICS_HOST``, ``TOKENWIRE_METRICS_PORT``  the metrics listener
                           (``server.metrics_host``, ``server.metrics_port``)
``TOKENWIRE_DRAIN_TIMEOUT`` seconds running streams may finish after SIGTERM
                           (``server.drain_timeout_s``)

Provider API keys are never in the file: a provider names the variable that holds its key
(``api_key_env``), read when the app starts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from tokenwire.errors import GatewayError
from tokenwire.wire.schema import MAX_OUTPUT_TOKENS

ProviderKind = Literal["sim", "local", "openai", "anthropic", "gemini"]


class ConfigError(GatewayError):
    """The configuration is invalid (raised at start-up, never for a request)."""


DEFAULT_MAX_OUTPUT_TOKENS = 32_768
DEFAULT_CONTEXT_TOKENS = 131_072

# Ranges, checked as a file is read (a value outside names its key, e.g. `$.server.port`):
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=0)]  # 0 has a meaning (keep none, queue none)
Capacity = Annotated[int, msgspec.Meta(ge=1)]  # sizes, limits and tries: 0 would refuse all
Delay = Annotated[float, msgspec.Meta(ge=0)]  # delays, graces and TTLs: 0 means none
Interval = Annotated[float, msgspec.Meta(gt=0)]  # timeouts, periods and rates: 0 means nothing
PORT_RANGE = "1-65535"


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    workers: Capacity | Literal["auto"] = 1  # processes on the port (tokenwire.workers)
    max_body_bytes: Capacity = 1_048_576
    sse_heartbeat_s: Interval = 15.0
    disconnect_grace_s: Delay = 0.0
    key_cache_ttl_s: Delay = 5.0
    stream_grace_s: Delay = 30.0  # resumable streams keep generating this long without a reader
    stream_retention_s: Delay = 300.0  # and stay replayable this long after they end
    stream_max_finished: Count = 10_000
    stream_max_events: Count = 2_000_000
    stream_max_events_per_stream: Count = 100_000
    stream_backend: Literal["memory", "redis"] = "memory"  # redis: [limits] redis_url, prefix
    ws_max_message_bytes: Capacity = 1_048_576
    ws_max_concurrent_requests: Capacity = 32
    ws_done_grace_ms: Delay = 50.0
    ws_auth_timeout_s: Interval = 10.0
    ws_idle_timeout_s: Interval = 300.0
    ws_send_timeout_s: Interval = 30.0
    ws_ping_interval_s: Interval = 20.0
    ws_per_message_deflate: bool = False
    ws_messages_per_second: Interval = 100.0
    ws_allowed_origins: list[str] = msgspec.field(default_factory=list)
    ws_ticket_ttl_s: Interval = 60.0
    # Hostile clients and networks (docs/configuration.md)
    trusted_proxies: list[str] = msgspec.field(default_factory=list)  # IPs / CIDRs, or "*"
    header_timeout_s: Interval = 10.0  # to complete a request's headers, else the socket closes
    sse_send_timeout_s: Interval = 30.0  # an HTTP client that accepts nothing this long: aborted
    max_connections: Count = 0  # open connections; 0: below the file descriptor limit
    health_max_loop_lag_s: Interval = 5.0  # /healthz: the event loop is stuck past this lag
    health_stall_s: Interval = 600.0  # /healthz: live generations, none moved for this long
    health_timeout_s: Interval = 2.0  # /healthz: each database / Redis probe
    # Operations (docs/operations.md)
    log_format: Literal["auto", "json", "text"] = "auto"  # auto: text on a terminal, else JSON
    metrics_host: str = "127.0.0.1"
    metrics_port: Port | None = None  # a listener serving GET /metrics without a key
    drain_timeout_s: Delay = 30.0  # SIGTERM: running streams may finish this long


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tokenwire:"
    window_s: Interval = 60.0
    auth_failures_per_window: Capacity = 30


class AccountingConfig(msgspec.Struct, forbid_unknown_fields=True):
    free_grant_usd: str | float = "0"
    default_max_tokens: Capacity = 4096  # reserved for requests without max_tokens
    webhook_tolerance_s: Interval = 300.0
    default_plan: str = "standard"  # the price list of keys without a plan of their own


class SignupConfig(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/signup``: self-service keys (docs/accounting.md#self-service-sign-up)."""

    enabled: bool = False
    grant_usd: str | float = "0"  # credit of a new address's key (a repeated address: none)
    invite_codes: list[str] = msgspec.field(default_factory=list)  # non-empty: one is needed
    max_per_day: Capacity = 100  # sign-ups per UTC day, every address together
    max_per_ip_per_day: Capacity = 3  # per client IP address and UTC day
    max_per_email_per_day: Capacity = 3  # per email address and UTC day
    plan: str = ""  # the keys' plan; "": none of their own (accounting.default_plan)
    models: list[str] | None = None  # the models the keys may use; left out: every model
    rpm: Capacity | None = None  # the keys' limits; left out: unlimited
    tpm: Capacity | None = None
    max_concurrent_streams: Capacity | None = None


class PlanPriceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """One model's price in a plan: ``usd_per_mtok`` (flat), or input and output prices."""

    usd_per_mtok: str | float | None = None
    input_usd_per_mtok: str | float | None = None
    output_usd_per_mtok: str | float | None = None
    cache_write_usd_per_mtok: str | float | None = None
    cache_read_usd_per_mtok: str | float | None = None


class PlanConfig(msgspec.Struct, forbid_unknown_fields=True):
    """A price list: what keys on it are charged per model (models it leaves out: at cost)."""

    description: str = ""
    models: dict[str, PlanPriceConfig] = msgspec.field(default_factory=dict)


class ProviderConfig(msgspec.Struct, forbid_unknown_fields=True):
    kind: ProviderKind
    base_url: str | None = None
    api_key_env: str | None = None
    ttft_ms: Delay = 50.0
    itl_ms: Delay = 20.0
    model_path: str | None = None
    max_queue: Count = 8
    n_ctx: Count = 2048  # 0: the model's own context size
    n_threads: Capacity | None = None
    connect_timeout_s: Interval = 10.0
    first_token_timeout_s: Interval = 120.0
    idle_timeout_s: Interval = 60.0
    max_connections: Capacity = 2048
    # An idle pooled connection is dropped after this; keep it below the upstream's own idle
    # timeout (uvicorn: 5 s), since a request sent on a connection the upstream is closing
    # cannot be retried safely (it may have reached the upstream).
    keepalive_timeout_s: Delay = 4.0
    # OpenAI-compatible only: the field that carries the admitted token limit when a request
    # has none (OpenAI's reasoning models accept only max_completion_tokens)
    output_limit_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"


class DeploymentConfig(msgspec.Struct, forbid_unknown_fields=True):
    provider: str
    upstream_model: str | None = None
    weight: Capacity = 1


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    provider: str | None = None
    upstream_model: str | None = None
    deployments: list[DeploymentConfig] = msgspec.field(default_factory=list)
    # What the operator pays the upstream; a cache price left out is the input price.
    input_usd_per_mtok: str | float = "0"
    output_usd_per_mtok: str | float = "0"
    cache_write_usd_per_mtok: str | float | None = None
    cache_read_usd_per_mtok: str | float | None = None
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS  # a larger max_tokens is a 400
    context_tokens: int = DEFAULT_CONTEXT_TOKENS  # the largest prompt the model accepts


class RoutingConfig(msgspec.Struct, forbid_unknown_fields=True):
    max_attempts: Capacity = 3  # tries before the first token, across deployments
    backoff_base_s: Delay = 0.1
    backoff_max_s: Delay = 2.0
    max_retry_after_s: Delay = 5.0  # honour an upstream Retry-After up to this long
    breaker_threshold: Capacity = 3  # consecutive failures that cool a deployment down
    breaker_cooldown_s: Delay = 30.0


class FileConfig(msgspec.Struct, forbid_unknown_fields=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    accounting: AccountingConfig = msgspec.field(default_factory=AccountingConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    providers: dict[str, ProviderConfig] = msgspec.field(default_factory=dict)
    models: list[ModelConfig] = msgspec.field(default_factory=list)
    plans: dict[str, PlanConfig] = msgspec.field(default_factory=dict)
    signup: SignupConfig = msgspec.field(default_factory=SignupConfig)
    currencies: dict[str, str] = msgspec.field(default_factory=dict)  # code: USD per unit
    database_url: str | None = None
    data_dir: str | None = None


def deployment_name(provider: str, upstream_model: str) -> str:
    """A deployment's name in metrics and logs: ``provider/upstream_model``."""
    return f"{provider}/{upstream_model}"


class DeploymentEntry(msgspec.Struct, frozen=True):
    """One place a model can be served: a provider, its name for the model, a weight."""

    provider: str
    upstream_model: str
    weight: int = 1

    @property
    def name(self) -> str:
        return deployment_name(self.provider, self.upstream_model)


class Price(msgspec.Struct, frozen=True):
    """What 1M tokens of each kind cost, in integer micro-dollars.

    ``input`` is the price of prompt tokens not read from or written to a prompt cache;
    ``cache_write`` and ``cache_read`` of those that were. ``flat``: one price for every
    kind of token (the four figures are equal), as a reseller's list has it.
    """

    input: int
    output: int
    cache_write: int
    cache_read: int
    flat: bool = False

    @property
    def free(self) -> bool:
        """Nothing to pay, whatever the usage."""
        return not (self.input or self.output or self.cache_write or self.cache_read)


class ModelEntry(msgspec.Struct, frozen=True):
    """A catalog entry, with what it costs the operator in micro-dollars per 1M tokens.

    ``provider`` and ``upstream_model`` are the first deployment's. ``max_output_tokens``
    bounds a request's ``max_tokens`` (and what is reserved for it); ``context_tokens`` is
    the largest prompt the model takes, which bounds what a prompt can cost. The prices are
    the upstream's (:attr:`cost`); what a key is charged comes from its plan.
    """

    id: str
    provider: str
    upstream_model: str
    input_micro_per_mtok: int
    output_micro_per_mtok: int
    deployments: tuple[DeploymentEntry, ...] = ()
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    cache_write_micro_per_mtok: int | None = None  # None: the input price
    cache_read_micro_per_mtok: int | None = None

    def all_deployments(self) -> tuple[DeploymentEntry, ...]:
        """The deployments, or the single one implied by provider and upstream_model."""
        return self.deployments or (DeploymentEntry(self.provider, self.upstream_model),)

    @property
    def cost(self) -> Price:
        """What the operator pays the upstream per 1M tokens of each kind."""
        read, write = self.cache_read_micro_per_mtok, self.cache_write_micro_per_mtok
        return Price(
            input=self.input_micro_per_mtok,
            output=self.output_micro_per_mtok,
            cache_write=self.input_micro_per_mtok if write is None else write,
            cache_read=self.input_micro_per_mtok if read is None else read,
        )


class Plan(msgspec.Struct, frozen=True):
    """A price list: what a key on it is charged per model; a model it leaves out is charged
    what it costs (``ModelEntry.cost``)."""

    name: str
    description: str = ""
    prices: dict[str, Price] = msgspec.field(default_factory=dict)

    def price(self, entry: ModelEntry) -> Price:
        """What 1M tokens of ``entry`` are charged on this plan."""
        return self.prices.get(entry.id) or entry.cost


class Settings(msgspec.Struct, frozen=True):
    """Everything ``create_app`` needs; build with :func:`load_settings`."""

    data_dir: Path
    database_url: str
    server: ServerConfig
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelEntry]
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    accounting: AccountingConfig = msgspec.field(default_factory=AccountingConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    plans: dict[str, Plan] = msgspec.field(default_factory=dict)
    signup: SignupConfig = msgspec.field(default_factory=SignupConfig)
    currencies: dict[str, Decimal] = msgspec.field(default_factory=dict)  # USD per unit


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/tokenwire`` (``~/.local/share/tokenwire``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tokenwire"


def usd_to_micro(value: str | float, *, what: str) -> int:
    """Exact USD → integer micro-dollars (strings are parsed as decimals, never floats)."""
    try:
        amount = Decimal(str(value)) * 1_000_000
    except InvalidOperation:
        raise ConfigError(f"{what}: {value!r} is not a price in USD") from None
    if amount < 0 or amount != amount.to_integral_value():
        raise ConfigError(f"{what}: {value!r} must be >= 0 with at most 6 decimals")
    return int(amount)


def parse_port(text: str, what: str = "TOKENWIRE_PORT") -> int:
    """A TCP port from 1 to 65535 given as text, or ``ConfigError`` naming ``what``."""
    try:
        port = int(text, 10)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: {text!r} is not a port number ({PORT_RANGE})")
    return port


def parse_workers(text: str, what: str = "TOKENWIRE_WORKERS") -> int | Literal["auto"]:
    """A worker count given as text: a positive integer or ``auto``; else ``ConfigError``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text, 10)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{what}: {text!r} is not a positive number of workers or 'auto'")
    return value


def parse_seconds(text: str, what: str = "TOKENWIRE_DRAIN_TIMEOUT") -> float:
    """A duration of 0 or more seconds given as text, or ``ConfigError`` naming ``what``."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{what}: {text!r} is not a number of seconds (0 or more)")
    return seconds


LOG_FORMATS = ("auto", "json", "text")


def _operations_env(server: ServerConfig, environ: Mapping[str, str]) -> ServerConfig:
    """``TOKENWIRE_LOG_FORMAT``, ``TOKENWIRE_METRICS_HOST``, ``TOKENWIRE_METRICS_PORT`` and
    ``TOKENWIRE_DRAIN_TIMEOUT``."""
    if environ.get("TOKENWIRE_DRAIN_TIMEOUT"):
        seconds = parse_seconds(environ["TOKENWIRE_DRAIN_TIMEOUT"])
        server = msgspec.structs.replace(server, drain_timeout_s=seconds)
    log_format = environ.get("TOKENWIRE_LOG_FORMAT")
    if log_format:
        if log_format not in LOG_FORMATS:
            raise ConfigError(
                f"TOKENWIRE_LOG_FORMAT: {log_format!r} is not one of {', '.join(LOG_FORMATS)}"
            )
        server = msgspec.structs.replace(server, log_format=log_format)
    if environ.get("TOKENWIRE_METRICS_HOST"):
        server = msgspec.structs.replace(server, metrics_host=environ["TOKENWIRE_METRICS_HOST"])
    if environ.get("TOKENWIRE_METRICS_PORT"):
        port = parse_port(environ["TOKENWIRE_METRICS_PORT"], "TOKENWIRE_METRICS_PORT")
        server = msgspec.structs.replace(server, metrics_port=port)
    return server


def check_server(server: ServerConfig) -> None:
    """What no single field can say: the metrics listener needs a port of its own."""
    if server.metrics_port is not None and server.metrics_port == server.port:
        raise ConfigError(
            f"server.metrics_port: {server.metrics_port} is the API's port too; the metrics "
            "listener needs a port of its own"
        )


def _read_toml(text: str, source: str) -> FileConfig:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    try:
        return msgspec.convert(raw, FileConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_name_provider(str(exc), raw)}") from None


def _name_provider(message: str, raw: dict[str, Any]) -> str:
    """msgspec writes a provider's name as ``[...]``; find the provider and name it."""
    providers = raw.get("providers")
    if "$.providers[...]" not in message or not isinstance(providers, dict):
        return message
    for name, table in providers.items():
        try:
            msgspec.convert(table, ProviderConfig)
        except msgspec.ValidationError as exc:
            where = f"$.providers.{name}"
            text = str(exc)
            return text.replace("`$", f"`{where}") if "`$" in text else f"{text} - at `{where}`"
    return message


def _overlay(base: Any, over: Any, keys: dict[str, Any]) -> Any:
    """``base`` with the fields named in ``keys`` taken from ``over``."""
    return msgspec.structs.replace(base, **{k: getattr(over, k) for k in keys})


def _merge(base: FileConfig, over: FileConfig, over_raw: dict[str, Any]) -> FileConfig:
    server = _overlay(base.server, over.server, over_raw.get("server", {}))
    limits = _overlay(base.limits, over.limits, over_raw.get("limits", {}))
    accounting = _overlay(base.accounting, over.accounting, over_raw.get("accounting", {}))
    routing = _overlay(base.routing, over.routing, over_raw.get("routing", {}))
    signup = _overlay(base.signup, over.signup, over_raw.get("signup", {}))
    providers = {**base.providers, **over.providers}
    models = {m.id: m for m in base.models}
    models.update({m.id: m for m in over.models})
    return FileConfig(
        server=server,
        limits=limits,
        accounting=accounting,
        routing=routing,
        providers=providers,
        models=list(models.values()),
        plans={**base.plans, **over.plans},
        signup=signup,
        currencies={**base.currencies, **over.currencies},
        database_url=over.database_url or base.database_url,
        data_dir=over.data_dir or base.data_dir,
    )


def load_settings(
    config_file: Path | None = None,
    *,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: str | None = None,
) -> Settings:
    """Build settings: defaults, then ``config_file`` (or ``$TOKENWIRE_CONFIG``), then env.

    ``overrides`` is extra TOML laid on top of everything (tests use it).
    """
    environ = os.environ if env is None else env
    default_text = resources.files("tokenwire").joinpath("default_config.toml").read_text()
    merged = _read_toml(default_text, "default_config.toml")
    path = config_file or (
        Path(environ["TOKENWIRE_CONFIG"]) if environ.get("TOKENWIRE_CONFIG") else None
    )
    layers: list[tuple[str, str]] = []
    if path is not None:
        try:
            layers.append((path.read_text(), str(path)))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    if overrides:
        layers.append((overrides, "overrides"))
    for text, source in layers:
        merged = _merge(merged, _read_toml(text, source), tomllib.loads(text))

    server = merged.server
    if environ.get("TOKENWIRE_HOST"):
        server = msgspec.structs.replace(server, host=environ["TOKENWIRE_HOST"])
    if environ.get("TOKENWIRE_PORT"):
        server = msgspec.structs.replace(server, port=parse_port(environ["TOKENWIRE_PORT"]))
    if environ.get("TOKENWIRE_WORKERS"):
        server = msgspec.structs.replace(
            server, workers=parse_workers(environ["TOKENWIRE_WORKERS"])
        )
    server = _operations_env(server, environ)
    limits = merged.limits
    if environ.get("TOKENWIRE_REDIS_URL"):
        limits = msgspec.structs.replace(
            limits, backend="redis", redis_url=environ["TOKENWIRE_REDIS_URL"]
        )
        server = msgspec.structs.replace(server, stream_backend="redis")

    resolved_dir = (
        data_dir
        or (Path(environ["TOKENWIRE_DATA_DIR"]) if environ.get("TOKENWIRE_DATA_DIR") else None)
        or (Path(merged.data_dir) if merged.data_dir else None)
        or default_data_dir()
    )
    database_url = (
        environ.get("TOKENWIRE_DATABASE_URL")
        or merged.database_url
        or f"sqlite+aiosqlite:///{resolved_dir / 'tokenwire.db'}"
    )
    models: dict[str, ModelEntry] = {}
    for model in merged.models:
        deployments = tuple(
            DeploymentEntry(
                d.provider, d.upstream_model or model.upstream_model or model.id, d.weight
            )
            for d in model.deployments
        )
        if model.provider is not None and not deployments:
            deployments = (DeploymentEntry(model.provider, model.upstream_model or model.id),)
        if not deployments:
            raise ConfigError(f"model {model.id!r} needs a provider or deployments")
        for deployment in deployments:
            if deployment.provider not in merged.providers:
                raise ConfigError(
                    f"model {model.id!r} names unknown provider {deployment.provider!r}"
                )
        if not 1 <= model.max_output_tokens <= MAX_OUTPUT_TOKENS:
            raise ConfigError(
                f"model {model.id!r}: max_output_tokens must be 1 to {MAX_OUTPUT_TOKENS}"
            )
        if model.context_tokens < 1:
            raise ConfigError(f"model {model.id!r}: context_tokens must be >= 1")
        models[model.id] = ModelEntry(
            id=model.id,
            max_output_tokens=model.max_output_tokens,
            context_tokens=model.context_tokens,
            provider=deployments[0].provider,
            upstream_model=deployments[0].upstream_model,
            deployments=deployments if len(deployments) > 1 else (),
            input_micro_per_mtok=usd_to_micro(model.input_usd_per_mtok, what=f"{model.id} input"),
            output_micro_per_mtok=usd_to_micro(
                model.output_usd_per_mtok, what=f"{model.id} output"
            ),
            cache_write_micro_per_mtok=_optional_usd(
                model.cache_write_usd_per_mtok, f"{model.id} cache_write"
            ),
            cache_read_micro_per_mtok=_optional_usd(
                model.cache_read_usd_per_mtok, f"{model.id} cache_read"
            ),
        )
    usd_to_micro(merged.accounting.free_grant_usd, what="accounting.free_grant_usd")
    plans = {name: _plan(name, plan, models) for name, plan in merged.plans.items()}
    _check_signup(merged.signup, merged.accounting, plans, models)
    for proxy in server.trusted_proxies:
        if proxy != "*":
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ConfigError(
                    f"server.trusted_proxies: {proxy!r} is not an IP address or network"
                ) from None
    check_server(server)
    return Settings(
        data_dir=resolved_dir,
        database_url=database_url,
        server=server,
        providers=merged.providers,
        models=models,
        limits=limits,
        accounting=merged.accounting,
        routing=merged.routing,
        plans=plans,
        signup=merged.signup,
        currencies=_currencies(merged.currencies),
    )


# -- plans, sign-up and currencies -----------------------------------------------------------

PLAN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CURRENCY_CODE = re.compile(r"[A-Z]{3}")
MAX_RATE = Decimal(1_000_000)  # USD per unit of a currency, at most
MAX_RATE_DECIMALS = 18


def _optional_usd(value: str | float | None, what: str) -> int | None:
    return None if value is None else usd_to_micro(value, what=what)


def _plan_price(where: str, config: PlanPriceConfig) -> Price:
    flat = _optional_usd(config.usd_per_mtok, f"{where}.usd_per_mtok")
    given_input = _optional_usd(config.input_usd_per_mtok, f"{where}.input_usd_per_mtok")
    given_output = _optional_usd(config.output_usd_per_mtok, f"{where}.output_usd_per_mtok")
    if flat is not None:
        if given_input is not None or given_output is not None:
            raise ConfigError(
                f"{where}: give usd_per_mtok (one flat price) or input_usd_per_mtok and "
                "output_usd_per_mtok, not both"
            )
        given_input = given_output = flat
    elif given_input is None or given_output is None:
        raise ConfigError(
            f"{where}: needs usd_per_mtok (one flat price) or both input_usd_per_mtok and "
            "output_usd_per_mtok"
        )
    write = _optional_usd(config.cache_write_usd_per_mtok, f"{where}.cache_write_usd_per_mtok")
    read = _optional_usd(config.cache_read_usd_per_mtok, f"{where}.cache_read_usd_per_mtok")
    return Price(
        input=given_input,
        output=given_output,
        cache_write=given_input if write is None else write,
        cache_read=given_input if read is None else read,
        flat=flat is not None and write is None and read is None,
    )


def _plan(name: str, config: PlanConfig, models: dict[str, ModelEntry]) -> Plan:
    if PLAN_NAME.fullmatch(name) is None:
        raise ConfigError(
            f"plans.{name}: a plan name is 1-64 letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    prices: dict[str, Price] = {}
    for model_id, price in config.models.items():
        where = f"plans.{name}.models.{model_id}"
        if model_id not in models:
            raise ConfigError(f"{where}: no model {model_id!r} in the catalog")
        prices[model_id] = _plan_price(where, price)
    return Plan(name, config.description, prices)


def _check_signup(
    signup: SignupConfig,
    accounting: AccountingConfig,
    plans: dict[str, Plan],
    models: dict[str, ModelEntry],
) -> None:
    if accounting.default_plan not in plans:
        raise ConfigError(
            f"accounting.default_plan: no plan {accounting.default_plan!r} "
            f"(the plans are: {', '.join(plans) or 'none'})"
        )
    usd_to_micro(signup.grant_usd, what="signup.grant_usd")
    if signup.plan and signup.plan not in plans:
        raise ConfigError(f"signup.plan: no plan {signup.plan!r}")
    unknown = [m for m in signup.models or () if m not in models]
    if unknown or signup.models == []:
        raise ConfigError(f"signup.models: not catalog models: {unknown or '[]'}")
    if any(not code.strip() or len(code) > 200 for code in signup.invite_codes):
        raise ConfigError("signup.invite_codes: each code is 1-200 characters, not blank")


def _currencies(rates: dict[str, str]) -> dict[str, Decimal]:
    """``[currencies]``: ISO 4217 codes to the USD one unit is credited as, exactly."""
    out: dict[str, Decimal] = {"USD": Decimal(1)}
    for code, text in rates.items():
        where = f"currencies.{code}"
        if CURRENCY_CODE.fullmatch(code) is None:
            raise ConfigError(f"{where}: a currency is a three-letter ISO 4217 code, like CNY")
        try:
            rate = Decimal(text.strip())
        except InvalidOperation:
            raise ConfigError(f"{where}: {text!r} is not a decimal number") from None
        if not rate.is_finite() or not 0 < rate <= MAX_RATE:
            raise ConfigError(f"{where}: the rate (USD per unit) must be above 0 and at most 1e6")
        if -int(rate.as_tuple().exponent) > MAX_RATE_DECIMALS:
            raise ConfigError(f"{where}: a rate has at most {MAX_RATE_DECIMALS} decimals")
        if code == "USD" and rate != 1:
            raise ConfigError(f"{where}: USD is always 1")
        out[code] = rate
    return out
