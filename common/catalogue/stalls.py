"""Work the catalogue shows in progress for too long: what the monitor calls stalled.

Three kinds are seen in the catalogue (a delivery held by a handler is seen in the heartbeats):

- ``tape_write``: tape copies ``archiving`` (taken into a write batch) not moved for longer than
  the limit, by holder (the tape instance, ``replicas.holder``);
- ``tape_read``: recall files ``staging`` (their window being read) for longer than the limit, by
  holder (the recall instance, ``recall_files.holder``);
- ``recall``: recall requests ``active`` whose last progress (``recalls.updated``: a file served,
  read or failed) is older than the limit.

Each answer names the holder (an instance id, ``daemon@node:pid:random``, or None for work
nobody holds), how many items, the oldest item's time and one example. The statements read only
rows in those states, through the indexes that lead with state: a handful of rows, not the
catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, func, select

from common.catalogue.schema import files, recall_files, recalls, replicas, storage_endpoints


@dataclass(frozen=True)
class StalledWork:
    kind: str  # tape_write | tape_read | recall
    holder: str | None  # the instance holding it; None: nobody (a request waiting)
    items: int
    since: datetime  # the oldest item's last change
    example: str


def stalled(conn: Connection, limits: Mapping[str, float], now: datetime) -> list[StalledWork]:
    out: list[StalledWork] = []
    if "tape_write" in limits:
        out += _tape_writes(conn, now - timedelta(seconds=limits["tape_write"]))
    if "tape_read" in limits:
        out += _tape_reads(conn, now - timedelta(seconds=limits["tape_read"]))
    if "recall" in limits:
        out += _recalls(conn, now - timedelta(seconds=limits["recall"]))
    return out


def _tape_writes(conn: Connection, before: datetime) -> list[StalledWork]:
    r, ep = replicas, storage_endpoints
    tape_ids = list(conn.scalars(select(ep.c.id).where(ep.c.kind == "tape")))
    if not tape_ids:
        return []
    stmt = (
        select(
            r.c.holder, func.count(), func.min(r.c.updated), func.min(files.c.name), func.min(r.c.cartridge)
        )
        .join(files, files.c.id == r.c.file_id)
        .where(r.c.storage_id.in_(tape_ids), r.c.state == "archiving", r.c.updated < before)
        .group_by(r.c.holder)
    )
    return [
        StalledWork("tape_write", holder, n, since, f"{name} on {vid or 'no cartridge yet'}")
        for holder, n, since, name, vid in conn.execute(stmt)
    ]


def _tape_reads(conn: Connection, before: datetime) -> list[StalledWork]:
    rf = recall_files
    stmt = (
        select(
            rf.c.holder, func.count(), func.min(rf.c.updated), func.min(rf.c.name), func.min(rf.c.cartridge)
        )
        .where(rf.c.state == "staging", rf.c.updated < before)
        .group_by(rf.c.holder)
    )
    return [
        StalledWork("tape_read", holder, n, since, f"{name} from {vid}")
        for holder, n, since, name, vid in conn.execute(stmt)
    ]


def _recalls(conn: Connection, before: datetime) -> list[StalledWork]:
    stmt = select(recalls.c.id, recalls.c.updated, recalls.c.done, recalls.c.failed, recalls.c.files).where(
        recalls.c.state == "active", recalls.c.updated < before
    )
    rows = conn.execute(stmt.order_by(recalls.c.updated)).all()
    if not rows:
        return []
    first = rows[0]
    example = f"recall {first.id}: {first.done + first.failed} of {first.files} files settled"
    return [StalledWork("recall", None, len(rows), first.updated, example)]
