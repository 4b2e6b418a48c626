"""The outbox: an event stating a fact is written in the transaction that records the fact, and
published after the commit (``daemons.relay``), so a broker outage or a kill between the two
delays the event but never loses it.

Why: facts recorded outside a message handler (a tape batch writing files, reconciliation at
start, periodic loops) have no message to leave unacked when the publish fails; before this table
the tape daemon logged a warning and dropped the event (253 ``file.archived`` lost over four fault
runs). A row is inserted with the fact, published with publisher confirms, marked ``sent`` once
confirmed; a row still unsent is published again at start and periodically, under the same message
id (stored in the row, derived from the fact where another path may announce it too), so a
consumer that drops duplicates by id sees each fact once. Sent rows are kept for
``SENT_RETENTION`` (also a window in which the same fact added again is not sent twice), then pruned.

Audit of every event stating a fact (``common/messages.py``) and how it reaches the bus:

=======================  =============================================  ===========================
event                    published by                                   path, message id
=======================  =============================================  ===========================
file.ingested            ingest handler, before the ack                 (a) id: endpoint, name,
                                                                        adler32
replica.created          replicator handler, before the ack (bulk too)  (a) id: endpoint, names
file.archived            tape writer after a flush; reconcile at start  (b) **outbox**, with the
                         and on every scheduler tick                    copy (``record_archived``);
                                                                        id: endpoint, name,
                                                                        cartridge, fseq
file.archived (again)    tape handler: the copy is already on tape      (a) the same id
file.failed (tape)       tape writer: no usable disk source             (b) **outbox**, with the
                                                                        copy (``mark_failed``)
file.failed (runner)     consumer runner, dead letter                   (a) published before the
                                                                        dead letter and the ack;
                                                                        id: daemon, message, attempt
tape.mounted             tape writer; recall scheduler (cartridge       (b) **outbox** (own
                         loaded)                                        transaction: the fact is
                                                                        the library's)
endpoint.paused/resumed  replicator circuit breaker (handler, poll,     (b) **outbox**, with the
                         start)                                         endpoint's health column
dataset.completed,       replicator's datasets loop (``datasets.        (b) **outbox**, with the
dataset.archived         advance``)                                     dataset's state; id: the
                                                                        dataset's name
file.recalled,           recall handler and scheduler                   (b) recall's own outbox
recall.completed                                                        (``announced`` flags on its
                                                                        rows, ``daemons.recall.
                                                                        announce``); id: request,
                                                                        name
alert.raised             monitor, from what it observed                 in-memory queue retried
                                                                        (not a catalogue fact)
daemon.heartbeat         every daemon, periodically                     not a fact: the next
                                                                        one replaces it
=======================  =============================================  ===========================

Commands (``replica.request``, ``tape.archive``) are not facts: they are published before the ack
of the message that caused them, or re-sent from catalogue state (parked copies, rules). One
exception goes through the outbox: the reaper's last step, when a rule locked a copy while it was
being deleted, asks for it again (``replica.request``) in the transaction that re-queues it.

(a) published inside a message handler before the ack: a broker outage fails the handler and
the message is redelivered, so the event is sent at least once; its id must be the same on every
redelivery (``common.messages.fact_id``). (b) published outside that path: through an outbox.

Every function takes a synchronous ``Connection`` inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, or_, select, update

from common import codec
from common.catalogue import schema as s
from common.catalogue.instances import held_by_dead
from common.catalogue.sql import chunks, insert_ignore_sync, utcnow
from common.messages import Message

o = s.outbox
SENT_RETENTION = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Pending:
    """An unsent row: what to publish, as it was recorded."""

    seq: int
    id: str
    routing_key: str
    body: bytes
    correlation_id: str | None


def add(conn: Connection, messages: Sequence[Message], correlation_id: str | None = None) -> None:
    """Queue events in the caller's transaction; a message id already queued (or sent within the
    retention) is kept as it is: the same fact is announced once."""
    now = utcnow()
    rows = [
        {"id": m.id, "routing_key": m.ROUTING_KEY, "body": codec.encode(m),
         "correlation_id": correlation_id or m.correlation_id, "created": now, "sent": None}
        for m in messages
    ]  # fmt: skip
    for part in chunks(rows):
        insert_ignore_sync(conn, o, part, ["id"])


def unsent(conn: Connection, limit: int) -> list[Pending]:
    """The oldest ``limit`` rows not confirmed yet, in the order they were recorded."""
    stmt = (
        select(o.c.seq, o.c.id, o.c.routing_key, o.c.body, o.c.correlation_id)
        .where(o.c.sent.is_(None))
        .order_by(o.c.seq)
        .limit(limit)
    )
    return [Pending(int(q), i, k, bytes(b), c) for q, i, k, b, c in conn.execute(stmt)]


def claim_unsent(
    conn: Connection, limit: int, claimant: str, now: datetime, until: datetime
) -> list[Pending]:
    """The oldest ``limit`` unsent rows that no other relay is publishing (unclaimed, their claim
    run out, or already ``claimant``'s), claimed for ``claimant`` until ``until``.

    Several relays run over the one outbox (every process of a daemon that records facts runs one,
    on every node); without claims each published every row. PostgreSQL: rows another relay is
    claiming are skipped, not waited for; SQLite: the write lock serialises the claims."""
    # Free: never claimed, its claim run out, or its claimant not a live instance (a relay of a
    # killed daemon, at once when the daemon restarts on its node and forgets its predecessor).
    free = or_(held_by_dead(o.c.claimed_by, now), o.c.claimed_until < now, o.c.claimed_by == claimant)
    stmt = (
        select(o.c.seq, o.c.id, o.c.routing_key, o.c.body, o.c.correlation_id)
        .where(o.c.sent.is_(None), free)
        .order_by(o.c.seq)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = [Pending(int(q), i, k, bytes(b), c) for q, i, k, b, c in conn.execute(stmt)]
    for part in chunks([r.seq for r in rows]):
        conn.execute(update(o).where(o.c.seq.in_(part)).values(claimed_by=claimant, claimed_until=until))
    return rows


def release_claims(conn: Connection, claimant: str) -> None:
    """The unsent rows ``claimant`` claimed are anyone's again (its relay stops)."""
    conn.execute(
        update(o)
        .where(o.c.claimed_by == claimant, o.c.sent.is_(None))
        .values(claimed_by=None, claimed_until=None)
    )


def mark_sent(conn: Connection, seqs: Sequence[int]) -> None:
    now = utcnow()
    for part in chunks(list(seqs)):
        conn.execute(update(o).where(o.c.seq.in_(part), o.c.sent.is_(None)).values(sent=now))


def backlog(conn: Connection) -> int:
    """How many rows wait for the broker."""
    return int(conn.scalar(select(func.count()).select_from(o).where(o.c.sent.is_(None))) or 0)


def prune(conn: Connection, before: datetime | None = None) -> int:
    """Delete rows sent before ``before`` (default: ``SENT_RETENTION`` ago); returns how many."""
    cutoff = before if before is not None else utcnow() - SENT_RETENTION
    res = conn.execute(delete(o).where(o.c.sent.is_not(None), o.c.sent < cutoff))
    return int(res.rowcount)
