"""``catalogue.instances``: running daemon processes, their leases, and role leases."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from common.catalogue import instances as db
from common.catalogue import stalls
from common.catalogue.repositories import Repository


class InstanceRepository(Repository):
    __slots__ = ()

    async def register(self, info: db.InstanceInfo) -> None:
        await self._catalogue.write(db.register, info)

    async def renew(self, instance_id: str, now: datetime, expires: datetime) -> bool:
        return await self._catalogue.write(db.renew, instance_id, now, expires)

    async def forget(self, instance_id: str) -> None:
        await self._catalogue.write(db.forget, instance_id)

    async def listing(self, daemon: str | None = None) -> list[db.InstanceInfo]:
        return await self._catalogue.read(db.listing, daemon)

    async def live_ids(self, daemon: str, now: datetime) -> list[str]:
        return await self._catalogue.read(db.live_ids, daemon, now)

    async def prune(self, before: datetime) -> int:
        return await self._catalogue.write(db.prune, before)

    async def claim_role(self, role: str, holder: str, now: datetime, expires: datetime) -> bool:
        return await self._catalogue.write(db.claim_role, role, holder, now, expires)

    async def release_role(self, role: str, holder: str) -> None:
        await self._catalogue.write(db.release_role, role, holder)

    async def role_holder(self, role: str, now: datetime) -> str | None:
        return await self._catalogue.read(db.role_holder, role, now)

    async def stalled_work(self, limits: Mapping[str, float], now: datetime) -> list[stalls.StalledWork]:
        """Tape writes, tape reads and recalls in progress longer than their limit, by holder."""
        return await self._catalogue.read(stalls.stalled, limits, now)
