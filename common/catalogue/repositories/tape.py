"""``catalogue.tape``: the tape daemon's queue, batches and cartridges (see ``common.catalogue.tape``)."""

from __future__ import annotations

from collections.abc import Sequence

from common.catalogue import tape as db
from common.catalogue.repositories import Repository
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

    async def take_batch(self, replica_ids: Sequence[int], cartridge: str) -> list[db.BatchFile]:
        return await self._catalogue.write(db.take_batch, replica_ids, cartridge)

    async def point_to(self, replica_ids: Sequence[int], cartridge: str) -> None:
        await self._catalogue.write(db.point_to, replica_ids, cartridge)

    async def requeue(self, replica_ids: Sequence[int]) -> int:
        return await self._catalogue.write(db.requeue, replica_ids)

    async def mark_failed(self, replica_id: int, event: FileFailed | None = None) -> bool:
        return await self._catalogue.write(db.mark_failed, replica_id, event)

    async def record_archived(self, records: Sequence[db.Archived]) -> list[db.Archived]:
        return await self._catalogue.write(db.record_archived, records)

    async def in_flight(self, storages: Sequence[str]) -> list[db.InFlight]:
        return await self._catalogue.read(db.in_flight, storages)

    async def files_per_cartridge(self) -> dict[str, int]:
        return await self._catalogue.read(db.files_per_cartridge)

    async def ingest_correlations(self, names: Sequence[str]) -> dict[str, str]:
        """The correlation id ingest gave each named file (its file.ready's event id)."""
        return await self._catalogue.read(db.ingest_correlations, names)
