"""Recall requests and their files.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
Name = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "recalls",
        sa.Column("id", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(255), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("reply_to", sa.String(255), nullable=True),
        sa.Column("correlation_id", sa.String(256), nullable=True),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("created", Ts, nullable=False),
        sa.Column("updated", Ts, nullable=False),
        sa.Column("completed", Ts, nullable=True),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_recalls")),
    )
    op.create_index(op.f("ix_recalls_state_priority"), "recalls", ["state", "priority"])
    op.create_table(
        "recall_files",
        sa.Column("recall_id", sa.String(256), nullable=False),
        sa.Column("name", Name, nullable=False),
        sa.Column("file_id", Id, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("storage", sa.String(64), nullable=True),
        sa.Column("cartridge", sa.String(64), nullable=True),
        sa.Column("fseq", sa.BigInteger(), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("updated", Ts, nullable=False),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["recall_id"], ["recalls.id"], name=op.f("fk_recall_files_recall_id_recalls"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_recall_files_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("recall_id", "name", name=op.f("pk_recall_files")),
    )
    op.create_index(
        op.f("ix_recall_files_state_cartridge_fseq"), "recall_files", ["state", "cartridge", "fseq"]
    )


def downgrade() -> None:
    op.drop_table("recall_files")
    op.drop_table("recalls")
