"""recall_files by file id: a delivery finds the recall files waiting for its copies by file id.

Without it, recording a delivery scanned every open recall file (the state index) for the few it
settles: a 100,000-file request cost 10^10 row visits to complete (issue 18).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_recall_files_file_id"), "recall_files", ["file_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_recall_files_file_id"), table_name="recall_files")
