"""The replicator's part of a dataset's lifecycle (``common.catalogue.datasets``): it knows what
copies rules want, so it notices a closed dataset becoming complete / archived, and it holds the
endpoints, so it removes a deleted dataset's copies.

``advance`` (every ``[datasets] check_interval``): closed datasets, once closed for
``[datasets] settle_seconds``, whose every wanted disk copy is available become ``complete`` (and
``archived`` once their wanted tape copies are too). The transition and its ``dataset.completed``
/ ``dataset.archived`` event are one transaction (outbox); the relay publishes it after the
commit. Several instances: the transition is conditional, one of them makes it, one event.

``delete_copies`` (same loop): the disk copies of ``deleting`` datasets are deleted through the
storage interface (only on the endpoints this instance serves), each then recorded ``deleted``
with a history row (same loop); a dataset none of whose copies is left becomes ``deleted`` and
``dataset.deleted`` is stated (outbox, once). A kill between a
delete and its record leaves the copy ``deleting``: the next round deletes it again (a missing
file deletes fine) and records it. Two instances may both delete one copy: harmless, recorded once.
A copy the endpoint refuses to delete stays ``deleting`` and is tried again next round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import timedelta

from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.config import Settings
from common.errors import SpoolError
from common.logging import get_logger
from common.storage import StorageBackend

log = get_logger("spool.replicator")

BATCH = 500


async def advance(catalogue: Catalogue, settings: Settings, kick: Callable[[], None]) -> int:
    """One round; returns the number of events queued (then ``kick`` the relay)."""
    now = utcnow()
    events = await catalogue.datasets.advance(now - timedelta(seconds=settings.datasets.settle_seconds), now)
    for event in events:
        log.info(event.ROUTING_KEY.replace(".", "_"), dataset=getattr(event, "dataset", None))
    if events:
        kick()
    return len(events)


async def delete_copies(
    catalogue: Catalogue, storages: Mapping[str, StorageBackend], kick: Callable[[], None] | None = None
) -> int:
    """One round over the doomed copies; returns how many were deleted."""
    deleted = 0
    while True:
        batch = [c for c in await catalogue.datasets.doomed_copies(BATCH) if c.storage in storages]
        progressed = 0
        for copy in batch:
            try:
                await storages[copy.storage].delete(copy.pfn)
            except SpoolError as err:
                log.warning(
                    "dataset_copy_not_deleted", file=copy.name, storage=copy.storage,
                    reason=err.reason, error=err.message,
                )  # fmt: skip
                continue
            await catalogue.datasets.copy_deleted(copy, utcnow())
            progressed += 1
            await asyncio.sleep(0)
        deleted += progressed
        if len(batch) < BATCH or not progressed:
            break
    settled = await catalogue.datasets.settle_deletions(utcnow())
    for name in settled:
        log.info("dataset_deleted", dataset=name)
    if settled and kick is not None:
        kick()  # their dataset.deleted events, queued in the outbox
    return deleted


async def lifecycle_round(
    catalogue: Catalogue, settings: Settings, storages: Mapping[str, StorageBackend], kick: Callable[[], None]
) -> None:
    await delete_copies(catalogue, storages, kick)
    await advance(catalogue, settings, kick)
