"""``catalogue.recall``: recall requests and their files (states in ``common.catalogue.recall``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.catalogue import recall as db
from common.catalogue.repositories import Repository


class RecallRepository(Repository):
    __slots__ = ()

    async def create_recall(self, spec: db.RecallSpec) -> db.Created | None:
        return await self._catalogue.write(db.create_recall, spec)

    async def recover(self, now: datetime | None = None) -> int:
        return await self._catalogue.write(db.recover, now)

    async def claim_cartridge(self, library: str, vid: str, holder: str, now: datetime) -> bool:
        return await self._catalogue.write(db.claim_cartridge, library, vid, holder, now)

    async def release_cartridge(self, library: str, vid: str, holder: str) -> None:
        await self._catalogue.write(db.release_cartridge, library, vid, holder)

    async def cartridges_held(self, now: datetime, but: str | None = None) -> set[tuple[str, str]]:
        return await self._catalogue.read(db.cartridges_held, now, but)

    async def let_go(self, holder: str) -> int:
        return await self._catalogue.write(db.let_go, holder)

    async def pending(self, limit: int, recall_id: str | None = None) -> list[db.PendingFile]:
        return await self._catalogue.read(db.pending, limit, recall_id)

    async def assign(self, plan: Sequence[tuple[str, str, db.TapeCopy | None]]) -> None:
        await self._catalogue.write(db.assign, plan)

    async def next_on_cartridge(self, storages: Sequence[str], vid: str, after: int) -> list[db.ReadItem]:
        return await self._catalogue.read(db.next_on_cartridge, storages, vid, after)

    async def window_on_cartridge(
        self, storages: Sequence[str], vid: str, after: int, limit: int
    ) -> list[db.ReadItem]:
        return await self._catalogue.read(db.window_on_cartridge, storages, vid, after, limit)

    async def set_state(
        self,
        keys: Sequence[tuple[str, str]],
        state: str,
        forget_copy: bool = False,
        holder: str | None = None,
        now: datetime | None = None,
    ) -> list[tuple[str, str]]:
        return await self._catalogue.write(db.set_state, keys, state, forget_copy, holder, now)

    async def deliver(self, dl: db.Delivery, holder: str | None = None) -> db.Settled | None:
        return await self._catalogue.write(db.deliver, dl, holder)

    async def deliver_many(
        self, deliveries: Sequence[db.Delivery], holder: str | None = None
    ) -> tuple[db.Settled, tuple[int, ...]]:
        return await self._catalogue.write(db.deliver_many, deliveries, holder)

    async def fail(
        self, keys: Sequence[tuple[str, str]], reason: str, error: str, holder: str | None = None
    ) -> db.Settled:
        return await self._catalogue.write(db.fail, keys, reason, error, holder)

    async def tape_copy_bad(self, file_id: int, storage: str, reason: str, error: str) -> bool:
        return await self._catalogue.write(db.tape_copy_bad, file_id, storage, reason, error)

    async def complete_settled(self, limit: int = 1000) -> tuple[db.Completion, ...]:
        return await self._catalogue.write(db.complete_settled, limit)

    async def mark_announced(self, settled: db.Settled) -> None:
        await self._catalogue.write(db.mark_announced, settled)

    async def unannounced(self, limit: int = 10_000) -> db.Settled:
        return await self._catalogue.read(db.unannounced, limit)

    async def status(self, recall_id: str) -> db.RecallView | None:
        return await self._catalogue.read(db.status, recall_id)

    async def summary(
        self, recall_id: str, with_waiting: bool = False, limit: int | None = None
    ) -> db.RecallSummary | None:
        return await self._catalogue.read(db.summary, recall_id, with_waiting, limit)

    async def list_recalls(self, limit: int, active_only: bool = False) -> list[db.RecallView]:
        return await self._catalogue.read(db.list_recalls, limit, active_only)
