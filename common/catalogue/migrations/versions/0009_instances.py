"""Instances of a daemon on several nodes (issue 19): leases, and who holds which work.

``instances``: each running daemon process, with a lease it renews; ``replicas.holder``: the
instance writing a tape copy ``archiving``; ``recall_files.holder``: the instance reading a file
``staging``; ``ingest_claims``: a new name an ingest instance is copying; ``role_leases``: one
holder of a role (the monitor's active instance). Rows left ``archiving`` or ``staging`` before
this revision have no holder: the first instance to start settles them, as before.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
MAX_HOLDER = 200
Name = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")
Ts = sa.DateTime(timezone=True)

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("daemon", sa.String(32), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started", Ts, nullable=False),
        sa.Column("renewed", Ts, nullable=False),
        sa.Column("expires", Ts, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_instances"),
    )
    op.create_index("ix_instances_daemon_expires", "instances", ["daemon", "expires"])
    op.create_table(
        "ingest_claims",
        sa.Column("name", Name, nullable=False),
        sa.Column("holder", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("claimed", Ts, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_ingest_claims"),
    )
    op.create_table(
        "role_leases",
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("expires", Ts, nullable=False),
        sa.PrimaryKeyConstraint("role", name="pk_role_leases"),
    )
    with op.batch_alter_table("replicas") as batch:
        batch.add_column(sa.Column("holder", sa.String(MAX_HOLDER), nullable=True))
    with op.batch_alter_table("recall_files") as batch:
        batch.add_column(sa.Column("holder", sa.String(MAX_HOLDER), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("recall_files") as batch:
        batch.drop_column("holder")
    with op.batch_alter_table("replicas") as batch:
        batch.drop_column("holder")
    op.drop_table("role_leases")
    op.drop_table("ingest_claims")
    op.drop_index("ix_instances_daemon_expires", table_name="instances")
    op.drop_table("instances")
