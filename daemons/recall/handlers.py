"""The recall daemon's I/O glue: the ``recall.request`` handler and its resources.

A recall can take hours (mounts queue behind each other and behind archiving), far beyond a
broker's consumer timeout, so the message is not held: the handler records the request and its
files in the catalogue (idempotent on the message id), serves at once what a disk copy already
holds, wakes the scheduler and acks. The scheduler (``scheduler``), running in the same process,
does the tape work and announces ``file.recalled`` / ``recall.completed`` as files settle.

Outcomes of a request:

- a destination that is not a configured disk endpoint -> Permanent ``unknown_storage``;
- neither names nor a dataset -> Permanent ``invalid_message``; an unknown dataset -> Permanent
  ``unknown_dataset`` (both dead-lettered: the request itself is wrong);
- an unknown name -> that file is ``failed`` with reason ``unknown_file``; the rest proceeds and
  the completion lists it among the failed;
- an id already used by a request with other content (destination, dataset, priority, names) ->
  Permanent ``id_conflict``; the first request is unchanged. The same id with the same content is
  a redelivery: nothing new happens.

A request refused outright is also answered on its ``reply_to`` (a ``recall.completed`` with
``reason`` and ``error``), so its sender never waits for a reply that will not come. Its size is
bounded by the message model (``common.limits``): an oversized request never reaches here.

With no destination, the first disk endpoint of the configuration is used (where ingest puts files).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.config import Settings
from common.errors import Permanent, SpoolError
from common.instance import InstanceLease, held_lease
from common.logging import get_logger
from common.messages import Message, RecallRequest
from common.storage import StorageBackend, open_storage
from common.tape import TapeLibrary, open_library
from daemons.recall import steps
from daemons.recall.announce import Announcer
from daemons.recall.scheduler import Scheduler

log = get_logger("spool.recall")


@dataclass
class RecallResources:
    catalogue: Catalogue
    scheduler: Scheduler
    announcer: Announcer
    # This process as one recall instance (issue 19): held for its life; the files it reads and
    # the cartridges it mounts are marked with ``lease.id``.
    lease: InstanceLease


def _describe(msg: Message) -> dict[str, Any]:
    names = getattr(msg, "names", None) or []
    return {"file": names[0] if len(names) == 1 else None, "dataset": getattr(msg, "dataset", None)}


@asynccontextmanager
async def open_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[RecallResources]:
    async with AsyncExitStack() as stack:
        catalogue = await Catalogue.open(settings.catalogue.url, echo=settings.catalogue.echo)
        stack.push_async_callback(catalogue.close)
        await catalogue.endpoints.sync(settings.storage)
        # Registered before anything is taken: the scheduler's start leaves this instance's rows
        # alone (none yet) and puts back only those no live instance holds.
        lease = await stack.enter_async_context(
            held_lease(catalogue, "recall", settings.node, settings.catalogue.lease_seconds)
        )
        storages: dict[str, StorageBackend] = {}
        for name, endpoint in settings.storage.items():
            if endpoint.kind == "disk":  # posix or remote (``delivery`` stages reads for a remote one)
                storages[name] = open_storage(name, endpoint)
                stack.push_async_callback(storages[name].aclose)
        libraries: dict[str, TapeLibrary] = {}
        for name in sorted({ep.library for ep in settings.storage.values() if ep.kind == "tape"}):
            library = await open_library(settings.tape_libraries[name])
            stack.push_async_callback(library.close)
            libraries[name] = library
        announcer = Announcer(catalogue, publisher, settings.bus.queue_prefix, holder=lease.id)
        scheduler = Scheduler(
            catalogue=catalogue,
            libraries=libraries,
            storages=storages,
            endpoints=settings.storage,
            settings=settings.recall,
            announcer=announcer,
            staging=settings.state_dir / "recall-staging",
            holder=lease.id,
            # About half a lease: a dead neighbour's files wait little more than its lease.
            reclaim_interval=settings.catalogue.lease_seconds / 2,
        )
        await scheduler.start()
        task = asyncio.create_task(scheduler.run())
        try:
            yield RecallResources(catalogue, scheduler, announcer, lease)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await scheduler.stop()
            # A clean stop hands this instance's reads over at once (before the lease is
            # forgotten); a failure here leaves them to the lease's expiry.
            try:
                await scheduler.let_go()
            except Exception as exc:
                log.warning("recall_reads_not_handed_over", error=repr(exc))


service = Service("recall", resources=open_resources, describe=_describe)


@service.handler(RecallRequest)
async def recall(msg: RecallRequest, ctx: Context[RecallResources]) -> None:
    try:
        await _recall(msg, ctx)
    except Permanent as err:
        await ctx.resources.announcer.refuse(msg, ctx.reply_to, ctx.correlation_id, err)
        raise


async def _recall(msg: RecallRequest, ctx: Context[RecallResources]) -> None:
    res = ctx.resources
    destination = steps.destination(msg.destination, ctx.settings.storage)
    if not msg.names and msg.dataset is None:
        raise Permanent("invalid_message", "a recall.request names files ('names') or a 'dataset'")
    spec = db.RecallSpec(
        id=msg.id,
        destination=destination,
        priority=msg.priority,
        names=tuple(msg.names),
        dataset=msg.dataset,
        reply_to=ctx.reply_to,
        correlation_id=ctx.correlation_id,
    )
    created = await res.catalogue.recall.create_recall(spec)
    if created is None:
        raise Permanent("unknown_dataset", f"dataset {msg.dataset!r} is not in the catalogue")
    if created.conflict is not None:
        raise Permanent(
            "id_conflict",
            f"recall id {msg.id!r} was already used by a request with {created.conflict}"
            " (an id names one request: send a new id)",
        )
    if created.new:
        ctx.log.info("recall_requested", files=created.files, destination=destination, priority=msg.priority)
    if created.unknown:
        ctx.log.warning(
            "recall_unknown_files",
            count=len(created.unknown),
            example=created.unknown[0],
            reason="unknown_file",
        )
    await res.announcer.publish(created.settled)
    await res.scheduler.serve_recall(msg.id)
    res.scheduler.wake()


@service.failure_hook
async def record_failure(
    msg: Message | None, err: SpoolError, attempt: int, final: bool, ctx: Context[RecallResources]
) -> None:
    """A request that cannot be accepted shows in ``spool recall status ID`` with its reason.

    Not an ``id_conflict``: the id's record describes the first request, which stays as it was
    (the refusal is in the dead-letter queue, the ``file.failed`` event and the reply)."""
    if not isinstance(msg, RecallRequest) or err.reason == "id_conflict":
        return
    await ctx.resources.catalogue.history.record_failure(
        request_id=msg.id, kind="recall", daemon="recall", reason=err.reason, error=err.message,
        attempts=attempt, final=final, dataset=msg.dataset,
        name=msg.names[0] if len(msg.names) == 1 else None,
    )  # fmt: skip
