"""Datasets' lifecycle (issue 20, parts 1 and 8): open -> closed -> complete -> archived, and
deletion (deleting -> deleted, the rows kept as tombstones).

``datasets``: when each state was reached (``closed_at``, ``completed_at``, ``archived_at``,
``deleted_at``), who closed / deleted it (``closed_by``, ``deleted_by``: ``cli:<user>``,
``event:<source>``, ``auto-close``), and ``last_file``: when its last file was registered, which
the ingest daemon's auto-close compares with ``[datasets] auto_close_after``. Existing datasets
get ``last_file`` = their ``created``; an index on ``state`` serves the lifecycle passes and
``spool datasets --state``.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
Ts = sa.DateTime(timezone=True)
WHO = 255

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("last_file", Ts, nullable=True))
        batch.add_column(sa.Column("closed_at", Ts, nullable=True))
        batch.add_column(sa.Column("closed_by", sa.String(WHO), nullable=True))
        batch.add_column(sa.Column("completed_at", Ts, nullable=True))
        batch.add_column(sa.Column("archived_at", Ts, nullable=True))
        batch.add_column(sa.Column("deleted_at", Ts, nullable=True))
        batch.add_column(sa.Column("deleted_by", sa.String(WHO), nullable=True))
        batch.create_index("ix_datasets_state", ["state"])
    op.execute("UPDATE datasets SET last_file = created")


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_index("ix_datasets_state")
        for column in ("deleted_by", "deleted_at", "archived_at", "completed_at", "closed_by", "closed_at"):
            batch.drop_column(column)
        batch.drop_column("last_file")
