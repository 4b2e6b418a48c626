"""Initial catalogue schema.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Types are spelled out here rather than imported from ``schema.py``: a migration must keep meaning
what it meant when it was written, whatever the models become.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
Name = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("name", name=op.f("uq_datasets_name")),
    )
    op.create_table(
        "storage_endpoints",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("root", sa.Text(), nullable=False),
        sa.Column("attributes", Json, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_endpoints")),
        sa.UniqueConstraint("name", name=op.f("uq_storage_endpoints_name")),
    )
    op.create_table(
        "files",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", Name, nullable=False),
        sa.Column("dataset_id", Id, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("adler32", sa.String(8), nullable=False),
        sa.Column("meta", Json, nullable=False),
        sa.Column("created", Ts, nullable=False),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_files_dataset_id_datasets")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_files")),
        sa.UniqueConstraint("name", name=op.f("uq_files_name")),
    )
    op.create_index(op.f("ix_files_dataset_id"), "files", ["dataset_id"])
    op.create_table(
        "file_metadata",
        sa.Column("file_id", Id, nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value_num", sa.Double(), nullable=True),
        sa.Column("value_int", sa.BigInteger(), nullable=True),
        sa.Column("value_str", sa.String(512), nullable=True),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_file_metadata_file_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("file_id", "key", name=op.f("pk_file_metadata")),
    )
    for col in ("value_num", "value_int", "value_str"):
        op.create_index(op.f(f"ix_file_metadata_key_{col}"), "file_metadata", ["key", col])
    op.create_table(
        "provenance",
        sa.Column("child_id", Id, nullable=False),
        sa.Column("parent_name", Name, nullable=False),
        sa.ForeignKeyConstraint(
            ["child_id"], ["files.id"], name=op.f("fk_provenance_child_id_files"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("child_id", "parent_name", name=op.f("pk_provenance")),
    )
    op.create_index(op.f("ix_provenance_parent_name"), "provenance", ["parent_name"])
    op.create_table(
        "replicas",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("file_id", Id, nullable=False),
        sa.Column("storage_id", Id, nullable=False),
        sa.Column("pfn", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cartridge", sa.String(64), nullable=True),
        sa.Column("fseq", sa.BigInteger(), nullable=True),
        sa.Column("created", Ts, nullable=False),
        sa.Column("updated", Ts, nullable=False),
        sa.ForeignKeyConstraint(
            ["file_id"], ["files.id"], name=op.f("fk_replicas_file_id_files"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["storage_id"], ["storage_endpoints.id"], name=op.f("fk_replicas_storage_id_storage_endpoints")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_replicas")),
        sa.UniqueConstraint("file_id", "storage_id", name=op.f("uq_replicas_file_id_storage_id")),
    )
    op.create_index(op.f("ix_replicas_storage_id_state"), "replicas", ["storage_id", "state"])
    op.create_table(
        "requests",
        sa.Column("id", sa.String(256), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("name", sa.String(1024), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("dataset", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created", Ts, nullable=False),
        sa.Column("updated", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_requests")),
    )
    op.create_index(op.f("ix_requests_name_updated"), "requests", ["name", "updated"])
    op.create_index(op.f("ix_requests_state_updated"), "requests", ["state", "updated"])
    op.create_table(
        "events",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("time", Ts, nullable=False),
        sa.Column("daemon", sa.String(32), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("storage", sa.String(64), nullable=True),
        sa.Column("detail", Json, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_name_time"), "events", ["name", "time"])


def downgrade() -> None:
    for table in (
        "events",
        "requests",
        "replicas",
        "provenance",
        "file_metadata",
        "files",
        "storage_endpoints",
        "datasets",
    ):
        op.drop_table(table)
