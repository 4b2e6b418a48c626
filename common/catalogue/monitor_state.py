"""The monitor's saved state: one JSON document per name, written only by the role's holder.

Two monitors may run on one catalogue, one of them active (the holder of the ``monitor`` role in
``role_leases``, see ``common.catalogue.instances``). The active one saves what it counted here
every few seconds; whichever instance becomes active next starts from the saved document
(``daemons.monitor.snapshot``).

``save`` writes only while ``holder`` holds the role, checked in the same transaction with the
role's row locked (``FOR UPDATE`` on PostgreSQL; SQLite runs one writer at a time anyway): a
successor's claim waits for a save under way, so every save it does not see was refused. A monitor
whose lease ran out can therefore never overwrite its successor's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from common.catalogue.schema import monitor_state, role_leases


@dataclass(frozen=True)
class SavedState:
    name: str
    doc: dict[str, Any]
    saved_by: str
    saved_at: datetime


def save(conn: Connection, name: str, role: str, holder: str, doc: dict[str, Any], now: datetime) -> bool:
    """Write ``doc`` under ``name`` if ``holder`` holds ``role`` now; whether it was written."""
    held = conn.execute(
        select(role_leases.c.holder)
        .where(role_leases.c.role == role, role_leases.c.expires >= now)
        .with_for_update()
    ).scalar()
    if held != holder:
        return False
    values = {"doc": doc, "saved_by": holder, "saved_at": now}
    done = conn.execute(update(monitor_state).where(monitor_state.c.name == name).values(**values))
    if done.rowcount == 0:
        conn.execute(insert(monitor_state).values(name=name, **values))
    return True


def load(conn: Connection, name: str) -> SavedState | None:
    row = conn.execute(select(monitor_state).where(monitor_state.c.name == name)).first()
    return None if row is None else SavedState(row.name, row.doc, row.saved_by, row.saved_at)
