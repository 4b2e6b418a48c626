"""Deleting copies no rule needs any more: lifetime over, or their rule removed.

Never the last available copy of a file, never a copy another rule still holds a live lock on
(both re-checked in the transaction that claims the copy), never a copy ingest made (those carry
no tombstone), never a copy whose tombstone moved into the future since the pass listed it (a
recall pinned it: also re-checked in the claim). Order, so that a kill at any point leaves
nothing inconsistent:
claim (state ``deleting``) -> delete the bytes -> delete the row and add a history row.
A copy left ``deleting`` by a kill is picked up again on the next pass. A copy a rule's placement
locked while it was ``deleting`` is not dropped at the end but asked for again (``queued``, a
``replica.request`` through the outbox).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from common.catalogue import Catalogue
from common.errors import SpoolError
from common.logging import get_logger
from common.storage import StorageBackend

log = get_logger("spool.replicator")

BATCH = 500


async def reap(catalogue: Catalogue, storages: Mapping[str, StorageBackend]) -> int:
    """One pass; returns the number of copies deleted."""
    expired = await catalogue.replication.expire_locks()
    if expired:
        log.info("locks_expired", count=expired)
    deleted = 0
    for item in await catalogue.replication.reapable(BATCH):
        storage = storages.get(item.storage)
        if storage is None:
            continue  # an endpoint this node does not serve
        if not await catalogue.replication.begin_delete(item.replica_id):
            continue
        try:
            await storage.delete(item.pfn)
        except SpoolError as err:
            log.warning(
                "reap_failed", file=item.name, storage=item.storage, reason=err.reason, error=err.message
            )
            continue
        if await catalogue.replication.finish_delete(item):
            log.info("reaped_copy_requested_again", file=item.name, storage=item.storage)
        deleted += 1
        await asyncio.sleep(0)
    if deleted:
        log.info("copies_reaped", count=deleted)
    return deleted
