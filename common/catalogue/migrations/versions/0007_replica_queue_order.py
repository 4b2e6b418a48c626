"""Replicas indexed in a tape queue's write order: (storage, state, priority desc, created, id).

``catalogue.tape.queue_head`` asks for the next window of a pool's queue in that order; with the
(storage_id, state) index every queued copy was read and sorted at each window: a night's backlog
of 300,000 copies, every 2,000 files written (issue 18). The new index starts with the old one's
columns and replaces it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_replicas_queue_order",
        "replicas",
        ["storage_id", "state", sa.text("priority DESC"), "created", "id"],
    )
    op.drop_index(op.f("ix_replicas_storage_id_state"), table_name="replicas")


def downgrade() -> None:
    op.create_index(op.f("ix_replicas_storage_id_state"), "replicas", ["storage_id", "state"])
    op.drop_index("ix_replicas_queue_order", table_name="replicas")
