"""Several recall instances on one catalogue (issue 19): who is reading which cartridge.

``recall_cartridges``: one row per cartridge a recall instance is reading, naming that instance
(``instances.id``); the others leave the cartridge alone while its holder's lease stands. Keyed by
library and VID, as the scheduler names a cartridge (two libraries may both label a tape A00001).

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
MAX_HOLDER = 200
Ts = sa.DateTime(timezone=True)

revision = "0011"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "recall_cartridges",
        sa.Column("library", sa.String(64), nullable=False),
        sa.Column("vid", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(MAX_HOLDER), nullable=False),
        sa.Column("claimed", Ts, nullable=False),
        sa.PrimaryKeyConstraint("library", "vid", name="pk_recall_cartridges"),
    )


def downgrade() -> None:
    op.drop_table("recall_cartridges")
