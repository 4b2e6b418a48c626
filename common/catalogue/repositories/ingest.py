"""``catalogue.ingest``: the ingest daemon's hot path (see ``common.catalogue.ingest``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from common.catalogue import ingest as db
from common.catalogue import ingest_claims
from common.catalogue.models import FileInfo, IngestRecord, RegisterOutcome
from common.catalogue.repositories import Repository


class IngestRepository(Repository):
    __slots__ = ()

    async def lookup_files(self, names: Sequence[str]) -> dict[str, FileInfo]:
        found = await self._catalogue.read(db.lookup, names)
        return {name: info for name, (_, info) in found.items()}

    async def known(self, ids: Sequence[str], names: Sequence[str]) -> tuple[set[str], dict[str, FileInfo]]:
        """Event ids already done, and registered files among ``names``: one round trip for ingest."""
        return await self._catalogue.read(db.known, ids, names)

    async def prior_requests(
        self, ids: Sequence[str], names: Sequence[str]
    ) -> tuple[dict[str, db.PriorRequest], dict[str, FileInfo]]:
        return await self._catalogue.read(db.prior_requests, ids, names)

    async def before_copy(
        self, ids: Sequence[str], names: Sequence[str], datasets: Sequence[str]
    ) -> tuple[dict[str, db.PriorRequest], dict[str, FileInfo], dict[str, str]]:
        """What ingest asks before copying, in one round trip: event ids, names, datasets' states."""
        return await self._catalogue.read(db.before_copy, ids, names, datasets)

    async def replica_recorded(self, name: str, storage: str) -> bool:
        return await self._catalogue.read(db.replica_recorded, name, storage)

    async def register(self, records: Sequence[IngestRecord]) -> list[RegisterOutcome]:
        """Register a batch in one transaction; one outcome per record, in order (see ``ingest``).
        Run again when it loses a race for a name with another node (PostgreSQL)."""
        if not records:
            return []
        return await self._catalogue.write(db.register, records)

    async def claim_names(self, names: Sequence[str], holder: str, now: datetime) -> dict[str, str]:
        """Claim new names before copying them; the refused ones with their live holders
        (``common.catalogue.ingest_claims``)."""
        return await self._catalogue.write(ingest_claims.claim, names, holder, now)

    async def release_names(self, names: Sequence[str], holder: str) -> None:
        await self._catalogue.write(ingest_claims.release, names, holder)

    async def drop_dead_claims(self, now: datetime) -> int:
        return await self._catalogue.write(ingest_claims.drop_dead, now)
