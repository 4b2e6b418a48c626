"""Replication: rules, their locks on copies, replica tombstones, endpoint health.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("storage_endpoints") as batch:
        batch.add_column(sa.Column("health", sa.String(16), nullable=False, server_default="ok"))
        batch.add_column(sa.Column("health_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("health_since", Ts, nullable=True))
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("tombstone", Ts, nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer(), nullable=False, server_default="3"))
    op.create_index(op.f("ix_replicas_tombstone"), "replicas", ["tombstone"])
    op.create_table(
        "rules",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("datasets", sa.Text(), nullable=True),
        sa.Column("meta_filters", Json, nullable=False),
        sa.Column("endpoints", sa.String(255), nullable=False),
        sa.Column("copies", sa.Integer(), nullable=False),
        sa.Column("lifetime", sa.Double(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", Ts, nullable=False),
        sa.Column("updated", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rules")),
    )
    op.create_table(
        "locks",
        sa.Column("rule_id", sa.String(64), nullable=False),
        sa.Column("file_id", Id, nullable=False),
        sa.Column("storage_id", Id, nullable=False),
        sa.Column("expires", Ts, nullable=True),
        sa.Column("created", Ts, nullable=False),
        sa.ForeignKeyConstraint(
            ["rule_id"], ["rules.id"], name=op.f("fk_locks_rule_id_rules"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_locks_file_id_files"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["storage_id"], ["storage_endpoints.id"], name=op.f("fk_locks_storage_id_storage_endpoints")
        ),
        sa.PrimaryKeyConstraint("rule_id", "file_id", "storage_id", name=op.f("pk_locks")),
    )
    op.create_index(op.f("ix_locks_file_id_storage_id"), "locks", ["file_id", "storage_id"])
    op.create_index(op.f("ix_locks_expires"), "locks", ["expires"])


def downgrade() -> None:
    op.drop_table("locks")
    op.drop_table("rules")
    op.drop_index(op.f("ix_replicas_tombstone"), table_name="replicas")
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("priority")
        batch.drop_column("tombstone")
    with op.batch_alter_table("storage_endpoints") as batch:
        batch.drop_column("health_since")
        batch.drop_column("health_reason")
        batch.drop_column("health")
