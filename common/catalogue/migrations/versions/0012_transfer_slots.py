"""The replicator's limits per endpoint across its instances (issue 19): transfer slots and the
shared circuit breaker.

``transfer_slots``: an endpoint's ``max_transfers`` slots, each free or held by the replicator
instance copying into the endpoint with it; ``transfer_waiters``: instances waiting for one (the
others then keep to their share). ``storage_endpoints.health_until`` / ``health_cooldown`` /
``prober``: the breaker's state every instance reads (when the cool-down ends, how long it is, who
makes the probe copy). An endpoint paused before this revision has no ``health_until``: the first
replicator to start resumes it, as before.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
MAX_HOLDER = 200
Ts = sa.DateTime(timezone=True)

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "transfer_slots",
        sa.Column("storage", sa.String(64), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(MAX_HOLDER), nullable=True),
        sa.Column("taken", Ts, nullable=True),
        sa.PrimaryKeyConstraint("storage", "slot", name="pk_transfer_slots"),
    )
    op.create_table(
        "transfer_waiters",
        sa.Column("storage", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("since", Ts, nullable=False),
        sa.PrimaryKeyConstraint("storage", "holder", name="pk_transfer_waiters"),
    )
    # Plain ALTER TABLE (SQLite has had ADD / DROP COLUMN since 3.35): a batch would copy the
    # table, which the replicas' foreign keys refuse to see dropped.
    op.add_column("storage_endpoints", sa.Column("health_until", Ts, nullable=True))
    op.add_column("storage_endpoints", sa.Column("health_cooldown", sa.Double(), nullable=True))
    op.add_column("storage_endpoints", sa.Column("prober", sa.String(MAX_HOLDER), nullable=True))


def downgrade() -> None:
    for column in ("prober", "health_cooldown", "health_until"):
        op.drop_column("storage_endpoints", column)
    op.drop_table("transfer_waiters")
    op.drop_table("transfer_slots")
