"""Strong checksums (issue 20, part 6): ``files.sha256``, 64 lower-case hex digits.

Computed by ingest in the same read pass as adler32 and checked on the later copies where Spool
reads the bytes. Nullable: files registered before this revision have none (a release manifest
refuses a dataset holding such files and names them).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# Frozen here, as in 0001: a migration does not follow later changes of the schema module.
SHA256_HEX = 64

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE (SQLite has had ADD / DROP COLUMN since 3.35), as 0012: a batch would copy
    # the table, and dropping ``files`` takes its replicas, metadata and provenance with it
    # (ON DELETE CASCADE).
    op.add_column("files", sa.Column("sha256", sa.String(SHA256_HEX), nullable=True))


def downgrade() -> None:
    op.drop_column("files", "sha256")
