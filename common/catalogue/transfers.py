"""The replicator's limits per endpoint, shared by its instances: transfer slots and the breaker.

Several replicator instances (one node or several) copy into the same endpoints. What holds per
*endpoint* lives here, in rows every instance reads and changes in short transactions, with no
protocol of their own between the daemons:

**Transfer slots.** An endpoint has ``max_transfers`` rows in ``transfer_slots``; a copy into it
runs while its instance holds one (``holder``). A slot is free when no live instance holds it
(``instances.held_by_dead``): released after the copy, or left by an instance whose lease ran out
(killed, paused past its lease), which needs no clean-up pass. A claim takes free rows with
``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL (two claimants never take the same row, and
neither waits for the other); on SQLite a write transaction holds the database's one write lock,
which serialises the claims. So the slots held never exceed the rows: exact, whatever the number
of instances. The price is a round trip per claim and per release; the replicator claims for a
batch of small copies (or one large copy), and coalesces the claims and releases of many copies
made at once into one transaction each (``daemons.replicator.slots``).

Fairness: an instance that could not get all the slots it wants leaves a row in
``transfer_waiters``; while others wait, an instance takes no more than its share of the
endpoint's slots (``ceil(max_transfers / instances wanting it)``). Alone, an instance may use them
all: an idle neighbour costs nothing. A slot number at or above the caller's ``max_transfers`` is
never claimed, so the rows of an endpoint configured larger elsewhere stay unused here (configure
the same value on every node).

**The shared breaker.** ``storage_endpoints.health`` is the breaker's state for every instance:
``ok`` (closed), ``paused`` (open: ``health_until`` is when the cool-down of ``health_cooldown``
seconds ends), ``probing`` (half-open: ``prober`` is the one instance making the probe copy). Each
transition is one conditional UPDATE, so of several instances deciding together one wins and the
others see its outcome: ``pause`` (only from ``ok``; the winner writes ``endpoint.paused`` to the
outbox in the same transaction), ``claim_probe`` (from ``paused`` once the cool-down is over, or
from ``probing`` when the prober's lease ran out: a dead prober does not leave the endpoint paused
for ever), ``probe_failed`` (back to ``paused``, the cool-down doubled up to the maximum),
``release_probe`` (the probe told nothing: the next copy may probe), ``resume`` (to ``ok``, with
``endpoint.resumed``). Counting the consecutive failures that open it stays in each instance (a
success would otherwise cost a write).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, delete, func, or_, select, update

from common.catalogue import outbox, replication
from common.catalogue.instances import held_by_dead
from common.catalogue.schema import instances, storage_endpoints, transfer_slots, transfer_waiters
from common.catalogue.sql import insert_ignore_sync
from common.messages import Message

ep = storage_endpoints
ts = transfer_slots
tw = transfer_waiters


# --- transfer slots ------------------------------------------------------------------------------
def sync_slots(conn: Connection, limits: Mapping[str, int]) -> None:
    """Make sure each endpoint has its slots ``0 .. limit - 1`` (rows beyond are left alone: a node
    configured with more may use them)."""
    rows = [
        {"storage": name, "slot": i, "holder": None, "taken": None}
        for name, n in limits.items()
        for i in range(n)
    ]
    insert_ignore_sync(conn, ts, rows, ["storage", "slot"])


def _live(now: datetime):  # type: ignore[no-untyped-def]
    return select(instances.c.id).where(instances.c.expires > now).scalar_subquery()


def claim_slots(conn: Connection, storage: str, limit: int, holder: str, wanted: int, now: datetime) -> int:
    """Take up to ``wanted`` free slots of ``storage`` for ``holder``, within its share while other
    instances wait; returns how many it got. Short of ``wanted``, ``holder`` is left waiting."""
    live = _live(now)
    conn.execute(delete(tw).where(tw.c.storage == storage, held_by_dead(tw.c.holder, now)))
    mine = conn.scalar(select(func.count()).where(ts.c.storage == storage, ts.c.holder == holder)) or 0
    holders = select(ts.c.holder).where(ts.c.storage == storage, ts.c.holder != holder, ts.c.holder.in_(live))
    waiters = select(tw.c.holder).where(tw.c.storage == storage, tw.c.holder != holder)
    others = set(conn.scalars(holders)) | set(conn.scalars(waiters))
    share = math.ceil(limit / (1 + len(others)))
    allowed = min(wanted, share - int(mine))
    got: list[int] = []
    if allowed > 0:
        free = (
            select(ts.c.slot)
            .where(ts.c.storage == storage, ts.c.slot < limit, held_by_dead(ts.c.holder, now))
            .order_by(ts.c.slot)
            .limit(allowed)
            # PostgreSQL: rows another claimant is taking are skipped, not waited for. SQLite has no
            # row locks (the clause is left out): its write lock serialises the claims.
            .with_for_update(skip_locked=True)
        )
        got = list(conn.scalars(free))
        if got:
            conn.execute(
                update(ts).where(ts.c.storage == storage, ts.c.slot.in_(got)).values(holder=holder, taken=now)
            )
    if len(got) < wanted:
        insert_ignore_sync(
            conn, tw, [{"storage": storage, "holder": holder, "since": now}], ["storage", "holder"]
        )
    else:
        conn.execute(delete(tw).where(tw.c.storage == storage, tw.c.holder == holder))
    return len(got)


def release_slots(conn: Connection, storage: str, holder: str, count: int, still_waiting: bool) -> int:
    """Give back ``count`` of the slots ``holder`` holds on ``storage``; returns how many it held.
    ``still_waiting``: it has copies waiting for more (its waiter row stays)."""
    mine = (
        select(ts.c.slot)
        .where(ts.c.storage == storage, ts.c.holder == holder)
        .order_by(ts.c.slot)
        .limit(count)
    )
    slots = list(conn.scalars(mine))
    if slots:
        conn.execute(
            update(ts).where(ts.c.storage == storage, ts.c.slot.in_(slots)).values(holder=None, taken=None)
        )
    if not still_waiting:
        conn.execute(delete(tw).where(tw.c.storage == storage, tw.c.holder == holder))
    return len(slots)


def others_waiting(conn: Connection, storage: str, holder: str, now: datetime) -> bool:
    """Whether a live instance other than ``holder`` waits for a slot of ``storage``."""
    stmt = select(tw.c.holder).where(
        tw.c.storage == storage, tw.c.holder != holder, tw.c.holder.in_(_live(now))
    )
    return conn.execute(stmt.limit(1)).first() is not None


def release_all(conn: Connection, holder: str, storage: str | None = None) -> int:
    """Every slot ``holder`` holds (on ``storage``, or anywhere), and its waits: at a stop, or
    when an instance no longer knows what it holds (a claim whose answer was lost)."""
    slots = update(ts).where(ts.c.holder == holder).values(holder=None, taken=None)
    waits = delete(tw).where(tw.c.holder == holder)
    if storage is not None:
        slots, waits = slots.where(ts.c.storage == storage), waits.where(tw.c.storage == storage)
    conn.execute(waits)
    return conn.execute(slots).rowcount or 0


def slot_holders(conn: Connection, storage: str, now: datetime) -> dict[str, int]:
    """Live holders of ``storage``'s slots and how many each holds (status, tests)."""
    stmt = (
        select(ts.c.holder, func.count())
        .where(ts.c.storage == storage, ts.c.holder.in_(_live(now)))
        .group_by(ts.c.holder)
    )
    return {holder: int(n) for holder, n in conn.execute(stmt)}


