"""``catalogue.transfers``: the replicator's limits per endpoint shared by its instances (transfer
slots, the shared circuit breaker; ``common.catalogue.transfers``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from common.catalogue import transfers as db
from common.catalogue.repositories import Repository
from common.messages import Message


class TransferRepository(Repository):
    __slots__ = ()

    # --- slots ----------------------------------------------------------------------------------
    async def sync_slots(self, limits: Mapping[str, int]) -> None:
        await self._catalogue.write(db.sync_slots, dict(limits))

    async def claim_slots(self, storage: str, limit: int, holder: str, wanted: int, now: datetime) -> int:
        return await self._catalogue.write(db.claim_slots, storage, limit, holder, wanted, now)

    async def release_slots(self, storage: str, holder: str, count: int, still_waiting: bool) -> int:
        return await self._catalogue.write(db.release_slots, storage, holder, count, still_waiting)

    async def others_waiting(self, storage: str, holder: str, now: datetime) -> bool:
        return await self._catalogue.read(db.others_waiting, storage, holder, now)

    async def release_all(self, holder: str, storage: str | None = None) -> int:
        return await self._catalogue.write(db.release_all, holder, storage)

    async def slot_holders(self, storage: str, now: datetime) -> dict[str, int]:
        return await self._catalogue.read(db.slot_holders, storage, now)

    # --- the shared breaker ---------------------------------------------------------------------
    async def views(self) -> dict[str, db.EndpointView]:
        return await self._catalogue.read(db.endpoint_views)

    async def pause(self, storage: str, reason: str, cooldown: float, now: datetime, event: Message) -> bool:
        return await self._catalogue.write(db.pause, storage, reason, cooldown, now, event)

    async def claim_probe(self, storage: str, holder: str, now: datetime) -> bool:
        return await self._catalogue.write(db.claim_probe, storage, holder, now)

    async def release_probe(self, storage: str, holder: str) -> None:
        await self._catalogue.write(db.release_probe, storage, holder)

    async def probe_failed(
        self, storage: str, holder: str, reason: str, base: float, maximum: float, now: datetime
    ) -> float | None:
        return await self._catalogue.write(db.probe_failed, storage, holder, reason, base, maximum, now)

    async def resume(self, storage: str, now: datetime, event: Callable[[float, int], Message]) -> bool:
        return await self._catalogue.write(db.resume, storage, now, event)
