"""ingest's I/O glue: the ``file.ready`` handler, its resources and its failure record.

Order of work for one event, chosen so that a kill at any instruction loses nothing:

1. validate (landing area and who may announce in it, dataset name, logical name and its
   component lengths; the message model already bounded metadata, parents and every field)
                                                                   -> Permanent on bad input
2. under a per-name lock: what was this event id recorded as, is the name known, is the
   dataset open?                                                   -> a new name in a closed
                                                                      dataset: dataset_closed
                                                                   -> same event: re-publish, stop
                                                                   -> id used for another file:
                                                                      id_conflict
                                                                   -> other checksum: name_conflict
3. a new name: claim it for this instance (batched; ``catalogue.ingest_claims``)
                                                                   -> claimed by another live
                                                                      instance: name_being_ingested
                                                                      (retried; by then registered)
   copy into the first disk endpoint (unnamed file, verify, link)  -> Retryable while not writable
   (remote: the checksum read here, uploaded to a temporary name, the server's checksum, renamed)
4. register file + replica + dataset + metadata + parents          -> batched, one transaction
   (the name's claim removed in it; a failed attempt releases it;  -> closed meanwhile:
   the dataset's row locked, its state read again)                    dataset_closed, copy removed
5. evaluate the replication rules: lock the copies they want      -> batched, one transaction,
   and publish the requests for the missing ones (bulk for disk)     then one publication
6. publish ``file.ingested``, then the runner acks.

The batched steps (2, 4, 5) are the functions of ``batches``, each serving all the handlers that
asked meanwhile.

**Everything an event can be refused for is decided in 1 and 2, before any byte moves**: a refusal
never leaves a copy behind and is never retried into another copy. A failure after 3 (the
catalogue refuses the batch, another process registered the name) removes the copy 3 made, unless
the catalogue records a replica at that place (then the copy is someone's registered file).

A kill after 3 leaves a verified file at its final path and no catalogue row: the redelivery copies
it again over itself and registers it. A kill during 3 leaves nothing (an unnamed file) or a temp
file (where the file system has no unnamed files), removed at start-up.

Reason codes decided here: ``area_not_permitted`` (the publisher may not announce in that landing
area), ``name_too_long`` (a path or name component over 255 bytes, a name over 1024 characters,
or ENAMETOOLONG from the file system), ``id_conflict`` (the event id was already used for another
file), ``name_conflict``, ``dataset_closed``, ``file_missing``; and those of ``steps`` (``path_outside_area``,
``invalid_name``, ``not_a_file``, ``bad_dataset_name``).

A refused event is traceable by the logical name the file would have had (its ``name``, else the
path relative to its landing area computed lexically) as well as by its absolute path: the failure
is recorded in the history of both (``spool trace``).
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common import limits
from common.batching import MicroBatcher
from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.bus.trust import is_spool_user
from common.catalogue import Catalogue, FileInfo, IngestRecord, RegisterOutcome
from common.catalogue.datasets import CLOSED, GONE
from common.catalogue.engine import WRITER_CACHE_KIB
from common.catalogue.ingest_claims import REGISTERED
from common.catalogue.sql import utcnow
from common.config import Settings
from common.errors import Permanent, Retryable, SpoolError
from common.instance import InstanceLease
from common.logging import get_logger
from common.messages import DatasetClose, FileIngested, FileReady, Message, MetadataSet, fact_id
from common.periodic import every
from common.placement import RuleBook, sync_config_rules
from common.storage import PosixStorage, StorageBackend, open_storage
from common.storage.checksum import adler32_of_file
from common.storage.transfer import sweep_stale_temporaries, upload_checked
from daemons.ingest import batches, datasets, steps
from daemons.ingest.batches import Known
from daemons.ingest.metadata import apply_metadata

log = get_logger("spool.ingest")


@dataclass
class _NameLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class IngestResources:
    catalogue: Catalogue
    storage: StorageBackend
    storage_name: str
    lookups: MicroBatcher[tuple[str, str, str], Known]
    # This process as one of several ingest instances (its lease), and the claims on new names.
    instance: InstanceLease
    claims: MicroBatcher[str, str | None]
    registrar: MicroBatcher[IngestRecord, RegisterOutcome]
    # A registered file -> the copies its replication rules want, locked and requested.
    planner: MicroBatcher[batches.PlanItem, None]
    rulebook: RuleBook
    per_file_fsync: bool = True
    _locks: dict[str, _NameLock] = field(default_factory=dict)

    @asynccontextmanager
    async def name_lock(self, name: str) -> AsyncIterator[None]:
        """Serialise events for one logical name inside this process; the entry lives only while
        someone holds or awaits it (a reference count, so a night of names does not pile up)."""
        entry = self._locks.setdefault(name, _NameLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[name]


def _describe(msg: Message) -> dict[str, Any]:
    if isinstance(msg, DatasetClose):
        return {"dataset": msg.dataset}
    return {"file": getattr(msg, "name", None) or getattr(msg, "path", None) or getattr(msg, "file", None)}


@asynccontextmanager
async def open_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[IngestResources]:
    catalogue = await Catalogue.open(
        settings.catalogue.url, echo=settings.catalogue.echo, batch_cache_kib=WRITER_CACHE_KIB
    )
    try:
        await catalogue.endpoints.sync(settings.storage)
        await sync_config_rules(catalogue, settings)
        instance = InstanceLease(catalogue, "ingest", settings.node, settings.catalogue.lease_seconds)
        await instance.start()
        dropped = await catalogue.ingest.drop_dead_claims(utcnow())
        if dropped:
            log.info("dead_instances_claims_dropped", count=dropped)
        rulebook = RuleBook(catalogue, settings)
        storage_name, endpoint = settings.first_disk()
        storage = open_storage(storage_name, endpoint)
        sweeping: asyncio.Task[None] | None = None
        if isinstance(storage, PosixStorage):
            removed = await asyncio.to_thread(storage.cleanup_temp, endpoint.stale_temp_age)
            if removed:
                log.info("removed_stale_temp_files", storage=storage_name, count=removed)
        else:  # a remote endpoint: the same sweep, in the background (a listing of the endpoint)
            sweeping = asyncio.create_task(
                sweep_stale_temporaries(storage_name, storage, endpoint.stale_temp_age)
            )

        batch = settings.catalogue
        per_file_fsync = endpoint.durability == "file"
        lookup = partial(batches.lookup, catalogue)
        claim = partial(batches.claim, catalogue, instance)
        durable_register = partial(batches.durable_register, catalogue, storage, per_file_fsync)
        request_copies = partial(batches.request_copies, rulebook, publisher)
        resources = IngestResources(
            catalogue=catalogue,
            storage=storage,
            storage_name=storage_name,
            lookups=MicroBatcher(lookup, max_size=batch.batch_size, max_wait=batch.batch_wait),
            instance=instance,
            claims=MicroBatcher(claim, max_size=batch.batch_size, max_wait=batch.batch_wait),
            registrar=MicroBatcher(durable_register, max_size=batch.batch_size, max_wait=batch.batch_wait),
            planner=MicroBatcher(request_copies, max_size=batch.batch_size, max_wait=batch.batch_wait),
            rulebook=rulebook,
            per_file_fsync=per_file_fsync,
        )
        # In the background: the first small copies find the copy process (almost) ready.
        starting = asyncio.create_task(
            storage.start_copy_process() if isinstance(storage, PosixStorage) else asyncio.sleep(0)
        )
        closing = asyncio.create_task(
            every(
                settings.datasets.auto_close_interval,
                lambda: datasets.auto_close(catalogue, settings),
                name="auto_close",
                log=log,
                jitter=0.2,
            )
        )
        try:
            yield resources
        finally:
            for task in (starting, sweeping, closing):
                if task is not None:
                    task.cancel()
            await asyncio.gather(starting, closing, *([sweeping] if sweeping else []), return_exceptions=True)
            await resources.planner.close()
            await resources.registrar.close()
            await resources.claims.close()
            await resources.lookups.close()
            await storage.aclose()
            await instance.stop()
    finally:
        await catalogue.close()


service = Service("ingest", resources=open_resources, describe=_describe)


@service.handler(FileReady)
async def ingest_file(msg: FileReady, ctx: Context[IngestResources]) -> None:
    try:
        await _ingest(msg, ctx)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:  # the file system's own verdict: never retried
            raise Permanent("name_too_long", f"{msg.path[:300]}: {exc.strerror}") from None
        raise


async def _ingest(msg: FileReady, ctx: Context[IngestResources]) -> None:
    settings, res = ctx.settings, ctx.resources
    _check_path_length(msg.path)
    located = steps.locate(msg.path, settings.landing_areas)
    check_publisher(located.area, ctx.user_id, settings)
    steps.check_dataset(msg.dataset, settings.datasets)
    name = steps.logical_name(msg.name, located)
    check_name_length(name)
    async with res.name_lock(name):
        info = await _ingest_locked(msg, ctx, located, name)
        # Replication policy: lock the copies the rules want and request the missing ones
        # (``batches.request_copies``). Also on a duplicate, so a kill between registering and
        # publishing loses no request.
        if await res.rulebook.rules():
            await res.planner.submit((info.name, info.dataset, dict(msg.metadata), ctx.correlation_id))
    # The id names the fact, so the event re-published on a redelivery is a duplicate by id.
    await ctx.publisher.publish(
        FileIngested(
            id=fact_id("file.ingested", res.storage_name, info.name, info.adler32),
            name=info.name,
            dataset=info.dataset,
            size=info.size,
            adler32=info.adler32,
            storage=res.storage_name,
            pfn=info.name,
            sha256=info.sha256,
        ),
        correlation_id=ctx.correlation_id,
    )


@service.handler(DatasetClose)
async def close_dataset(msg: DatasetClose, ctx: Context[IngestResources]) -> None:
    outcome = await datasets.close_dataset(msg, ctx.resources.catalogue, ctx.user_id, ctx.settings)
    ctx.log.info("dataset_close", dataset=msg.dataset, outcome=outcome)


@service.handler(MetadataSet)
async def set_metadata(msg: MetadataSet, ctx: Context[IngestResources]) -> None:
    """Metadata set / removed after ingest (``daemons.ingest.metadata``)."""
    outcome = await apply_metadata(msg, ctx.resources.catalogue)
    ctx.log.info("metadata_set", file=msg.file, dataset=msg.dataset, outcome=outcome)


def check_publisher(area: str, user_id: str | None, settings: Settings) -> None:
    """A landing area listed in ``landing_publishers`` takes announcements only from its listed
    broker users (the AMQP ``user_id``, validated by RabbitMQ) and from Spool's own users. An area
    listed with no users takes them from Spool's users only; an area not listed, from anyone."""
    allowed = settings.landing_publishers.get(area)
    if allowed is None or user_id in allowed or is_spool_user(user_id, settings.bus):
        return
    who = f"broker user {user_id!r}" if user_id else "a publisher without a user_id"
    raise Permanent(
        "area_not_permitted", f"{who} may not announce files in landing area {area!r} ({', '.join(allowed)})"
    )