# --- the shared breaker --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EndpointView:
    """What a replicator polls of one endpoint: the operator's state and the shared breaker."""

    state: str  # online | readonly | down (the operator's)
    health: str  # ok | paused | probing
    until: datetime | None = None  # paused: when the cool-down ends
    cooldown: float | None = None
    prober: str | None = None
    reason: str | None = None
    since: datetime | None = None

    def probe_due(self, now: datetime) -> bool:
        """Paused, the cool-down over (a pause without an end, as before the breaker was shared:
        at once)."""
        return self.health == "paused" and (self.until is None or self.until <= now)


def endpoint_views(conn: Connection) -> dict[str, EndpointView]:
    stmt = select(
        ep.c.name, ep.c.state, ep.c.health, ep.c.health_until, ep.c.health_cooldown, ep.c.prober,
        ep.c.health_reason, ep.c.health_since,
    )  # fmt: skip
    return {row[0]: EndpointView(*row[1:]) for row in conn.execute(stmt)}


def pause(
    conn: Connection, storage: str, reason: str, cooldown: float, now: datetime, event: Message
) -> bool:
    """Open the breaker of ``storage`` (from ``ok`` only); True when this call did, and then
    ``event`` (``endpoint.paused``) is in the outbox. False: another instance paused it first."""
    done = conn.execute(
        update(ep)
        .where(ep.c.name == storage, ep.c.health == "ok")
        .values(
            health="paused",
            health_reason=reason,
            health_since=now,
            health_until=now + timedelta(seconds=cooldown),
            health_cooldown=cooldown,
            prober=None,
        )
    )
    if done.rowcount != 1:
        return False
    outbox.add(conn, [event])
    return True


