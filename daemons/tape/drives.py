"""Holding a drive with a cartridge of a pool for one write batch, through the faults of a library.

What goes wrong with drives and cartridges, and the answer here:

- the drive is broken (or taken) when we try to use it  -> claim another free drive, release this one
- the cartridge fails to load (``mount_failed``)         -> count it against the cartridge and try
  again on another drive when one is free (the drive may be the culprit); after
  ``tape.mount_failures_before_suspect`` failures the cartridge is marked ``suspect`` (never
  appended to again; an operator looks at it) and another cartridge of the pool is taken
- the cartridge is in another drive, disabled, suspect   -> take another cartridge of the pool
- the cartridge is full                                  -> ``close``: mark it ``full``, take the next

Failure counts live in the process (``MountFailures``), shared by its batches, so three failed
batches on three drives condemn the cartridge, not three drives. Every new cartridge is reported to
``on_cartridge`` *before* it is mounted: the batch's catalogue rows always name the cartridge they
are being written to, which is what start-up reconciliation checks against the library.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable

from common.errors import Retryable, SpoolError
from common.logging import get_logger
from common.tape import TapeLibrary
from daemons.tape import steps

log = get_logger("spool.tape")

CartridgeCallback = Callable[[str], Awaitable[None]]
MountedCallback = Callable[[str, str], Awaitable[None]]  # (drive, cartridge) after a real load
# Cartridge problems that another cartridge of the pool avoids.
_OTHER_CARTRIDGE = frozenset({"cartridge_in_use", "cartridge_disabled", "cartridge_not_writable"})
# Drive problems that another drive avoids.
_OTHER_DRIVE = frozenset({"drive_broken", "drive_busy"})


class MountFailures(Counter[str]):
    """Failed loads per cartridge in this process (reset by a successful load)."""


class Mount:
    """A drive claimed for one batch of one pool, and the cartridge loaded in it."""

    def __init__(
        self,
        library: TapeLibrary,
        pool: str,
        request: str,
        failures: MountFailures,
        suspect_after: int,
        on_cartridge: CartridgeCallback,
        on_mounted: MountedCallback | None = None,
    ) -> None:
        self.on_mounted = on_mounted
        self.library = library
        self.pool = pool
        self.request = request
        self.failures = failures
        self.suspect_after = suspect_after
        self.on_cartridge = on_cartridge
        self.drive: str | None = None
        self.vid: str | None = None
        self.excluded: set[str] = set()  # cartridges this batch gave up on

    async def acquire(self, needed: int = 1) -> bool:
        """Pick a cartridge of the pool and claim a drive for it (preferably the drive that holds
        it already: no mount). False when no drive is free; ``no_cartridge`` when the pool has none.
        Nothing is mounted yet and ``on_cartridge`` is not called (the batch has no rows yet)."""
        for _ in range(8):  # a few cartridges may be stuck in broken drives
            vid = (await self.library.allocate_cartridge(self.pool, needed, exclude_vids=self.excluded)).vid
            try:
                drive = await self.library.claim_drive(self.request, vid=vid)
            except SpoolError as exc:
                if exc.reason != "drive_broken":
                    raise
                self.excluded.add(vid)  # stuck in a broken drive: another cartridge
                continue
            if drive is None:
                # It sits in a drive someone is using (a race: allocation skips those). Any drive
                # will do; the mount then answers cartridge_in_use and ``load`` takes another one.
                drive = await self.library.claim_drive(self.request)
                if drive is None:
                    return False
            self.drive, self.vid = drive, vid
            return True
        raise Retryable("no_cartridge", f"pool {self.pool!r}: every cartridge with room is in a broken drive")

    async def load(self, needed: int = 1) -> None:
        """Mount ``self.vid`` into ``self.drive``, working around failures (see the module doc)."""
        assert self.drive is not None and self.vid is not None
        budget = self.suspect_after * 4 + 8
        while True:
            budget -= 1
            if budget < 0:
                raise Retryable("mount_failed", f"pool {self.pool!r}: no cartridge would load")
            try:
                loaded = await self.library.mount(self.drive, self.vid, request=self.request)
            except SpoolError as exc:
                await self._after_failure(exc, needed)
                continue
            self.failures.pop(self.vid, None)
            if loaded and self.on_mounted is not None:
                await self.on_mounted(self.drive, self.vid)
            return

    async def _after_failure(self, exc: SpoolError, needed: int) -> None:
        assert self.vid is not None
        log.warning(
            "tape_mount_failed", drive=self.drive, cartridge=self.vid, reason=exc.reason, error=exc.message
        )
        if exc.reason == "mount_failed":
            self.failures[self.vid] += 1
            if steps.should_suspect(self.failures[self.vid], self.suspect_after):
                log.error("cartridge_suspect", cartridge=self.vid, failures=self.failures[self.vid])
                await self.library.set_cartridge_state(self.vid, "suspect")
                self.failures.pop(self.vid, None)
                await self._other_cartridge(needed)
            await self._other_drive()  # the drive may be the culprit; keep this one if none is free
        elif exc.reason in _OTHER_DRIVE:
            if not await self._other_drive():
                raise Retryable(exc.reason, f"{exc.message}; no other drive is free") from None
        elif exc.reason in _OTHER_CARTRIDGE:
            await self._other_cartridge(needed)
        else:
            raise exc

    async def _other_drive(self) -> bool:
        """Claim another free drive before releasing this one (so this process always holds one)."""
        drive = await self.library.claim_drive(self.request)
        if drive is None:
            return False
        await self.release()
        self.drive = drive
        return True

    async def _other_cartridge(self, needed: int) -> None:
        assert self.vid is not None
        self.excluded.add(self.vid)
        self.vid = (await self.library.allocate_cartridge(self.pool, needed, exclude_vids=self.excluded)).vid
        await self.on_cartridge(self.vid)

    async def close_cartridge(self, reason: str, needed: int) -> None:
        """The loaded cartridge takes no more (``cartridge_full``: mark it full); load the next one."""
        assert self.vid is not None
        if reason == "cartridge_full":
            await self.library.set_cartridge_state(self.vid, "full")
            log.info("cartridge_full", cartridge=self.vid, pool=self.pool)
        await self._other_cartridge(needed)
        await self.load(needed)

    async def release(self) -> None:
        """Give the drive back; the cartridge stays in it, so the pool's next batch needs no mount."""
        if self.drive is not None:
            drive, self.drive = self.drive, None
            await self.library.release_drive(drive)
