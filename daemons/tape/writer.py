"""One write batch: a pool's queue head written sequentially onto its cartridges in one mount.

Order of work, so that a kill at any instruction loses nothing and writes nothing twice:

1. take the queue head (``steps.batch_size``), pick a cartridge and claim a drive (``drives.Mount``)
2. mark the copies ``archiving`` on that cartridge, held by this instance (catalogue) — from now
   on the batch owns them; ``TAKE_WINDOW`` files at a time, the next window when this one is
   written (2-4 repeat until the batch's limits or the queue's end)
3. mount (working around broken drives and cartridges that will not load)
4. per file, in order: write it from its first usable disk copy (a mounted one first; a remote
   one is downloaded to a node-local staging file first, ``staging``) behind a buffered tape mark
   (``write(flush=False)``); the library verifies size and adler32 while writing and returns the
   file sequence number, but the file is not durable yet
5. every ``flush_files`` files or ``flush_bytes`` bytes (``[tape]``, CTA's defaults), before a
   cartridge change and at the end: flush (one synchronous tape mark makes the group durable),
   then record the group ``available`` with cartridge + fseq (``Recorder``), their
   ``file.archived`` written to the outbox in the same transaction; the relay publishes them
   after the commit (a broker outage delays them, a kill leaves them for the next start)
6. at the end, or on any error: flush and record what was written, put the copies not made
   durable back into the queue, release the drive (the cartridge stays mounted for the pool's
   next batch; the library drops whatever a failed flush left behind).

Killed between 5's flush and its record, a file is committed on tape but the catalogue still says
``archiving`` on that cartridge: start-up reconciliation (``reconcile``) finds it there and records
it. Killed during 4 or before 5's flush, the library drops the files written since the last flush
when it reopens (they were never committed), and reconciliation puts their copies back in the
queue; a staging file left behind is removed at the next start. The batch never records a file
the library has not committed.

Small files (``[tape] aggregate_below``) are not written one by one: in step 4 each is copied,
verified, into an aggregate staged in the staging directory (``common.tape.aggregate``: a tar with
an index), and the aggregate, once it reaches ``aggregate_size`` / ``aggregate_max_files`` or the
batch ends, is written as one tape file (one per-file overhead on the drive) with its members'
index. A member whose source is bad fails alone, as a plain file would; the others go on. After
the flush, each member is recorded at the aggregate's fseq and its own offset within it, the
aggregate's members in one transaction. A kill before the flush loses the aggregate as it loses a
plain file (its members go back to the queue); after it, reconciliation finds the members in the
cartridge's list of files (the index given to the library with the aggregate). A stop (drain)
drops an aggregate not yet written: its members go back to the queue.

A cartridge that fills up mid-batch is closed (state ``full``) and the batch continues on the next
one of the pool; what was written before is recorded first, so catalogue rows always name the
cartridge their file is on or is being written to. A file whose disk copies are all missing or
corrupt fails (``failed``, the reason is the file's last error, ``file.failed`` goes through the
outbox); the batch goes on with the next file. ``tape.mounted`` goes through the outbox too.

Several instances may write one library (``daemons.tape.reconcile``): every catalogue statement of
the batch names this instance as the copies' holder and matches nothing once a successor has
taken them over. So that a successor never requeues a file this instance then commits, the batch
writes, flushes and moves to a new cartridge only while its lease stands with a quarter of it to
spare (``Env.may_commit``): an instance whose renewals fail (paused, cut off from the catalogue)
stops its batch well before others count it dead; what it had not flushed is dropped when it
releases the drive, and its copies go back to the queue (or are settled by the successor).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.catalogue import Catalogue, Source
from common.catalogue import tape as db
from common.config import Settings
from common.errors import Permanent, Retryable, SpoolError
from common.instance import InstanceLease
from common.logging import get_logger
from common.messages import FileFailed, TapeMounted, utcnow
from common.storage import StorageBackend
from common.storage.checksum import normalise_adler32
from common.tape import TapeLibrary, TapeMember, aggregate
from common.tape.data import run_to_completion
from daemons.relay import OutboxRelay
from daemons.tape import staging, steps
from daemons.tape.drives import Mount, MountFailures

log = get_logger("spool.tape")

AGGREGATE_PREFIX = "spool-aggregate-"  # the tape file name of an aggregate (its members are in its index)
# How a batch file goes out: to tape, or into the open aggregate (see ``Batch._write``).
Put = Callable[[db.BatchFile, Source, Path, bool], Awaitable["SpoolError | bool | None"]]


@dataclass
class Env:
    """What every batch of the process shares."""

    settings: Settings
    catalogue: Catalogue
    relay: OutboxRelay  # publishes the events the catalogue's outbox holds
    storages: Mapping[str, StorageBackend]
    staging: Path  # node-local directory of remote copies being written (``staging``)
    lease: InstanceLease  # this instance: the holder of the copies its batches take
    failures: MountFailures = field(default_factory=MountFailures)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    mounts: set[Mount] = field(default_factory=set)  # of the batches running now

    @property
    def holder(self) -> str:
        return self.lease.id

    def own_drives(self) -> set[str]:
        """The drives this process's batches hold now (``reconcile``: not another's writer)."""
        return {m.drive for m in self.mounts if m.drive is not None}

    def may_commit(self) -> bool:
        """Whether the lease stands with ``lease_margin`` to spare (see the module doc)."""
        lease = self.lease
        if lease.lost or lease.expires is None:
            return False
        return lease.expires - utcnow() > lease.lease * LEASE_MARGIN


# The part of a lease that must be left for a batch to write, flush or change cartridge: a
# quarter tolerates one failed renewal (renewed every third), and leaves others' clocks and the
# operation in flight that much time before they count this instance dead.
LEASE_MARGIN = 0.25


def lease_lost(holder: str) -> Retryable:
    return Retryable(
        "instance_lease_lost",
        f"{holder}: the lease is about to run out (renewals failing): the batch stops and leaves "
        "its copies to the queue or to a successor",
    )


class Recorder:
    """Files a flush made durable, recorded with their ``file.archived`` events (outbox), which
    the relay then publishes: about ``every`` per transaction, an aggregate's members never split
    (one transaction, one set-based statement, whatever their number)."""

    def __init__(self, catalogue: Catalogue, relay: OutboxRelay, every: int, holder: str) -> None:
        self.catalogue = catalogue
        self.relay = relay
        self.every = every
        self.holder = holder
        self.buffer: list[list[db.Archived]] = []  # one list per tape file

    def add(self, record: db.Archived) -> None:
        self.buffer.append([record])

    def add_aggregate(self, records: list[db.Archived]) -> None:
        if records:
            self.buffer.append(records)

    async def flush(self) -> None:
        while self.buffer:
            n, size = 0, 0
            while n < len(self.buffer) and (n == 0 or size + len(self.buffer[n]) <= self.every):
                size += len(self.buffer[n])
                n += 1
            await self.catalogue.tape.record_archived(
                [a for group in self.buffer[:n] for a in group], holder=self.holder
            )
            del self.buffer[:n]
            self.relay.kick()


@dataclass(frozen=True, slots=True)
class Unflushed:
    """A file on the tape behind a buffered tape mark, waiting for the flush that commits it
    (``members``: an aggregate, its files and their offsets within it; ``file`` is then None)."""

    file: db.BatchFile | None
    vid: str
    fseq: int
    size: int
    members: tuple[tuple[db.BatchFile, int], ...] = ()


@dataclass
class Open:
    """The aggregate being built for the next tape file, and the batch files in it."""

    builder: aggregate.Builder
    files: list[tuple[db.BatchFile, TapeMember]] = field(default_factory=list)


# Files taken from the queue at a time within one batch (``Batch.run``): a few MB of rows.
TAKE_WINDOW = 2_000


class Batch:
    """One mount's worth of one tape endpoint's queue (see the module doc for the order of work)."""

    def __init__(self, env: Env, target: steps.TapeTarget, library: TapeLibrary) -> None:
        self.env = env
        self.target = target
        self.library = library
        policy = env.settings.tape
        self.recorder = Recorder(env.catalogue, env.relay, policy.record_every, env.holder)
        self.pending: dict[int, db.BatchFile] = {}  # taken, neither durable on tape nor failed yet
        self.unflushed: list[Unflushed] = []  # written since the last flush (still pending)
        self.open: Open | None = None  # the aggregate being built (its files still pending)
        self.written = 0
        self.failed = 0
        self.mount: Mount | None = None

    async def _mounted(self, drive: str, vid: str) -> None:
        mounted = TapeMounted(
            library=self.target.library,
            drive=drive,
            cartridge=vid,
            purpose="archive",
            request=self.mount.request if self.mount else None,
        )
        await self.env.catalogue.outbox.add([mounted])
        self.env.relay.kick()

    async def run(self, why: str) -> int:
        """Write the batch; returns the number of files written (0: no drive, or nothing queued).

        The batch (up to ``batch_max_files`` / ``batch_max_bytes`` in one mount) is taken from the
        queue ``TAKE_WINDOW`` files at a time, each window marked ``archiving`` just before it is
        written: taken whole, a night's 50,000-file batch held every file's row and sources in the
        daemon's memory at once (tens of MB), and a kill had all of them to settle."""
        policy = self.env.settings.tape
        cat = self.env.catalogue
        files_left, bytes_left = policy.batch_max_files, policy.batch_max_bytes
        chosen = await self._next_window(files_left, bytes_left, first=True)
        if not chosen:
            return 0
        mount = self.mount = Mount(
            self.library,
            self.target.pool,
            steps.label(self.target.storage, self.target.pool, len(chosen)),
            self.env.failures,
            policy.mount_failures_before_suspect,
            self._moved_to,
            self._mounted,
        )
        self.env.mounts.add(mount)
        try:
            if not await mount.acquire(needed=chosen[0].size):
                return 0
            loaded = False
            empty = 0  # windows in a row that other writers took first
            while chosen and not self.env.stopping.is_set():
                assert mount.vid is not None
                if not self.env.may_commit():
                    raise lease_lost(self.env.holder)
                files = await cat.tape.take_batch(
                    [c.replica_id for c in chosen], mount.vid, holder=self.env.holder
                )
                if not files:
                    # Another instance took this head of the queue meanwhile (both read it before
                    # either took it): the next head, unless the queue is being emptied under us.
                    empty += 1
                    if empty >= 3:
                        break
                    chosen = await self._next_window(files_left, bytes_left, first=not loaded)
                    continue
                empty = 0
                self.pending.update((f.replica_id, f) for f in files)
                files_left -= len(chosen)
                bytes_left -= sum(c.size for c in chosen)
                if not loaded:
                    log.info(
                        "archive_batch_started", storage=self.target.storage, pool=self.target.pool, why=why,
                        files=len(files), bytes=sum(f.size for f in files), drive=mount.drive,
                        cartridge=mount.vid,
                    )  # fmt: skip
                    await mount.load(needed=files[0].size)
                    loaded = True
                for f in files:
                    if self.env.stopping.is_set():
                        break
                    if f.size < policy.aggregate_below:
                        await self._aggregate(f)
                    else:
                        await self._archive(f, self._write)
                    await self._maybe_flush()
                chosen = await self._next_window(files_left, bytes_left, first=False)
            if loaded and not self.env.stopping.is_set():
                await self._write_aggregate()
        finally:
            await self._finish()
        return self.written

    async def _next_window(self, files_left: int, bytes_left: int, *, first: bool) -> list[db.Candidate]:
        """The queue's next ``TAKE_WINDOW`` files within what is left of the batch's limits (the
        first window takes its first file whatever its size, as ``steps.batch_size`` does)."""
        if files_left <= 0 or bytes_left <= 0:
            return []
        window = min(TAKE_WINDOW, files_left)
        head = await self.env.catalogue.tape.queue_head(self.target.storage, window)
        if not first and head and head[0].size > bytes_left:
            return []
        return head[: steps.batch_size([c.size for c in head], window, bytes_left)]

    async def _maybe_flush(self) -> None:
        policy = self.env.settings.tape
        size = sum(u.size for u in self.unflushed)
        if len(self.unflushed) >= policy.flush_files or size >= policy.flush_bytes:
            await self._flush()

    async def _flush(self) -> None:
        """One synchronous tape mark for what was written since the last one, then its records:
        nothing is recorded that the library has not made durable."""
        if not self.unflushed:
            return
        assert self.mount is not None and self.mount.drive is not None
        if not self.env.may_commit():
            raise lease_lost(self.env.holder)
        await self.library.flush(self.mount.drive)
        for u in self.unflushed:
            if u.file is not None:
                self.recorder.add(self._archived(u.file, u.vid, u.fseq, None))
            else:
                self.recorder.add_aggregate([self._archived(f, u.vid, u.fseq, at) for f, at in u.members])
        self.unflushed.clear()
        await self.recorder.flush()

    def _archived(self, f: db.BatchFile, vid: str, fseq: int, offset: int | None) -> db.Archived:
        """``f`` is durable on tape: no longer pending, to be recorded."""
        del self.pending[f.replica_id]
        self.written += 1
        storage = self.target.storage
        correlation = db.CORRELATIONS.take(f.name, storage)  # the tape.archive's (its file.ready's)
        return db.Archived(f.replica_id, f.name, storage, vid, fseq, correlation, offset)

    # --- aggregates ----------------------------------------------------------------------------
    async def _aggregate(self, f: db.BatchFile) -> None:
        """Copy the small file ``f`` into the open aggregate (opened here when none is), after
        writing the open one to tape when ``f`` would take it past its limits."""
        policy = self.env.settings.tape
        if self.open is not None and self.open.files:
            b = self.open.builder
            if (
                b.size + f.size + aggregate.MEMBER_OVERHEAD > policy.aggregate_size
                or len(self.open.files) >= policy.aggregate_max_files
            ):
                await self._write_aggregate()
        if self.open is None:
            path = self.env.staging / f"aggregate-{secrets.token_hex(8)}.tar"
            self.open = Open(await asyncio.to_thread(aggregate.Builder, path))
        await self._archive(f, self._add_member)

    async def _add_member(
        self, f: db.BatchFile, source: Source, path: Path, staged: bool
    ) -> SpoolError | bool | None:
        """``_write``'s counterpart for a small file: copied into the open aggregate, verified
        against the catalogue's size and adler32 (a member that does not match is cut off again
        and fails alone, with the reasons a tape write gives)."""
        assert self.open is not None
        try:
            member = await run_to_completion(
                self.open.builder.add, path, f.name, str(f.replica_id), f.size, normalise_adler32(f.adler32),
                f.sha256,
            )  # fmt: skip
        except SpoolError as exc:
            if exc.reason in steps.SOURCE_BAD and not staged:
                await self._source_bad(f, source, exc)
                return False
            if exc.reason in steps.SOURCE_TRANSIENT or exc.reason in steps.SOURCE_BAD:
                return exc
            raise
        self.open.files.append((f, member))
        return None

    async def _write_aggregate(self) -> None:
        """Seal the open aggregate and write it as one tape file (behind a buffered tape mark, as
        any file); its staging file is removed whatever happens."""
        opened, self.open = self.open, None
        if opened is None:
            return
        try:
            if not opened.files:
                return
            size, adler32 = await asyncio.to_thread(opened.builder.seal)
            largest = max((c.capacity for c in await self.library.list_cartridges()), default=0)
            if size > largest:  # tiny test cartridges: its members go as plain files instead
                for f, _m in opened.files:
                    await self._archive(f, self._write)
                return
            name = f"{AGGREGATE_PREFIX}{opened.builder.path.stem.removeprefix('aggregate-')}.tar"
            members = [m for _f, m in opened.files]
            fseq, vid = await self._put(opened.builder.path, name, size, adler32, members)
            self.unflushed.append(
                Unflushed(None, vid, fseq, size, tuple((f, m.offset) for f, m in opened.files))
            )
            log.info("archive_aggregate_written", cartridge=vid, fseq=fseq, files=len(members), bytes=size)
        finally:
            await asyncio.to_thread(opened.builder.discard)

    async def _put(
        self, path: Path, name: str, size: int, adler32: str, members: list[TapeMember]
    ) -> tuple[int, str]:
        """Write the staged aggregate, moving on to the pool's next cartridge when this one is
        full; returns (fseq, cartridge). The library verifies the aggregate's adler32 as it copies:
        a staging file that changed since is this node's fault (``tape_write_error``, the batch
        ends and its files are queued again)."""
        mount = self.mount
        assert mount is not None
        while True:
            assert mount.drive is not None
            if not self.env.may_commit():
                raise lease_lost(self.env.holder)
            try:
                fseq = await self.library.write(
                    mount.drive, path, name, size, adler32, flush=False, members=members
                )
            except SpoolError as exc:
                if exc.reason in steps.CARTRIDGE_DONE:
                    await self._flush()
                    await mount.close_cartridge(exc.reason, needed=size)
                    continue
                if exc.reason in steps.SOURCE_BAD or exc.reason in steps.SOURCE_TRANSIENT:
                    raise Retryable("tape_write_error", f"staged aggregate {path}: {exc.message}") from None
                raise
            assert mount.vid is not None
            return fseq, mount.vid

    async def _moved_to(self, vid: str) -> None:
        """The batch continues on ``vid``: the copies not written yet now belong to it."""
        if not self.env.may_commit():
            raise lease_lost(self.env.holder)
        await self.env.catalogue.tape.point_to(list(self.pending), vid, holder=self.env.holder)

    async def _archive(self, f: db.BatchFile, put: Put) -> None:
        """Write ``f`` with ``put`` (to tape, or into the open aggregate) from its first usable
        source."""
        transient: SpoolError | None = None
        for source in staging.prefer_local(f.sources, self.env.storages):
            try:
                path, staged = await self._source_file(f, source)
            except SpoolError as exc:
                if exc.reason in steps.DOWNLOAD_BAD or isinstance(exc, Permanent):
                    await self._source_bad(f, source, exc)
                else:  # the endpoint or the network, not the copy: another source, or later
                    log.warning(
                        "archive_source_unreachable", file=f.name, source=source.storage,
                        reason=exc.reason, error=exc.message,
                    )  # fmt: skip
                    transient = exc
                continue
            try:
                outcome = await put(f, source, path, staged)
            finally:
                if staged:
                    await asyncio.to_thread(staging.discard, path)
            if outcome is None:
                return  # written, or failed for good
            if isinstance(outcome, SpoolError):
                transient = outcome
        if transient is not None:
            log.warning(
                "archive_source_unreadable", file=f.name, reason=transient.reason, error=transient.message
            )
            return  # stays pending: back to the queue at the end of the batch
        tried = ", ".join(s.storage for s in f.sources) or "none available"
        await self._fail(f, "no_source", f"no usable disk copy to archive from (tried: {tried})")

    async def _write(
        self, f: db.BatchFile, source: Source, path: Path, staged: bool
    ) -> SpoolError | bool | None:
        """Write ``f`` from ``path``: None when done with the file (written, or failed for good),
        False when this source is bad (the next one is tried), the error when it may pass.

        A staging file was verified as it was downloaded: a source error reading it back is this
        node's, not the remote copy's, which is therefore not marked bad."""
        mount = self.mount
        assert mount is not None
        while True:
            assert mount.drive is not None
            if not self.env.may_commit():
                raise lease_lost(self.env.holder)
            try:
                fseq = await self.library.write(
                    mount.drive, path, f.name, f.size, f.adler32, flush=False, sha256=f.sha256
                )
            except SpoolError as exc:
                if exc.reason in steps.CARTRIDGE_DONE:
                    if await self._too_large(f):
                        return None
                    await self._flush()  # rows must name the cartridge their file is on
                    await mount.close_cartridge(exc.reason, needed=f.size)
                    continue
                if exc.reason in steps.SOURCE_BAD and not staged:
                    await self._source_bad(f, source, exc)
                    return False
                if exc.reason in steps.SOURCE_TRANSIENT or exc.reason in steps.SOURCE_BAD:
                    return exc
                raise
            assert mount.vid is not None
            self.unflushed.append(Unflushed(f, mount.vid, fseq, f.size))
            return None

    async def _source_file(self, f: db.BatchFile, source: Source) -> tuple[Path, bool]:
        """The file of this node to write (``staging.fetch``): a mounted copy, or a remote one
        downloaded into the staging directory."""
        storage = self.env.storages.get(source.storage)
        if storage is None:
            raise Permanent("unknown_storage", f"disk endpoint {source.storage!r} is not configured here")
        return await staging.fetch(
            storage, source, self.env.staging, tag=str(f.replica_id), size=f.size, adler32=f.adler32
        )

    async def _too_large(self, f: db.BatchFile) -> bool:
        """A file larger than any cartridge would close every cartridge of the pool in turn."""
        largest = max((c.capacity for c in await self.library.list_cartridges()), default=0)
        if f.size <= largest:
            return False
        await self._fail(f, "larger_than_cartridge", f"{f.size} bytes do not fit a {largest}-byte cartridge")
        return True

    async def _source_bad(self, f: db.BatchFile, source: Source, exc: SpoolError) -> None:
        """A missing or corrupt disk copy is marked ``bad`` (as the replicator does) and the next
        one is tried."""
        log.warning(
            "archive_source_bad", file=f.name, source=source.storage, reason=exc.reason, error=exc.message
        )
        cat = self.env.catalogue
        if exc.reason == "unknown_storage":
            return
        await cat.replication.set_replica_state(f.name, source.storage, "bad", only_from=("available",))
        await cat.history.record_event(
            name=f.name, daemon="tape", type="replica.bad", outcome="bad", storage=source.storage,
            detail={"reason": exc.reason, "error": exc.message},
        )  # fmt: skip

    async def _fail(self, f: db.BatchFile, reason: str, error: str) -> None:
        del self.pending[f.replica_id]
        self.failed += 1
        storage = self.target.storage
        log.error("archive_failed", file=f.name, storage=storage, reason=reason, error=error)
        cat = self.env.catalogue
        text = f"{storage}: {error}"
        event = FileFailed(
            daemon="tape", reason=reason, error=text, attempts=1, name=f.name, endpoint=storage
        )  # fmt: skip
        await cat.tape.mark_failed(f.replica_id, event, holder=self.env.holder)
        self.env.relay.kick()
        await cat.history.record_failure(
            request_id=db.archive_request_id(f.name, storage), kind="archive", daemon="tape",
            reason=reason, error=text, attempts=1, final=True, name=f.name,
        )  # fmt: skip

    async def _finish(self) -> None:
        """Flush and record what was written, queue again what was not, give the drive back. Each
        step runs even if another fails: files a failed flush left are queued again (releasing the
        drive drops them from the cartridge); flushed files stay ``archiving`` when they could not
        be recorded, and reconciliation records them from the cartridge later."""
        if self.open is not None:  # not written: its files are still pending, queued again below
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.open.builder.discard)
            self.open = None
        if self.unflushed and not self.env.may_commit():
            # A successor may be settling these copies already: not committed, they are dropped
            # when the drive is released, and whoever holds them requeues them.
            log.error("archive_unflushed_dropped", storage=self.target.storage, files=len(self.unflushed),
                      reason="instance_lease_lost")  # fmt: skip
            self.unflushed.clear()
        try:
            await self._flush()
        except Exception as exc:
            log.error("archive_flush_failed", storage=self.target.storage, error=repr(exc))
            self.unflushed.clear()  # still pending: queued again below
        try:
            await self.recorder.flush()
        except Exception as exc:
            log.error("archive_record_failed", storage=self.target.storage, error=repr(exc))
        if self.pending:
            try:
                n = await self.env.catalogue.tape.requeue(list(self.pending), holder=self.env.holder)
                log.info("archive_requeued", storage=self.target.storage, files=n)
            except Exception as exc:
                log.error("archive_requeue_failed", storage=self.target.storage, error=repr(exc))
        if self.mount is not None:
            try:
                await self.mount.release()
            except Exception as exc:
                log.error("drive_release_failed", drive=self.mount.drive, error=repr(exc))
            finally:
                self.env.mounts.discard(self.mount)
        if self.written or self.failed:
            log.info(
                "archive_batch_done", storage=self.target.storage, written=self.written, failed=self.failed,
                requeued=len(self.pending),
            )  # fmt: skip


async def run_batch(env: Env, target: steps.TapeTarget, library: TapeLibrary, why: str) -> int:
    return await Batch(env, target, library).run(why)
