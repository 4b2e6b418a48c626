"""ingest's I/O glue: the ``file.ready`` handler, its resources and its failure record.

Order of work for one event, chosen so that a kill at any instruction loses nothing:

1. validate (dataset name, landing area, logical name)            -> Permanent on bad input
2. under a per-name lock: is the event id done, is the name known? -> duplicate: re-publish, stop
                                                                   -> other checksum: name_conflict
3. copy into the first disk endpoint (unnamed file, verify, link)  -> Retryable while not writable
   (remote: the checksum read here, uploaded to a temporary name, the server's checksum, renamed)
4. register file + replica + dataset + metadata + parents          -> batched, one transaction
5. evaluate the replication rules: lock the copies they want      -> batched, one transaction
6. publish one request per missing copy and ``file.ingested``, then the runner acks.

A kill after 3 leaves a verified file at its final path and no catalogue row: the redelivery copies
it again over itself and registers it. A kill during 3 leaves nothing (an unnamed file) or a temp
file (where the file system has no unnamed files), removed at start-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from common.batching import MicroBatcher
from common.bus.publisher import Publisher
from common.bus.service import Context, Service
from common.catalogue import Catalogue, FileInfo, IngestRecord, RegisterOutcome, Wanted
from common.config import Settings
from common.errors import Permanent, SpoolError
from common.logging import get_logger
from common.messages import FileIngested, FileReady, Message, fact_id
from common.placement import BULK, RuleBook, config_rules, publish_wanted
from common.storage import PosixStorage, StorageBackend, open_storage
from common.storage.checksum import adler32_of_file
from common.storage.transfer import sweep_stale_temporaries, upload_checked
from daemons.ingest import steps

log = get_logger("spool.ingest")


@dataclass
class Known:
    event_done: bool
    file: FileInfo | None


@dataclass
class _NameLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class IngestResources:
    catalogue: Catalogue
    storage: StorageBackend
    storage_name: str
    lookups: MicroBatcher[tuple[str, str], Known]
    registrar: MicroBatcher[IngestRecord, RegisterOutcome]
    # (name, dataset, metadata) -> the copies its replication rules still need.
    planner: MicroBatcher[tuple[str, str, dict[str, Any], str | None], list[Wanted]]
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
    return {"file": getattr(msg, "name", None) or getattr(msg, "path", None)}


@asynccontextmanager
async def open_resources(settings: Settings, publisher: Publisher) -> AsyncIterator[IngestResources]:
    catalogue = await Catalogue.open(settings.catalogue.url, echo=settings.catalogue.echo)
    try:
        await catalogue.sync_endpoints(settings.storage)
        await catalogue.sync_config_rules(config_rules(settings))
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

        async def lookup(keys: Sequence[tuple[str, str]]) -> list[Known]:
            done, files = await catalogue.ingest_known([k[0] for k in keys], [k[1] for k in keys])
            return [Known(i in done, files.get(n)) for i, n in keys]

        batch = settings.catalogue
        per_file_fsync = endpoint.durability == "file"

        async def durable_register(records: Sequence[IngestRecord]) -> Sequence[RegisterOutcome]:
            # Group commit: the copies of the whole batch reach the disk before any is recorded.
            # (A remote endpoint's server has its file before our upload returns.)
            if not per_file_fsync and isinstance(storage, PosixStorage):
                await storage.sync()
            return await catalogue.register_ingested(records)

        async def plan_and_request(
            items: Sequence[tuple[str, str, dict[str, Any], str | None]],
        ) -> list[list[Wanted]]:
            # The disk copies a whole batch wants go out now as bulk replica.requests (one message
            # per destination and few hundred files, not one per file); each handler then
            # publishes only its tape requests. The handlers ack after this returns: a kill in
            # between redelivers the events, whose duplicates plan and request again.
            # Each file's requests keep its file.ready's correlation id (item[3]).
            wanted = await rulebook.plan([i[:3] for i in items], correlation_ids=[i[3] for i in items])
            await publish_wanted(publisher, [w for ws in wanted for w in ws if w.kind == "disk"], bulk=BULK)
            return [[w for w in ws if w.kind != "disk"] for ws in wanted]

        resources = IngestResources(
            catalogue=catalogue,
            storage=storage,
            storage_name=storage_name,
            lookups=MicroBatcher(lookup, max_size=batch.batch_size, max_wait=batch.batch_wait),
            registrar=MicroBatcher(durable_register, max_size=batch.batch_size, max_wait=batch.batch_wait),
            planner=MicroBatcher(plan_and_request, max_size=batch.batch_size, max_wait=batch.batch_wait),
            rulebook=rulebook,
            per_file_fsync=per_file_fsync,
        )
        # In the background: the first small copies find the copy process (almost) ready.
        starting = asyncio.create_task(
            storage.start_copy_process() if isinstance(storage, PosixStorage) else asyncio.sleep(0)
        )
        try:
            yield resources
        finally:
            for task in (starting, sweeping):
                if task is not None:
                    task.cancel()
            await asyncio.gather(starting, *([sweeping] if sweeping else []), return_exceptions=True)
            await resources.planner.close()
            await resources.registrar.close()
            await resources.lookups.close()
            await storage.aclose()
    finally:
        await catalogue.close()


service = Service("ingest", resources=open_resources, describe=_describe)


@service.handler(FileReady)
async def ingest_file(msg: FileReady, ctx: Context[IngestResources]) -> None:
    settings, res = ctx.settings, ctx.resources
    steps.check_dataset(msg.dataset, settings.datasets)
    located = steps.locate(msg.path, settings.landing_areas)
    name = steps.logical_name(msg.name, located)
    async with res.name_lock(name):
        info = await _ingest_locked(msg, ctx, located, name)
        # Replication policy: lock the copies the rules want and request the missing ones. Also on
        # a duplicate, so a kill between registering and publishing loses no request.
        wanted: list[Wanted] = []
        if await res.rulebook.rules():
            wanted = await res.planner.submit(
                (info.name, info.dataset, dict(msg.metadata), ctx.correlation_id)
            )
    await publish_wanted(ctx.publisher, wanted, correlation_id=ctx.correlation_id)
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
        ),
        correlation_id=ctx.correlation_id,
    )


async def _ingest_locked(
    msg: FileReady, ctx: Context[IngestResources], located: steps.Located, name: str
) -> FileInfo:
    res = ctx.resources
    known = await res.lookups.submit((msg.id, name))
    if known.event_done and known.file is not None:
        ctx.log.info("duplicate_event", name=name)
        return known.file
    if known.file is not None:
        adler = msg.adler32
        if adler is None and msg.size in (None, known.file.size):
            adler = await _source_checksum(located)
        verdict = steps.compare_existing(msg.size, adler, known.file.size, known.file.adler32)
        if verdict == "conflict":
            raise _conflict(name, known.file, msg.size, adler)
        # Same content again: record the event id as done (through registration) and re-publish.
        size, adler32 = known.file.size, known.file.adler32
    elif isinstance(res.storage, PosixStorage):
        copied = await res.storage.put_from(
            located.source,
            name,
            expected_size=msg.size,
            expected_adler32=msg.adler32,
            fsync=res.per_file_fsync,
        )
        size, adler32 = copied.size, copied.adler32
    else:  # a remote first endpoint: uploaded, verified by the server's checksum
        uploaded = await upload_checked(
            res.storage, located.source, name, expected_size=msg.size, expected_adler32=msg.adler32
        )
        size, adler32 = uploaded.size, uploaded.adler32
    record = IngestRecord(
        event_id=msg.id,
        name=name,
        dataset=msg.dataset,
        size=size,
        adler32=adler32,
        metadata=dict(msg.metadata),
        parents=list(msg.parents),
        storage=res.storage_name,
        pfn=name,
        path=str(located.source),
        source=msg.source,
        attempt=ctx.attempt,
    )
    outcome = await res.registrar.submit(record)
    if outcome.outcome == "conflict":
        # Another process registered the name between our lookup and our write.
        raise _conflict(name, outcome.file, size, adler32)
    assert outcome.file is not None
    return outcome.file


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


@service.failure_hook
async def record_failure(
    msg: Message | None, err: SpoolError, attempt: int, final: bool, ctx: Context[IngestResources]
) -> None:
    """Keep the last error per file in the catalogue (``spool show`` / ``spool trace`` read it)."""
    if not isinstance(msg, FileReady):
        return  # undecodable: the dead-letter queue holds it with its reason
    await ctx.resources.catalogue.record_failure(
        request_id=msg.id,
        kind="ingest",
        daemon="ingest",
        reason=err.reason,
        error=err.message,
        attempts=attempt,
        final=final,
        name=msg.name,
        path=msg.path,
        dataset=msg.dataset,
    )