def _check_path_length(path: str) -> None:
    part = limits.too_long_component(path)
    if part is not None:
        raise Permanent(
            "name_too_long",
            f"a component of {path[:200]!r} is {len(part.encode(errors='surrogatepass'))} bytes, "
            f"at most {limits.MAX_COMPONENT_BYTES} allowed",
        )


def check_name_length(name: str) -> None:
    """A logical name becomes a path on every disk endpoint: its components must fit the file
    system and the whole the catalogue's column. Decided before the copy, for good."""
    if len(name) > limits.MAX_NAME:
        raise Permanent(
            "name_too_long", f"logical name is {len(name)} characters, at most {limits.MAX_NAME} allowed"
        )
    _check_path_length(name)


async def _ingest_locked(
    msg: FileReady, ctx: Context[IngestResources], located: steps.Located, name: str
) -> FileInfo:
    res = ctx.resources
    known = await res.lookups.submit((msg.id, name, msg.dataset))
    if known.prior is not None:
        # A failure row's name may be the lexical one (``failure_names``), which a symlinked
        # directory makes differ from the resolved one: there the path decides, unless the event
        # gave its name.
        exact = known.prior.state == "done" or msg.name is not None
        other = known.prior.differs(
            name=name if exact else None, paths=(msg.path, located.source), dataset=msg.dataset
        )
        if other is not None:
            raise _id_conflict(msg.id, other, name)
    if known.dataset_state in GONE or (known.file is None and known.dataset_state in CLOSED):
        raise dataset_closed(msg.dataset, known.dataset_state, name)
    if known.event_done and known.file is not None:
        claims = _claims_differ(msg, known.file)
        if claims is not None:
            raise _id_conflict(msg.id, f"{name!r} with {claims}", name)
        ctx.log.info("duplicate_event", name=name)
        return known.file
    if known.file is not None:
        adler = msg.adler32
        if adler is None and msg.size in (None, known.file.size):
            adler = await _source_checksum(located)
        verdict = steps.compare_existing(msg.size, adler, known.file.size, known.file.adler32)
        if msg.sha256 is not None and known.file.sha256 not in (None, msg.sha256):
            verdict = "conflict"
        if verdict == "conflict":
            raise _conflict(name, known.file, msg.size, adler)
        # Same content again: record the event id as done (through registration) and re-publish.
        size, adler32 = known.file.size, known.file.adler32
        return await _register(msg, ctx, located, name, size, adler32, known.file.sha256, copied=False)
    holder = await res.claims.submit(name)
    if holder == REGISTERED:  # by another instance since our look-up: the retry's look-up decides
        raise Retryable(
            "name_being_ingested", f"{name!r} was registered by another ingest instance meanwhile"
        )
    if holder is not None:
        raise Retryable(
            "name_being_ingested",
            f"{name!r} is being copied by another ingest instance ({holder}); retried once it is registered",
        )
    try:
        return await _copy_and_register(msg, ctx, located, name)
    except BaseException:
        await _release_claim(ctx, name)
        raise


