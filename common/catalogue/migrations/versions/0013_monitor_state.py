"""The monitor's saved state (issue 19): counts and failure groups survive a monitor restart.

``monitor_state``: one JSON document per name (``monitor``), written every few seconds by the
active monitor (the holder of the ``monitor`` role lease) and read by whichever instance becomes
active next (``common.catalogue.monitor_state``).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
MAX_HOLDER = 200
Json = sa.JSON().with_variant(JSONB(), "postgresql")
Ts = sa.DateTime(timezone=True)

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "monitor_state",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("doc", Json, nullable=False),
        sa.Column("saved_by", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("saved_at", Ts, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_monitor_state"),
    )


def downgrade() -> None:
    op.drop_table("monitor_state")
