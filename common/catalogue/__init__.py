"""The catalogue: the truth about files, datasets, replicas, requests and their history.

``Catalogue`` is the one object daemons and the CLI hold. It owns an async engine (SQLite by
default, PostgreSQL when the URL says so), brings the schema to the latest migration when opened,
and keeps transaction scope out of callers' hands: each method is one transaction, and every write
transaction on SQLite takes the write lock up front (see ``engine``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from common.catalogue import ingest, queries, replication, writes
from common.catalogue.engine import create_engine, create_sync_sqlite_engine, migrate, normalise_url, writer
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
from common.catalogue.policy import Rule
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
from common.catalogue.sql import UnknownStorageError, is_transient_conflict
from common.catalogue.writes import EndpointState
from common.config import StorageEndpoint
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
_REGISTER_TRIES = 3
T = TypeVar("T")


def _os_text(exc: OSError) -> str:
    """``Connection refused``, ``No such file or directory: /proc/x`` (no errno, no quotes)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text}: {exc.filename}" if exc.filename is not None else text


class Catalogue:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)
        # SQLite has a single writer. Concurrent BEGIN IMMEDIATEs from one process would wait in
        # SQLite's busy handler, which sleeps in steps of up to 100 ms; measured with ingest, that
        # turned 3-record batches into 280 ms each. Queue the writers here instead: in order, no sleep.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if engine.dialect.name == "sqlite" else None
        # SQLite file: hot batch transactions run whole in one thread on a plain engine (see engine).
        self._sync_engine = create_sync_sqlite_engine(engine.url) if self._write_lock else None
        self._sync_thread: ThreadPoolExecutor | None = None

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
    async def open(cls, url: str, *, echo: bool = False) -> Catalogue:
        """Connect and migrate to head (idempotent; safe when several daemons start at once)."""
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
        return cls(engine)

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

    # --- storage endpoints ---------------------------------------------------------------------
    async def sync_endpoints(self, endpoints: Mapping[str, StorageEndpoint]) -> None:
        async with self._write() as conn:
            await writes.sync_endpoints(conn, endpoints)

    async def set_endpoint_state(self, name: str, state: EndpointState) -> None:
        async with self._write() as conn:
            await writes.set_endpoint_state(conn, name, state)

    async def endpoints(self) -> list[EndpointInfo]:
        async with self._engine.connect() as conn:
            return await queries.endpoints(conn)

    # --- ingest --------------------------------------------------------------------------------
    async def lookup_files(self, names: Sequence[str]) -> dict[str, FileInfo]:
        found = await self._transaction(ingest.lookup, names, write=False)
        return {name: info for name, (_, info) in found.items()}

    async def ingest_known(
        self, ids: Sequence[str], names: Sequence[str]
    ) -> tuple[set[str], dict[str, FileInfo]]:
        """Event ids already done, and registered files among ``names``: one round trip for ingest."""
        return await self._transaction(ingest.known, ids, names, write=False)

    async def request_state(self, ids: Sequence[str]) -> dict[str, RequestInfo]:
        async with self._engine.connect() as conn:
            return await queries.request_state(conn, ids)

    async def register_ingested(self, records: Sequence[IngestRecord]) -> list[RegisterOutcome]:
        """Register a batch in one transaction; one outcome per record, in order (see ``ingest``)."""
        if not records:
            return []
        return await self._retrying_write(ingest.register, records)

    async def run(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``fn(connection, *args)`` (a synchronous function of a SQLAlchemy ``Connection``) as
        one transaction. The way daemon-specific catalogue modules (``tape``, ``recall``) add their
        own statements without growing this class: write the function once, sync, in a module of
        ``common.catalogue``; it runs in the SQLite worker thread or through ``run_sync``."""
        if write:
            return await self._retrying_write(fn, *args)
        return await self._transaction(fn, *args, write=False)

    async def _retrying_write(self, fn: Callable[..., T], *args: Any) -> T:
        """A write transaction that may race another node's on PostgreSQL: run it again, it then
        sees the other's committed rows."""
        for attempt in range(1, _REGISTER_TRIES + 1):
            try:
                return await self._transaction(fn, *args, write=True)
            except DBAPIError as exc:
                if attempt == _REGISTER_TRIES or not is_transient_conflict(exc):
                    raise
        raise AssertionError("unreachable")

    # --- requests and history ------------------------------------------------------------------
    async def record_failure(
        self,
        *,
        request_id: str,
        kind: str,
        daemon: str,
        reason: str,
        error: str,
        attempts: int,
        final: bool,
        name: str | None = None,
        path: str | None = None,
        dataset: str | None = None,
    ) -> None:
        """Remember the latest failure of a request (``failed`` when final, else ``retrying``) and
        add it to the history of the file (by name, else by source path, else by request id)."""
        state = "failed" if final else "retrying"
        async with self._write() as conn:
            await writes.record_request(
                conn, request_id=request_id, kind=kind, state=state, attempts=attempts,
                reason=reason, error=error, name=name, path=path, dataset=dataset,
            )  # fmt: skip
            await writes.add_event(
                conn,
                name=name or path or request_id,
                daemon=daemon,
                type="file.failed" if final else "file.retry",
                outcome=state,
                attempt=attempts,
                detail={"request_id": request_id, "kind": kind, "reason": reason, "error": error},
            )

    async def record_done(
        self,
        *,
        request_id: str,
        kind: str,
        attempts: int = 1,
        name: str | None = None,
        path: str | None = None,
        dataset: str | None = None,
    ) -> None:
        """Mark a request done (its earlier reason / error stay for the record)."""
        async with self._write() as conn:
            await writes.record_request(
                conn, request_id=request_id, kind=kind, state="done", attempts=attempts,
                reason=None, error=None, name=name, path=path, dataset=dataset,
            )  # fmt: skip

    async def record_event(
        self,
        *,
        name: str,
        daemon: str,
        type: str,
        outcome: str = "ok",
        attempt: int = 1,
        storage: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        async with self._write() as conn:
            await writes.add_event(
                conn, name=name, daemon=daemon, type=type, outcome=outcome,
                attempt=attempt, storage=storage, detail=detail,
            )  # fmt: skip

    async def set_replica(
        self,
        *,
        name: str,
        storage: str,
        pfn: str,
        state: str,
        cartridge: str | None = None,
        fseq: int | None = None,
    ) -> None:
        """Create or update the replica of ``name`` on ``storage``; ``KeyError`` if no such file."""
        async with self._write() as conn:
            await writes.set_replica(
                conn, name=name, storage=storage, pfn=pfn, state=state, cartridge=cartridge, fseq=fseq
            )

    # --- queries for the CLI -------------------------------------------------------------------
    async def show_file(self, name: str) -> FileView | None:
        async with self._engine.connect() as conn:
            return await queries.show_file(conn, name)

    async def list_files(
        self, *, dataset: str | None = None, prefix: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[FileInfo]:
        async with self._engine.connect() as conn:
            return await queries.list_files(conn, dataset=dataset, prefix=prefix, limit=limit, offset=offset)

    async def list_datasets(self) -> list[DatasetInfo]:
        async with self._engine.connect() as conn:
            return await queries.list_datasets(conn)

    async def find_files(
        self, filters: Sequence[MetaFilter | str], *, dataset: str | None = None, limit: int = 1000
    ) -> list[FileInfo]:
        """Files matching every filter (strings are parsed with ``parse_filter``), by name."""
        parsed = [parse_filter(x) if isinstance(x, str) else x for x in filters]
        async with self._engine.connect() as conn:
            return await queries.find_files(conn, parsed, dataset=dataset, limit=limit)

    async def ancestors(self, name: str, *, max_depth: int = 100) -> list[Relative]:
        async with self._engine.connect() as conn:
            return await queries.relatives(conn, name, up=True, max_depth=max_depth)

    async def descendants(self, name: str, *, max_depth: int = 100) -> list[Relative]:
        async with self._engine.connect() as conn:
            return await queries.relatives(conn, name, up=False, max_depth=max_depth)

    async def history(self, name: str) -> list[EventInfo]:
        async with self._engine.connect() as conn:
            return await queries.history(conn, name)

    async def failed_requests(self, limit: int = 100, *, include_retrying: bool = False) -> list[RequestInfo]:
        states = ("failed", "retrying") if include_retrying else ("failed",)
        async with self._engine.connect() as conn:
            return await queries.requests_in(conn, states, limit)

    async def counts(self) -> Counts:
        async with self._engine.connect() as conn:
            return await queries.counts(conn)

    # --- replication (see ``replication`` for the states and the locking model) ---------------
    async def load_rules(self) -> list[Rule]:
        return await self._transaction(replication.load_rules, write=False)

    async def sync_config_rules(self, rules: Sequence[Rule]) -> list[str]:
        return await self._transaction(replication.sync_config_rules, list(rules), write=True)

    async def add_rule(self, rule: Rule) -> None:
        """Store a new rule (state ``new``: the replicator evaluates existing files against it);
        ``KeyError`` if the id is taken."""
        await self._transaction(replication.add_rule, rule, write=True)

    async def remove_rule(self, rule_id: str) -> int:
        """Delete a rule; returns the number of copies released. ``KeyError`` if unknown."""
        return await self._transaction(replication.remove_rule, rule_id, write=True)

    async def rule_views(self) -> list[RuleView]:
        return await self._transaction(replication.rule_views, write=False)

    async def new_rules(self, created_before: datetime) -> list[Rule]:
        return await self._transaction(replication.new_rules, created_before, write=False)

    async def activate_rule(self, rule_id: str) -> None:
        await self._transaction(replication.activate_rule, rule_id, write=True)

    async def files_for_rule(
        self, rule: Rule, *, after: tuple[int, int] = (0, 0), limit: int, metadata: bool = True
    ) -> list[RuleFile]:
        return await self._transaction(
            lambda c: replication.files_for_rule(c, rule, after=after, limit=limit, metadata=metadata),
            write=False,
        )

    async def plan_copies(
        self,
        items: Sequence[tuple[str, str, Mapping[str, Any]]],
        rules: Sequence[Rule],
        endpoints: Mapping[str, Mapping[str, str]],
    ) -> list[list[Wanted]]:
        return await self._retrying_write(replication.plan_copies, list(items), list(rules), endpoints)

    async def replica_task(self, name: str, storage: str) -> ReplicaTask | None:
        return await self._transaction(replication.replica_task, name, storage, write=False)

    async def replica_tasks(self, items: Sequence[tuple[str, str]]) -> list[ReplicaTask | None]:
        return await self._transaction(replication.replica_tasks, list(items), write=False)

    async def set_replica_state(
        self, name: str, storage: str, state: str, *, only_from: Sequence[str] | None = None
    ) -> bool:
        return await self._transaction(
            lambda c: replication.set_replica_state(c, name, storage, state, only_from=only_from), write=True
        )

    async def cancel_copy(self, name: str, storage: str) -> bool:
        return await self._transaction(replication.cancel_copy, name, storage, write=True)

    async def record_copies(self, records: Sequence[CopyRecord]) -> None:
        await self._retrying_write(replication.record_copies, list(records))

    async def park(self, name: str, storage: str, priority: int) -> None:
        await self._transaction(replication.park, name, storage, priority, write=True)

    async def waiting(
        self, storage: str, limit: int, *, parked_before: datetime, after: tuple[int, int] | None = None
    ) -> list[tuple[int, int, str]]:
        return await self._transaction(
            lambda c: replication.waiting(c, storage, limit, parked_before=parked_before, after=after),
            write=False,
        )

    async def endpoint_states(self) -> dict[str, str]:
        """Operator state by endpoint name: ``endpoints`` without the rest of each row (polled
        every ``poll_interval``; the full rows, attributes decoded, cost ten times more)."""
        return await self._transaction(replication.endpoint_states, write=False)

    async def waiting_count(self, storage: str) -> int:
        return await self._transaction(replication.waiting_count, storage, write=False)

    async def set_health(self, storage: str, health: str, reason: str | None = None) -> None:
        await self._transaction(replication.set_health, storage, health, reason, write=True)

    async def endpoint_usage(self) -> list[EndpointUsage]:
        return await self._transaction(replication.endpoint_usage, write=False)

    async def expire_locks(self) -> int:
        return await self._transaction(replication.expire_locks, write=True)

    async def reapable(self, limit: int = 500) -> list[Reapable]:
        return await self._transaction(replication.reapable, limit, write=False)

    async def begin_delete(self, replica_id: int) -> bool:
        # Retried: on PostgreSQL its row locks (file, then copies) can deadlock with a writer
        # taking them the other way round; the loser runs again (idempotent: it re-reads).
        return await self._retrying_write(replication.begin_delete, replica_id)

    async def begin_evict(self, replica_id: int) -> bool:
        """An operator's claim (``spool rse evict``): whatever the copy's tombstone."""
        return await self._retrying_write(replication.begin_evict, replica_id)

    async def finish_delete(
        self, item: Reapable, *, by: str = "replicator", why: str = "no rule needs it"
    ) -> bool:
        """True when a live lock held the copy by then: it was asked for again (outbox)."""
        return await self._retrying_write(lambda c: replication.finish_delete(c, item, by=by, why=why))

    async def copies_on(
        self, storage: str, *, dataset: str | None = None, names: Sequence[str] = ()
    ) -> list[Reapable]:
        return await self._transaction(
            lambda c: replication.copies_on(c, storage, dataset=dataset, names=names), write=False
        )
