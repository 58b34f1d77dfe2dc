"""Stored responses (the Responses API) and the API each ledger row was served through.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("usage_ledger") as batch:
        batch.add_column(sa.Column("api", sa.String(16), nullable=False, server_default="chat"))
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("api", sa.String(16), nullable=True))
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), nullable=False, index=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_response_id", sa.String(64), nullable=True),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("conversation", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("responses")
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("api")
    with op.batch_alter_table("usage_ledger") as batch:
        batch.drop_column("api")
