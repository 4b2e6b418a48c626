"""Opening the catalogue: migrations, engine tuning, URLs."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from common.catalogue import Catalogue, normalise_url
from common.catalogue.engine import BUSY_TIMEOUT_MS, alembic_config
from common.catalogue.schema import metadata
from tests.catalogue_fixtures import empty_catalogue_url, rec  # noqa: F401


def _schema_diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(ctx, metadata))


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def test_migrations_idempotent(empty_catalogue_url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    for _ in range(2):
        async with await Catalogue.open(empty_catalogue_url) as cat, cat.engine.connect() as conn:
            assert await conn.run_sync(_current) == head
    async with await Catalogue.open(empty_catalogue_url) as cat:
        await cat.endpoints.sync({})
        assert (await cat.queries.counts()).files == 0


async def test_migrated_schema_matches_the_models(empty_catalogue_url: str) -> None:
    async with await Catalogue.open(empty_catalogue_url) as cat, cat.engine.connect() as conn:
        assert await conn.run_sync(_schema_diff) == []
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert tables == set(metadata.tables) | {"alembic_version"}


async def test_daemons_opening_together_migrate_once(empty_catalogue_url: str) -> None:
    cats = await asyncio.gather(*(Catalogue.open(empty_catalogue_url) for _ in range(4)))
    try:
        assert {(await c.queries.counts()).files for c in cats} == {0}
    finally:
        for c in cats:
            await c.close()


async def test_sqlite_is_tuned_for_concurrent_daemons(tmp_path: Path) -> None:
    async with await Catalogue.open(f"sqlite:///{tmp_path}/c.db") as cat, cat.engine.connect() as conn:
        pragma = {
            p: (await conn.exec_driver_sql(f"PRAGMA {p}")).scalar()
            for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
    assert pragma["journal_mode"] == "wal"
    assert pragma["synchronous"] == 1  # NORMAL
    assert int(pragma["busy_timeout"] or 0) >= BUSY_TIMEOUT_MS >= 30_000
    assert pragma["foreign_keys"] == 1


async def test_open_creates_the_sqlite_directory(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "er" / "catalogue.db"
    async with await Catalogue.open(f"sqlite+aiosqlite:///{db}") as cat:
        assert cat.backend == "sqlite"
    assert db.is_file()


async def test_write_transactions_do_not_fail_when_sqlite_is_busy(tmp_path: Path) -> None:
    """Many concurrent writers on one file wait for the lock instead of "database is locked"."""
    from tests.catalogue_fixtures import ENDPOINTS

    url = f"sqlite+aiosqlite:///{tmp_path}/c.db"
    cats = [await Catalogue.open(url) for _ in range(3)]
    try:
        await cats[0].endpoints.sync(ENDPOINTS)

        async def work(i: int, cat: Catalogue) -> None:
            for j in range(10):
                await cat.ingest.register([rec(f"{i}-{j}-{k}") for k in range(20)])
                await cat.history.record_failure(request_id=f"{i}-{j}", kind="ingest", daemon="ingest",
                                         reason="x", error="e", attempts=1, final=False)  # fmt: skip

        await asyncio.gather(*(work(i, c) for i, c in enumerate(cats)))
        assert (await cats[0].queries.counts()).files == 600
    finally:
        for c in cats:
            await c.close()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:///var/c.db", "sqlite+aiosqlite:///var/c.db"),
        ("sqlite+aiosqlite:///var/c.db", "sqlite+aiosqlite:///var/c.db"),
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_plain_urls_pick_the_asyncio_driver(given: str, expected: str) -> None:
    assert normalise_url(given).render_as_string() == expected


def test_unsupported_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported catalogue URL"):
        normalise_url("mysql://u@h/db")


def test_the_head_revision_constant_is_alembics_head() -> None:
    from common.catalogue.engine import HEAD_REVISION

    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD_REVISION


def _columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


def _to(conn: Connection, revision: str) -> None:
    from alembic import command

    cfg = alembic_config(conn)
    current = _current(conn)
    (command.downgrade if revision < (current or "") else command.upgrade)(cfg, revision)


async def test_0005_adds_the_member_offset_of_tape_copies_and_back(empty_catalogue_url: str) -> None:
    """Revision 0005 (tape aggregates): copies written before it are plain tape files (NULL);
    downgrading drops the column and keeps the copies."""
    from tests.catalogue_fixtures import ENDPOINTS

    async with await Catalogue.open(empty_catalogue_url) as cat:
        await cat.endpoints.sync(ENDPOINTS)
        await cat.ingest.register([rec("a"), rec("b")])
        await cat.replication.set_replica(name="b", storage="disk2", pfn="A1/2", state="available",
                                          cartridge="A1", fseq=2, member_offset=1536)  # fmt: skip
        async with cat.engine.begin() as conn:
            await conn.run_sync(_to, "0004")
            assert "member_offset" not in await conn.run_sync(_columns, "replicas")
        async with cat.engine.begin() as conn:
            await conn.run_sync(_to, "0005")
            assert "member_offset" in await conn.run_sync(_columns, "replicas")
            rows = await conn.execute(text("SELECT fseq, member_offset FROM replicas WHERE fseq IS NOT NULL"))
            assert [tuple(r) for r in rows] == [(2, None)]


async def test_0016_adds_sha256_null_for_files_before_it_and_back(empty_catalogue_url: str) -> None:
    """Revision 0016 (strong checksums): files registered before it have no sha256 (NULL);
    downgrading drops the column and keeps the files with their replicas (no table copy: the
    replicas' ON DELETE CASCADE would take them along)."""
    from tests.catalogue_fixtures import ENDPOINTS

    async with await Catalogue.open(empty_catalogue_url) as cat:
        await cat.endpoints.sync(ENDPOINTS)
        await cat.ingest.register([rec("a", sha256="ab" * 32), rec("b")])
        async with cat.engine.begin() as conn:
            await conn.run_sync(_to, "0014")
            assert "sha256" not in await conn.run_sync(_columns, "files")
        async with cat.engine.begin() as conn:
            await conn.run_sync(_to, "0016")
            assert "sha256" in await conn.run_sync(_columns, "files")
            rows = await conn.execute(text("SELECT name, sha256 FROM files ORDER BY name"))
            assert [tuple(r) for r in rows] == [("a", None), ("b", None)]
            assert (await conn.execute(text("SELECT count(*) FROM replicas"))).scalar() == 2
        await cat.ingest.register([rec("c", sha256="cd" * 32)])
        assert (await cat.queries.show_file("c")).sha256 == "cd" * 32  # type: ignore[union-attr]