async def _copy_and_register(
    msg: FileReady, ctx: Context[IngestResources], located: steps.Located, name: str
) -> FileInfo:
    res = ctx.resources
    if isinstance(res.storage, PosixStorage):
        copied = await res.storage.put_from(
            located.source,
            name,
            expected_size=msg.size,
            expected_adler32=msg.adler32,
            fsync=res.per_file_fsync,
            expected_sha256=msg.sha256,
        )
        size, adler32, sha256 = copied.size, copied.adler32, copied.sha256
    else:  # a remote first endpoint: uploaded, verified by the server's checksum
        uploaded = await upload_checked(
            res.storage,
            located.source,
            name,
            expected_size=msg.size,
            expected_adler32=msg.adler32,
            expected_sha256=msg.sha256,
        )
        size, adler32, sha256 = uploaded.size, uploaded.adler32, uploaded.sha256
    return await _register(msg, ctx, located, name, size, adler32, sha256, copied=True)


async def _register(
    msg: FileReady,
    ctx: Context[IngestResources],
    located: steps.Located,
    name: str,
    size: int,
    adler32: str,
    sha256: str | None,
    *,
    copied: bool,
) -> FileInfo:
    """Register what was copied (or found registered); on failure, remove a copy this event made
    that the catalogue does not record, so nothing unregistered stays in the storage root."""
    res = ctx.resources
    record = IngestRecord(
        event_id=msg.id,
        name=name,
        dataset=msg.dataset,
        size=size,
        adler32=adler32,
        sha256=sha256,
        metadata=dict(msg.metadata),
        dataset_metadata=dict(ctx.settings.datasets.fields_of(msg.dataset) or {}),
        parents=list(msg.parents),
        storage=res.storage_name,
        pfn=name,
        path=str(located.source),
        source=msg.source,
        attempt=ctx.attempt,
    )
    try:
        outcome = await res.registrar.submit(record)
        if outcome.outcome == "conflict":
            # Another process registered the name between our lookup and our write.
            raise _conflict(name, outcome.file, size, adler32)
        if outcome.outcome == "dataset_closed":
            # The dataset was closed between our look-up and the registration.
            raise dataset_closed(msg.dataset, "closed", name)
        if outcome.file is None:
            # The event id was recorded done for another name in the same instant (a batch).
            raise _id_conflict(msg.id, "another file", name)
    except Exception:
        if copied:
            await _remove_unregistered(ctx, name)
        raise
    return outcome.file


