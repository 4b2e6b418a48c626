"""``catalogue.endpoints``: the storage endpoints, their operator state and their health."""

from __future__ import annotations

from collections.abc import Mapping

from common.catalogue import queries, replication, writes
from common.catalogue.models import EndpointInfo
from common.catalogue.replication import EndpointUsage
from common.catalogue.repositories import Repository
from common.catalogue.writes import EndpointState
from common.config import StorageEndpoint


class EndpointRepository(Repository):
    __slots__ = ()

    async def sync(self, endpoints: Mapping[str, StorageEndpoint]) -> None:
        """Make the catalogue's endpoint rows match the configuration."""
        async with self._catalogue.begin() as conn:
            await writes.sync_endpoints(conn, endpoints)

    async def set_state(self, name: str, state: EndpointState) -> None:
        async with self._catalogue.begin() as conn:
            await writes.set_endpoint_state(conn, name, state)

    async def all(self) -> list[EndpointInfo]:
        async with self._catalogue.connect() as conn:
            return await queries.endpoints(conn)

    async def set_health(self, storage: str, health: str, reason: str | None = None) -> None:
        await self._catalogue.write(replication.set_health, storage, health, reason, retry=False)

    async def usage(self) -> list[EndpointUsage]:
        return await self._catalogue.read(replication.endpoint_usage)
