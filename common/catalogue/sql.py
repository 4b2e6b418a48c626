"""Small SQL helpers shared by the catalogue modules: the backend-specific bits live here."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from common.catalogue import schema as s

T = TypeVar("T")

# Both SQLite (32766) and PostgreSQL (32767) cap bound parameters per statement; stay far below.
IN_CHUNK = 500


# unique_violation, serialization_failure, deadlock_detected: another writer got there first.
_RACE_SQLSTATES = frozenset({"23505", "40001", "40P01"})


def is_transient_conflict(exc: DBAPIError) -> bool:
    """True when re-running the transaction will see the competing writer's committed rows."""
    # SQLite errors carry no SQLSTATE: its writers are serialised (BEGIN IMMEDIATE), so a unique
    # violation there is a real bug and is raised at once.
    return getattr(exc.orig, "sqlstate", None) in _RACE_SQLSTATES


class UnknownStorageError(ValueError):
    """A record names a storage endpoint the catalogue does not know (``sync_endpoints`` first)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def check_fits(table: Table, row: dict[str, Any]) -> None:
    """Refuse a string longer than its column, identically on both backends.

    PostgreSQL would raise on it and SQLite would store it whole, so a long reason code would work
    in development and break in production; here it fails the same way everywhere, naming the column.
    """
    for key, value in row.items():
        length = getattr(table.c[key].type, "length", None)
        if length is not None and isinstance(value, str) and len(value) > length:
            raise ValueError(f"{table.name}.{key} is {len(value)} characters long, at most {length} allowed")


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _insert(conn: Connection | AsyncConnection, table: Table) -> Any:
    mod = postgresql if conn.dialect.name == "postgresql" else sqlite
    return mod.insert(table)


def upsert_sync(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    """Multi-row ``INSERT ... ON CONFLICT (keys) DO UPDATE`` (same syntax on SQLite and PostgreSQL)."""
    if not rows:
        return
    stmt = _insert(conn, table)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in update})
    conn.execute(stmt, list(rows))


def insert_ignore_sync(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    """Insert rows, silently keeping the existing row on a key clash (a concurrent creator won)."""
    if rows:
        conn.execute(_insert(conn, table).on_conflict_do_nothing(index_elements=list(keys)), list(rows))


def storage_ids_sync(conn: Connection, names: set[str]) -> dict[str, int]:
    ep = s.storage_endpoints
    ids: dict[str, int] = {
        n: i for n, i in conn.execute(select(ep.c.name, ep.c.id).where(ep.c.name.in_(names)))
    }
    missing = names - ids.keys()
    if missing:
        raise UnknownStorageError(f"unknown storage endpoint(s): {', '.join(sorted(missing))}")
    return ids


# The write helpers are written once, synchronously, so that a batch can run whole in a worker
# thread (SQLite) or inside an async connection (``run_sync``, PostgreSQL).
async def upsert(
    conn: AsyncConnection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str],
) -> None:
    await conn.run_sync(upsert_sync, table, rows, keys, update)


async def insert_ignore(
    conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    await conn.run_sync(insert_ignore_sync, table, rows, keys)


async def storage_ids(conn: AsyncConnection, names: set[str]) -> dict[str, int]:
    return await conn.run_sync(storage_ids_sync, names)
