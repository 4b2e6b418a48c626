"""Small SQL helpers shared by the catalogue modules: the backend-specific bits live here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from itertools import chain
from typing import Any, TypeVar

from sqlalchemy import Column, Connection, Dialect, Row, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

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


def insert_or_skip(conn: Connection, table: Table, keys: Sequence[str]) -> Any:
    """``INSERT ... ON CONFLICT (keys) DO NOTHING`` of this dialect, to add values and RETURNING
    to (the rows it returns are the ones it inserted)."""
    return _insert(conn, table).on_conflict_do_nothing(index_elements=list(keys))


def insert_ignore_sync(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]
) -> None:
    """Insert rows, silently keeping the existing row on a key clash (a concurrent creator won)."""
    if rows:
        conn.execute(_insert(conn, table).on_conflict_do_nothing(index_elements=list(keys)), list(rows))


# Once per batch on every daemon's hot path: driver-level (see below), not Core statements.
_STORAGE_IDS_SQL = "SELECT name, id FROM storage_endpoints WHERE name IN ({})"
_FILE_IDS_SQL = "SELECT name, id FROM files WHERE name IN ({})"


def file_ids_sync(conn: Connection, names: Sequence[str]) -> dict[str, int]:
    """Name -> id of the files registered among ``names``."""
    return {name: fid for name, fid in select_in(conn, _FILE_IDS_SQL, list(dict.fromkeys(names)))}


def storage_ids_sync(conn: Connection, names: set[str]) -> dict[str, int]:
    ids: dict[str, int] = {name: sid for name, sid in select_in(conn, _STORAGE_IDS_SQL, sorted(names))}
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


# --- Driver-level execution for the hot paths -------------------------------------------------
#
# Why: for ingest's batches SQLAlchemy Core spent more CPU than SQLite itself (cache keys, bind
# parameter processing per row, ``construct_params``), and the ingest daemon is bound by its own
# CPU. These helpers send SQL text built once per dialect and plain tuples through
# ``exec_driver_sql``, which keeps SQLAlchemy's connection, transaction and error wrapping
# (``DBAPIError``, so ``is_transient_conflict`` still applies) but skips compilation and binds.
# Values must be exactly what the column types' bind processors would have sent: callers convert
# the few that need it with ``bind_processor`` (datetimes: once per batch) or ``json_processor``.
#
# Statement sizes come from a short ladder (powers of two), whatever the batch size: SQLite's
# statement cache and asyncpg's prepared statements then serve every batch, where preparing a new
# 256-row INSERT cost three times as much as running it.

# Rows per multi-row INSERT, and values per ``IN (...)``: a power of two, far below both backends'
# cap on bound parameters (SQLite 32766, PostgreSQL 32767).
MAX_ROWS = 512

Processor = Callable[[Any], Any]
AnyRow = Row[*tuple[Any, ...]]


def _identity(value: Any) -> Any:
    return value


def bind_processor(column: Column[Any], dialect: Dialect) -> Processor:
    """What SQLAlchemy does to a Python value bound to ``column`` on ``dialect``."""
    return column.type.dialect_impl(dialect).bind_processor(dialect) or _identity


def result_processor(column: Column[Any], dialect: Dialect) -> Processor:
    """What SQLAlchemy does to a value of ``column`` read back, for rows of ``exec_driver_sql``.

    Only for types whose processor does not depend on the driver's type code (none is passed).
    """
    return column.type.dialect_impl(dialect).result_processor(dialect, None) or _identity


# The json module's own string escaper (C): what ``json.dumps`` writes for every string.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
# Checks that the shortcut below writes what a column's JSON processor writes (see ``json_processor``).
_JSON_PROBE = {"s": 'é"\\\n\u2028😀', "i": -(2**63), "f": 0.1, "t": True, "b": False, "n": None}


def _flat_json(obj: dict[Any, Any]) -> str | None:
    """``json.dumps(obj)`` for a dict of str keys to str / int / float / bool / None, else None.

    Ingest writes two such objects a file (metadata, event detail); ``json.dumps`` spends most of
    its time setting up its encoder, which here is a few ``is`` tests.
    """
    parts = []
    for key, value in obj.items():
        cls = value.__class__
        if key.__class__ is not str:
            return None
        if cls is str:
            text = _json_string(value)
        elif value is None:
            text = "null"
        elif value is True:
            text = "true"
        elif value is False:
            text = "false"
        elif cls is int:
            text = int.__repr__(value)
        elif cls is float and math.isfinite(value):
            text = float.__repr__(value)
        else:
            return None
        parts.append(f"{_json_string(key)}: {text}")
    return "{" + ", ".join(parts) + "}"


def json_processor(column: Column[Any], dialect: Dialect) -> Processor:
    """``bind_processor`` for a JSON column, with a shortcut for flat objects (``_flat_json``).

    The shortcut is taken only if it writes what the column's own processor writes for a probe
    value (it would not with a custom ``json_serializer``, for one); anything it does not cover
    goes to that processor.
    """
    process = bind_processor(column, dialect)
    if process(_JSON_PROBE) != _flat_json(_JSON_PROBE):
        return process

    def fast(value: Any) -> Any:
        text = _flat_json(value) if value.__class__ is dict else None
        return process(value) if text is None else text

    return fast


def literal(column: Column[Any], dialect: Dialect, value: Any) -> str:
    """``value`` as an SQL literal for ``column``, rendered by SQLAlchemy: for the code's own
    constants, so that they cost no parameter and the statement text stays the same."""
    if value is None:
        return "NULL"
    render = column.type.dialect_impl(dialect).literal_processor(dialect)
    if render is None:
        raise TypeError(f"no SQL literal for {column}")
    return render(value)


def _markers(dialect: Dialect, shared: int, count: int) -> tuple[list[str], list[str]]:
    """Parameter markers for ``exec_driver_sql``: ``shared`` ones, which a statement may repeat (the
    first parameters), and ``count`` more, each used once. pysqlite: ``?1`` .. ``?k`` then ``?`` (which
    numbers on from the largest so far); asyncpg: ``$1``, ``$2``...

    Only the shared markers are numbered on SQLite: preparing a statement with hundreds of ``?NNN``
    takes time quadratic in their number (docs/decisions.md, "SQL text at driver level").
    """
    if dialect.paramstyle == "qmark":
        return [f"?{i}" for i in range(1, shared + 1)], ["?"] * count
    if dialect.paramstyle == "numeric_dollar":
        numbers = [f"${i}" for i in range(1, shared + count + 1)]
        return numbers[:shared], numbers[shared:]
    raise NotImplementedError(f"paramstyle {dialect.paramstyle!r}")


def _ladder(count: int) -> Iterator[int]:
    """Sizes that add up to ``count``: ``MAX_ROWS`` as often as it fits, then powers of two."""
    full, rest = divmod(count, MAX_ROWS)
    yield from [MAX_ROWS] * full
    size = MAX_ROWS // 2
    while rest:
        if rest >= size:
            yield size
            rest -= size
        size //= 2


@lru_cache(maxsize=512)
def insert_sql(
    dialect: Dialect,
    table: Table,
    shared: tuple[str, ...],
    columns: tuple[str, ...],
    constants: tuple[tuple[str, str], ...],
    rows: int,
    tail: str,
) -> str:
    """``INSERT INTO table (shared, columns, constant columns) VALUES (...), ... tail`` for ``rows``
    rows: the ``shared`` columns' parameters (bound once) in every row, then one parameter per
    column, then the ``(column, SQL literal)`` constants."""
    quote = dialect.identifier_preparer.quote
    width = len(columns)
    common, marks = _markers(dialect, len(shared), rows * width)
    fixed = [sql for _, sql in constants]
    values = ", ".join(
        "(" + ", ".join(common + marks[i : i + width] + fixed) + ")" for i in range(0, len(marks), width)
    )
    names = ", ".join(quote(c) for c in shared + columns + tuple(c for c, _ in constants))
    return f"INSERT INTO {quote(table.name)} ({names}) VALUES {values}{tail}"


def upsert_tail(
    dialect: Dialect,
    keys: Sequence[str],
    update: Sequence[str],
    *,
    table: Table | None = None,
    fill: Sequence[str] = (),
) -> str:
    """`` ON CONFLICT (keys) DO UPDATE SET c = excluded.c, ...`` (the same on both backends); the
    ``fill`` columns of ``table`` take the proposed value only where the stored one is NULL."""
    quote = dialect.identifier_preparer.quote
    sets = [f"{quote(c)} = excluded.{quote(c)}" for c in update]
    if fill:
        if table is None:
            raise TypeError("fill needs the table")
        sets += [f"{quote(c)} = coalesce({quote(table.name)}.{quote(c)}, excluded.{quote(c)})" for c in fill]
    return f" ON CONFLICT ({', '.join(map(quote, keys))}) DO UPDATE SET {', '.join(sets)}"


def ignore_tail(dialect: Dialect, keys: Sequence[str]) -> str:
    """`` ON CONFLICT (keys) DO NOTHING``: keep the existing row on a key clash (both backends)."""
    return f" ON CONFLICT ({', '.join(map(dialect.identifier_preparer.quote, keys))}) DO NOTHING"


def returning_tail(dialect: Dialect, columns: Sequence[str]) -> str:
    return " RETURNING " + ", ".join(map(dialect.identifier_preparer.quote, columns))


def insert_rows(
    conn: Connection,
    table: Table,
    columns: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
    *,
    shared: Mapping[str, Any] | None = None,
    constants: Mapping[str, Any] | None = None,
    tail: str = "",
) -> list[AnyRow]:
    """Insert ``rows`` (values in ``columns`` order), in order; the rows a ``RETURNING`` tail
    produced. Every row also takes the ``shared`` values (bound once per statement: a batch's
    timestamp) and the ``constants`` (the code's own, written into the SQL as literals).

    Values must be bind-processed already. Multi-row statements rather than executemany: asyncpg's
    executemany plans and executes row by row, and SQLite runs one multi-row statement faster than
    as many single-row ones.
    """
    dialect = conn.dialect
    common = tuple((shared or {}).values())
    names = tuple(shared or ())
    fixed = tuple((c, literal(table.c[c], dialect, v)) for c, v in (constants or {}).items())
    out: list[AnyRow] = []
    start = 0
    for size in _ladder(len(rows)):
        sql = insert_sql(dialect, table, names, columns, fixed, size, tail)
        result = conn.exec_driver_sql(sql, (*common, *chain.from_iterable(rows[start : start + size])))
        if result.returns_rows:
            out.extend(result.all())
        start += size
    return out


@lru_cache(maxsize=512)
def _in_sql(dialect: Dialect, template: str, count: int) -> str:
    return template.format(", ".join(_markers(dialect, 0, count)[1]))


def select_in(conn: Connection, template: str, values: Sequence[Any]) -> Iterator[AnyRow]:
    """Rows of ``template`` (SQL text with one ``IN ({})``, its only parameters) for ``values``.

    Each list is padded to a power of two with its last value (``IN`` does not care), so that
    a few statement texts serve every batch size.
    """
    for start in range(0, len(values), MAX_ROWS):
        part = list(values[start : start + MAX_ROWS])
        size = 1 << (len(part) - 1).bit_length()
        part += part[-1:] * (size - len(part))
        yield from conn.exec_driver_sql(_in_sql(conn.dialect, template, size), tuple(part)).all()
