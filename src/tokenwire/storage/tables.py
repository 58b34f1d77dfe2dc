"""Table definitions (SQLAlchemy Core). Schema changes go through a migration in ``migrations/``.

Money is integer micro-dollars (``*_micro``); times are Unix seconds (``created_at`` of keys
and credit events) or Unix milliseconds (the ledger's ``created_at``).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("is_admin", sa.Boolean, nullable=False, default=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("revoked_at", sa.BigInteger, nullable=True),
    sa.Column("allowed_models", sa.Text, nullable=True),  # JSON list; NULL: every model
    sa.Column("rpm", sa.Integer, nullable=True),  # NULL: unlimited
    sa.Column("tpm", sa.Integer, nullable=True),
    sa.Column("max_concurrent_streams", sa.Integer, nullable=True),
    sa.Column("balance_micro", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("plan", sa.String(64), nullable=True),  # NULL: accounting.default_plan
)

# Worst-case cost held at admission, released when the completion settles.
reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("completion_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("amount_micro", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # what the completion was, for the row written if its process dies before settling it
    sa.Column("model", sa.String(256), nullable=True),
    sa.Column("provider", sa.String(64), nullable=True),
    sa.Column("transport", sa.String(8), nullable=True),
    sa.Column("api", sa.String(16), nullable=True),
)

# One row per completion, written once (the primary key makes the write idempotent).
usage_ledger = sa.Table(
    "usage_ledger",
    metadata,
    sa.Column("completion_id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("provider", sa.String(64), nullable=False),
    sa.Column("transport", sa.String(8), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("usage_estimated", sa.Boolean, nullable=False),
    # parts of prompt_tokens: written to / read from the provider's prompt cache
    sa.Column("cache_write_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cache_read_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_micro", sa.BigInteger, nullable=False),  # what the operator pays upstream
    sa.Column("charge_micro", sa.BigInteger, nullable=False),  # what the key was charged
    sa.Column("plan", sa.String(64), nullable=True),  # the price list that charged it
    sa.Column("ttft_ms", sa.Integer, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("finish_reason", sa.String(32), nullable=True),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("api", sa.String(16), nullable=False, server_default="chat"),
    sa.Index("ix_usage_ledger_key_time", "key_id", "created_at"),
)

# Grants, top-ups and adjustments; payment_id makes webhook top-ups idempotent.
credit_events = sa.Table(
    "credit_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("amount_micro", sa.BigInteger, nullable=False),  # credited, in micro-dollars
    sa.Column("payment_id", sa.String(128), nullable=True, unique=True),
    sa.Column("note", sa.String(500), nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # what was paid: ISO 4217 currency, millionths of its unit, USD per unit (exact decimal)
    sa.Column("currency", sa.String(3), nullable=False, server_default="USD"),
    sa.Column("original_micro", sa.BigInteger, nullable=False),
    sa.Column("rate", sa.String(40), nullable=False, server_default="1"),
)

# Self-service sign-ups (POST /v1/signup), one row each. ``grant_email`` is the address's
# mailbox (``docs/accounting.md``) on the one sign-up that received the free grant, NULL on
# the others: its unique index is what makes the grant once per address.
signups = sa.Table(
    "signups",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("email", sa.String(254), nullable=False, index=True),
    sa.Column("grant_email", sa.String(254), nullable=True, unique=True),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("client_ip", sa.String(64), nullable=False),
    sa.Column("invite_code", sa.String(200), nullable=True),
    sa.Column("grant_micro", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

# Sign-ups per UTC day: overall (scope "day"), per client IP ("ip") and per address
# ("email"). One conditional UPDATE takes a place under the cap, atomically on both databases.
signup_counters = sa.Table(
    "signup_counters",
    metadata,
    sa.Column("scope", sa.String(8), primary_key=True),
    sa.Column("subject", sa.String(254), primary_key=True),
    sa.Column("day", sa.Integer, primary_key=True),  # days since 1970-01-01 (UTC)
    sa.Column("count", sa.Integer, nullable=False),
)

# Responses API objects kept for GET /v1/responses/{id} and previous_response_id (per key).
# ``response`` is the response object as JSON; ``conversation`` the chat messages through its
# output (instructions excluded), which a later response with this one as previous continues.
responses = sa.Table(
    "responses",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("key_id", sa.String(32), nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("model", sa.String(256), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("previous_response_id", sa.String(64), nullable=True),
    sa.Column("response", sa.Text, nullable=False),
    sa.Column("conversation", sa.Text, nullable=False),
)
