"""State changes of the simulated library, one short transaction each, run under the library lock.

Every drive operation is split in three so that no lock is held while the "tape moves":
``begin_*`` checks, reserves (drive status, cartridge location, fseq and space) and returns a
plan with the modelled durations; the caller then moves data and sleeps outside the lock;
``finish_*`` applies the outcome and charges the drive's clock. ``abort`` undoes a begun operation
that will not finish (cancellation, a source error); it is keyed by the operation id, so it is a
no-op when the operation never began or already finished. Aborted operations are not charged.

Checks come before any change in each method, so an exception leaves the state untouched.

Buffered writes: ``finish_write`` without ``flush`` leaves the file ``written`` (complete, not
durable, not listed); ``begin_flush``/``finish_flush`` commit every file this session wrote on the
cartridge since the last flush, with one journal fsync. Such a transaction sets ``sync`` False: its
state save need not reach the disk either (headers are rebuilt from the journals at open).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import Permanent, Retryable, SpoolError
from common.tape.library import Cartridge, Drive, DriveStatus, TapeFile, TapeMember
from common.tape.reconcile import drop_files, settle_cartridge, settle_drive
from common.tape.store import LibraryState, Store
from common.tape.timing import TapeTiming


@dataclass(frozen=True, slots=True)
class MountPlan:
    op: str
    drive_id: str
    vid: str
    seconds: float
    unloaded: str | None  # cartridge taken out of the drive first (an exchange)
    fail: bool  # injected mount failure


@dataclass(frozen=True, slots=True)
class MovePlan:
    """A locate or an unmount: the head ends at ``target``."""

    op: str
    drive_id: str
    vid: str
    seconds: float
    target: int = 0


@dataclass(frozen=True, slots=True)
class FlushPlan:
    """A synchronous tape mark: ``fseqs`` (their data in ``data``) become durable."""

    op: str
    drive_id: str
    vid: str
    fseqs: list[int]
    data: list[Path]
    seconds: float


@dataclass(frozen=True, slots=True)
class TransferPlan:
    """A read or a write of ``file``; ``seconds`` is locate + transfer."""

    op: str
    drive_id: str
    vid: str
    file: TapeFile
    locate_seconds: float
    transfer_seconds: float
    data: Path  # the file's bytes on the cartridge
    path: Path  # write: the temp file the data goes through; read: the destination
    skip: int = 0  # read of an aggregate's member: where its bytes start within the file
    span: int | None = None  # and how many (None: the whole file)

    @property
    def seconds(self) -> float:
        return self.locate_seconds + self.transfer_seconds

    @property
    def length(self) -> int:
        return self.file.size if self.span is None else self.span


class Txn:
    """One transaction over a freshly loaded state; ``dirty`` says whether it must be saved."""

    def __init__(self, state: LibraryState, store: Store, timing: TapeTiming) -> None:
        self.state = state
        self.store = store
        self.timing = timing
        assert store.session is not None
        self.session: str = store.session
        self.dirty = False
        self.sync = True  # False: the state save may skip fsync (buffered writes)
        self.alive = functools.cache(store.alive)
        self.notes: list[str] = []

    # --- housekeeping --------------------------------------------------------------------------
    def sweep(self) -> None:
        """Free drives held by sessions that died since (a neighbour process crashed)."""
        for d in self.state.drives.values():
            foreign = {s for s in (d.claim, d.op_session) if s is not None and s != self.session}
            if any(not self.alive(s) for s in foreign) or (d.op is not None and d.op_session is None):
                vid = d.vid
                self.notes += settle_drive(self.state, d.drive_id, self.alive)
                if vid is not None:
                    self.notes += settle_cartridge(self.state, self.store, vid, self.alive)
                self.dirty = True

    # --- lookups and checks --------------------------------------------------------------------
    def drive(self, drive_id: str) -> Drive:
        try:
            return self.state.drives[drive_id]
        except KeyError:
            raise Permanent("unknown_drive", f"no drive {drive_id!r} in the library") from None

    def cartridge(self, vid: str) -> Cartridge:
        try:
            return self.state.cartridges[vid]
        except KeyError:
            raise Permanent("unknown_cartridge", f"no cartridge {vid!r} in the library") from None

    def usable(self, drive_id: str) -> Drive:
        """The drive if this session may start an operation on it now."""
        d = self.drive(drive_id)
        if d.op is not None:
            raise Retryable("drive_busy", f"drive {drive_id} is {d.status} for {d.request or 'someone'}")
        if d.claim is not None and d.claim != self.session:
            raise Retryable("drive_busy", f"drive {drive_id} is claimed for {d.request or 'someone'}")
        if d.broken:
            held = f" with {d.vid} stuck in it" if d.vid else ""
            raise Retryable("drive_broken", f"drive {drive_id} is broken{held}")
        return d

    def mounted(self, d: Drive) -> Cartridge:
        if d.vid is None:
            raise Permanent("not_mounted", f"drive {d.drive_id} has no cartridge")
        return self.cartridge(d.vid)

    def committed_file(self, vid: str, fseq: int) -> TapeFile:
        f = self.store.journal(vid).committed_file(fseq)
        if f is None:
            raise Permanent("unknown_fseq", f"{vid} has no file with fseq {fseq}")
        return f

    def _start(self, d: Drive, status: DriveStatus, op: str) -> None:
        d.status, d.op, d.op_session, d.since = status, op, self.session, time.time()
        self.dirty = True

    def _end(self, d: Drive, op: str) -> None:
        if d.op != op:
            raise RuntimeError(f"drive {d.drive_id}: operation {op} was taken over by {d.op}")
        d.status = "broken" if d.broken else "idle"
        d.op = d.op_session = None
        d.since = time.time()
        if d.claim is None and d.vid is None:
            d.request = None
        self.dirty = True

    # --- mount / unmount -----------------------------------------------------------------------
    def begin_mount(self, drive_id: str, vid: str, op: str, request: str | None) -> MountPlan | None:
        d = self.usable(drive_id)
        cart = self.cartridge(vid)
        if d.vid == vid:
            if request is not None and d.request != request:
                d.request, self.dirty = request, True
            return None
        if cart.drive is not None:
            raise Retryable("cartridge_in_use", f"{vid} is in drive {cart.drive}")
        if cart.state == "disabled":
            raise Retryable("cartridge_disabled", f"{vid} is disabled")
        unloaded = d.vid
        if unloaded is not None:
            self.flush_before_unload(d)
            self.cartridge(unloaded).drive = None
        fail = cart.fail_mounts > 0
        if fail:
            cart.fail_mounts -= 1
        if request is not None:
            d.request = request
        d.vid, d.head, cart.drive = vid, 0, drive_id
        self._start(d, "mounting", op)
        seconds = self.timing.mount_seconds + (self.timing.unmount_seconds if unloaded else 0.0)
        return MountPlan(op, drive_id, vid, seconds, unloaded, fail)

    def finish_mount(self, plan: MountPlan) -> SpoolError | None:
        d, cart = self.drive(plan.drive_id), self.cartridge(plan.vid)
        u = d.usage
        if plan.unloaded is not None:
            u.unmount_seconds += self.timing.unmount_seconds
            u.unmounts += 1
        u.mount_seconds += self.timing.mount_seconds
        if plan.fail:
            d.vid, d.head, cart.drive = None, 0, None
        self._end(d, plan.op)
        if plan.fail:
            return Retryable("mount_failed", f"{plan.vid} failed to load in drive {plan.drive_id}")
        u.mounts += 1
        cart.mounts += 1
        return None

    def begin_unmount(self, drive_id: str, op: str) -> MovePlan | None:
        d = self.usable(drive_id)
        if d.vid is None:
            return None
        self.flush_before_unload(d)
        self._start(d, "unmounting", op)
        return MovePlan(op, drive_id, d.vid, self.timing.unmount_seconds)

    def finish_unmount(self, plan: MovePlan) -> None:
        d, cart = self.drive(plan.drive_id), self.cartridge(plan.vid)
        d.usage.unmount_seconds += plan.seconds
        d.usage.unmounts += 1
        d.vid, d.head, cart.drive = None, 0, None
        self._end(d, plan.op)

    # --- locate --------------------------------------------------------------------------------
    def begin_position(self, drive_id: str, fseq: int, op: str) -> MovePlan:
        d = self.usable(drive_id)
        cart = self.mounted(d)
        target = cart.used_bytes if fseq == cart.next_fseq else self.committed_file(cart.vid, fseq).offset
        seconds = self.timing.locate_seconds(d.head, target, cart.capacity)
        self._start(d, "locating", op)
        return MovePlan(op, drive_id, cart.vid, seconds, target)

    def finish_position(self, plan: MovePlan) -> None:
        d = self.drive(plan.drive_id)
        d.usage.locate_seconds += plan.seconds
        d.head = plan.target
        self._end(d, plan.op)

    # --- write ---------------------------------------------------------------------------------
    def begin_write(
        self,
        drive_id: str,
        op: str,
        name: str,
        size: int,
        adler32: str,
        flush: bool = True,
        members: list[TapeMember] | None = None,
    ) -> TransferPlan:
        d = self.usable(drive_id)
        cart = self.mounted(d)
        if cart.state == "full":
            raise Retryable("cartridge_full", f"{cart.vid} is full")
        if cart.state in ("suspect", "disabled"):
            raise Retryable(
                "cartridge_not_writable", f"{cart.vid} is {cart.state}; nothing is appended to it"
            )
        if size > cart.free_bytes:
            raise Retryable(
                "cartridge_full", f"{cart.vid} has {cart.free_bytes} bytes left, {name} needs {size}"
            )
        cf = self.store.journal(cart.vid)
        f = TapeFile(
            fseq=cf.next_fseq(),
            name=name,
            size=size,
            adler32=adler32,
            offset=cf.end_of_data(),
            state="writing",
            written_at=time.time(),
            members=members,
        )
        # Not synced: a reservation lost to a power cut is a file recovery would drop anyway.
        record = {"op": "reserve", "session": self.session, "file": f.model_dump()}
        self.store.append(cart.vid, record, sync=False)
        self.sync = flush
        cart.used_bytes, cart.next_fseq = f.end, f.fseq + 1
        if cart.state == "scratch":
            cart.state = "filling"
        self._start(d, "writing", op)
        return TransferPlan(
            op,
            drive_id,
            cart.vid,
            f,
            self.timing.locate_seconds(d.head, f.offset, cart.capacity),
            self.timing.file_seconds(size),
            self.store.data_path(cart.vid, f.fseq),
            self.store.temp_path(cart.vid, f.fseq, self.session),
        )

    def finish_write(self, plan: TransferPlan, flush: bool = True) -> int:
        """The file is on the tape behind a buffered tape mark; with ``flush`` a synchronous one
        follows (its data was synced by the copy), committing it and whatever preceded it."""
        d, cart = self.drive(plan.drive_id), self.cartridge(plan.vid)
        self.store.append(plan.vid, {"op": "written", "fseq": plan.file.fseq}, sync=False)
        if cart.used_bytes >= cart.capacity:
            cart.state = "full"
        u = d.usage
        u.locate_seconds += plan.locate_seconds
        u.write_seconds += plan.transfer_seconds
        u.files_written += 1
        u.bytes_written += plan.file.size
        d.head = plan.file.end
        if flush:
            self._commit(d, cart, synced={plan.file.fseq})
        else:
            self.sync = False
        self._end(d, plan.op)
        return plan.file.fseq

    # --- flush ---------------------------------------------------------------------------------
    def begin_flush(self, drive_id: str, op: str) -> FlushPlan | None:
        """What a synchronous tape mark on the drive would commit; None: nothing to flush."""
        d = self.usable(drive_id)
        cart = self.mounted(d)
        fseqs = self.store.journal(cart.vid).unflushed(self.session)
        if not fseqs:
            return None
        self._start(d, "writing", op)
        data = [self.store.data_path(cart.vid, n) for n in fseqs]
        return FlushPlan(op, drive_id, cart.vid, fseqs, data, self.timing.flush_seconds())

    def finish_flush(self, plan: FlushPlan) -> list[int]:
        d, cart = self.drive(plan.drive_id), self.cartridge(plan.vid)
        committed = self._commit(d, cart, synced=set(plan.fseqs))
        self._end(d, plan.op)
        return committed

    def flush_before_unload(self, d: Drive) -> None:
        """A drive writes out its buffer before it unloads: commit this session's pending files."""
        if d.vid is not None and self.store.journal(d.vid).unflushed(self.session):
            self._commit(d, self.cartridge(d.vid), synced=set())

    def discard_unflushed(self, d: Drive) -> None:
        """The writer gives the drive up without a flush: what it wrote since is lost."""
        if d.vid is not None and d.op is None:
            drop_files(self.state, self.store, d.vid, self.store.journal(d.vid).unflushed(self.session))

    def _commit(self, d: Drive, cart: Cartridge, synced: set[int]) -> list[int]:
        """Commit this session's written files on ``cart``: their data (unless ``synced``), then
        one journal fsync; charged as one synchronous tape mark."""
        fseqs = self.store.journal(cart.vid).unflushed(self.session)
        if not fseqs:
            return []
        self.store.sync_data(cart.vid, [n for n in fseqs if n not in synced])
        now = time.time()
        self.store.append(cart.vid, *({"op": "commit", "fseq": n, "at": now} for n in fseqs))
        cart.files += len(fseqs)
        d.usage.flush_seconds += self.timing.flush_seconds()
        d.usage.flushes += 1
        self.sync, self.dirty = True, True
        return fseqs

    # --- read ----------------------------------------------------------------------------------
    def begin_read(
        self, drive_id: str, fseq: int, op: str, dest: Path, member: TapeMember | None = None
    ) -> TransferPlan:
        """A read of the file, or of ``member``'s span of it: locate to its first byte, stream
        only its bytes."""
        d = self.usable(drive_id)
        cart = self.mounted(d)
        f = self.committed_file(cart.vid, fseq)
        skip, span = (0, f.size) if member is None else (member.offset, member.size)
        if skip + span > f.size:
            raise Permanent(
                "tape_read_error", f"{cart.vid} fseq {fseq}: bytes {skip}-{skip + span} beyond its {f.size}"
            )
        self._start(d, "reading", op)
        return TransferPlan(
            op,
            drive_id,
            cart.vid,
            f,
            self.timing.locate_seconds(d.head, f.offset + skip, cart.capacity),
            self.timing.read_seconds(span),
            self.store.data_path(cart.vid, fseq),
            dest,
            skip,
            None if member is None else span,
        )

    def finish_read(self, plan: TransferPlan, *, suspect: bool, delivered: bool) -> None:
        """Charge the read; a media error makes the cartridge suspect (never appended to again)."""
        d, cart = self.drive(plan.drive_id), self.cartridge(plan.vid)
        u = d.usage
        u.locate_seconds += plan.locate_seconds
        u.read_seconds += plan.transfer_seconds
        if delivered:
            u.files_read += 1
            u.bytes_read += plan.length
        if suspect and cart.state != "disabled":
            cart.state = "suspect"
        d.head = plan.file.offset + plan.skip + plan.length
        self._end(d, plan.op)

    # --- abort ---------------------------------------------------------------------------------
    def abort(self, drive_id: str, op: str) -> None:
        d = self.state.drives.get(drive_id)
        if d is None or d.op != op:
            return
        if d.status == "mounting" and d.vid is not None:
            self.cartridge(d.vid).drive = None
            d.vid, d.head = None, 0
        elif d.status == "writing" and d.vid is not None:
            # Only the file on its way: what this session wrote before stays for its flush.
            mine = self.store.journal(d.vid).unflushed(self.session, states=("writing",))
            drop_files(self.state, self.store, d.vid, mine)
        self._end(d, op)
