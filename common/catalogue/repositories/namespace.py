"""``catalogue.namespace``: the DIRAC-style namespace questions (``common.catalogue.namespace``),
each a read, each page one statement. Used by ``spool ls --dirs``, ``spool du``, ``spool lfn``,
``spool rse dump`` and the monitor's HTTP query API."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from common.catalogue import namespace
from common.catalogue.filters import MetaFilter
from common.catalogue.models import DatasetInfo, FileInfo
from common.catalogue.namespace import (
    DirectorySize,
    DumpRow,
    Entry,
    Existence,
    MetadataField,
    ReplicaRow,
)
from common.catalogue.repositories import Repository


class NamespaceRepository(Repository):
    __slots__ = ()

    async def list_directory(
        self, path: str, *, after: tuple[str, int] | None = None, limit: int = 1000
    ) -> list[Entry]:
        async with self._catalogue.connect() as conn:
            return await namespace.list_directory(conn, path, after=after, limit=limit)

    async def directory_size(self, path: str) -> DirectorySize:
        async with self._catalogue.connect() as conn:
            return await namespace.directory_size(conn, path)

    async def exists(self, names: Sequence[str]) -> list[Existence]:
        async with self._catalogue.connect() as conn:
            return await namespace.exists(conn, names)

    async def lfn_for_pfn(self, endpoint: str, physical: str) -> str | None:
        """``UnknownEndpoint`` when ``endpoint`` is not in the catalogue."""
        async with self._catalogue.connect() as conn:
            return await namespace.lfn_for_pfn(conn, endpoint, physical)

    async def dump_page(self, endpoint: str, *, after: int | None = None, limit: int = 1000) -> list[DumpRow]:
        """``UnknownEndpoint`` when ``endpoint`` is not in the catalogue."""
        async with self._catalogue.connect() as conn:
            return await namespace.dump(conn, endpoint, after=after, limit=limit)

    async def dump(self, endpoint: str, *, page: int = 5000) -> AsyncIterator[DumpRow]:
        """Every replica on ``endpoint``, a page (one short read transaction) at a time: constant
        memory whatever the endpoint holds, and no transaction held open while the caller writes."""
        after: int | None = None
        while True:
            rows = await self.dump_page(endpoint, after=after, limit=page)
            for row in rows:
                yield row
            if len(rows) < page:
                return
            after = rows[-1].id

    async def replicas(self, names: Sequence[str]) -> list[ReplicaRow]:
        async with self._catalogue.connect() as conn:
            return await namespace.replicas(conn, names)

    async def find_page(
        self,
        filters: Sequence[MetaFilter],
        *,
        dataset: str | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> list[FileInfo]:
        async with self._catalogue.connect() as conn:
            return await namespace.find_page(conn, filters, dataset=dataset, after=after, limit=limit)

    async def datasets_page(self, *, after: str | None = None, limit: int = 1000) -> list[DatasetInfo]:
        async with self._catalogue.connect() as conn:
            return await namespace.datasets_page(conn, after=after, limit=limit)

    async def metadata_fields(self) -> list[MetadataField]:
        async with self._catalogue.connect() as conn:
            return await namespace.metadata_fields(conn)
