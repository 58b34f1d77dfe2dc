"""Cost and charge, plans, cache tokens, payments in other currencies, sign-ups.

Revision ID: 0004
Revises: 0003

Until now a ledger row had one amount, ``cost_micro``, which was what the key was charged
(the catalog had one price, the upstream's list price). From here a row keeps both: what the
completion cost the operator (``cost_micro``) and what the key was charged (``charge_micro``).
Existing rows get ``charge_micro = cost_micro``: the balance paid exactly that, and it was
computed from the only prices there were, so their margin is 0. Nothing is lost: the
downgrade writes the charge back into ``cost_micro``, the column's old meaning.

Credit events record what was paid (``currency``, ``original_micro`` in millionths of one
unit of it) and the ``rate`` it was credited at; existing ones were all US dollars at 1.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("plan", sa.String(64), nullable=True))
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(
            sa.Column("cache_write_tokens", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("cache_read_tokens", sa.Integer, nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("charge_micro", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("plan", sa.String(64), nullable=True))
    op.execute("UPDATE usage_ledger SET charge_micro = cost_micro")
    with op.batch_alter_table("credit_events") as batch:
        batch.add_column(sa.Column("currency", sa.String(3), nullable=False, server_default="USD"))
        batch.add_column(
            sa.Column("original_micro", sa.BigInteger, nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("rate", sa.String(40), nullable=False, server_default="1"))
    op.execute("UPDATE credit_events SET original_micro = amount_micro")
    op.create_table(
        "signups",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("email", sa.String(254), nullable=False, index=True),
        sa.Column("grant_email", sa.String(254), nullable=True, unique=True),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=False),
        sa.Column("invite_code", sa.String(200), nullable=True),
        sa.Column("grant_micro", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "signup_counters",
        sa.Column("scope", sa.String(8), primary_key=True),
        sa.Column("subject", sa.String(254), primary_key=True),
        sa.Column("day", sa.Integer, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("signup_counters")
    op.drop_table("signups")
    with op.batch_alter_table("credit_events") as batch:
        for column in ("rate", "original_micro", "currency"):
            batch.drop_column(column)
    op.execute("UPDATE usage_ledger SET cost_micro = charge_micro")
    with op.batch_alter_table("usage_ledger") as batch:
        for column in ("plan", "charge_micro", "cache_read_tokens", "cache_write_tokens"):
            batch.drop_column(column)
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("plan")
