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
from collections import deque
from types import TracebackType

from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.errors import Retryable
from common.logging import get_logger

log = get_logger("spool.replicator")

POLL = 0.05  # seconds between claims while every slot is held elsewhere


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

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            await self._take()
        except BaseException:
            self._local.release()
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.in_use -= 1
        self._give_back(1)
        self._local.release()

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
        while self._to_release:
            count = self._to_release
            try:
                await self.catalogue.transfers.release_slots(
                    self.storage, self.holder, count, still_waiting=bool(self._waiters)
                )
            except Exception as exc:
                log.warning("transfer_slot_release_failed", storage=self.storage, error=repr(exc))
                await asyncio.sleep(POLL * 10)
                continue
            self._to_release -= count
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
        try:
            await self.catalogue.transfers.release_all(self.holder, self.storage)
        except Exception as exc:  # the lease's end frees them anyway
            log.warning("transfer_slots_not_released", storage=self.storage, error=repr(exc))
