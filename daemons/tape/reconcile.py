"""Copies a dead writer left ``archiving``, settled against what the cartridge really holds.

The catalogue row of a copy in a batch names the cartridge its file is being written to. When the
writer dies (SIGKILL, power cut), the library's own recovery (on its next open) drops every file
that was not committed, so a cartridge lists exactly the files wholly written and verified. Hence:

- the file is committed on that cartridge under its name -> record it ``available`` with that fseq
  (it is never written a second time), its ``file.archived`` in the outbox (same transaction);
- the file is a member of an aggregate committed on that cartridge (the index the writer gave the
  library with the aggregate names it) -> the same, at the aggregate's fseq and its offset in it;
- otherwise -> back to ``queued``; the next batch writes it.

Which rows are a dead writer's: those of endpoints with no batch running in this process, whose
cartridge is not in a drive some live session holds (a claim or an operation in progress; the
library clears those of dead sessions itself). This runs at start-up and on every scheduler tick,
so rows a failed batch could not record are healed too. Supported deployment: one tape daemon per
tape library, like one ingest per disk endpoint; a second one would see the first one's rows
between two steps of a cartridge change as orphans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from common.catalogue import Catalogue
from common.catalogue import tape as db
from common.errors import SpoolError
from common.logging import get_logger
from common.tape import TapeLibrary
from daemons.relay import OutboxRelay
from daemons.tape import steps

log = get_logger("spool.tape")


async def held_cartridges(library: TapeLibrary) -> set[str]:
    """Cartridges in a drive that a live session is using (claimed, or in an operation)."""
    return {
        d.vid
        for d in await library.list_drives()
        if d.vid is not None and (d.claim is not None or d.op is not None)
    }


async def reconcile(
    catalogue: Catalogue,
    relay: OutboxRelay,
    libraries: Mapping[str, TapeLibrary],
    targets: Mapping[str, steps.TapeTarget],
    storages: Sequence[str],
) -> tuple[int, int]:
    """Settle the orphaned ``archiving`` copies of ``storages``; returns (recorded, requeued)."""
    rows = await catalogue.tape.in_flight(list(storages))
    if not rows:
        return 0, 0
    groups: dict[tuple[str, str | None], list[db.InFlight]] = defaultdict(list)
    for row in rows:
        groups[(row.storage, row.cartridge)].append(row)
    held: dict[str, set[str]] = {}
    found: list[db.Archived] = []
    lost: list[int] = []
    for (storage, vid), group in groups.items():
        if vid is None:
            lost += [row.replica_id for row in group]
            continue
        target = targets[storage]
        library = libraries[target.library]
        if target.library not in held:
            held[target.library] = await held_cartridges(library)
        if vid in held[target.library]:
            continue  # a live writer is at it
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
    applied = await catalogue.tape.record_archived(found) if found else []
    requeued = await catalogue.tape.requeue(lost) if lost else 0
    if applied or requeued:
        log.warning("archive_reconciled", recorded_from_tape=len(applied), requeued=requeued)
    if applied:
        relay.kick()
    return len(applied), requeued
