"""Accounting: key limits and balances, reservations, the usage ledger, credit events.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("allowed_models", sa.Text, nullable=True))
        batch.add_column(sa.Column("rpm", sa.Integer, nullable=True))
        batch.add_column(sa.Column("tpm", sa.Integer, nullable=True))
        batch.add_column(sa.Column("max_concurrent_streams", sa.Integer, nullable=True))
        batch.add_column(
            sa.Column("balance_micro", sa.BigInteger, nullable=False, server_default="0")
        )
    op.create_table(
        "reservations",
        sa.Column("completion_id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False, index=True),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_ledger",
        sa.Column("completion_id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("transport", sa.String(8), nullable=False),
        sa.Column("prompt_tokens", sa.Integer, nullable=False),
        sa.Column("completion_tokens", sa.Integer, nullable=False),
        sa.Column("usage_estimated", sa.Boolean, nullable=False),
        sa.Column("cost_micro", sa.BigInteger, nullable=False),
        sa.Column("ttft_ms", sa.Integer, nullable=True),
        sa.Column("duration_ms", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(32), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_usage_ledger_key_time", "usage_ledger", ["key_id", "created_at"])
    op.create_table(
        "credit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("key_id", sa.String(32), nullable=False, index=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_micro", sa.BigInteger, nullable=False),
        sa.Column("payment_id", sa.String(128), nullable=True, unique=True),
        sa.Column("note", sa.String(500), nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("credit_events")
    op.drop_index("ix_usage_ledger_key_time", "usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_table("reservations")
    with op.batch_alter_table("api_keys") as batch:
        for column in ("balance_micro", "max_concurrent_streams", "tpm", "rpm", "allowed_models"):
            batch.drop_column(column)
