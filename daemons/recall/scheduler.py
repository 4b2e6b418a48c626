"""The recall scheduler: turns queued recall files into tape mounts and delivered copies.

Every ``poll_interval`` (or at once when a request arrives) one *pass*:

1. serves queued files that have a disk copy (``serve_from_disk``);
2. fails files that have no copy at all and none coming (``no_copy``, or ``checksum_mismatch``
   when the only tape copies turned out corrupt);
3. chooses one tape copy per file and plans mounts (``steps.choose_copies``, ``steps.plan_mounts``),
   records the choices, and starts a *mount* for each planned cartridge a drive can be claimed for.

A mount reads its cartridge's files in fseq order, a *window* at a time (``READ_WINDOW``): the
next queued files planned on the cartridge beyond the head, fetched in one query, so files of
requests that arrived meanwhile join the mount when they are ahead of the head (a file planned on
a running mount ends its window early: the next window, from the head, holds it); the others wait
for the next mount. Room in the destination is reserved per window, the window's files go
``staging`` in one statement, and what was read is recorded in one transaction and announced in
one publish (``_record``). The mount ends when nothing is left ahead, after ``batch_max_files``,
or when the destination buffer stays full for ``buffer_wait`` seconds (backpressure: the drive is
released, the files stay queued, nothing fails). The cartridge stays in the drive, so a later
mount of it costs nothing.

A pass reads the whole queue only when something changed since the last plan (a request, a file
put back, a mount ending early) or the plan's age passed (``plan_age``: ``PLAN_MAX_AGE``, longer
for a queue that takes long to plan); otherwise it starts the next mounts of the standing plan.

Sweep (at start and every ``SWEEP_INTERVAL``): an ``active`` recall with no file left to serve
is completed as a delivery would complete it (issue 14 left such recalls on PostgreSQL).

Kill safety: a file is ``staging`` while its window is read; a kill leaves it so, and once the
instance's lease has run out a survivor's pass (``reclaim``, every ``reclaim_interval``) or the
next ``start`` puts it back. A copy is recorded and its recall files settled in one transaction
after the bytes are in place under their final name, so a file is never delivered twice (files
read but not yet recorded when killed are read again); events go through the ``Announcer``'s
outbox, which a survivor flushes when a neighbour is gone.

Several instances (issue 19): any number of recall daemons may share one catalogue (PostgreSQL
when they run on several nodes; SQLite serves the instances of one node). Each holds an
``InstanceLease`` (the daemon's resources) and coordinates only through the catalogue, never with
the others directly:

- a file goes ``staging`` with ``holder`` = this instance, in one conditional statement
  (``queued`` rows only, and only while our lease stands): two instances never stage one file.
  Recording it, putting it back, failing it apply to rows this instance holds and clear the
  holder, so an instance whose lease ran out (its files taken over) records nothing.
- a cartridge is read by one instance at a time. Decision: a claim row per cartridge
  (``recall_cartridges``: library, VID, holder), taken with a conditional ``UPDATE`` / ``INSERT``
  before the mount and deleted after it. Its lifetime is the holder's lease, not a lease of its
  own: nothing to renew per mount, and a dead instance's cartridges are free the moment its lease
  runs out. Not the staging rows themselves: between two windows of a mount no row is
  ``staging``, yet the cartridge is still in our drive and ahead of our head. Not an advisory
  lock: SQLite has none, and a session lock would tie the claim to a connection of the pool.
  A pass skips the cartridges other live instances hold (one read, ``cartridges_held``) and
  claims each mount it starts; a claim lost to a neighbour meanwhile gives the drive back. So
  the instances share a request's cartridges (each as many drives as ``max_drives`` allows it),
  and never mount one cartridge twice. The simulated library refuses that too (a cartridge sits
  in one drive, ``cartridge_in_use``); the claim keeps the catalogue's rows apart whatever the
  library, and saves the drive a futile claim.
- a dead instance's ``staging`` files are put back by one survivor (``recall.recover``: one
  conditional ``UPDATE`` of the rows no live instance holds; two survivors at once each put back
  other rows, never the same), then planned and read again. A completion is decided once, in the
  transaction that settles a request's last file (``common.catalogue.recall``).
- the plan (chosen copies) is shared in the catalogue: for a file with copies on two cartridges,
  two instances may each write their own choice; either reads it correctly (the staging is what
  decides who reads), at worst from the cartridge the other would not have chosen.

Without a ``holder`` (the benchmark, tests) the scheduler is the catalogue's only reader: rows
are staged without a holder (anyone's to put back: ``start`` does) and no cartridge is claimed.

Nothing here needs the broker: the benchmark drives this class with a recording publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from common.catalogue import Catalogue
from common.catalogue import recall as db
from common.catalogue.sql import utcnow
from common.config import RecallSettings, StorageEndpoint
from common.errors import SpoolError
from common.log_folding import ReasonThrottle
from common.logging import get_logger
from common.messages import TapeMounted
from common.periodic import every
from common.storage import PosixStorage, StorageBackend
from common.tape import TapeLibrary
from daemons.recall import delivery, steps
from daemons.recall.announce import Announcer
from daemons.recall.steps import CartridgeKey, Mount

log = get_logger("spool.recall")

PLAN_LIMIT = 100_000  # queued files looked at per pass, most urgent first
# How often ``run`` sweeps for active recalls with nothing left to do (``sweep``): a cheap query,
# and a recall it repairs has waited for a bug, not for the operator.
SWEEP_INTERVAL = 60.0
# A mount's read-ahead window (issue 18): files fetched, given room, marked ``staging``, read,
# recorded and announced per window, a few statements each, not per file. Bounded so a window's
# rows stay a small transaction and late files wait at most one window to join the mount.
READ_WINDOW = 256
# Within a window, the files read are recorded (and ``file.recalled`` published) at least this
# often: a window of large files takes minutes to read, and requesters follow progress.
RECORD_SECONDS = 2.0
# A pass while mounts of the last plan still wait for a drive starts them from that plan instead
# of reading every queued file again (100,000 rows per pass, one pass per mount ended: issue 18);
# the queue is read again when something changed (``_replan``) or after this many seconds, so a
# copy archived or an endpoint put back meanwhile is seen.
PLAN_MAX_AGE = 10.0
# ... or longer, so that reading and planning the queue takes at most this share of the time: each
# read costs in proportion to the queue, and one every 10 s made a 100,000-file request's planning
# quadratic (0.06 ms of catalogue CPU per file at 10,000 files, 0.28 at 50,000: issue 18).
PLAN_TIME_SHARE = 0.05
# Failures of a disk source that make that copy useless (as the replicator judges them). Not
# ``path_outside_area``: since issue 16 that is the *destination* path's (a symlink on it), and a
# healthy source copy must not be marked bad for it (``delivery.copy_from_disk`` turns a source
# pfn escaping its root into ``source_corrupt``).
DISK_SOURCE_BAD = frozenset({"source_missing", "source_corrupt"})


def plan_age(reading_seconds: float) -> float:
    """How long a plan stands (unless something changes): ``PLAN_MAX_AGE``, or longer when reading
    the queue took long, so that reading stays ``PLAN_TIME_SHARE`` of the time whatever its size."""
    return max(PLAN_MAX_AGE, reading_seconds / PLAN_TIME_SHARE)


@dataclass(frozen=True, slots=True)
class PassResult:
    pending: int  # queued files seen
    started: int  # mounts started


class Scheduler:
    read_window = READ_WINDOW
    record_seconds = RECORD_SECONDS

    def __init__(
        self,
        *,
        catalogue: Catalogue,
        libraries: Mapping[str, TapeLibrary],
        storages: Mapping[str, StorageBackend],
        endpoints: Mapping[str, StorageEndpoint],
        settings: RecallSettings,
        announcer: Announcer,
        staging: Path | None = None,
        holder: str | None = None,
        reclaim_interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.catalogue = catalogue
        # This instance's id (its ``InstanceLease``): the rows it stages and the cartridges it
        # reads are marked with it. None: a scheduler alone on its catalogue (benchmark, tests).
        self.holder = holder
        # How often a pass puts back what dead instances left ``staging`` (``reclaim``): about
        # half a lease, so a dead neighbour's files wait little more than its lease.
        self.reclaim_interval = reclaim_interval
        self._next_reclaim = 0.0
        self._neighbours: set[str] = set()  # the other live recall instances at the last reclaim
        # Cartridges whose claim could not be released (catalogue unreachable): retried by passes.
        self._unreleased: set[CartridgeKey] = set()
        self.libraries = libraries
        self.storages = storages
        # Node-local staging of reads for remote destinations (``delivery``); the daemon passes
        # ``<state_dir>/recall-staging``.
        self.staging = staging or Path(tempfile.gettempdir()) / "spool-recall-staging"
        self.settings = settings
        self.announcer = announcer
        # tape endpoint -> its library; disk endpoint -> its reserve
        self.tape_library = {n: ep.library for n, ep in endpoints.items() if ep.kind == "tape"}
        self.reserve = {n: ep.min_free_bytes for n, ep in endpoints.items() if ep.kind == "disk"}
        self.active: dict[CartridgeKey, asyncio.Task[None]] = {}
        self.heads: dict[CartridgeKey, int] = {}  # fseq last read by each running mount
        # Running mounts whose cartridge a pass planned new files on since their window was
        # staged: they fetch their window again from the head (``_read_window``).
        self.joined: set[CartridgeKey] = set()
        self.retry_at: dict[CartridgeKey, float] = {}  # monotonic time a failed cartridge may retry
        self.in_flight: Counter[str] = Counter()  # bytes being written to each destination
        self.serving: set[tuple[int, str]] = set()  # (file id, destination) copied from disk now
        # Destinations an operator left online (``spool rse set``): the others take nothing, so
        # their files wait as for a full buffer.
        self.writable: set[str] = set(self.reserve)
        self._throttle = ReasonThrottle()  # one log line per cause per minute, however many repeat
        self._wake = asyncio.Event()
        # The last plan's mounts not started yet, and until when it may stand (``pass_once``).
        self._plan: list[Mount] = []
        self._plan_until = 0.0
        self._replan = True  # something changed that the plan does not know: read the queue again
        self._replan_after: set[CartridgeKey] = set()  # running mounts files were planned on since
        self.sweep_interval = SWEEP_INTERVAL
        self._next_sweep = 0.0  # monotonic time of the next sweep in ``run``

    # --- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Reclaim what a killed process left: staging rows no live instance holds, staging
        files, unpublished events, and recalls left ``active`` with nothing to do (``sweep``)."""
        await self.reclaim()
        for name, storage in self.storages.items():
            age = storage.endpoint.stale_temp_age if isinstance(storage, PosixStorage) else 0.0
            removed = await asyncio.to_thread(delivery.clean_staging, storage, self.staging, age)
            if removed:
                log.info("recall_staging_cleaned", storage=name, files=removed)
        await self.announcer.flush()
        await self.sweep()

    async def reclaim(self) -> int:
        """Put back the files dead instances left ``staging`` (``recall.recover``: only rows no
        live instance holds, each by one survivor); returns how many. The next pass plans them.

        A neighbour gone since the last look (its lease ran out, or it stopped) may have recorded
        files it never announced (killed between the commit and the publish): the outbox is
        flushed then, as a restart would (the same message ids: a fact both announce is one).
        """
        self._next_reclaim = time.monotonic() + self.reclaim_interval
        now = utcnow()
        reclaimed = await self.catalogue.recall.recover(now)
        if reclaimed:
            log.warning("recall_reads_reclaimed", files=reclaimed)
            self._replan = True
        if self.holder is not None:
            live = set(await self.catalogue.instances.live_ids(db.DAEMON, now)) - {self.holder}
            gone, self._neighbours = self._neighbours - live, live
            if gone:
                log.info("recall_neighbours_gone", instances=sorted(gone))
                await self.announcer.flush()
        return reclaimed

    async def sweep(self) -> int:
        """Complete active recalls none of whose files is left to serve; returns how many.

        Before issue 14 was fixed, two deliveries committing together on PostgreSQL could leave a
        recall ``active`` with every file done and its counter one short, for ever (a restart did
        not look). The catalogue recounts and completes them as a delivery would, and the
        completion goes out through the outbox; one log line per repaired request says so.
        """
        self._next_sweep = time.monotonic() + self.sweep_interval
        completed = await self.catalogue.recall.complete_settled()
        for c in completed:
            log.warning(
                "recall_stuck_repaired",
                recall=c.recall_id,
                state=c.state,
                files=c.files,
                failed=len(c.failed),
            )
        await self.announcer.publish(db.Settled(completed=completed))
        return len(completed)

    async def run(self) -> None:
        """Passes until cancelled, every ``poll_interval`` or at once when woken; an error is
        logged and the next pass tries again."""
        await every(
            self.settings.poll_interval, self._pass, name="recall-scheduler", wake=self._wake,
            on_error=self._pass_failed,
        )  # fmt: skip

    async def _pass(self) -> None:
        if time.monotonic() >= self._next_reclaim:
            await self.reclaim()
        if time.monotonic() >= self._next_sweep:
            await self.sweep()
        await self.pass_once()

    def _pass_failed(self, exc: Exception) -> None:
        admitted, folded = self._throttle.admit(f"pass:{type(exc).__name__}", exc)
        if admitted:
            log.error(
                "recall_pass_failed", error=str(exc), error_type=type(exc).__name__, exc_info=exc,
                similar_since_last_line=folded or None,
            )  # fmt: skip

    def wake(self) -> None:
        """A pass now, reading the queue again (a request arrived)."""
        self._replan = True
        self._wake.set()

    async def stop(self) -> None:
        """Abandon running mounts, as a kill would: their files stay ``staging`` (``let_go`` hands
        them over at a clean stop; else a survivor or the next start puts them back)."""
        tasks = list(self.active.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def let_go(self) -> None:
        """After ``stop``, at a clean stop of an instance: put its ``staging`` files back and free
        its cartridges now, rather than when its lease runs out."""
        if self.holder is None:
            return
        returned = await self.catalogue.recall.let_go(self.holder)
        if returned:
            log.info("recall_reads_handed_over", files=returned)

    async def until_idle(self) -> None:
        """Run passes until nothing is queued or nothing can progress (benchmark, tests)."""
        while True:
            result = await self.pass_once()
            if self.active:
                await asyncio.wait(list(self.active.values()), return_when=asyncio.FIRST_COMPLETED)
            elif not result.pending or not result.started:
                return

    # --- one pass ----------------------------------------------------------------------------
    async def pass_once(self) -> PassResult:
        if self.announcer.behind:
            await self.announcer.flush()
        if self._unreleased:
            await self._release_claims()
        self._plan = [m for m in self._plan if m.key not in self.active]
        # Endpoint states are a few rows: read every pass, so an operator's change counts at once.
        self.writable = {e.name for e in await self.catalogue.endpoints.all() if e.state == "online"}
        if self._plan and not self._replan and time.monotonic() < self._plan_until:
            started = await self._start_planned()
            return PassResult(sum(len(m.files) for m in self._plan) + started, started)
        self._replan = False
        self._plan = []
        began = time.monotonic()
        files = await self.catalogue.recall.pending(PLAN_LIMIT)
        reading = time.monotonic() - began  # what grows with the queue (copies from disk do not count)
        if not files:
            return PassResult(0, 0)
        files = await self._known_destinations(files)
        on_disk, on_tape, lost = steps.triage(steps.readable(files, self.tape_library))
        await self.serve_from_disk(on_disk)
        await self._fail_lost(lost)
        if not on_tape:
            return PassResult(len(files), 0)
        now = time.monotonic()
        avoid = [k for k, t in self.retry_at.items() if t > now]
        loaded = await self._loaded()
        chosen = steps.choose_copies(on_tape, self.tape_library, heads=self.heads, loaded=loaded, avoid=avoid)
        changes = steps.changed_choices(on_tape, chosen)
        if changes:
            await self.catalogue.recall.assign(changes)
            planned = {steps.cartridge_of(c, self.tape_library) for _, _, c in changes if c is not None}
            self.joined |= planned & self.active.keys()
            self._replan_after |= planned & self.active.keys()
        # Planned whatever the room: a full buffer leaves the plan standing (``_start_planned``
        # starts a mount once a file of it fits) rather than the queue read on every pass.
        self._plan = steps.plan_mounts(on_tape, chosen, self.tape_library, busy=self.active)
        self._plan_until = time.monotonic() + plan_age(reading)
        return PassResult(len(files), await self._start_planned(loaded))

    async def _start_planned(self, loaded: Sequence[CartridgeKey] | None = None) -> int:
        """Start mounts of the standing plan, most urgent first: the ones a drive is free for, not
        backing off, with a file that fits its destination now (mounting one none of whose files
        fits would only hold a drive while waiting). Returns how many started."""
        now = time.monotonic()
        space = {d: await self._room(d) for d in {p.destination for m in self._plan for p in m.files}}
        ready = [
            m for m in self._plan
            if self.retry_at.get(m.key, 0.0) <= now and any(p.size <= space[p.destination] for p in m.files)
        ]  # fmt: skip
        if ready and self.holder is not None:
            # Cartridges other live instances read now: not ours to mount (one read, however
            # many; ``_start_mounts`` still claims each one it starts, atomically).
            others = await self.catalogue.recall.cartridges_held(utcnow(), self.holder)
            ready = [m for m in ready if m.key not in others]
        if loaded is None:
            loaded = await self._loaded()
        started = await self._start_mounts(ready, set(loaded))
        self._plan = [m for m in self._plan if m.key not in started]
        return len(started)

    async def _loaded(self) -> list[CartridgeKey]:
        keys = []
        for name, library in self.libraries.items():
            keys += [(name, d.vid) for d in await library.list_drives() if d.vid is not None and not d.broken]
        return keys

    async def _known_destinations(self, files: Sequence[db.PendingFile]) -> list[db.PendingFile]:
        """Fail the files of a destination that left the configuration since it was requested."""
        gone = [p.key for p in files if p.destination not in self.storages]
        if gone:
            error = "the destination is no longer a configured disk endpoint"
            await self.announcer.publish(await self.catalogue.recall.fail(gone, "unknown_storage", error))
        return [p for p in files if p.destination in self.storages]

    async def _room(self, destination: str) -> int:
        """Bytes ``destination`` may still take (``_free``, less its reserve and reads in flight)."""
        return self._room_of(destination, await self._free(destination))

    async def _free(self, destination: str) -> int | None:
        """Free bytes of ``destination``; None when unknown. A remote endpoint whose protocol does
        not tell its free space is not held back (unknown is not full: its own ``disk_full``
        would requeue the file); one that cannot be asked now takes nothing this time, like a full
        one (0), as does one the operator did not leave online."""
        if destination not in self.writable:
            return 0
        storage = self.storages[destination]
        if isinstance(storage, PosixStorage):
            return await delivery.free_space(storage)
        try:
            return await delivery.free_space(storage)
        except SpoolError as err:
            admitted, folded = self._throttle.admit(f"space:{destination}:{err.reason}")
            if admitted:
                log.warning(
                    "recall_free_space_unknown", storage=destination, reason=err.reason,
                    error=err.message, similar_since_last_line=folded or None,
                )  # fmt: skip
            return 0

    def _room_of(self, destination: str, free: int | None) -> int:
        if free is None:
            return sys.maxsize
        return steps.room(free, self.reserve.get(destination, 0), self.in_flight[destination])

    async def _fail_lost(self, lost: Sequence[db.PendingFile]) -> None:
        for damaged in (True, False):
            keys = [p.key for p in lost if p.damaged == damaged]
            if not keys:
                continue
            reason, error = (
                ("checksum_mismatch", "every tape copy failed its checksum on read")
                if damaged
                else (db.NO_COPY, "no available copy on disk or tape, and none being archived")
            )
            await self.announcer.publish(await self.catalogue.recall.fail(keys, reason, error))

    async def _start_mounts(self, plan: Sequence[Mount], loaded: set[CartridgeKey]) -> set[CartridgeKey]:
        started: set[CartridgeKey] = set()
        for mount in plan:
            if self.settings.max_drives and len(self.active) >= self.settings.max_drives:
                break
            library = self.libraries.get(mount.library)
            if library is None:
                continue
            try:
                drive = await library.claim_drive(f"recall {mount.vid}", vid=mount.vid)
            except SpoolError as err:
                self._back_off(mount.key, err)
                continue
            if drive is None:
                if mount.key in loaded:
                    continue  # busy in its drive (the tape daemon's?): wait for that drive
                break  # no free drive at all
            if not await self._claim(mount.key):
                with contextlib.suppress(Exception):
                    await library.release_drive(drive)
                continue  # another instance took the cartridge since ``_start_planned`` looked
            self.heads[mount.key] = 0
            self.active[mount.key] = asyncio.create_task(self._mount(mount, library, drive))
            started.add(mount.key)
        return started

    async def _claim(self, key: CartridgeKey) -> bool:
        """The cartridge for this instance alone (``recall.claim_cartridge``); always, without a
        holder. A catalogue error counts as not claimed (logged): the next pass tries again."""
        if self.holder is None:
            return True
        try:
            return await self.catalogue.recall.claim_cartridge(key[0], key[1], self.holder, utcnow())
        except Exception as exc:
            log.warning("recall_cartridge_claim_failed", library=key[0], vid=key[1], error=repr(exc))
            return False

    async def _release_claims(self) -> None:
        """Free the claims of cartridges no mount of ours reads now (their release failed)."""
        assert self.holder is not None
        for key in list(self._unreleased):
            if key in self.active:
                self._unreleased.discard(key)  # claimed again by a running mount: it releases
                continue
            try:  # passes alone start mounts, one at a time: nobody claims ``key`` meanwhile
                await self.catalogue.recall.release_cartridge(key[0], key[1], self.holder)
            except Exception as exc:
                log.warning("recall_cartridge_release_failed", library=key[0], vid=key[1], error=repr(exc))
                return
            self._unreleased.discard(key)

    def _back_off(self, key: CartridgeKey, err: SpoolError) -> None:
        admitted, folded = self._throttle.admit(f"mount:{err.reason}")
        if admitted:
            log.warning(
                "recall_mount_failed", library=key[0], vid=key[1], reason=err.reason, error=err.message,
                similar_since_last_line=folded or None,
            )  # fmt: skip
        self.retry_at[key] = time.monotonic() + self.settings.retry_delay

    async def _announce_mount(self, library: str, drive: str, vid: str) -> None:
        """``tape.mounted`` for the monitor's mount count, through the outbox (never lost)."""
        msg = TapeMounted(
            library=library, drive=drive, cartridge=vid, purpose="recall", request=f"recall {vid}"
        )
        await self.announcer.mounted(msg)

    # --- one mount ---------------------------------------------------------------------------
    async def _mount(self, mount: Mount, library: TapeLibrary, drive: str) -> None:
        key = mount.key
        storages = [n for n, lib in self.tape_library.items() if lib == mount.library]
        reads = 0
        mounted = False
        drained = False  # ended because nothing was left ahead of the head
        try:
            while reads < self.settings.batch_max_files:
                self.joined.discard(key)
                limit = min(self.read_window, self.settings.batch_max_files - reads)
                head = self.heads[key]
                window = await self.catalogue.recall.window_on_cartridge(storages, mount.vid, head, limit)
                if not window:
                    drained = True
                    break
                groups = await self._reserve_window(_by_fseq(window), mount.vid)
                if not groups:
                    break
                groups = await self._stage(groups)
                if not groups:  # taken meanwhile (served from disk), or our lease ran out
                    break
                if not mounted:
                    try:
                        if await library.mount(drive, mount.vid, request=f"recall {mount.vid}"):
                            await self._announce_mount(mount.library, drive, mount.vid)
                    except BaseException as exc:
                        self._give_back(groups)
                        if isinstance(exc, Exception):  # not when cancelled: as a kill
                            await self._put_back([i.key for g in groups for i in g])
                        raise
                    mounted = True
                    log.info("recall_mount", vid=mount.vid, drive=drive, planned=len(mount.files))
                reads += await self._read_window(key, library, drive, groups)
            self.retry_at.pop(key, None)
        except SpoolError as err:
            self._back_off(key, err)
        except Exception as exc:
            log.error("recall_mount_crashed", vid=mount.vid, error=str(exc), exc_info=exc)
            self.retry_at[key] = time.monotonic() + self.settings.retry_delay
        finally:
            with contextlib.suppress(Exception):
                await library.release_drive(drive)
            if self.holder is not None:
                # After the drive (a neighbour given the cartridge finds the drive free), before
                # the key leaves ``active`` (no pass of ours claims it again meanwhile).
                try:
                    await self.catalogue.recall.release_cartridge(key[0], key[1], self.holder)
                except Exception as exc:
                    log.warning(
                        "recall_cartridge_release_failed", library=key[0], vid=key[1], error=repr(exc)
                    )
                    self._unreleased.add(key)
            self.active.pop(key, None)
            self.heads.pop(key, None)
            self.joined.discard(key)
            # Files left on the cartridge (behind the head, for lack of room, after an error or
            # batch_max_files) are not in the standing plan: the next pass reads the queue.
            if not drained or key in self._replan_after:
                self._replan = True
            self._replan_after.discard(key)
            self._wake.set()
        if mounted:
            log.info("recall_mount_done", vid=mount.vid, drive=drive, read=reads)

    async def _reserve_window(
        self, groups: Sequence[Sequence[db.ReadItem]], vid: str
    ) -> list[Sequence[db.ReadItem]]:
        """Backpressure, per window: the leading files of ``groups`` that fit their destinations
        now, counted as in flight (``_read_window`` gives each back once read). When not even the
        first fits, wait for it as ``_reserve_room`` does; nothing (False) after ``buffer_wait``.
        Files are never skipped: a mount only winds forward, so one left behind would wait for
        another mount."""
        if not groups:
            return []
        destinations = {g[0].destination for g in groups}
        free = {d: await self._free(d) for d in destinations}
        # No await from here to the counting below: no other mount takes the room meanwhile.
        room = {d: self._room_of(d, free[d]) for d in destinations}
        taken: list[Sequence[db.ReadItem]] = []
        for g in groups:
            first = g[0]
            if room[first.destination] < first.size:
                break
            room[first.destination] -= first.size
            taken.append(g)
        if not taken:
            first = groups[0][0]
            return [groups[0]] if await self._reserve_room(first.destination, first.size, vid) else []
        for g in taken:
            self.in_flight[g[0].destination] += g[0].size
        return taken

    def _give_back(self, groups: Sequence[Sequence[db.ReadItem]]) -> None:
        for g in groups:
            self.in_flight[g[0].destination] -= g[0].size

    async def _stage(self, groups: Sequence[Sequence[db.ReadItem]]) -> list[Sequence[db.ReadItem]]:
        """Mark a window's files ``staging`` under this instance (one statement); the groups
        (positions) left with a file to read. A file no longer queued (served from disk
        meanwhile) is not ours to read; none at all when our lease ran out. The room of a group
        left empty is given back."""
        keys = [i.key for g in groups for i in g]
        staged = set(await self.catalogue.recall.set_state(keys, "staging", holder=self.holder, now=utcnow()))
        if len(staged) == len(keys):
            return list(groups)
        kept: list[Sequence[db.ReadItem]] = []
        for g in groups:
            mine = [i for i in g if i.key in staged]
            if mine:
                kept.append(mine)
            else:
                self._give_back([g])
        self._replan = True  # the queue changed under us: plan from it again
        return kept

    async def _put_back(self, keys: Sequence[tuple[str, str]], forget_copy: bool = False) -> None:
        """Our ``staging`` files back to ``queued`` (only rows this instance holds)."""
        await self.catalogue.recall.set_state(keys, "queued", forget_copy, holder=self.holder)

    async def _reserve_room(self, destination: str, size: int, vid: str) -> bool:
        """Backpressure: wait until ``size`` bytes fit the destination and count them as in flight
        (the caller gives them back); False after ``buffer_wait``."""
        deadline = time.monotonic() + self.settings.buffer_wait
        logged = False
        while await self._room(destination) < size:
            if time.monotonic() >= deadline:
                log.info("recall_buffer_full_drive_released", storage=destination, vid=vid)
                return False
            if not logged:
                log.info("recall_waiting_for_buffer", storage=destination, needed=size, vid=vid)
                logged = True
            await asyncio.sleep(min(self.settings.poll_interval, 1.0))
        self.in_flight[destination] += size  # no await since the check: nobody else took the room
        return True

    async def _read_window(
        self, key: CartridgeKey, library: TapeLibrary, drive: str, groups: Sequence[Sequence[db.ReadItem]]
    ) -> int:
        """Read a window's files in fseq order; returns how many were read (or given up).

        The window's files are ``staging`` under this instance (``_stage``); what was read is
        recorded and announced together (``_record``) at the end, or every ``record_seconds`` so a
        long window still reports progress. A file joining the cartridge ahead of the head
        (``joined``) ends the window early: the unread files go back to ``queued`` and the next
        window, fetched from the head, holds them and the newcomer in fseq order. On an error,
        what was read is recorded and the rest put back before the error goes up; a kill leaves
        rows ``staging`` (put back once this instance's lease has run out: ``reclaim``) and read
        files not yet recorded, which are read again then: a file is announced once, in the
        transaction that records it.
        """
        staged = [i.key for g in groups for i in g]
        read: list[tuple[db.Delivery, list[tuple[str, str]]]] = []
        since = time.monotonic()
        n = 0
        try:
            for g in groups:
                if key in self.joined:
                    break
                item, keys = g[0], [i.key for i in g]
                try:
                    dl = await self._read(library, drive, item, keys)
                finally:
                    self.in_flight[item.destination] -= item.size
                    n += 1
                self.heads[key] = item.copy.fseq
                if dl is not None:
                    read.append((dl, keys))
                if read and time.monotonic() - since >= self.record_seconds:
                    await self._record(read)
                    read, since = [], time.monotonic()
        except Exception:
            try:
                await self._record(read)
            finally:
                # Only our staging rows move: what was recorded (done) or failed stays so.
                await self._put_back(staged)
            raise
        finally:
            self._give_back(groups[n:])
        await self._record(read)
        if n < len(groups):
            await self._put_back([i.key for g in groups[n:] for i in g])
        return n

    async def _read(
        self, library: TapeLibrary, drive: str, item: db.ReadItem, keys: Sequence[tuple[str, str]]
    ) -> db.Delivery | None:
        """Read one file for the requests that want it on ``item``'s destination (``keys``);
        the copy to record, or None when the tape copy was bad (``_bad_copy`` settled it). On
        another error the keys go back to ``queued`` and the error goes up."""
        try:
            dest = self.storages[item.destination]
            pfn = await delivery.read_from_tape(library, drive, item, dest, self.staging)
        except SpoolError as err:
            if err.reason in steps.MEDIA_ERRORS:
                await self._bad_copy(item, keys, err)
                return None
            await self._put_back(keys)
            raise
        source = f"{item.copy.cartridge}/{item.copy.fseq} ({item.copy.storage})"
        pin_until = utcnow() + timedelta(seconds=self.settings.pin_seconds)
        return db.Delivery(item.file_id, item.name, item.destination, pfn, pin_until, source)

    async def _record(self, read: Sequence[tuple[db.Delivery, Sequence[tuple[str, str]]]]) -> None:
        """Record the copies read (one transaction) and announce what they settled (one publish);
        a copy the reaper is deleting right now puts its files back in the queue."""
        if not read:
            return
        settled, refused = await self.catalogue.recall.deliver_many([dl for dl, _ in read], self.holder)
        if refused:
            self._replan = True
            again = set(refused)
            await self._put_back([k for dl, keys in read if dl.file_id in again for k in keys])
        await self.announcer.publish(settled)

    async def _bad_copy(self, item: db.ReadItem, keys: Sequence[tuple[str, str]], err: SpoolError) -> None:
        """A corrupt tape copy: marked ``bad``; the next pass reads another copy, if any is left."""
        log.warning(
            "recall_tape_copy_bad", file=item.name, vid=item.copy.cartridge, fseq=item.copy.fseq,
            storage=item.copy.storage, reason=err.reason, error=err.message,
        )  # fmt: skip
        others = await self.catalogue.recall.tape_copy_bad(
            item.file_id, item.copy.storage, err.reason, err.message
        )
        if others:
            await self._put_back(keys, forget_copy=True)
            self._replan = True  # another copy to choose
            return
        reason = "checksum_mismatch" if err.reason == "tape_checksum_mismatch" else err.reason
        settled = await self.catalogue.recall.fail(keys, reason, err.message, self.holder)
        await self.announcer.publish(settled)

    async def _delivered(
        self,
        file_id: int,
        name: str,
        destination: str,
        pfn: str,
        source: str,
        keys: Sequence[tuple[str, str]],
    ) -> None:
        pin_until = utcnow() + timedelta(seconds=self.settings.pin_seconds)
        settled = await self.catalogue.recall.deliver(
            db.Delivery(file_id, name, destination, pfn, pin_until, source)
        )
        if settled is None:  # the reaper is deleting the destination's copy: try again later
            await self.catalogue.recall.set_state(keys, "queued")
            self._replan = True
            return
        await self.announcer.publish(settled)

    # --- from disk ---------------------------------------------------------------------------
    async def serve_recall(self, recall_id: str) -> None:
        """Serve at once the files of one request that have a disk copy (the handler's part)."""
        files = await self.catalogue.recall.pending(PLAN_LIMIT, recall_id)
        on_disk, _, _ = steps.triage(files)
        await self.serve_from_disk(on_disk)

    async def serve_from_disk(self, files: Sequence[db.PendingFile]) -> None:
        """Count done what is already on the destination; copy what is on another disk endpoint
        (when it fits: a full destination makes it wait like a tape read)."""
        firsts: dict[tuple[int, str], db.PendingFile] = {}
        for p in files:
            firsts.setdefault((p.file_id, p.destination), p)
        for key, p in firsts.items():
            if key in self.serving:
                continue
            self.serving.add(key)
            try:
                await self._serve_one(p)
            except SpoolError as err:
                log.warning("recall_disk_copy_failed", file=p.name, storage=p.destination, reason=err.reason)
            finally:
                self.serving.discard(key)

    async def _serve_one(self, p: db.PendingFile) -> None:
        here = next((c for c in p.disk if c.storage == p.destination), None)
        if here is not None:
            await self._delivered(p.file_id, p.name, p.destination, here.pfn, p.destination, [p.key])
            return
        if await self._room(p.destination) < p.size:
            return
        dest = self.storages[p.destination]
        self.in_flight[p.destination] += p.size
        try:
            for src in p.disk:
                source = self.storages.get(src.storage)
                if source is None:
                    continue
                try:
                    pfn = await delivery.copy_from_disk(
                        source, src.pfn, dest, p.name, p.size, p.adler32, p.sha256
                    )
                except SpoolError as err:
                    if err.reason not in DISK_SOURCE_BAD:
                        raise
                    await self._disk_source_bad(p.name, src.storage, err)
                    continue
                break
            else:
                return  # no disk source worked: the next pass reads it from tape
        finally:
            self.in_flight[p.destination] -= p.size
        await self._delivered(p.file_id, p.name, p.destination, pfn, src.storage, [p.key])

    async def _disk_source_bad(self, name: str, storage: str, err: SpoolError) -> None:
        log.warning("recall_source_bad", file=name, source=storage, reason=err.reason, error=err.message)
        await self.catalogue.replication.set_replica_state(name, storage, "bad", only_from=("available",))
        await self.catalogue.history.record_event(
            name=name, daemon="recall", type="replica.bad", outcome="bad", storage=storage,
            detail={"reason": err.reason, "error": err.message},
        )  # fmt: skip


def _by_fseq(items: Sequence[db.ReadItem]) -> list[list[db.ReadItem]]:
    """A window's rows (tape order) as one read per position (a tape file, or a member of an
    aggregate: fseq and ``member_offset``): the rows of the first row's destination (requests for
    other destinations are served from this copy by the next pass)."""
    groups: list[list[db.ReadItem]] = []
    for item in items:
        if groups and _position(groups[-1][0]) == _position(item):
            if item.destination == groups[-1][0].destination:
                groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _position(item: db.ReadItem) -> tuple[int, int | None]:
    return item.copy.fseq, item.member_offset
