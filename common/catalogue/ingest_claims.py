"""Claims on new names: one ingest instance copies a name at a time.

Two ingest instances may receive events for the same new name (two announcements of one file, or
an instrument announcing twice). Both would find the name unknown and copy it: the copies land at
the same final path, renamed over each other, so the registered file could be the other
instance's bytes. Before copying a name the catalogue does not know, an instance claims it here;
the registration transaction removes the claim (``register``), a failed attempt releases it.

- A name claimed by a **live** instance (``common.catalogue.instances``) is refused: the event is
  retried later, and by then the name is registered (a duplicate, or a ``name_conflict``).
- A name claimed by a **dead** instance (lease run out, or its row gone) is taken over: its copy
  may be complete or half made at the final path; ours replaces it, as a redelivery would.
- A name the instance already holds is its own again (a retry of its own event).
- A name **registered** meanwhile (between the instance's look-up and its claim: the
  registration removed the holder's claim) is refused as ``REGISTERED``: copying it now would
  overwrite a registered file. The event is retried and its look-up then finds the file.

Concurrent claims on PostgreSQL: ``INSERT … ON CONFLICT DO NOTHING`` waits for a competing
insert's transaction and then does nothing; the take-over ``UPDATE … WHERE holder is dead``
re-evaluates its condition after a competing update commits, so only one survivor takes a name.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Connection, delete, select, update

from common.catalogue.instances import held_by_dead
from common.catalogue.schema import ingest_claims as c
from common.catalogue.sql import file_ids_sync, insert_or_skip

_CHUNK = 500
REGISTERED = "registered"  # the holder given for a name refused because it is registered


def claim(conn: Connection, names: Sequence[str], holder: str, now: datetime) -> dict[str, str]:
    """Claim ``names`` for ``holder``; returns the names refused, each with its live holder."""
    wanted = sorted(set(names))  # key order: concurrent batches lock in the same order
    refused: dict[str, str] = {}
    for i in range(0, len(wanted), _CHUNK):
        part = wanted[i : i + _CHUNK]
        rows = [{"name": n, "holder": holder, "claimed": now} for n in part]
        inserted = set(conn.scalars(insert_or_skip(conn, c, ["name"]).values(rows).returning(c.c.name)))
        # The common case: every name was free (one statement). Otherwise the names held already
        # are taken over from dead holders and the rest refused.
        clashed = [n for n in part if n not in inserted]
        if clashed:
            conn.execute(
                update(c)
                .where(c.c.name.in_(clashed), c.c.holder != holder, held_by_dead(c.c.holder, now))
                .values(holder=holder, claimed=now)
            )
            others = select(c.c.name, c.c.holder).where(c.c.name.in_(clashed), c.c.holder != holder)
            held = conn.execute(others)
            refused.update({name: other for name, other in held})
        # After the claims (whose inserts waited for a competing registration to commit), so a
        # name registered by then is seen here.
        registered = [n for n in file_ids_sync(conn, part) if n not in refused]
        if registered:
            release(conn, registered, holder)
            refused.update(dict.fromkeys(registered, REGISTERED))
    return refused


def release(conn: Connection, names: Sequence[str], holder: str) -> None:
    """Give up ``holder``'s claims (an attempt that failed before registering)."""
    conn.execute(delete(c).where(c.c.name.in_(list(names)), c.c.holder == holder))


def drop_registered(conn: Connection, names: Sequence[str]) -> None:
    """In the registration transaction: a registered name needs no claim, whoever held it."""
    for i in range(0, len(names), _CHUNK):
        conn.execute(delete(c).where(c.c.name.in_(list(names[i : i + _CHUNK]))))


def drop_dead(conn: Connection, now: datetime) -> int:
    """Claims of dead instances (at an instance's start): the names, if announced again, are
    claimed afresh."""
    return conn.execute(delete(c).where(held_by_dead(c.c.holder, now))).rowcount or 0