async def _release_claim(ctx: Context[IngestResources], name: str) -> None:
    """A claimed name not registered: let another attempt (ours or another instance's) claim it.
    A registration removes the claim in its own transaction; a release that fails leaves the claim
    to this instance's retry, or to the others once this instance's lease has run out."""
    res = ctx.resources
    try:
        await res.catalogue.ingest.release_names([name], res.instance.id)
    except Exception as exc:
        ctx.log.warning("ingest_claim_not_released", name=name, error=repr(exc))


async def _remove_unregistered(ctx: Context[IngestResources], name: str) -> None:
    res = ctx.resources
    try:
        if await res.catalogue.ingest.replica_recorded(name, res.storage_name):
            return  # the catalogue records a replica here: it is someone's file, not our leftover
        await res.storage.delete(name)
        ctx.log.info("unregistered_copy_removed", name=name, storage=res.storage_name)
    except Exception as exc:  # the original failure is what the runner must see
        ctx.log.warning("unregistered_copy_not_removed", name=name, error=repr(exc))


def _claims_differ(msg: FileReady, registered: FileInfo) -> str | None:
    """A done event re-sent must claim what was registered under its id (size, checksum)."""
    if msg.size is not None and msg.size != registered.size:
        return f"size {registered.size}"
    if msg.adler32 is not None and msg.adler32 != registered.adler32:
        return f"adler32 {registered.adler32}"
    if msg.sha256 is not None and registered.sha256 not in (None, msg.sha256):
        return f"sha256 {registered.sha256}"
    return None