def claim_probe(conn: Connection, storage: str, holder: str, now: datetime) -> bool:
    """Make ``holder`` the one instance whose next copy into ``storage`` is the probe: once the
    cool-down is over, or when the instance probing it is dead."""
    due = and_(ep.c.health == "paused", or_(ep.c.health_until.is_(None), ep.c.health_until <= now))
    orphaned = and_(ep.c.health == "probing", held_by_dead(ep.c.prober, now))
    done = conn.execute(
        update(ep).where(ep.c.name == storage, or_(due, orphaned)).values(health="probing", prober=holder)
    )
    return done.rowcount == 1


def release_probe(conn: Connection, storage: str, holder: str) -> None:
    """The probe ended telling nothing about the endpoint: paused again, due at once."""
    conn.execute(
        update(ep)
        .where(ep.c.name == storage, ep.c.health == "probing", ep.c.prober == holder)
        .values(health="paused", prober=None)
    )


def probe_failed(
    conn: Connection, storage: str, holder: str, reason: str, base: float, maximum: float, now: datetime
) -> float | None:
    """``holder``'s probe failed: paused again for twice the cool-down (up to ``maximum``); returns
    that cool-down, or None when the probe was no longer ``holder``'s (taken over, or resumed)."""
    current = conn.scalar(
        select(ep.c.health_cooldown)
        .where(ep.c.name == storage, ep.c.health == "probing", ep.c.prober == holder)
        .with_for_update()
    )
    cooldown = min((current or base) * 2, maximum)
    done = conn.execute(
        update(ep)
        .where(ep.c.name == storage, ep.c.health == "probing", ep.c.prober == holder)
        .values(
            health="paused",
            prober=None,
            health_reason=reason,
            health_until=now + timedelta(seconds=cooldown),
            health_cooldown=cooldown,
        )
    )
    return cooldown if done.rowcount == 1 else None


def resume(conn: Connection, storage: str, now: datetime, event: Callable[[float, int], Message]) -> bool:
    """Close the breaker of ``storage``; True when this call did (it was paused or probing), and
    then ``event(paused_seconds, copies_waiting)`` (``endpoint.resumed``) is in the outbox."""
    row = conn.execute(
        select(ep.c.health, ep.c.health_since).where(ep.c.name == storage).with_for_update()
    ).first()
    if row is None or row.health == "ok":
        return False
    conn.execute(
        update(ep)
        .where(ep.c.name == storage)
        .values(
            health="ok",
            health_reason=None,
            health_since=now,
            health_until=None,
            health_cooldown=None,
            prober=None,
        )
    )
    since = row.health_since or now
    outbox.add(
        conn, [event(max(0.0, (now - since).total_seconds()), replication.waiting_count(conn, storage))]
    )
    return True
