"""Fixtures for the catalogue tests: every test runs on a SQLite file and on a fresh PostgreSQL
database (created through asyncpg, dropped afterwards), so the two backends cannot drift.

PostgreSQL comes from ``SPOOL_TEST_PG_URL`` (default: trust auth on 127.0.0.1:5432). When it
cannot be reached the PostgreSQL half is skipped with the reason, unless ``SPOOL_TEST_PG_REQUIRED=1``
in which case it fails.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from common.catalogue import Catalogue, IngestRecord
from common.config import StorageEndpoint

PG_URL = os.environ.get("SPOOL_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
PG_REQUIRED = os.environ.get("SPOOL_TEST_PG_REQUIRED") == "1"

ENDPOINTS = {
    "disk1": StorageEndpoint(root=Path("/srv/disk1")),
    "disk2": StorageEndpoint(root=Path("/srv/disk2"), attributes={"site": "PIC"}),
    "tape1": StorageEndpoint(kind="tape", root=Path("/srv/tape1")),
}


@asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A uniquely named empty database for one test; yields its SQLAlchemy URL."""
    base = make_url(PG_URL)
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if PG_REQUIRED:
            raise
        pytest.skip(f"PostgreSQL not reachable at {base.render_as_string()}: {exc}")
    name = f"spool_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/var/catalogue.db"
    else:
        async with pg_database() as url:
            yield url


@pytest.fixture
async def catalogue(catalogue_url: str) -> AsyncIterator[Catalogue]:
    cat = await Catalogue.open(catalogue_url)
    await cat.endpoints.sync(ENDPOINTS)
    try:
        yield cat
    finally:
        await cat.close()


def rec(name: str, **kw: Any) -> IngestRecord:
    """An ``IngestRecord`` with plausible defaults; event id defaults to ``ev-<name>``."""
    fields: dict[str, Any] = {
        "event_id": f"ev-{name}",
        "name": name,
        "dataset": "lst1.20261123.run012345.dl0",
        "size": 1000,
        "adler32": "0badcafe",
        "metadata": {},
        "parents": [],
        "storage": "disk1",
        "pfn": f"/srv/disk1/{name}",
        "path": f"/landing/{name}",
        "source": "test",
    }
    fields.update(kw)
    return IngestRecord(**fields)
