"""Instances of the daemons and their leases: who is alive, who holds which work.

Several instances of one daemon may share a catalogue (on one node or several). Each process
registers a row in ``instances`` with a lease it renews (``common.instance.InstanceLease``); a
row whose ``expires`` has passed is a dead instance, whatever its process may still be doing.
Work an instance takes names it as ``holder`` (``replicas.holder`` for a tape copy
``archiving``, ``recall_files.holder`` for a file ``staging``, ``ingest_claims.holder``), so a
successor settles only what dead instances held (``held_by_dead``), never a live neighbour's.

A lease that ran out is never renewed (``renew`` returns False): by then a successor may have
taken the work over, and the instance must stop rather than finish it twice.

Role leases (``role_leases``) give one instance at a time a role (the active monitor): taken when
free or expired, kept by renewing, released at a clean stop.

Times are the callers' clocks (UTC): the nodes' clocks must agree to well within a lease (NTP).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, insert, or_, select, update

from common.catalogue.schema import instances, role_leases


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    daemon: str
    node: str
    pid: int
    started: datetime
    renewed: datetime
    expires: datetime


def register(conn: Connection, info: InstanceInfo) -> None:
    conn.execute(insert(instances).values(**info.__dict__))


def renew(conn: Connection, instance_id: str, now: datetime, expires: datetime) -> bool:
    """Extend a lease that has not run out; False when it has (or the row is gone)."""
    done = conn.execute(
        update(instances)
        .where(instances.c.id == instance_id, instances.c.expires >= now)
        .values(renewed=now, expires=expires)
    )
    return done.rowcount == 1


def forget(conn: Connection, instance_id: str) -> None:
    """A clean stop: the instance is gone at once, what it still holds is anyone's to settle."""
    conn.execute(delete(instances).where(instances.c.id == instance_id))


def listing(conn: Connection, daemon: str | None = None) -> list[InstanceInfo]:
    stmt = select(instances).order_by(instances.c.daemon, instances.c.node, instances.c.started)
    if daemon is not None:
        stmt = stmt.where(instances.c.daemon == daemon)
    return [InstanceInfo(**row._mapping) for row in conn.execute(stmt)]


def live_ids(conn: Connection, daemon: str, now: datetime) -> list[str]:
    stmt = select(instances.c.id).where(instances.c.daemon == daemon, instances.c.expires > now)
    return list(conn.scalars(stmt.order_by(instances.c.id)))


def prune(conn: Connection, before: datetime) -> int:
    """Remove rows of instances whose lease ran out before ``before`` (their work was settled by
    then: a successor settles within a scheduler round of the expiry)."""
    return conn.execute(delete(instances).where(instances.c.expires < before)).rowcount or 0


def held_by_dead(holder: ColumnElement[Any], now: datetime) -> ColumnElement[bool]:
    """The condition "no live instance holds this row": no holder, or one whose lease ran out
    (or whose row is gone). For the statements that settle a dead instance's work."""
    live = select(instances.c.id).where(instances.c.expires > now)
    return or_(holder.is_(None), holder.not_in(live.scalar_subquery()))


# --- roles ---------------------------------------------------------------------------------------
def claim_role(conn: Connection, role: str, holder: str, now: datetime, expires: datetime) -> bool:
    """Take ``role`` for ``holder`` until ``expires`` when it is free, expired or already its own."""
    taken = conn.execute(
        update(role_leases)
        .where(role_leases.c.role == role, or_(role_leases.c.holder == holder, role_leases.c.expires < now))
        .values(holder=holder, expires=expires)
    )
    if taken.rowcount == 1:
        return True
    if conn.execute(select(role_leases.c.role).where(role_leases.c.role == role)).first() is not None:
        return False  # held by another, unexpired
    # Nobody has ever held it. Two claimants may insert at once: the loser's transaction fails
    # on the primary key and is run again by ``Catalogue.write`` (a transient conflict).
    conn.execute(insert(role_leases).values(role=role, holder=holder, expires=expires))
    return True


def release_role(conn: Connection, role: str, holder: str) -> None:
    conn.execute(delete(role_leases).where(role_leases.c.role == role, role_leases.c.holder == holder))


def role_holder(conn: Connection, role: str, now: datetime) -> str | None:
    stmt = select(role_leases.c.holder).where(role_leases.c.role == role, role_leases.c.expires >= now)
    return conn.scalar(stmt)
