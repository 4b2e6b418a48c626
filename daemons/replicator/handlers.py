"""The replicator's I/O glue: the ``replica.request`` handler, its resources, its background loops.

Order of work for one request, so that a kill at any instruction loses nothing:

1. the destination must be a configured disk endpoint                  -> Permanent otherwise
2. under a per-(file, destination) lock, read the copy's catalogue row:
   available -> verify the bytes; good: re-announce and stop; bad: mark it and copy again
   no rule wants it any more -> cancel (drop the row) and stop
3. the endpoint must be writable (operator state, circuit breaker)    -> park in the catalogue, ack
4. wait for one of the destination's ``max_transfers`` slots, shared by every replicator instance
   on the catalogue (``slots``; a small copy goes in a batch of small copies made one after
   another, and the batch holds one slot: ``PosixStorage._batched``)
5. copy from the best source (``steps.rank_sources``): unnamed file (or temp name), kernel copy,
   read-back checksum, atomic link (or rename); a missing / corrupt source is marked ``bad`` and
   the next one tried
6. record the copy available (batched, after one syncfs of the endpoint: group commit)
7. publish ``replica.created`` (one per request, listing a bulk request's copies); the runner acks.

A kill during 5 leaves nothing (an unnamed file) or a temp file (removed at start-up); after 5 a
verified file nobody recorded: the redelivery copies it again over itself. Background loops in the
same process: endpoint health (``health``), new rules (``rules``) and the reaper (``reaper``).

Several instances (one node or several, on one catalogue) share the work through the broker's
queue. Each holds an instance lease (``common.instance``, daemon ``replicator``) for its life: it
names the transfer slots and the probe the instance holds, so that what a killed instance held is
free once its lease runs out. The limits per endpoint (``max_transfers``, the circuit breaker)
hold across the instances; the lock per (file, endpoint) is per process (two instances given the
same copy at once both make it: the second link replaces the first with the same verified bytes).

A bulk request (``names``) takes the same steps for all its files at once where nothing needs
deciding (``bulk``); each file left over takes them on its own (``_replicate_one``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from common.batching import MicroBatcher
from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.catalogue import Catalogue, CopyRecord, ReplicaTask
from common.config import Settings
from common.errors import Permanent, Retryable, SpoolError, unknown_names
from common.instance import InstanceLease
from common.logging import get_logger
from common.messages import CreatedCopy, Message, MetadataChanged, ReplicaCreated, ReplicaRequest, fact_id
from common.periodic import every
from common.placement import RuleBook, sync_config_rules
from common.storage import PosixStorage, StorageBackend, open_storage
from common.storage.transfer import sweep_stale_temporaries, verify_stored
from daemons.replicator import steps
from daemons.replicator.bulk import UNKNOWN_FILE, replicate_bulk
from daemons.replicator.datasets import lifecycle_round
from daemons.replicator.health import EndpointHealth
from daemons.replicator.locks import KeyedLocks
from daemons.replicator.metadata import place_again
from daemons.replicator.reaper import reap
from daemons.replicator.rules import evaluate_new_rules
from daemons.replicator.slots import EndpointSlots

log = get_logger("spool.replicator")


@dataclass
class ReplicatorResources:
    catalogue: Catalogue
    storages: dict[str, StorageBackend]
    health: EndpointHealth
    registrar: MicroBatcher[CopyRecord, None]
    # (name, destination) -> what the catalogue knows of that copy; handlers ask together.
    tasks: MicroBatcher[tuple[str, str], ReplicaTask | None]
    slots: dict[str, EndpointSlots]
    lease: InstanceLease
    rulebook: RuleBook  # the rules, for a file placed again after its metadata changed
    reading: Counter[str] = field(default_factory=Counter)  # copies reading from each source now
    # One copy of a file to an endpoint at a time in this process (duplicate requests wait, then
    # find the copy made).
    locks: KeyedLocks[tuple[str, str]] = field(default_factory=KeyedLocks)


def _describe(msg: Message) -> dict[str, Any]:
    name = getattr(msg, "name", None) or getattr(msg, "file", None)
    if name is None and getattr(msg, "names", None):
        name = f"{len(msg.names)} files"  # type: ignore[attr-defined]
    return {"file": name, "storage": getattr(msg, "destination", None)}


@asynccontextmanager
async def open_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[ReplicatorResources]:
    catalogue = await Catalogue.open(settings.catalogue.url, echo=settings.catalogue.echo)
    storages: dict[str, StorageBackend] = {}
    tasks: list[asyncio.Task[None]] = []
    lease = InstanceLease(catalogue, "replicator", settings.node, settings.catalogue.lease_seconds)
    health = EndpointHealth(settings, catalogue, publisher, instance=lease.id)
    slots: dict[str, EndpointSlots] = {}
    try:
        await catalogue.endpoints.sync(settings.storage)
        await lease.start()
        await sync_config_rules(catalogue, settings)
        for name, endpoint in settings.storage.items():
            if endpoint.kind != "disk":
                continue
            storage = storages[name] = open_storage(name, endpoint)
            if not isinstance(storage, PosixStorage):
                # Temporaries a killed predecessor left on the server, found in the background
                # (a listing of the endpoint); only those older than this start are touched.
                sweep = sweep_stale_temporaries(name, storage, endpoint.stale_temp_age)
                tasks.append(asyncio.create_task(sweep))
                continue
            removed = await asyncio.to_thread(storage.cleanup_temp, endpoint.stale_temp_age)
            if removed:
                log.info("removed_stale_temp_files", storage=name, count=removed)
            # In the background: the daemon consumes meanwhile, and its first small copies find
            # the copy process (almost) ready instead of waiting for its imports.
            tasks.append(asyncio.create_task(storage.start_copy_process()))

        async def durable_record(records: Sequence[CopyRecord]) -> list[None]:
            # Group commit: copies written without their own fsync reach the disk before any is
            # recorded available (one syncfs per endpoint touched by the batch).
            for name in {r.storage for r in records}:
                storage = storages[name]
                if isinstance(storage, PosixStorage) and settings.storage[name].durability == "batch":
                    await storage.sync()
            await catalogue.replication.record_copies(records)
            return [None] * len(records)

        batch = settings.catalogue
        resources = ReplicatorResources(
            catalogue=catalogue,
            storages=storages,
            health=health,
            registrar=MicroBatcher(durable_record, max_size=batch.batch_size, max_wait=batch.batch_wait),
            tasks=MicroBatcher(
                catalogue.replication.replica_tasks, max_size=batch.batch_size, max_wait=batch.batch_wait
            ),
            slots=slots,
            lease=lease,
            rulebook=RuleBook(catalogue, settings),
        )
        limits = {name: settings.storage[name].max_transfers for name in storages}
        await catalogue.transfers.sync_slots(limits)
        for name, limit in limits.items():
            slots[name] = EndpointSlots(catalogue, name, limit, lease.id)
        for name, storage in storages.items():
            if isinstance(storage, PosixStorage):
                storage.transfer_slots = resources.slots[name]
        await health.start()
        rep = settings.replication
        tasks += [
            asyncio.create_task(every(rep.poll_interval, health.poll, name="health", log=log)),
            asyncio.create_task(
                every(
                    rep.poll_interval,
                    lambda: evaluate_new_rules(catalogue, publisher, settings, lease.id),
                    name="rules",
                    log=log,
                )
            ),
            asyncio.create_task(
                every(rep.reaper_interval, lambda: reap(catalogue, storages), name="reaper", log=log)
            ),
            asyncio.create_task(
                every(
                    settings.datasets.check_interval,
                    lambda: lifecycle_round(catalogue, settings, storages, health.relay.kick),
                    name="datasets",
                    log=log,
                )
            ),
        ]
        try:
            yield resources
        finally:
            await resources.tasks.close()
            await resources.registrar.close()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await health.close()
        for storage in storages.values():
            await storage.aclose()
        for endpoint_slots in slots.values():
            await endpoint_slots.close()
        await lease.stop()
        await catalogue.close()


service = Service("replicator", resources=open_resources, describe=_describe)


@service.handler(MetadataChanged)
async def metadata_changed(msg: MetadataChanged, ctx: Context[ReplicatorResources]) -> None:
    await place_again(msg, ctx.resources.catalogue, ctx.resources.rulebook, ctx.publisher)


@service.handler(ReplicaRequest)
async def replicate(msg: ReplicaRequest, ctx: Context[ReplicatorResources]) -> None:
    steps.destination(msg.destination, ctx.settings.storage)
    if msg.name is not None:
        await _announce(
            ctx, msg.destination, [await _replicate_one(msg.name, msg, ctx, msg.id, ctx.correlation_id)]
        )
        return
    # Bulk: one replica.created for the copies made. A file that fails continues as a single-file
    # request, with retries and a dead letter of its own - except names the catalogue does not
    # know: those are one outcome for the whole request (see ``common.errors.unknown_names``).
    outcomes = await replicate_bulk(msg, ctx, _replicate_one)
    for outcome in outcomes:
        if isinstance(outcome, asyncio.CancelledError):
            raise outcome  # stopping: the whole message goes back to the queue
    correlation = {name: msg.correlation_of(i, ctx.correlation_id) for i, name in enumerate(msg.names)}
    made = [o for o in outcomes if isinstance(o, CreatedCopy)]
    if msg.correlation_ids:  # files of several events: each copy names its own
        made = [c.model_copy(update={"correlation_id": correlation[c.name]}) for c in made]
    # Announced before the failures are re-sent: if the announcement fails, the whole request is
    # retried (made copies are verified and announced again, the failures copied again).
    await _announce(ctx, msg.destination, made)
    unknown: list[str] = []
    for name, outcome in zip(msg.names, outcomes, strict=True):
        if not isinstance(outcome, BaseException):
            continue
        if isinstance(outcome, Permanent) and outcome.reason == UNKNOWN_FILE:
            unknown.append(name)
            continue
        reason = outcome.reason if isinstance(outcome, SpoolError) else type(outcome).__name__
        ctx.log.info("bulk_item_resent_alone", file=name, reason=reason)
        await ctx.publisher.publish(
            ReplicaRequest(
                name=name,
                destination=msg.destination,
                rule_id=msg.rule_id,
                priority=msg.priority,
                correlation_id=correlation[name],
            ),
            correlation_id=correlation[name],
        )
    if unknown:
        raise unknown_names(unknown, len(msg.names))


async def _replicate_one(
    name: str,
    msg: ReplicaRequest,
    ctx: Context[ReplicatorResources],
    request_id: str,
    correlation_id: str | None = None,
) -> CreatedCopy | None:
    """Make (or verify) one copy; returns what to announce, ``None`` when nothing was made
    (cancelled, parked, a bad copy nobody wants)."""
    res = ctx.resources
    dest = res.storages[msg.destination]
    async with res.locks.hold((name, msg.destination)):
        task = await _task(res, name, msg.destination)
        act = steps.action(task)
        if act == "wait":
            raise Retryable("copy_being_deleted", f"the reaper is deleting the copy of {name} there")
        if act == "cancel":
            await res.catalogue.replication.cancel_copy(name, msg.destination)
            ctx.log.info("copy_cancelled", file=name, why="no rule wants this copy any more")
            return None
        if act == "verify":
            assert task.pfn is not None
            problem = await verify_stored(
                dest, task.pfn, size=task.size, adler32=task.adler32, sha256=task.sha256
            )
            if problem is None:
                return _created(task, task.pfn)
            ctx.log.warning("copy_corrupt", file=name, problem=problem)
            await res.catalogue.replication.set_replica_state(name, msg.destination, "bad")
            await res.catalogue.history.record_event(
                name=name, daemon="replicator", type="replica.bad", outcome="bad",
                attempt=ctx.attempt, storage=msg.destination, detail={"problem": problem},
            )  # fmt: skip
            if not task.needed:
                return None  # nobody wants it: do not repair it
        admission = await res.health.admit(msg.destination)
        for _ in range(3):
            if admission != "wait":
                break
            if await _park(ctx, name, msg, "endpoint not writable"):
                return None
            # Writable by now (resumed by another instance since this one last looked, which has
            # re-sent what was parked until then): look again and go.
            await res.health.refresh()
            admission = await res.health.admit(msg.destination)
        else:
            raise Retryable("endpoint_state_changing", f"{msg.destination} changed state while parking")
        fsync = ctx.settings.storage[dest.name].durability == "file"
        # A small copy takes its slot with its batch (see the module docstring, step 4).
        batched = isinstance(dest, PosixStorage) and dest.batches_copy(task.size, fsync)
        slot = contextlib.nullcontext() if batched else res.slots[msg.destination]
        try:
            async with slot:
                copied, source = await _copy_from_best(ctx, task, dest, fsync)
        except SpoolError as err:
            if err.reason in steps.ENDPOINT_FAILURES:
                if await res.health.failure(msg.destination, err) and await _park(
                    ctx, name, msg, f"{err.reason}: {err.message}"
                ):
                    return None  # otherwise resumed meanwhile: retried as any failure
            elif admission == "probe":
                await res.health.release_probe(msg.destination)
            raise
        except BaseException:
            if admission == "probe":
                await res.health.release_probe(msg.destination)
            raise
        await res.health.success(msg.destination)
        await res.registrar.submit(
            CopyRecord(
                request_id=request_id,
                name=name,
                storage=msg.destination,
                pfn=copied,
                attempt=ctx.attempt,
                source=source,
                correlation_id=correlation_id or ctx.correlation_id,
            )
        )
    return _created(task, copied)


async def _task(res: ReplicatorResources, name: str, destination: str) -> ReplicaTask:
    task = await res.tasks.submit((name, destination))
    if task is None:
        raise Permanent(UNKNOWN_FILE, f"{name} is not in the catalogue")
    return task


async def _park(ctx: Context[ReplicatorResources], name: str, msg: ReplicaRequest, why: str) -> bool:
    """Park the copy until the endpoint is writable; False when it is writable already (nothing
    parked: see ``common.catalogue.replication.park``)."""
    if not await ctx.resources.catalogue.replication.park(name, msg.destination, msg.priority):
        return False
    ctx.log.info("copy_parked", file=name, why=why)
    return True


async def _copy_from_best(
    ctx: Context[ReplicatorResources], task: ReplicaTask, dest: StorageBackend, fsync: bool
) -> tuple[str, str]:
    """Copy from the best source that works; returns (where the copy is inside ``dest``, the
    source endpoint). Both ends mounted here: the verified kernel copy. Otherwise the destination
    backend's ``copy_from`` (third-party when the pair can, else through this node)."""
    res = ctx.resources
    ranked = steps.rank_sources(task.sources, dest.name, ctx.settings.storage, res.health.states, res.reading)
    transient: SpoolError | None = None
    tried: list[str] = []
    relpath = task.pfn or task.name
    for source in ranked:
        tried.append(source.storage)
        res.reading[source.storage] += 1
        src = res.storages[source.storage]
        try:
            try:  # a catalogue pfn escaping its root: that copy is unusable
                path = src.resolve(source.pfn) if isinstance(src, PosixStorage) else src.url(source.pfn)
            except SpoolError as err:
                await _mark_source_bad(ctx, task.name, source.storage, err)
                continue
            if isinstance(dest, PosixStorage) and isinstance(path, os.PathLike):
                copied = await dest.copy_verified(
                    path,
                    relpath,
                    expected_size=task.size,
                    expected_adler32=task.adler32,
                    fsync=fsync,
                    expected_sha256=task.sha256,
                )
                return copied.pfn, source.storage
            done = await dest.copy_from(src, source.pfn, relpath, size=task.size, adler32=task.adler32)
            # A remote end is verified by its server's adler32; sha256 is checked only where this
            # node reads the bytes (docs/remote-storage.md, "Strong checksums").
            ctx.log.debug(
                "copied", file=task.name, source=source.storage, mode=done.mode, size=done.size,
                sha256_verified=False,
            )  # fmt: skip
            return done.relpath, source.storage
        except SpoolError as err:
            if err.reason in steps.SOURCE_BAD:
                await _mark_source_bad(ctx, task.name, source.storage, err)
                continue
            if err.reason in steps.SOURCE_TRANSIENT:
                transient = err
                continue
            raise
        finally:
            res.reading[source.storage] -= 1
    if transient is not None:
        raise Retryable(transient.reason, f"{transient.message} (sources tried: {', '.join(tried)})")
    tried_text = f"tried {', '.join(tried)}" if tried else "no available copy on a readable disk endpoint"
    raise Permanent("no_source", f"no usable source replica of {task.name} ({tried_text})")


