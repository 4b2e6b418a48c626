"""``catalogue.queries``: read views for the CLI, the monitor and the status report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from common.catalogue import find, metadata, queries, releases
from common.catalogue.failures import failure_groups
from common.catalogue.filters import MetaFilter, parse_filter
from common.catalogue.find import FoundFile
from common.catalogue.models import Counts, DatasetInfo, EventInfo, FileInfo, FileView, Relative, RequestInfo
from common.catalogue.repositories import Repository


class QueryRepository(Repository):
    __slots__ = ()

    async def request_state(self, ids: Sequence[str]) -> dict[str, RequestInfo]:
        async with self._catalogue.connect() as conn:
            return await queries.request_state(conn, ids)

    async def show_file(self, name: str) -> FileView | None:
        async with self._catalogue.connect() as conn:
            return await queries.show_file(conn, name)

    async def list_files(
        self, *, dataset: str | None = None, prefix: str | None = None, limit: int = 1000, offset: int = 0
    ) -> list[FileInfo]:
        async with self._catalogue.connect() as conn:
            return await queries.list_files(conn, dataset=dataset, prefix=prefix, limit=limit, offset=offset)

    async def release_contents(self, dataset: str) -> releases.ReleaseContents | None:
        """A dataset's state and files with their sha256, for its release manifest."""
        async with self._catalogue.connect() as conn:
            return await releases.release_contents(conn, dataset)

    async def list_datasets(self, *, state: str | None = None) -> list[DatasetInfo]:
        async with self._catalogue.connect() as conn:
            return await queries.list_datasets(conn, state=state)

    async def find_files(
        self, filters: Sequence[MetaFilter | str], *, dataset: str | None = None, limit: int = 1000
    ) -> list[FileInfo]:
        """Files matching every filter (strings are parsed with ``parse_filter``), by name."""
        parsed = [parse_filter(x) if isinstance(x, str) else x for x in filters]
        async with self._catalogue.connect() as conn:
            return await queries.find_files(conn, parsed, dataset=dataset, limit=limit)

    async def find_detailed(
        self, filters: Sequence[MetaFilter | str], *, dataset: str | None = None, limit: int = 1000
    ) -> list[FoundFile]:
        """As ``find_files``, each file with its metadata, its dataset's and its replicas."""
        parsed = [parse_filter(x) if isinstance(x, str) else x for x in filters]
        async with self._catalogue.connect() as conn:
            rows = await find.find(conn, parsed, dataset=dataset, limit=limit)
            return await find.details(conn, rows)

    async def dataset_history(self, name: str) -> list[dict[str, Any]]:
        return await self._catalogue.read(metadata.dataset_history, name)

    async def ancestors(self, name: str, *, max_depth: int = 100) -> list[Relative]:
        async with self._catalogue.connect() as conn:
            return await queries.relatives(conn, name, up=True, max_depth=max_depth)

    async def descendants(self, name: str, *, max_depth: int = 100) -> list[Relative]:
        async with self._catalogue.connect() as conn:
            return await queries.relatives(conn, name, up=False, max_depth=max_depth)

    async def history(self, name: str) -> list[EventInfo]:
        async with self._catalogue.connect() as conn:
            return await queries.history(conn, name)

    async def failed_requests(self, limit: int = 100, *, include_retrying: bool = False) -> list[RequestInfo]:
        states = ("failed", "retrying") if include_retrying else ("failed",)
        async with self._catalogue.connect() as conn:
            return await queries.requests_in(conn, states, limit)

    async def failure_groups(self) -> list[dict[str, Any]]:
        """Failed and retrying requests as failure groups, biggest first (``spool status``)."""
        return await self._catalogue.read(failure_groups)

    async def counts(self) -> Counts:
        async with self._catalogue.connect() as conn:
            return await queries.counts(conn)
