"""``catalogue.datasets``: a dataset's lifecycle and deletion (see ``common.catalogue.datasets``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.catalogue import datasets as db
from common.catalogue.dataset_view import DatasetView, dataset_view
from common.catalogue.repositories import Repository
from common.messages import Message


class DatasetRepository(Repository):
    __slots__ = ()

    async def close(self, name: str, by: str, now: datetime) -> db.CloseOutcome:
        return await self._catalogue.write(db.close, name, by, now)

    async def auto_close(self, idle_since: datetime, now: datetime) -> list[str]:
        """Close the open datasets idle since before ``idle_since``; their names."""
        return await self._catalogue.write(db.auto_close, idle_since, now)

    async def advance(self, settled_before: datetime, now: datetime) -> list[Message]:
        """Closed datasets with all their copies -> complete / archived; the events queued."""
        return await self._catalogue.write(db.advance, settled_before, now)

    async def request_delete(self, name: str, by: str, force: bool, now: datetime) -> db.DeleteRequest:
        return await self._catalogue.write(db.request_delete, name, by, force, now)

    async def doomed_copies(self, limit: int) -> list[db.DoomedCopy]:
        return await self._catalogue.read(db.doomed_copies, limit)

    async def copy_deleted(self, copy: db.DoomedCopy, now: datetime) -> None:
        await self._catalogue.write(db.copy_deleted, copy, now)

    async def settle_deletions(self, now: datetime) -> list[str]:
        return await self._catalogue.write(db.settle_deletions, now)

    async def states(self, names: Sequence[str]) -> dict[str, str]:
        return await self._catalogue.read(db.states, names)

    async def show(self, name: str, now: datetime, *, wanted: bool = False) -> DatasetView | None:
        return await self._catalogue.read(dataset_view, name, now, wanted)
