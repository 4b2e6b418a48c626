"""An endpoint's ``max_transfers`` across the replicator's instances: ``async with slots:`` around
each transfer into it (one large copy, or one batch of small copies: ``PosixStorage._run_small``).

Decision: slots are rows in the catalogue (``common.catalogue.transfers``), held by the instance
copying with them, rather than an equal share of the limit per live instance. A share needs no
round trip per copy, but it is exact only while the set of instances stands still (a newcomer
runs its share before the others have shrunk theirs), and an idle instance's share is lost to
the busy ones. Rows are exact at every moment, let one instance use all the slots while the others
have nothing to copy, and free themselves when an instance dies (its lease runs out: nothing to
clean). Their cost, a claim and a release per transfer, is kept small:

- what waits here at the same moment is claimed in one transaction, and what ends at the same
  moment released in one (a bulk request's copies start together);
- a batch of up to 256 small copies is one transfer: one claim for the batch, not per file;
- at most ``max_transfers`` transfers of this instance ask at all (a local semaphore first), so an
  instance alone on the catalogue never waits for a row: all of them are its own.

A slot given back is kept ``KEEP`` s before its row is released, and the next transfer of this
instance in that time takes it back without a round trip (a bulk request's batches follow one
another: without this, every batch paid a claim and a release, a third of the replicator's time on
a fast disk). A slot is kept, reused or handed to a transfer waiting here only while no other
instance is known to wait for the endpoint, known from a read at most ``FRESH`` s old: then an
instance alone claims and releases rarely, and a newcomer waits at most about ``FRESH`` s longer
for its share than it would have.

An instance short of slots polls (``POLL`` s, or at once when one of its own is released) and
leaves a waiter row meanwhile, so the others keep to their share (see ``claim_slots``). A claim
that fails (the catalogue unreachable) fails the transfers waiting for it as ``Retryable``, as any
of their catalogue writes would; its answer may have been lost after the commit, so the rows this
instance holds are released (``release_all``) the next time nothing here is in flight. A release
that fails is tried again (the rows stay this live instance's meanwhile: nobody else takes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from types import TracebackType

from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.errors import Retryable
from common.logging import get_logger

log = get_logger("spool.replicator")

POLL = 0.05  # seconds between claims while every slot is held elsewhere
KEEP = 0.1  # seconds a slot given back waits for the next transfer here before its release
FRESH = 0.5  # seconds "no other instance waits" is believed before it is read again


class EndpointSlots:
    def __init__(self, catalogue: Catalogue, storage: str, limit: int, holder: str) -> None:
        self.catalogue = catalogue
        self.storage = storage
        self.limit = limit
        self.holder = holder
        self.in_use = 0  # slots granted here (their transfers running, or about to)
        self._local = asyncio.Semaphore(limit)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._to_release = 0
        self._released = asyncio.Event()  # one of ours went back: a claim may succeed now
        self._claimer: asyncio.Task[None] | None = None
        self._releaser: asyncio.Task[None] | None = None
        self._unsure = False  # a claim failed: the catalogue may hold rows of ours we do not know of
        self._others_waiting = True  # another instance waits for the endpoint, as last known
        self._known_at = -FRESH  # monotonic time of that knowledge
        self.claims = 0  # claim transactions made (tests, and curiosity) ...
        self.transfers = 0  # ... for this many transfers

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            if not await self._reuse():
                await self._take()
        except BaseException:
            self._local.release()
            raise
        self.transfers += 1

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.in_use -= 1
        if not (self._alone() and self._hand_over()):
            self._give_back(1)
        self._local.release()

    # --- keeping what was given back ----------------------------------------------------------
    def _alone(self) -> bool:
        """No other instance waits for the endpoint, as known ``FRESH`` s ago at most."""
        return not self._others_waiting and time.monotonic() - self._known_at < FRESH

    async def _refresh(self) -> None:
        """Read whether another instance waits, unless that was known less than ``FRESH`` s ago."""
        if time.monotonic() - self._known_at < FRESH:
            return
        try:
            waiting = await self.catalogue.transfers.others_waiting(self.storage, self.holder, utcnow())
        except Exception:
            waiting = True  # unknown: keep nothing (the claims and releases report the catalogue)
        self._others_waiting, self._known_at = waiting, time.monotonic()

    async def _reuse(self) -> bool:
        """Take back a slot given back and not released yet, while no other instance waits."""
        if self._to_release <= 0:
            return False
        await self._refresh()
        if not self._alone() or self._to_release <= 0:
            return False
        self._to_release -= 1
        self.in_use += 1
        return True

    def _hand_over(self) -> bool:
        """Give the slot just given back to a transfer of this instance waiting for one."""
        while self._waiters:
            wake = self._waiters.popleft()
            if not wake.done():
                wake.set_result(None)
                self.in_use += 1
                return True
        return False

    # --- claiming -----------------------------------------------------------------------------
    async def _take(self) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(wake)
        if self._claimer is None or self._claimer.done():
            self._claimer = asyncio.create_task(self._claim(), name=f"slots-{self.storage}")
        try:
            await wake
        except asyncio.CancelledError:
            if wake in self._waiters:
                self._waiters.remove(wake)
            elif wake.done() and not wake.cancelled():
                self.in_use -= 1  # granted as this waiter was cancelled: not ours to keep
                self._give_back(1)
            raise

    async def _claim(self) -> None:
        """Claim for everyone waiting, until nobody is."""
        while self._waiters:
            self._released.clear()
            wanted = len(self._waiters)
            try:
                if self._unsure and self.in_use == 0 and self._to_release == 0:
                    await self.catalogue.transfers.release_all(self.holder, self.storage)
                    self._unsure = False
                self.claims += 1
                got = await self.catalogue.transfers.claim_slots(
                    self.storage, self.limit, self.holder, wanted, utcnow()
                )
            except Exception as exc:
                # The catalogue away: the transfers waiting fail as any of their catalogue writes
                # would (their messages are retried later), rather than hang while it lasts.
                self._unsure = True
                log.warning("transfer_slot_claim_failed", storage=self.storage, error=repr(exc))
                while self._waiters:
                    wake = self._waiters.popleft()
                    if not wake.done():
                        wake.set_exception(
                            Retryable("catalogue_unavailable", f"claiming a slot of {self.storage}: {exc!r}")
                        )
                return
            for _ in range(got):
                while self._waiters:
                    wake = self._waiters.popleft()
                    if not wake.done():
                        wake.set_result(None)
                        self.in_use += 1
                        break
                else:
                    self._give_back(1)  # its copy gave up meanwhile
            if got < wanted:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._released.wait(), POLL)

    # --- releasing ----------------------------------------------------------------------------
    def _give_back(self, count: int) -> None:
        self._to_release += count
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.create_task(self._release(), name=f"slots-release-{self.storage}")

    async def _release(self) -> None:
        """Release what was given back, several at once; kept and tried again on an error (the
        rows stay this live instance's meanwhile: no other instance takes them)."""
        while self._to_release > 0:
            await self._refresh()
            if self._alone():
                await asyncio.sleep(KEEP)  # the next transfer here may take it back meanwhile
                if self._to_release <= 0:
                    break
            # Counted out before the round trip: a transfer starting meanwhile takes back only
            # what is not being released.
            count = self._to_release
            self._to_release -= count
            try:
                await self.catalogue.transfers.release_slots(
                    self.storage, self.holder, count, still_waiting=bool(self._waiters)
                )
            except Exception as exc:
                self._to_release += count
                log.warning("transfer_slot_release_failed", storage=self.storage, error=repr(exc))
                await asyncio.sleep(POLL * 10)
                continue
            self._released.set()

    async def close(self) -> None:
        """At a stop: every slot and wait of this instance on the endpoint released."""
        for task in (self._claimer, self._releaser):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._claimer, self._releaser) if t is not None), return_exceptions=True
        )
        for wake in self._waiters:
            wake.cancel()
        if self.transfers:
            log.info(
                "transfer_slots_used", storage=self.storage, transfers=self.transfers, claims=self.claims
            )
        try:
            await self.catalogue.transfers.release_all(self.holder, self.storage)
        except Exception as exc:  # the lease's end frees them anyway
            log.warning("transfer_slots_not_released", storage=self.storage, error=repr(exc))
