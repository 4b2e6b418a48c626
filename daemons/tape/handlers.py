"""The tape daemon's I/O glue: the ``tape.archive`` handler, its resources, the scheduler loop.

The handler does not hold the message while the copy waits for a mount (minutes to hours, past
the broker's consumer timeout): it makes sure the copy is ``queued`` in the catalogue, the queue
of its tape endpoint (= pool), and acks. The scheduler (``scheduler``) decides when a queue is
worth a mount and writes it in batches (``writer``). A redelivered or repeated request finds the
copy queued, being written, or on tape; in the last case it announces ``file.archived`` again,
under the message id of the fact (``db.archived_event``), so consumers see it once.

Events the daemon states outside this handler (``file.archived`` of a batch or of reconciliation,
a tape ``file.failed``, ``tape.mounted``) go through the catalogue's outbox, which the relay
(``daemons.relay``) publishes: started before the scheduler (what a predecessor left unsent goes
out first), stopped after it (the last batch's events get their chance).

Each tape daemon process is an instance holding a lease in the catalogue (``common.instance``),
held for its life: taken before the scheduler starts (the copies its batches take name it as
their holder), given back after the scheduler has stopped (what is left is then anyone's to
settle at once). Several instances may share a library: PostgreSQL for instances on several
nodes, SQLite for several on one node. One that dies leaves its copies to the others once its
lease has run out (``catalogue.lease_seconds``; ``daemons.tape.reconcile``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from common.batching import MicroBatcher
from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.catalogue import Catalogue
from common.catalogue import tape as db
from common.config import Settings
from common.errors import Permanent, SpoolError, unknown_names
from common.instance import InstanceLease
from common.logging import get_logger
from common.messages import Message, TapeArchive
from common.storage import StorageBackend, open_storage
from common.tape import TapeLibrary, open_library
from daemons.relay import OutboxRelay
from daemons.tape import steps
from daemons.tape.scheduler import Scheduler

log = get_logger("spool.tape")


@dataclass
class TapeResources:
    catalogue: Catalogue
    targets: dict[str, steps.TapeTarget]
    libraries: dict[str, TapeLibrary]
    scheduler: Scheduler
    relay: OutboxRelay
    lease: InstanceLease  # this instance (its id: the holder of the copies its batches write)
    # Group commit of the handler's ``ensure_queued``: one transaction for the files of the
    # requests that arrive together, not one per file.
    queuer: MicroBatcher[db.Wanted, db.TapeCopy | None]


def _describe(msg: Message) -> dict[str, Any]:
    name = getattr(msg, "name", None)
    if name is None and getattr(msg, "names", None):
        name = f"{len(msg.names)} files"  # type: ignore[attr-defined]
    return {"file": name, "storage": getattr(msg, "destination", None)}


@asynccontextmanager
async def open_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[TapeResources]:
    targets = steps.targets(settings.storage)
    async with AsyncExitStack() as stack:
        catalogue = await Catalogue.open(settings.catalogue.url, echo=settings.catalogue.echo)
        stack.push_async_callback(catalogue.close)
        await catalogue.endpoints.sync(settings.storage)
        lease = InstanceLease(catalogue, "tape", settings.node, settings.catalogue.lease_seconds)
        await lease.start()
        stack.push_async_callback(lease.stop)  # after the scheduler's close (the stack unwinds)
        libraries: dict[str, TapeLibrary] = {}
        for name in sorted({t.library for t in targets.values()}):
            library = await open_library(settings.tape_libraries[name])
            stack.push_async_callback(library.close)
            libraries[name] = library
        storages: dict[str, StorageBackend] = {}
        for name, endpoint in settings.storage.items():
            if endpoint.kind == "disk":  # posix or remote: ``writer`` stages a remote copy here
                storages[name] = open_storage(name, endpoint)
                stack.push_async_callback(storages[name].aclose)
        relay = OutboxRelay(catalogue, publisher, holder=lease.id)
        stack.push_async_callback(relay.close, settings.bus.stop_grace)
        await relay.start()
        scheduler = Scheduler(settings, catalogue, relay, libraries, targets, storages, lease)
        stack.push_async_callback(scheduler.close, settings.bus.stop_grace)
        await scheduler.start()
        batch = settings.catalogue
        queuer = MicroBatcher(
            catalogue.tape.ensure_queued_many, max_size=batch.batch_size, max_wait=batch.batch_wait
        )
        stack.push_async_callback(queuer.close)
        endpoints = {n: f"{t.library}/{t.pool}" for n, t in targets.items()}
        log.info("tape_ready", endpoints=endpoints, instance=lease.id)
        yield TapeResources(catalogue, targets, libraries, scheduler, relay, lease, queuer)


service = Service("tape", resources=open_resources, describe=_describe)


@service.handler(TapeArchive)
async def archive(msg: TapeArchive, ctx: Context[TapeResources]) -> None:
    """Queue the copy of each file the request names (one, or a bulk request's ``names``) and
    announce again those already on tape. Names the catalogue does not know fail the request
    once, after the others are queued (``common.errors.unknown_names``)."""
    res = ctx.resources
    target = steps.destination(msg.destination, res.targets, ctx.settings.storage)
    names = msg.files
    # The writer records the copy later, from catalogue rows: it finds the correlation id here
    # (remembered first: the writer may take the copy as soon as it is queued).
    correlations = [msg.correlation_of(i, ctx.correlation_id) for i in range(len(names))]
    for name, correlation in zip(names, correlations, strict=True):
        db.CORRELATIONS.remember(name, target.storage, correlation)
    copies = await res.queuer.submit_many([db.Wanted(n, target.storage, msg.priority) for n in names])
    unknown: list[str] = []
    for name, correlation, copy in zip(names, correlations, copies, strict=True):
        if copy is None:
            db.CORRELATIONS.take(name, target.storage)
            unknown.append(name)
        elif copy.state == "available" and copy.cartridge is not None and copy.fseq is not None:
            db.CORRELATIONS.take(name, target.storage)  # on tape already: the writer will not ask
            on_tape = db.Archived(0, name, target.storage, copy.cartridge, copy.fseq)
            await ctx.publisher.publish(db.archived_event(on_tape, correlation), correlation_id=correlation)
        else:
            ctx.log.debug("archive_queued", file=name, state=copy.state, pool=target.pool)
    if unknown and msg.name is not None:
        raise Permanent("unknown_file", f"{msg.name} is not in the catalogue")
    if unknown:
        raise unknown_names(unknown, len(names))


@service.failure_hook
async def record_failure(
    msg: Message | None, err: SpoolError, attempt: int, final: bool, ctx: Context[TapeResources]
) -> None:
    """Keep the last error per file (``spool show``)."""
    if not isinstance(msg, TapeArchive) or msg.name is None:
        return  # a bulk request failing as a whole is retried whole; its files have no error yet
    await ctx.resources.catalogue.history.record_failure(
        request_id=db.archive_request_id(msg.name, msg.destination), kind="archive", daemon="tape",
        reason=err.reason, error=f"{msg.destination}: {err.message}", attempts=attempt, final=final,
        name=msg.name,
    )  # fmt: skip
