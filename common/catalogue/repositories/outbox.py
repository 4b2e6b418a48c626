"""``catalogue.outbox``: events recorded with the facts they state, sent later by the relay."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.catalogue import outbox as db
from common.catalogue.repositories import Repository
from common.messages import Message


class OutboxRepository(Repository):
    __slots__ = ()

    async def add(self, messages: Sequence[Message], correlation_id: str | None = None) -> None:
        await self._catalogue.write(db.add, messages, correlation_id)

    async def unsent(self, limit: int) -> list[db.Pending]:
        return await self._catalogue.read(db.unsent, limit)

    async def claim_unsent(
        self, limit: int, claimant: str, now: datetime, until: datetime
    ) -> list[db.Pending]:
        return await self._catalogue.write(db.claim_unsent, limit, claimant, now, until)

    async def release_claims(self, claimant: str) -> None:
        await self._catalogue.write(db.release_claims, claimant)

    async def mark_sent(self, seqs: Sequence[int]) -> None:
        await self._catalogue.write(db.mark_sent, seqs)

    async def backlog(self) -> int:
        return await self._catalogue.read(db.backlog)

    async def prune(self, before: datetime | None = None) -> int:
        return await self._catalogue.write(db.prune, before)
