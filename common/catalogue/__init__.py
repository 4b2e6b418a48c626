"""The catalogue: the truth about files, datasets, replicas, requests and their history.

How to reach the catalogue: through its repositories, one per domain, each method one transaction::

    await catalogue.ingest.register(records)        # ingest's batches
    await catalogue.replication.plan_copies(...)    # rules, locks, copies, reaping
    await catalogue.tape.take_batch(ids, vid, holder=me)  # the tape queue and cartridges
    await catalogue.recall.assign(plan)             # recall requests and their files
    await catalogue.outbox.add(events)              # events waiting for the relay
    await catalogue.endpoints.set_health(...)       # storage endpoints, state and health
    await catalogue.history.record_failure(...)     # requests' outcomes, files' events
    await catalogue.queries.show_file(name)         # read views for the CLI and the monitor
    await catalogue.namespace.list_directory(path)  # DIRAC-style namespace questions, paged
    await catalogue.instances.renew(id, now, until)  # daemon instances' leases (several nodes)
    await catalogue.transfers.claim_slots(...)      # the replicator's slots and breaker per endpoint
    await catalogue.datasets.close(name, by, now)   # datasets' lifecycle and deletion
    await catalogue.metadata.apply(change)          # metadata set / unset after ingest, fields in use

A repository (``common.catalogue.repositories``) holds no SQL: it names a function of its domain's
module (``common.catalogue.ingest``, ``replication``, ...) and the transaction to run it in.
``Catalogue`` itself only opens, migrates and closes, and runs transactions: ``read`` / ``write``
for a synchronous function of a ``Connection`` (the SQLite worker thread, or ``run_sync``), and
``connect`` / ``begin`` for the async query code. Every write transaction on SQLite takes the
write lock up front (see ``engine``). Daemons, the CLI and the benches call repositories only; a
new statement gets a function in its domain's module and a method on its repository.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.catalogue.engine import (
    READER_CACHE_KIB,
    create_engine,
    create_sync_sqlite_engine,
    migrate,
    normalise_url,
    writer,
)
from common.catalogue.filters import MetaFilter, parse_filter
from common.catalogue.models import (
    Counts,
    DatasetInfo,
    EndpointInfo,
    EventInfo,
    FileInfo,
    FileView,
    IngestRecord,
    Outcome,
    RegisterOutcome,
    Relative,
    ReplicaInfo,
    RequestInfo,
    check_metadata,
)
from common.catalogue.replication import (
    CopyRecord,
    EndpointUsage,
    Reapable,
    ReplicaTask,
    RuleFile,
    RuleView,
    Source,
    Wanted,
)
from common.catalogue.repositories.datasets import DatasetRepository
from common.catalogue.repositories.endpoints import EndpointRepository
from common.catalogue.repositories.history import HistoryRepository
from common.catalogue.repositories.ingest import IngestRepository
from common.catalogue.repositories.instances import InstanceRepository
from common.catalogue.repositories.metadata import MetadataRepository
from common.catalogue.repositories.namespace import NamespaceRepository
from common.catalogue.repositories.outbox import OutboxRepository
from common.catalogue.repositories.queries import QueryRepository
from common.catalogue.repositories.recall import RecallRepository
from common.catalogue.repositories.replication import ReplicationRepository
from common.catalogue.repositories.tape import TapeRepository
from common.catalogue.repositories.transfers import TransferRepository
from common.catalogue.sql import UnknownStorageError, is_transient_conflict
from common.catalogue.writes import EndpointState
from common.errors import ConfigError, Retryable

__all__ = [
    "Catalogue",
    "CopyRecord",
    "Counts",
    "DatasetInfo",
    "EndpointInfo",
    "EndpointState",
    "EndpointUsage",
    "EventInfo",
    "FileInfo",
    "FileView",
    "IngestRecord",
    "MetaFilter",
    "Outcome",
    "Reapable",
    "RegisterOutcome",
    "Relative",
    "ReplicaInfo",
    "ReplicaTask",
    "RequestInfo",
    "RuleFile",
    "RuleView",
    "Source",
    "UnknownStorageError",
    "Wanted",
    "check_metadata",
    "normalise_url",
    "parse_filter",
]

# A concurrent writer (PostgreSQL, several ingest nodes) registering the same name makes the batch
# fail on the unique key (or, rarely, a deadlock); run it again and it sees the other's row.
_WRITE_TRIES = 3
T = TypeVar("T")


def _os_text(exc: OSError) -> str:
    """``Connection refused``, ``No such file or directory: /proc/x`` (no errno, no quotes)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}: {exc.filename}" if exc.filename is not None else text


