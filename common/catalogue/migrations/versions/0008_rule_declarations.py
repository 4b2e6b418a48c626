"""Which nodes' configuration files declare each config rule (several nodes, issue 19).

One node's file may no longer remove a rule another node's file declares: a config rule is removed
when the last file declaring it stops doing so (``replication.sync_config_rules``). A config rule
stored before this revision has no declaration; the first file synced that does not declare it
removes it, as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rule_declarations",
        sa.Column("rule_id", sa.String(64), sa.ForeignKey("rules.id", ondelete="CASCADE"), nullable=False),
        sa.Column("node", sa.String(128), nullable=False),
        sa.Column("declared", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("rule_id", "node"),
    )


def downgrade() -> None:
    op.drop_table("rule_declarations")
