"""Engine creation and migrations: the only backend-specific set-up.

SQLite is tuned for many small daemons writing one file: WAL (readers never block the writer),
``synchronous=NORMAL`` (durable at checkpoints, safe against corruption, much faster commits),
a 30 s ``busy_timeout`` (writers queue instead of failing), and foreign keys on. Write transactions
start with ``BEGIN IMMEDIATE``: a deferred transaction that reads and then writes can fail with
"database is locked" at once (no busy wait) when another writer committed in between.

Migrations run at open time under a lock (``BEGIN IMMEDIATE`` on SQLite, an advisory lock on
PostgreSQL) so that daemons starting together do not race to create the same tables.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

from common.errors import ConfigError

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_MS = 30_000
# Page cache of the connection that writes ingest batches: registration slowed several times once
# the catalogue outgrew a smaller cache (docs/decisions.md, "SQLite settings of the catalogue").
# Ingest asks for it (``Catalogue.open(batch_cache_kib=...)``); the other daemons' batch connection
# has the readers' size: the tape daemon's filled 64 MB while draining a 500,000-file night.
WRITER_CACHE_KIB = 64_000
# Page cache of every other connection (the async engine's: two or three per daemon, each its own
# cache). At 32 MB the tape daemon's two held 51 MB of pages after a 60,000-file night, on the way
# to 64: the largest part of its growth (docs/decisions.md, "SQLite settings of the catalogue").
READER_CACHE_KIB = 16_000
WRITE_OPTION = "spool_write"  # execution option marking a write transaction
_PG_MIGRATION_LOCK = 0x5350_4F4F_4C  # arbitrary constant: "SPOOL"

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


def normalise_url(url: str | URL) -> URL:
    """Accept plain ``sqlite:///`` / ``postgresql://`` URLs and pick the asyncio driver."""
    u = make_url(url)
    if u.drivername in _DRIVERS:
        u = u.set(drivername=_DRIVERS[u.drivername])
    if u.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise ValueError(f"unsupported catalogue URL {u.render_as_string(hide_password=True)!r}")
    return u


def _is_sqlite_file(u: URL) -> bool:
    db = u.database or ""
    return u.get_backend_name() == "sqlite" and db not in ("", ":memory:") and not db.startswith("file:")


# libpq's TLS keys, accepted in a PostgreSQL URL's query (or as ``catalogue.*`` settings, which
# config folds into the URL); asyncpg takes none of them as such, only ``ssl``.
PG_TLS_KEYS = ("sslmode", "sslrootcert", "sslcert", "sslkey")
PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def ssl_argument(query: Mapping[str, str]) -> ssl.SSLContext | str | bool | None:
    """asyncpg's ``ssl`` for libpq's ``sslmode`` / ``sslrootcert`` / ``sslcert`` / ``sslkey``.

    As libpq: ``disable`` no TLS; ``allow`` / ``prefer`` TLS if the server offers it, unverified;
    ``require`` TLS or no connection, the certificate checked against ``sslrootcert`` when one is
    given (else not at all); ``verify-ca`` the certificate must chain to ``sslrootcert`` (else the
    system CAs); ``verify-full`` and its name must be the host's. ``sslcert`` / ``sslkey``: a
    client certificate. None when no key is given (asyncpg's default, ``prefer``).
    """
    if not any(k in query for k in PG_TLS_KEYS):
        return None
    mode = query.get("sslmode", "prefer")
    if mode not in PG_SSLMODES:
        raise ConfigError(f"catalogue sslmode {mode!r} is not one of {', '.join(PG_SSLMODES)}")
    if mode == "disable":
        return False
    root, cert, key = query.get("sslrootcert"), query.get("sslcert"), query.get("sslkey")
    if mode in ("allow", "prefer") and not cert:
        return mode
    verify = mode in ("verify-ca", "verify-full") or (mode == "require" and root is not None)
    try:
        context = (
            ssl.create_default_context(cafile=root) if verify else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        )
        context.check_hostname = mode == "verify-full"
        if not verify:
            context.verify_mode = ssl.CERT_NONE
        if cert:
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        what = f"sslrootcert {root}" if root and not cert else f"sslcert {cert} / sslkey {key}"
        raise ConfigError(f"catalogue {what}: {getattr(exc, 'strerror', None) or exc}") from None
    return context


def _split_tls(u: URL) -> tuple[URL, ssl.SSLContext | str | bool | None]:
    """The URL without libpq's TLS keys, and asyncpg's ``ssl`` argument made of them."""
    query = {k: v if isinstance(v, str) else v[-1] for k, v in u.query.items()}
    return u.difference_update_query(PG_TLS_KEYS), ssl_argument(query)


