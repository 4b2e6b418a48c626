"""The simulated tape library: a ``TapeLibrary`` kept in a directory, with an LTO-9 timing model.

Each drive operation runs as begin (a short locked transaction) → data I/O and a sleep of the
modelled duration times ``time_scale`` with no lock held → finish (another transaction that charges
the drive's clock). Operations on different drives therefore overlap as on real hardware, and a
benchmark reads each drive's simulated seconds and mount count from ``usage()`` instead of
trusting wall time. See ``transitions`` for the state changes, ``store`` for the on-disk layout
and the multi-process rules, ``reconcile`` for crash recovery.

Decisions a daemon author should know:

- ``read`` verifies by default: a checksum that differs from the one recorded at write time
  raises ``TapeChecksumMismatch`` (``Permanent``, reason ``tape_checksum_mismatch``) and leaves
  ``dest`` untouched; ``verify=False`` delivers the bytes and returns the computed checksum for
  the caller to judge. Either way the cartridge becomes ``suspect``.
- ``write`` verifies the source against the announced size and adler32 while copying (one pass),
  so a file on tape is known to be what the catalogue says.
- ``write(flush=False)`` is buffered: no fsync at all until ``flush``, which fsyncs the group's
  data and commits it with one journal fsync (see ``common.tape.library`` for the contract).
- ``mount`` of the cartridge already in the drive is free (no time, no mount counted); mounting
  another cartridge into an occupied drive unloads the old one first (charged as an unmount).
- Cancelling an operation aborts it cleanly: a half-written file is dropped, a half-done mount is
  undone, and nothing is charged.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Concatenate, ParamSpec, TypeVar

import structlog

from common.errors import Permanent, SpoolError
from common.storage.checksum import normalise_adler32
from common.tape import allocation
from common.tape.config import SimulatedLibraryConfig
from common.tape.data import read_data, run_to_completion, write_data
from common.tape.library import (
    Cartridge,
    CartridgeState,
    Drive,
    DriveUsage,
    LibraryUsage,
    ReadResult,
    TapeChecksumMismatch,
    TapeFile,
    TapeMember,
)
from common.tape.reconcile import reconcile
from common.tape.statelog import STATE_FILE, STATE_VERSION
from common.tape.store import LibraryState, Store
from common.tape.transitions import Txn

P = ParamSpec("P")
T = TypeVar("T")
log = structlog.get_logger("spool.tape")

MEDIA_ERRORS = frozenset({"tape_read_error", "tape_checksum_mismatch"})


def new_state(config: SimulatedLibraryConfig) -> LibraryState:
    """A fresh library laid out as ``config`` says: pool cartridges first, then scratch."""
    now = time.time()
    drives = {f"DR{n:02d}": Drive(drive_id=f"DR{n:02d}", since=now) for n in range(1, config.drives + 1)}
    pools: list[str | None] = [p for p, count in config.pools.items() for _ in range(count)]
    pools += [None] * config.scratch_cartridges
    cartridges = {}
    for number, pool in enumerate(pools, start=1):
        vid = config.label(number)
        cartridges[vid] = Cartridge(vid=vid, pool=pool, capacity=config.capacity_bytes)
    return LibraryState(created_at=now, drives=drives, cartridges=cartridges)


def _open_sync(config: SimulatedLibraryConfig) -> tuple[Store, bool, list[str]]:
    store = Store(Path(config.root).absolute(), durable=config.durable)
    try:
        with store.locked():
            converted = store.state.convert_legacy()
            created = not store.exists()
            if created:
                store.initialise(new_state(config))
            store.open_session()
            store.prune_sessions()
            state = store.load()
            notes = reconcile(state, store, store.alive)
            store.save(state)
            if converted:
                notes.append(f"state converted to {STATE_FILE} (version {STATE_VERSION})")
    except BaseException:
        store.close_session()  # also closes the lock file
        raise
    return store, created, notes


def _op_id() -> str:
    return secrets.token_hex(6)


class SimulatedLibrary:
    """A ``TapeLibrary`` in a directory. Obtain one with ``await SimulatedLibrary.open(config)``.

    Several objects (in one process or several) may open the same directory; each is a session.
    Close it when done, after its operations have finished: its claims are released, and a
    cartridge it left in a drive stays there for the next user.
    """

    def __init__(self, config: SimulatedLibraryConfig, store: Store) -> None:
        self.config = config
        self.timing = config.timing
        self.time_scale = config.time_scale
        self.root = store.root
        self._store = store
        self._lock = asyncio.Lock()  # one transaction at a time per object (the flock is per file)

    @classmethod
    async def open(cls, config: SimulatedLibraryConfig) -> SimulatedLibrary:
        """Initialise the directory if it holds no library yet, else reopen and reconcile it."""
        store, created, notes = await asyncio.to_thread(_open_sync, config)
        for note in notes:
            log.warning("tape_library_reconciled", root=str(store.root), note=note)
        log.info("tape_library_opened", root=str(store.root), created=created, session=store.session)
        return cls(config, store)

    async def close(self) -> None:
        if self._store.session is None:
            return
        await self._txn(allocation.release_all)
        async with self._lock:
            await asyncio.to_thread(self._store.close_session)

    async def __aenter__(self) -> SimulatedLibrary:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- plumbing ------------------------------------------------------------------------------
    async def _txn(self, fn: Callable[Concatenate[Txn, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(txn, ...)`` under both locks on a fresh state, saving it if changed."""
        if self._store.session is None:
            raise RuntimeError(f"tape library {self.root} is closed")

        def bound(txn: Txn) -> T:
            return fn(txn, *args, **kwargs)

        async with self._lock:
            return await run_to_completion(self._transact, bound)

    def _transact(self, _cancelled: object, fn: Callable[[Txn], T]) -> T:
        with self._store.locked():
            try:
                state = self._store.load()
                txn = Txn(state, self._store, self.timing)
                txn.sweep()
                if txn.dirty:
                    self._store.save(state)
                    txn.dirty = False
                    for note in txn.notes:
                        log.warning("tape_library_reconciled", root=str(self.root), note=note)
                result = fn(txn)
                if txn.dirty:
                    self._store.save(state, sync=txn.sync)
                return result
            except BaseException:
                # ``state`` may be changed part-way and is the store's kept copy: the file has it right.
                self._store.forget()
                raise

    async def _sleep(self, seconds: float, started: float) -> None:
        """Sleep what is left of the scaled duration after the real I/O already spent."""
        remaining = seconds * self.time_scale - (time.monotonic() - started)
        await asyncio.sleep(max(0.0, remaining))

    async def _abort(self, drive_id: str, op: str) -> None:
        try:
            await self._txn(Txn.abort, drive_id, op)
        except Exception:
            log.exception("tape_abort_failed", drive=drive_id, op=op)

    # --- queries -------------------------------------------------------------------------------
    # Copies: the state's own objects are changed in place by later transactions.
    async def list_cartridges(self, pool: str | None = None) -> list[Cartridge]:
        carts = await self._txn(lambda t: [c.model_copy() for c in t.state.cartridges.values()])
        return [c for c in carts if pool is None or c.pool == pool]

    async def list_drives(self) -> list[Drive]:
        return await self._txn(lambda t: [d.model_copy(deep=True) for d in t.state.drives.values()])

    async def list_files(self, vid: str) -> list[TapeFile]:
        def files(t: Txn) -> list[TapeFile]:
            t.cartridge(vid)
            return t.store.journal(vid).committed()  # fresh models, the caller may keep them

        return await self._txn(files)

    async def usage(self) -> LibraryUsage:
        drives = await self.list_drives()
        total = DriveUsage()
        for d in drives:
            total = total.plus(d.usage)
        return LibraryUsage(drives={d.drive_id: d.usage for d in drives}, total=total)

    @property
    def journal_syncs(self) -> int:
        """Journal fsyncs this object made: one per flush, not one per file (tests count them)."""
        return self._store.journal_syncs

    def data_path(self, vid: str, fseq: int) -> Path:
        """Where the bytes of ``vid``/``fseq`` live (tests damage them to simulate bad media)."""
        return self._store.data_path(vid, fseq)

    # --- allocation ----------------------------------------------------------------------------
    async def claim_drive(self, request: str, *, vid: str | None = None) -> str | None:
        return await self._txn(allocation.claim_drive, request, vid)

    async def release_drive(self, drive_id: str) -> None:
        await self._txn(allocation.release_drive, drive_id)

    async def allocate_cartridge(
        self, pool: str, needed_bytes: int, *, exclude_vids: frozenset[str] | set[str] = frozenset()
    ) -> Cartridge:
        return await self._txn(allocation.allocate_cartridge, pool, needed_bytes, exclude_vids)

    async def set_cartridge_state(self, vid: str, state: CartridgeState) -> None:
        await self._txn(allocation.set_cartridge_state, vid, state)

    # --- fault injection -----------------------------------------------------------------------
    async def set_drive_broken(self, drive_id: str, broken: bool = True) -> None:
        """Mark a drive out of order (or repaired); operations on it raise ``drive_broken``."""
        await self._txn(allocation.set_drive_broken, drive_id, broken)

    async def fail_next_mounts(self, vid: str, count: int = 1) -> None:
        """Make the next ``count`` mounts of ``vid`` fail with ``mount_failed`` (after the load time)."""
        await self._txn(allocation.fail_next_mounts, vid, count)

    # --- drive operations ----------------------------------------------------------------------
    async def mount(self, drive_id: str, vid: str, *, request: str | None = None) -> bool:
        op = _op_id()
        try:
            plan = await self._txn(Txn.begin_mount, drive_id, vid, op, request)
            if plan is None:
                return False  # already in the drive: no mount
            await self._sleep(plan.seconds, time.monotonic())
            error = await self._txn(Txn.finish_mount, plan)
        except BaseException:
            await self._abort(drive_id, op)
            raise
        if error is not None:
            raise error
        return True

    async def unmount(self, drive_id: str) -> None:
        op = _op_id()
        try:
            plan = await self._txn(Txn.begin_unmount, drive_id, op)
            if plan is None:
                return
            await self._sleep(plan.seconds, time.monotonic())
            await self._txn(Txn.finish_unmount, plan)
        except BaseException:
            await self._abort(drive_id, op)
            raise

    async def position(self, drive_id: str, fseq: int) -> None:
        """Locate to the start of ``fseq`` (``next_fseq`` of the cartridge: its end of data)."""
        op = _op_id()
        try:
            plan = await self._txn(Txn.begin_position, drive_id, fseq, op)
            await self._sleep(plan.seconds, time.monotonic())
            await self._txn(Txn.finish_position, plan)
        except BaseException:
            await self._abort(drive_id, op)
            raise

    async def write(
        self,
        drive_id: str,
        source: Path,
        name: str,
        size: int,
        adler32: str,
        *,
        flush: bool = True,
        members: Sequence[TapeMember] | None = None,
        sha256: str | None = None,
    ) -> int:
        """Append ``source`` after the last file of the mounted cartridge; returns its fseq.

        Raises ``cartridge_full`` (Retryable) before moving any byte when it does not fit, and
        ``size_mismatch``/``checksum_mismatch`` (Permanent) when the source is not what was
        announced; in both cases nothing is recorded on the cartridge. With ``flush=False`` the
        file waits for ``flush`` to become durable and visible.
        """
        try:
            expected = normalise_adler32(adler32)
        except ValueError as exc:
            raise Permanent("invalid_checksum", str(exc)) from None
        if size < 0:
            raise Permanent("invalid_size", f"size {size} of {name} is negative")
        index = list(members) if members is not None else None
        if index is not None and any(m.end > size for m in index):
            raise Permanent("invalid_size", f"a member of aggregate {name} ends beyond its {size} bytes")
        op = _op_id()
        try:
            plan = await self._txn(Txn.begin_write, drive_id, op, name, size, expected, flush, index)
            started = time.monotonic()
            durable = self.config.durable and flush
            await run_to_completion(
                write_data, Path(source), plan.path, plan.data, size, expected, durable, sha256
            )
            sync = self.timing.flush_seconds() if flush else 0.0
            await self._sleep(plan.seconds + sync, started)
            return await self._txn(Txn.finish_write, plan, flush)
        except BaseException:
            await self._abort(drive_id, op)
            raise

    async def flush(self, drive_id: str) -> list[int]:
        """Commit what this session wrote on the drive's cartridge since the last flush."""
        op = _op_id()
        try:
            plan = await self._txn(Txn.begin_flush, drive_id, op)
            if plan is None:
                return []
            started = time.monotonic()
            await asyncio.to_thread(self._store.sync_data, plan.vid, plan.fseqs)
            await self._sleep(plan.seconds, started)
            return await self._txn(Txn.finish_flush, plan)
        except BaseException:
            await self._abort(drive_id, op)
            raise

    async def read(
        self, drive_id: str, fseq: int, dest: Path, *, verify: bool = True, member: TapeMember | None = None
    ) -> ReadResult:
        """Copy ``fseq`` of the mounted cartridge to ``dest``, locating first if needed; with
        ``member``, only that span of it (charged: the locate to it and its bytes)."""
        expected_member: str | None = None
        if member is not None:
            try:
                expected_member = normalise_adler32(member.adler32)
            except ValueError as exc:
                raise Permanent("invalid_checksum", str(exc)) from None
        op = _op_id()
        result: ReadResult | None = None
        error: SpoolError | None = None
        try:
            plan = await self._txn(Txn.begin_read, drive_id, fseq, op, Path(dest), member)
            started = time.monotonic()
            expected = expected_member if expected_member is not None else plan.file.adler32
            copy = functools.partial(
                read_data,
                vid=plan.vid,
                fseq=fseq,
                size=plan.length,
                expected=expected,
                keep_mismatch=not verify,
                durable=self.config.durable,
                offset=plan.skip,
            )
            try:
                result = await run_to_completion(copy, plan.data, plan.path)
            except SpoolError as exc:
                if exc.reason not in MEDIA_ERRORS:
                    raise
                error = exc
            if result is not None and result.adler32 != expected:
                error = TapeChecksumMismatch(plan.vid, fseq, expected, result.adler32)
            await self._sleep(plan.seconds, started)
            await self._txn(Txn.finish_read, plan, suspect=error is not None, delivered=result is not None)
        except BaseException:
            await self._abort(drive_id, op)
            raise
        if result is None:
            assert error is not None
            log.warning("tape_media_error", vid=plan.vid, fseq=fseq, reason=error.reason)
            raise error
        if error is not None:
            log.warning("tape_media_error", vid=plan.vid, fseq=fseq, reason=error.reason)
        return result
