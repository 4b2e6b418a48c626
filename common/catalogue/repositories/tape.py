"""``catalogue.tape``: the tape daemon's queue, batches and cartridges (see ``common.catalogue.tape``)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from common.catalogue import tape as db
from common.catalogue.repositories import Repository
from common.catalogue.sql import utcnow
from common.messages import FileFailed


class TapeRepository(Repository):
    __slots__ = ()

    async def ensure_queued(self, name: str, storage: str, priority: int) -> db.TapeCopy | None:
        return await self._catalogue.write(db.ensure_queued, name, storage, priority)

    async def ensure_queued_many(self, wanted: Sequence[db.Wanted]) -> list[db.TapeCopy | None]:
        return await self._catalogue.write(db.ensure_queued_many, wanted)

    async def queue_stats(self, storages: Sequence[str]) -> list[db.QueueStats]:
        return await self._catalogue.read(db.queue_stats, storages)

    async def queue_head(self, storage: str, limit: int) -> list[db.Candidate]:
        return await self._catalogue.read(db.queue_head, storage, limit)

    async def take_batch(
        self, replica_ids: Sequence[int], cartridge: str, *, holder: str
    ) -> list[db.BatchFile]:
        return await self._catalogue.write(partial(db.take_batch, holder=holder), replica_ids, cartridge)

    async def point_to(self, replica_ids: Sequence[int], cartridge: str, *, holder: str) -> None:
        await self._catalogue.write(partial(db.point_to, holder=holder), replica_ids, cartridge)

    async def requeue(self, replica_ids: Sequence[int], *, holder: str) -> int:
        return await self._catalogue.write(partial(db.requeue, holder=holder), replica_ids)

    async def mark_failed(self, replica_id: int, event: FileFailed | None = None, *, holder: str) -> bool:
        return await self._catalogue.write(partial(db.mark_failed, holder=holder), replica_id, event)

    async def record_archived(self, records: Sequence[db.Archived], *, holder: str) -> list[db.Archived]:
        return await self._catalogue.write(partial(db.record_archived, holder=holder), records)

    async def in_flight(self, storages: Sequence[str]) -> list[db.InFlight]:
        return await self._catalogue.read(db.in_flight, storages)

    async def settleable(
        self, storages: Sequence[str], holder: str, idle: Sequence[str]
    ) -> list[db.InFlight]:
        """The ``archiving`` copies ``holder`` may settle (``db.settleable``), as of now."""
        return await self._catalogue.read(db.settleable, storages, holder, idle, utcnow())

    async def take_over(self, replica_ids: Sequence[int], holder: str) -> list[int]:
        """Take the settleable copies among ``replica_ids`` for ``holder`` (``db.take_over``)."""
        return await self._catalogue.write(db.take_over, replica_ids, holder, utcnow())

    async def files_per_cartridge(self) -> dict[str, int]:
        return await self._catalogue.read(db.files_per_cartridge)

    async def ingest_correlations(self, names: Sequence[str]) -> dict[str, str]:
        """The correlation id ingest gave each named file (its file.ready's event id)."""
        return await self._catalogue.read(db.ingest_correlations, names)
