"""Fixtures for the catalogue tests: every test runs on a SQLite file and on a fresh PostgreSQL
database (created through asyncpg, dropped afterwards), so the two backends cannot drift.

PostgreSQL comes from ``SPOOL_TEST_PG_URL`` (default: trust auth on 127.0.0.1:5432). When it
cannot be reached the PostgreSQL half is skipped with the reason, unless ``SPOOL_TEST_PG_REQUIRED=1``
in which case it fails. Also: the raw rows a file left (as the driver returns them) and the
statements sent while a test runs, for the tests holding the driver-level SQL to what it replaced.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Connection, Engine, event, text
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


async def pg_unreachable() -> str | None:
    """Why PostgreSQL at ``PG_URL`` cannot be reached, or None when it answers."""
    dsn = make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        await (await asyncpg.connect(dsn, timeout=5)).close()
    except (OSError, asyncpg.PostgresError) as exc:
        return f"PostgreSQL not reachable: {exc}"
    return None


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


# The PostgreSQL half needs a server: an integration test (`make unit` runs the SQLite half only).
@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
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


def raw_rows(
    conn: Connection, name: str, queries: dict[str, str]
) -> dict[str, list[tuple[tuple[str, Any], ...]]]:
    """Every row ``queries`` select for one file as the driver returns it (``text()``: no type
    processing), the file's name masked wherever it appears."""
    fid = conn.execute(text("SELECT id FROM files WHERE name = :name"), {"name": name}).scalar()
    out = {}
    for table, sql in queries.items():
        rows = conn.execute(text(sql), {"id": fid, "name": name})
        out[table] = sorted((tuple(_masked(v, name) for v in row) for row in rows), key=repr)
    return out


def _masked(value: Any, name: str) -> tuple[str, Any]:
    """``value`` with its type (1, 1.0 and True are equal in Python, not stored alike) and
    ``name`` masked; asyncpg hands JSON columns over decoded."""
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
    return type(value).__name__, text.replace(name, "<name>") if isinstance(text, str) else text


@pytest.fixture
def statements() -> Iterator[list[tuple[str, Any]]]:
    """The statements (and their parameters) any engine sends while the test runs."""
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        sent.append((statement.strip(), parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(Engine, "before_cursor_execute", record)