class Catalogue:
    def __init__(self, engine: AsyncEngine, *, batch_cache_kib: int = READER_CACHE_KIB) -> None:
        self._engine = engine
        self._writer = writer(engine)
        # SQLite has a single writer. Concurrent BEGIN IMMEDIATEs from one process would wait in
        # SQLite's busy handler, which sleeps in steps of up to 100 ms: small batches then took
        # hundreds of ms each. Queue the writers here instead: in order, no sleep
        # (docs/decisions.md, "SQLite settings of the catalogue").
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        # SQLite file: hot batch transactions run whole in one thread on a plain engine (see engine).
        self._sync_engine = (
            create_sync_sqlite_engine(engine.url, batch_cache_kib) if self._write_lock else None
        )
        self._sync_thread: ThreadPoolExecutor | None = None
        # The ways in, one per domain (see the module docstring).
        self.ingest = IngestRepository(self)
        self.replication = ReplicationRepository(self)
        self.tape = TapeRepository(self)
        self.recall = RecallRepository(self)
        self.outbox = OutboxRepository(self)
        self.endpoints = EndpointRepository(self)
        self.history = HistoryRepository(self)
        self.queries = QueryRepository(self)
        self.namespace = NamespaceRepository(self)
        self.instances = InstanceRepository(self)
        self.transfers = TransferRepository(self)
        self.datasets = DatasetRepository(self)
        self.metadata = MetadataRepository(self)

    # --- transactions (for repositories; and for tests that look at rows directly) -------------
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(connection, *args)`` (a synchronous function of a SQLAlchemy ``Connection``)
        as one read transaction."""
        return await self._transaction(fn, *args, write=False)

    async def write(self, fn: Callable[..., T], *args: Any, retry: bool = True) -> T:
        """Run ``fn(connection, *args)`` as one write transaction. With ``retry``, a transaction
        that races another node's on PostgreSQL (``is_transient_conflict``) runs again: it then
        sees the other's committed rows."""
        if not retry:
            return await self._transaction(fn, *args, write=True)
        for attempt in range(1, _WRITE_TRIES + 1):
            try:
                return await self._transaction(fn, *args, write=True)
            except DBAPIError as exc:
                if attempt == _WRITE_TRIES or not is_transient_conflict(exc):
                    raise
        raise AssertionError("unreachable")

    def connect(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A read connection for the async query code (``queries``)."""
        return self._engine.connect()

    def begin(self) -> AbstractAsyncContextManager[AsyncConnection]:
        """A write transaction for the async code (``writes``), holding the SQLite write lock."""
        return self._write()

    async def _transaction(self, fn: Callable[..., T], *args: Any, write: bool) -> T:
        """Run ``fn(connection, *args)`` as one transaction: in a worker thread on SQLite files,
        through ``run_sync`` on the async engine otherwise."""
        if self._sync_engine is None:
            if write:
                async with self._write() as conn:
                    return await conn.run_sync(fn, *args)
            async with self._engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        if self._sync_thread is None:
            self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="catalogue-sqlite")
        loop = asyncio.get_running_loop()
        if not write:
            return await loop.run_in_executor(self._sync_thread, self._sync_tx, fn, args, False)
        assert self._write_lock is not None
        async with self._write_lock:
            return await loop.run_in_executor(self._sync_thread, self._sync_tx, fn, args, True)

    def _sync_tx(self, fn: Callable[..., T], args: tuple[Any, ...], write: bool) -> T:
        assert self._sync_engine is not None
        engine = writer(self._sync_engine) if write else self._sync_engine
        with engine.begin() as conn:
            return fn(conn, *args)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        if self._write_lock is None:
            async with self._writer.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._writer.begin() as conn:
            yield conn

    @classmethod
    async def open(
        cls, url: str, *, echo: bool = False, batch_cache_kib: int = READER_CACHE_KIB
    ) -> Catalogue:
        """Connect and migrate to head (idempotent; safe when several daemons start at once).

        ``batch_cache_kib``: SQLite page cache of the connection that runs whole transactions in a
        thread; ingest, whose registrations it carries, gives ``WRITER_CACHE_KIB`` (see engine)."""
        # An unusable URL is a config mistake and an unreachable database (closed port, missing
        # state_dir) is named as the catalogue's: one line for the operator, never a traceback.
        try:
            engine = create_engine(url, echo=echo)
        except (ValueError, ArgumentError) as exc:  # unknown driver, unparseable URL
            raise ConfigError(f"catalogue.url: {exc}") from None
        except OSError as exc:
            raise Retryable("catalogue_unavailable", f"cannot open the catalogue: {_os_text(exc)}") from None
        try:
            await migrate(engine)
        except OSError as exc:
            await engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            raise Retryable(
                "catalogue_unavailable", f"cannot reach the catalogue at {where}: {_os_text(exc)}"
            ) from None
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, batch_cache_kib=batch_cache_kib)

    async def close(self) -> None:
        if self._sync_thread is not None:
            self._sync_thread.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name
