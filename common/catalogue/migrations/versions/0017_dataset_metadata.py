"""Dataset metadata and dataset history (issue 20): the fields of a dataset's name by the
nomenclature, metadata set later by ``metadata.set`` / ``spool meta set``, and a history per
dataset (``spool trace --dataset``).

``dataset_metadata`` is shaped like ``file_metadata`` (typed value columns, an index per column
on ``(key, value_*)``) so that one metadata filter compares both alike. ``dataset_events`` is a
dataset's ``events``: by name, so it outlives the dataset, and apart from the files' history
because a dataset and a file may have the same name.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_metadata",
        sa.Column("dataset_id", Id, nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value_num", sa.Double(), nullable=True),
        sa.Column("value_int", sa.BigInteger(), nullable=True),
        sa.Column("value_str", sa.String(512), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_metadata_dataset_id_datasets"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("dataset_id", "key", name=op.f("pk_dataset_metadata")),
    )  # fmt: skip
    for col in ("value_num", "value_int", "value_str"):
        op.create_index(op.f(f"ix_dataset_metadata_key_{col}"), "dataset_metadata", ["key", col])
    op.create_table(
        "dataset_events",
        sa.Column("id", Id, autoincrement=True, nullable=False),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("time", Ts, nullable=False),
        sa.Column("daemon", sa.String(32), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("detail", Json, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_events")),
    )
    op.create_index(op.f("ix_dataset_events_dataset_time"), "dataset_events", ["dataset", "time"])


def downgrade() -> None:
    op.drop_index(op.f("ix_dataset_events_dataset_time"), table_name="dataset_events")
    op.drop_table("dataset_events")
    for col in ("value_num", "value_int", "value_str"):
        op.drop_index(op.f(f"ix_dataset_metadata_key_{col}"), table_name="dataset_metadata")
    op.drop_table("dataset_metadata")