def _tls_errors_in_one_line(engine: AsyncEngine, u: URL, mode: str) -> None:
    """A server refusing TLS, or a certificate refused, becomes one ``ConfigError`` line: asyncpg
    raises them as plain ``ConnectionError`` / ``SSLError``, which SQLAlchemy passes on raw."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _connect(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = f"certificate verify failed: {exc.verify_message}"
            else:
                reason = str(exc.reason or exc).lower().replace("_", " ")
            raise ConfigError(
                f"TLS with PostgreSQL at {u.host}:{u.port or 5432} failed (sslmode={mode}): {reason}"
            ) from None
        except ConnectionError as exc:
            if "SSL" not in str(exc):
                raise
            raise ConfigError(
                f"PostgreSQL at {u.host}:{u.port or 5432} does not offer TLS, and sslmode={mode} requires it"
            ) from None


def create_engine(url: str | URL, *, echo: bool = False) -> AsyncEngine:
    u = normalise_url(url)
    tls: ssl.SSLContext | str | bool | None = None
    mode = str(u.query.get("sslmode", "prefer"))
    if u.get_backend_name() == "postgresql":
        u, tls = _split_tls(u)
    if _is_sqlite_file(u):
        Path(u.database or "").expanduser().parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"echo": echo}
    if u.get_backend_name() == "postgresql":
        # asyncpg prepares every statement and PostgreSQL switches a prepared statement to a
        # generic plan after five runs; planned while tables were small, ``name IN (...)`` then
        # stays a sequential scan as the catalogue grows (docs/decisions.md, "SQLite settings of
        # the catalogue"). A custom plan per execution keeps the unique indexes in use.
        kwargs.update(
            pool_pre_ping=True,
            pool_size=10,
            max_overflow=10,
            connect_args={"server_settings": {"plan_cache_mode": "force_custom_plan"}},
        )
        if tls is not None:
            kwargs["connect_args"]["ssl"] = tls
    engine = create_async_engine(u, **kwargs)
    if tls is not None and tls is not False:
        _tls_errors_in_one_line(engine, u, mode)
    if u.get_backend_name() == "sqlite":
        _tune_sqlite(engine.sync_engine)
    else:
        # Send a batch of rows as one multi-row INSERT (as SQLAlchemy does for psycopg) rather than
        # asyncpg's executemany, which binds and executes (and, see above, plans) row by row.
        engine.dialect.use_insertmanyvalues_wo_returning = True
    return engine


def create_sync_sqlite_engine(url: URL, cache_kib: int = WRITER_CACHE_KIB) -> Engine | None:
    """A plain (pysqlite) engine on the same SQLite file, for whole transactions run in a thread.

    Through aiosqlite every statement is a round trip between the event loop and the driver's
    thread, and a busy daemon's loop makes each one cost milliseconds. Ingest's batch registration
    (about ten statements) therefore runs in one worker-thread call on this engine instead.
    None for in-memory databases, which a second engine could not see.
    """
    if not _is_sqlite_file(url):
        return None
    # One connection kept open (the engine is used by one worker thread): a new connection per
    # batch re-ran the PRAGMAs, re-parsed the schema and started with a cold page cache (slower:
    # docs/decisions.md). Ingest's is larger than the async engine's: it carries the registrations.
    sync = sa_create_engine(
        url.set(drivername="sqlite"),
        poolclass=QueuePool,
        pool_size=1,
        max_overflow=0,
        connect_args={"check_same_thread": False},
    )
    _tune_sqlite(sync, cache_kib=cache_kib)
    return sync


def _tune_sqlite(engine: Engine, cache_kib: int = READER_CACHE_KIB) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module; "begin" below issues BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in (
            # The busy timeout first: switching a new file to WAL takes a lock, and daemons
            # opening it together failed with "database is locked" while none was set yet.
            f"busy_timeout={BUSY_TIMEOUT_MS}",
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "foreign_keys=ON",
            "temp_store=MEMORY",
            f"cache_size=-{cache_kib}",  # page cache per connection, in KiB
        ):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


E = TypeVar("E", AsyncEngine, Engine)


def writer(engine: E) -> E:
    """The same engine (same pool) whose transactions are write transactions."""
    return engine.execution_options(**{WRITE_OPTION: True})


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration built in code: no alembic.ini is needed at run time."""
    from alembic.config import Config  # imported when needed: a CLI query need not pay for it

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    from alembic import command

    command.upgrade(alembic_config(connection), revision)


# The newest migration. Opening a catalogue already there skips Alembic altogether (loading it and
# its scripts was a third of a `spool` command's time); a test keeps this equal to Alembic's head.
HEAD_REVISION = "0016"


def _current_revision(connection: Connection) -> str | None:
    try:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except DBAPIError:
        return None  # a new database: no version table yet


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; a no-op when it is already there."""
    if revision == "head":
        async with engine.connect() as conn:
            if await conn.run_sync(_current_revision) == HEAD_REVISION:
                return
    async with writer(engine).begin() as conn:
        await conn.run_sync(_upgrade, revision)
