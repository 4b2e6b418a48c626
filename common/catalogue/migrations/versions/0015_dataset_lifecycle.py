"""Datasets' lifecycle (issue 20, parts 1 and 8): open -> closed -> complete -> archived, and
deletion (deleting -> deleted, the rows kept as tombstones).

``datasets``: when each state was reached (``closed_at``, ``completed_at``, ``archived_at``,
``deleted_at``), who closed / deleted it (``closed_by``, ``deleted_by``: ``cli:<user>``,
``event:<source>``, ``auto-close``), ``tape_wanted`` (set as it completes: its rules want tape
copies, so it is watched until ``archived``), and ``last_file``: when its last file was registered, which
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


# Plain ALTER TABLE, not batch mode: on SQLite a batch copies the table and drops the old one,
# which ``files.dataset_id``'s foreign key forbids; ADD / DROP COLUMN are native (SQLite >= 3.35).
COLUMNS = (
    ("last_file", Ts), ("closed_at", Ts), ("closed_by", sa.String(WHO)), ("completed_at", Ts),
    ("archived_at", Ts), ("deleted_at", Ts), ("deleted_by", sa.String(WHO)), ("tape_wanted", sa.Boolean()),
)  # fmt: skip


def upgrade() -> None:
    for name, type_ in COLUMNS:
        op.add_column("datasets", sa.Column(name, type_, nullable=True))
    op.create_index("ix_datasets_state", "datasets", ["state"])
    op.execute("UPDATE datasets SET last_file = created")


def downgrade() -> None:
    op.drop_index("ix_datasets_state", "datasets")
    for name, _ in reversed(COLUMNS):
        op.drop_column("datasets", name)
