"""ingest's batch functions: what concurrent ``file.ready`` handlers ask together.

Each runs under a ``MicroBatcher`` (``common.batching``, built in ``handlers.open_resources``):
a handler submits one item, and one call serves every item that arrived meanwhile, so a busy
daemon makes one catalogue read, one ``syncfs`` and one transaction for hundreds of files.
The resources come first, bound with ``functools.partial``: the batcher passes only the items.

- ``lookup``: what each event id was recorded as, and the file registered under each name;
- ``claim``: new names claimed for this instance before their copy (``catalogue.ingest_claims``);
- ``durable_register``: group commit of the batch's copies, then one registration transaction;
- ``request_copies``: the copies the replication rules want, locked, and their requests
  published: the one place ingest asks for copies, disk and tape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.bus.publisher import Publisher
from common.catalogue import Catalogue, FileInfo, IngestRecord, RegisterOutcome
from common.catalogue import ingest as db
from common.catalogue.sql import utcnow
from common.instance import InstanceLease
from common.placement import BULK, RuleBook, publish_wanted
from common.storage import PosixStorage, StorageBackend

# (name, dataset, metadata, correlation id) of a registered file, for its replication rules.
PlanItem = tuple[str, str, dict[str, Any], str | None]


@dataclass
class Known:
    prior: db.PriorRequest | None  # what the event id was recorded as, if anything
    file: FileInfo | None
    dataset_state: str | None = None  # of the event's dataset; None: not created yet

    @property
    def event_done(self) -> bool:
        return self.prior is not None and self.prior.state == "done"


async def lookup(catalogue: Catalogue, keys: Sequence[tuple[str, str, str]]) -> list[Known]:
    """(event id, logical name, dataset) -> what the catalogue knows of each, in one read."""
    ids, names, datasets = [k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]
    prior, files, states = await catalogue.ingest.before_copy(ids, names, datasets)
    return [Known(prior.get(i), files.get(n), states.get(ds)) for i, n, ds in keys]


async def claim(catalogue: Catalogue, instance: InstanceLease, names: Sequence[str]) -> list[str | None]:
    """Claim new names before copying them, in one transaction: None for a name now this
    instance's, else the live instance that holds it."""
    refused = await catalogue.ingest.claim_names(names, instance.id, utcnow())
    return [refused.get(n) for n in names]


async def durable_register(
    catalogue: Catalogue, storage: StorageBackend, per_file_fsync: bool, records: Sequence[IngestRecord]
) -> Sequence[RegisterOutcome]:
    # Group commit: the copies of the whole batch reach the disk before any is recorded.
    # (A remote endpoint's server has its file before our upload returns.)
    if not per_file_fsync and isinstance(storage, PosixStorage):
        await storage.sync()
    return await catalogue.ingest.register(records)


async def request_copies(rulebook: RuleBook, publisher: Publisher, items: Sequence[PlanItem]) -> list[None]:
    """Lock the copies the rules want for a batch of files and publish their requests as bulk
    ``replica.request``s (disk) and ``tape.archive``s (tape): one message per destination and few
    hundred files, not one per file.

    The handlers ack after this returns: a kill in between redelivers the events, whose
    duplicates plan and request again. Each file's requests keep its file.ready's correlation id.
    """
    wanted = await rulebook.plan([i[:3] for i in items], correlation_ids=[i[3] for i in items])
    await publish_wanted(publisher, [w for ws in wanted for w in ws], bulk=BULK)
    return [None] * len(items)
