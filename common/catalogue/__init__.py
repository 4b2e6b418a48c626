"""The catalogue: the truth about files, datasets, replicas, requests and their history.

``Catalogue`` is the one object daemons and the CLI hold. It owns an async engine (SQLite by
default, PostgreSQL when the URL says so), brings the schema to the latest migration when opened,
and keeps transaction scope out of callers' hands: each method is one transaction, and every write
transaction on SQLite takes the write lock up front (see ``engine``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from common.catalogue import ingest, queries, writes
from common.catalogue.engine import create_engine, migrate, normalise_url, writer
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
from common.catalogue.sql import UnknownStorageError, is_transient_conflict
from common.catalogue.writes import EndpointState
from common.config import StorageEndpoint

__all__ = [
    "Catalogue",
    "Counts",
    "DatasetInfo",
    "EndpointInfo",
    "EndpointState",
    "EventInfo",
    "FileInfo",
    "FileView",
    "IngestRecord",
    "MetaFilter",
    "Outcome",
    "RegisterOutcome",
    "Relative",
    "ReplicaInfo",
    "RequestInfo",
    "UnknownStorageError",
    "check_metadata",
    "normalise_url",
    "parse_filter",
]

# A concurrent writer (PostgreSQL, several ingest nodes) registering the same name makes the batch
# fail on the unique key (or, rarely, a deadlock); run it again and it sees the other's row.
_REGISTER_TRIES = 3


class Catalogue:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._writer = writer(engine)

    @classmethod
    async def open(cls, url: str, *, echo: bool = False) -> Catalogue:
        """Connect and migrate to head (idempotent; safe when several daemons start at once)."""
        engine = create_engine(url, echo=echo)
        try:
            await migrate(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    async def close(self) -> None:
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
        async with self._writer.begin() as conn:
            await writes.sync_endpoints(conn, endpoints)

    async def set_endpoint_state(self, name: str, state: EndpointState) -> None:
        async with self._writer.begin() as conn:
            await writes.set_endpoint_state(conn, name, state)

    async def endpoints(self) -> list[EndpointInfo]:
        async with self._engine.connect() as conn:
            return await queries.endpoints(conn)

    # --- ingest --------------------------------------------------------------------------------
    async def lookup_files(self, names: Sequence[str]) -> dict[str, FileInfo]:
        async with self._engine.connect() as conn:
            found = await ingest.lookup(conn, names)
        return {name: info for name, (_, info) in found.items()}

    async def request_state(self, ids: Sequence[str]) -> dict[str, RequestInfo]:
        async with self._engine.connect() as conn:
            return await queries.request_state(conn, ids)

    async def register_ingested(self, records: Sequence[IngestRecord]) -> list[RegisterOutcome]:
        """Register a batch in one transaction; one outcome per record, in order (see ``ingest``)."""
        if not records:
            return []
        for attempt in range(1, _REGISTER_TRIES + 1):
            try:
                async with self._writer.begin() as conn:
                    return await ingest.register(conn, records)
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
        async with self._writer.begin() as conn:
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
        async with self._writer.begin() as conn:
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
        async with self._writer.begin() as conn:
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
        async with self._writer.begin() as conn:
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
