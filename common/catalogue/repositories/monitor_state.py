"""``MonitorStateRepository``: the monitor's saved state (``common.catalogue.monitor_state``).

Made by the monitor from its catalogue (``MonitorStateRepository(catalogue)``): only the monitor
reads or writes it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from common.catalogue import monitor_state as db
from common.catalogue.repositories import Repository


class MonitorStateRepository(Repository):
    __slots__ = ()

    async def save(self, name: str, role: str, holder: str, doc: dict[str, Any], now: datetime) -> bool:
        return await self._catalogue.write(db.save, name, role, holder, doc, now)

    async def load(self, name: str) -> db.SavedState | None:
        return await self._catalogue.read(db.load, name)
