"""Tape copies inside an aggregate: the member's offset within its tape file.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL: the copy is a tape file of its own (every copy written before this revision).
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("member_offset", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("member_offset")
