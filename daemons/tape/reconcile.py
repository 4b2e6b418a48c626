"""Copies a dead writer left ``archiving``, settled against what the cartridge really holds.

The catalogue row of a copy in a batch names the cartridge its file is being written to. When the
writer dies (SIGKILL, power cut), the library's own recovery (at its next open, or at another
session's next operation) drops every file that was not committed, so a cartridge lists exactly
the files wholly written and verified. Hence:

- the file is committed on that cartridge under its name -> record it ``available`` with that fseq
  (it is never written a second time), its ``file.archived`` in the outbox (same transaction);
- the file is a member of an aggregate committed on that cartridge (the index the writer gave the
  library with the aggregate names it) -> the same, at the aggregate's fseq and its offset in it;
- otherwise -> back to ``queued``; the next batch writes it.

Which rows are a dead writer's: several tape daemons may share a library (and its catalogue:
PostgreSQL across nodes, SQLite for several on one node), so the rows say who writes them. A copy
``archiving`` names its ``holder``, the instance whose batch took it (``common.instance``), and an
instance settles (``settleable``):

- the copies no live instance holds: their writer was killed, or stopped, or its lease ran out
  (``catalogue.lease_seconds`` after its last renewal), or the row predates holders;
- its own copies on endpoints where no batch of its own is running: what a batch of its own
  could neither record nor requeue when it ended (the catalogue failing at that moment).

It takes them first (``take_over``: atomic, so of two survivors each row is settled by one),
then settles them against the cartridge as above, as their holder; a stale writer's late
records are checked against the holder too and match nothing. One check stays with the
library: rows whose cartridge is in a drive a live session other than this process's batches is
using (claimed, or in an operation) are left for a later round. A killed writer's session is dead
and the library clears its claims itself; a writer whose lease ran out while its process goes on
(paused, cut off from the catalogue) still holds its drive and cartridge, and may still commit
files there until it notices and stops (``instance_lease_lost``). A cartridge one of our own
batches has taken over since is no obstacle: the library dropped the dead writer's unflushed
files before our batch could claim its drive, so its list of files is final for those rows (and
a dead neighbour's copies do not wait for the end of our batch, which may last hours).

This runs at start-up and on every scheduler tick, so a dead neighbour's copies are settled
within a tick of its lease running out, and rows a failed batch could not record are healed too.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence

from common.catalogue import Catalogue
from common.catalogue import tape as db
from common.errors import SpoolError
from common.logging import get_logger
from common.tape import TapeLibrary
from daemons.relay import OutboxRelay
from daemons.tape import steps

log = get_logger("spool.tape")


async def held_cartridges(library: TapeLibrary, own: Callable[[], Collection[str]] = frozenset) -> set[str]:
    """Cartridges in a drive that a live session other than ours is using (claimed, or in an
    operation). ``own``: the drives this process's batches hold, asked after the library answered
    (a drive ours then, released since, counts as another's: the error is on the side of waiting)."""
    drives = await library.list_drives()
    ours = own()
    return {
        d.vid
        for d in drives
        if d.vid is not None and (d.claim is not None or d.op is not None) and d.drive_id not in ours
    }


async def reconcile(
    catalogue: Catalogue,
    relay: OutboxRelay,
    libraries: Mapping[str, TapeLibrary],
    targets: Mapping[str, steps.TapeTarget],
    storages: Sequence[str],
    holder: str,
    idle: Sequence[str],
    own_drives: Callable[[], Collection[str]] = frozenset,
) -> tuple[int, int]:
    """Settle the orphaned ``archiving`` copies of ``storages`` as the instance ``holder``, whose
    own batches run on the endpoints not in ``idle`` and hold ``own_drives()``; returns
    (recorded, requeued)."""
    rows = await catalogue.tape.settleable(list(storages), holder, list(idle))
    if not rows:
        return 0, 0
    groups: dict[tuple[str, str | None], list[db.InFlight]] = defaultdict(list)
    for row in rows:
        groups[(row.storage, row.cartridge)].append(row)
    held: dict[str, set[str]] = {}
    found: list[db.Archived] = []
    lost: list[int] = []
    previous: set[str] = set()  # the holders whose copies were settled (for the log)
    for (storage, vid), group in groups.items():
        if vid is not None:
            target = targets[storage]
            library = libraries[target.library]
            if target.library not in held:
                held[target.library] = await held_cartridges(library, own_drives)
            if vid in held[target.library]:
                continue  # a live session is at it: perhaps a writer whose lease ran out, not done yet
        taken = set(await catalogue.tape.take_over([row.replica_id for row in group], holder))
        group = [row for row in group if row.replica_id in taken]  # another survivor took the rest
        previous.update(row.holder or "none" for row in group if row.holder != holder)
        if vid is None:
            lost += [row.replica_id for row in group]
            continue
        try:
            on_tape = steps.tape_positions(await library.list_files(vid))
        except SpoolError as exc:
            if exc.reason != "unknown_cartridge":
                raise
            on_tape = {}
        by_name = {row.name: row for row in group}
        written, missing = steps.split_in_flight(list(by_name), on_tape)
        found += [
            db.Archived(by_name[n].replica_id, n, storage, vid, fseq, member_offset=offset)
            for n, (fseq, offset) in written.items()
        ]
        lost += [by_name[n].replica_id for n in missing]
    applied = await catalogue.tape.record_archived(found, holder=holder) if found else []
    requeued = await catalogue.tape.requeue(lost, holder=holder) if lost else 0
    if applied or requeued:
        log.warning(
            "archive_reconciled", recorded_from_tape=len(applied), requeued=requeued,
            holders=sorted(previous), instance=holder,
        )  # fmt: skip
    if applied:
        relay.kick()
    return len(applied), requeued
