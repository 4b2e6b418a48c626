"""Outbox rows claimed by the relay publishing them (issue 19): with several instances of a daemon
every process runs a relay over the one outbox, and each published every unsent row.

``outbox.claimed_by`` / ``claimed_until``: a relay claims the rows it is about to publish for a
while (``common.catalogue.outbox.claim_unsent``); the others take the next ones, and a claim
whose relay died runs out.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
MAX_HOLDER = 200
Ts = sa.DateTime(timezone=True)

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(MAX_HOLDER), nullable=True))
        batch.add_column(sa.Column("claimed_until", Ts, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("claimed_until")
        batch.drop_column("claimed_by")
