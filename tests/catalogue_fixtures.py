"""Fixtures for the catalogue tests: every test runs on a SQLite file and on a fresh PostgreSQL
database (created through asyncpg, dropped afterwards), so the two backends cannot drift.

PostgreSQL comes from ``SPOOL_TEST_PG_URL`` (default: trust auth on 127.0.0.1:5432). When it
cannot be reached the PostgreSQL half is skipped with the reason, unless ``SPOOL_TEST_PG_REQUIRED=1``
in which case it fails. Also: the raw rows a file left (as the driver returns them) and the
statements sent while a test runs, for the tests holding the driver-level SQL to what it replaced.

A test's catalogue starts as a copy of one migrated at head once per session (a SQLite file copied,
a PostgreSQL database created from a template database): running the migrations for every test was
most of a catalogue test's set-up. The copy is what ``Catalogue.open`` leaves in an empty database;
the migration tests themselves ask for ``empty_catalogue_url``. ``write_config`` (conftest) seeds a
state directory's default SQLite catalogue the same way, for the daemons and commands a test starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
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


# The session's migrated templates, made on first use (``_sqlite_template``, ``_pg_template``) and
# removed when the session ends (``drop_templates``, from conftest's ``pytest_sessionfinish``).
_TEMPLATES: dict[str, str] = {}


async def _sqlite_template() -> Path:
    if "sqlite" not in _TEMPLATES:
        path = Path(tempfile.mkdtemp(prefix="spool-test-template-")) / "catalogue.db"
        cat = await Catalogue.open(f"sqlite+aiosqlite:///{path}")
        await cat.close()  # the last connection closed: the WAL is checkpointed into the file
        _TEMPLATES["sqlite"] = str(path)
    return Path(_TEMPLATES["sqlite"])


def seed_sqlite_catalogue(path: Path) -> None:
    """Copy the migrated template to ``path``, from code that runs outside the event loop (or in
    it: the template is made in a thread of its own, with its own loop)."""
    if "sqlite" not in _TEMPLATES:
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _sqlite_template()).result()
    shutil.copyfile(_TEMPLATES["sqlite"], path)


async def sqlite_catalogue(path: Path) -> str:
    """The URL of a SQLite catalogue at ``path``, already migrated (a copy of the template)."""
    template = await _sqlite_template()
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite+aiosqlite:///{path}"


async def _pg_template(admin: asyncpg.Connection) -> str:
    if "postgresql" not in _TEMPLATES:
        name = f"spool_template_{uuid.uuid4().hex[:12]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        cat = await Catalogue.open(make_url(PG_URL).set(database=name).render_as_string(hide_password=False))
        await cat.close()  # a template database must have no connection while it is copied
        _TEMPLATES["postgresql"] = name
    return _TEMPLATES["postgresql"]


@asynccontextmanager
async def pg_database(*, migrated: bool = True) -> AsyncIterator[str]:
    """A uniquely named database for one test, migrated at head (or empty); yields its URL."""
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
        template = f' TEMPLATE "{await _pg_template(admin)}"' if migrated else ""
        await admin.execute(f'CREATE DATABASE "{name}"{template}')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def drop_templates() -> None:
    """Remove the session's templates (the SQLite file's directory, the PostgreSQL database)."""
    if sqlite := _TEMPLATES.pop("sqlite", None):
        shutil.rmtree(Path(sqlite).parent, ignore_errors=True)
    if pg := _TEMPLATES.pop("postgresql", None):
        asyncio.run(_drop_pg(pg))


async def _drop_pg(name: str) -> None:
    dsn = make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn, timeout=5)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def _backend_url(backend: str, tmp_path: Path, *, migrated: bool) -> AsyncIterator[str]:
    if backend == "sqlite":
        path = tmp_path / "var" / "catalogue.db"
        yield await sqlite_catalogue(path) if migrated else f"sqlite+aiosqlite:///{path}"
    else:
        async with pg_database(migrated=migrated) as url:
            yield url


# The PostgreSQL half needs a server: an integration test (`make unit` runs the SQLite half only).
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
async def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A catalogue migrated at head, on each backend."""
    async for url in _backend_url(request.param, tmp_path, migrated=True):
        yield url


@pytest.fixture(params=BACKENDS)
async def empty_catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database on each backend, for the tests of the migrations themselves."""
    async for url in _backend_url(request.param, tmp_path, migrated=False):
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