async def _mark_source_bad(
    ctx: Context[ReplicatorResources], name: str, storage: str, err: SpoolError
) -> None:
    ctx.log.warning("source_bad", source=storage, reason=err.reason, error=err.message)
    cat = ctx.resources.catalogue
    await cat.replication.set_replica_state(name, storage, "bad", only_from=("available",))
    await cat.history.record_event(
        name=name, daemon="replicator", type="replica.bad", outcome="bad", attempt=ctx.attempt,
        storage=storage, detail={"reason": err.reason, "error": err.message},
    )  # fmt: skip


def _created(task: ReplicaTask, pfn: str) -> CreatedCopy:
    return CreatedCopy(name=task.name, pfn=pfn, size=task.size, adler32=task.adler32)


async def _announce(
    ctx: Context[ReplicatorResources], storage: str, copies: Sequence[CreatedCopy | None]
) -> None:
    made = [c for c in copies if c is not None]
    if made:
        # The id names the fact (the endpoint and the copies), so the event re-published on a
        # redelivery is a duplicate by id.
        fact = fact_id("replica.created", storage, *sorted(c.name for c in made))
        await ctx.publisher.publish(
            ReplicaCreated(id=fact, storage=storage, copies=made), correlation_id=ctx.correlation_id
        )


@service.failure_hook
async def record_failure(
    msg: Message | None, err: SpoolError, attempt: int, final: bool, ctx: Context[ReplicatorResources]
) -> None:
    """Keep the last error per file; a copy that failed for good shows as ``failed``."""
    if not isinstance(msg, ReplicaRequest) or msg.name is None:
        return  # a bulk request failing as a whole is retried whole; its files have no error yet
    cat = ctx.resources.catalogue
    await cat.history.record_failure(
        request_id=msg.id, kind="replica", daemon="replicator", reason=err.reason,
        error=f"{msg.destination}: {err.message}", attempts=attempt, final=final, name=msg.name,
    )  # fmt: skip
    if final:
        with contextlib.suppress(Exception):  # an unknown endpoint or file has no row to mark
            await cat.replication.set_replica_state(
                msg.name, msg.destination, "failed", only_from=("queued", "waiting", "bad")
            )
