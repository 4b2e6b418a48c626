"""``catalogue.metadata``: metadata set and removed after ingest, the fields in use, a dataset's
history (see ``common.catalogue.metadata``)."""

from __future__ import annotations

from common.catalogue import metadata as db
from common.catalogue.repositories import Repository
from common.messages import MetaValue


class MetadataRepository(Repository):
    __slots__ = ()

    async def apply(self, change: db.MetadataChange) -> db.ChangeOutcome:
        """One change in one transaction: ``changed``, or ``duplicate`` for an id already applied."""
        return await self._catalogue.write(db.apply, change)

    async def fields(self) -> list[db.FieldUse]:
        return await self._catalogue.read(db.fields)

    async def of_dataset(self, name: str) -> dict[str, MetaValue] | None:
        """A dataset's metadata; None when there is no such dataset."""
        return await self._catalogue.read(db.of_dataset, name)