def dataset_closed(dataset: str, state: str | None, name: str) -> Permanent:
    return Permanent(
        "dataset_closed", f"dataset {dataset!r} is {state}: it takes no new file ({name!r} refused)"
    )


def _id_conflict(event_id: str, other: str, name: str) -> Permanent:
    return Permanent(
        "id_conflict",
        f"event id {event_id!r} was already used for {other}; this event is for {name!r}"
        " (an event id names one event: send a new id)",
    )


async def _source_checksum(located: steps.Located) -> str:
    try:
        return await asyncio.to_thread(adler32_of_file, located.source)
    except FileNotFoundError:
        raise Permanent("file_missing", f"{located.source} does not exist") from None


def _conflict(name: str, existing: FileInfo | None, size: int | None, adler32: str | None) -> Permanent:
    have = f"size {existing.size}, adler32 {existing.adler32}" if existing else "another content"
    return Permanent(
        "name_conflict",
        f"{name} is already registered with {have}; this event has size {size}, adler32 {adler32}",
    )


def lexical_name(msg: FileReady, settings: Settings) -> str | None:
    """The logical name a refused file would have had, without touching the file system: its
    ``name``, else its path relative to the landing area that holds it as written (a refused path
    may be a FIFO, a symlink out of the area, or gone). None when no area holds it."""
    if msg.name is not None:
        return msg.name
    path = os.path.normpath(msg.path)
    for root in settings.landing_areas.values():
        root_text = os.path.normpath(os.fspath(root))
        if path.startswith(root_text.rstrip("/") + "/"):
            return path[len(root_text.rstrip("/")) + 1 :]
    return None


@service.failure_hook
async def record_failure(
    msg: Message | None, err: SpoolError, attempt: int, final: bool, ctx: Context[IngestResources]
) -> None:
    """Keep the last error per file in the catalogue (``spool show`` / ``spool trace`` read it),
    findable by the logical name the file would have had and by its absolute path.

    An ``id_conflict`` leaves the request row alone (it describes the first event of that id) and
    only adds the failure to the history of this event's file.
    """
    if not isinstance(msg, FileReady):
        return  # undecodable: the dead-letter queue holds it with its reason
    catalogue = ctx.resources.catalogue
    name = lexical_name(msg, ctx.settings)
    if name is not None and len(name) > limits.MAX_NAME:
        name = None  # longer than any name the catalogue holds: traceable by its path only
    path = msg.path if len(msg.path) <= limits.MAX_NAME else None
    state = "failed" if final else "retrying"
    detail = {"request_id": msg.id, "kind": "ingest", "reason": err.reason, "error": err.message}
    event = {"daemon": "ingest", "type": "file.failed" if final else "file.retry", "outcome": state}
    if err.reason == "id_conflict":
        for key in dict.fromkeys(n for n in (name, path) if n is not None):
            await catalogue.history.record_event(name=key, attempt=attempt, detail=detail, **event)
        return
    # The request row, and the history under the logical name (else the path).
    await catalogue.history.record_failure(
        request_id=msg.id,
        kind="ingest",
        daemon="ingest",
        reason=err.reason,
        error=err.message,
        attempts=attempt,
        final=final,
        name=name,
        path=path,
        dataset=msg.dataset,
    )
    if name is not None and path is not None and name != path:  # and under the absolute path
        await catalogue.history.record_event(name=path, attempt=attempt, detail=detail, **event)
