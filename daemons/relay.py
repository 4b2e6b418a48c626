"""The outbox relay: publishes what the catalogue's outbox holds (``common.catalogue.outbox``).

A daemon that records facts outside its message handlers runs one relay. Order of work, and what
a kill at each step leaves:

1. the fact and its event are committed together (the caller), then the caller ``kick``\\s the relay
   — killed here: the row is unsent, the next start publishes it (``start`` looks at once);
2. the relay reads the oldest unsent rows (``batch`` at most) and publishes them, ``window`` at a
   time, each awaited until the broker confirms it — killed here: unconfirmed rows are still
   unsent and go out again at the next start, under the same message id;
3. the confirmed rows are marked ``sent`` — killed before: they go out again, same id (consumers
   drop duplicates by id).

A broker outage only waits: the rows stay unsent, the relay logs one ``outbox_publish_postponed``
warning (not one per event), tries again every ``retry`` seconds and says
``outbox_publish_resumed`` once through. A publish that hangs (a robust connection waiting to
reconnect) counts as an outage after ``publish_timeout``. Besides kicks, the loop looks at the
outbox every ``interval`` seconds, so rows another process of the same daemon left are sent too,
and prunes rows sent long ago.

The outbox is one table for the whole catalogue, and any relay publishes any unsent row: events
a node left behind go out even if that node never comes back (on one host, ``spool run`` with
several daemons runs several relays over it; several instances of a daemon, one each). A relay
claims the rows it reads (``outbox.claim_unsent``) under its daemon's instance lease id
(``holder``), for ``claim`` seconds at most, so the others take other rows instead of publishing
the same ones. The claims of a relay that stops are released; those of a killed one are free as
soon as its instance is dead (its lease run out, or at once when the daemon restarts on its node
and forgets its predecessor). A relay without an instance (tests, tools) claims under an id no
live instance has: its claims keep no other relay away. A row is still sent twice now and then (a
claim that ran out during a long outage, a kill between confirm and ``sent``), with the same
message id both times.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from datetime import timedelta

from common import codec
from common.bus.publisher import Publisher
from common.catalogue import Catalogue
from common.catalogue import outbox as db
from common.catalogue.sql import utcnow
from common.errors import InvalidMessage, Retryable, SpoolError
from common.logging import get_logger

log = get_logger("spool.outbox")

BATCH = 500  # rows read per transaction
WINDOW = 64  # publishes awaiting their confirm at once
INTERVAL = 5.0  # seconds between looks when nobody kicks
RETRY = 2.0  # seconds between attempts while the broker is away
PUBLISH_TIMEOUT = 10.0  # a publish not confirmed by then counts as an outage
PRUNE_EVERY = 300.0  # seconds between deletions of rows sent before the retention
CLAIM = 60.0  # seconds the rows a relay read are its own to publish (several relays, one outbox)


class OutboxRelay:
    def __init__(
        self,
        catalogue: Catalogue,
        publisher: Publisher,
        *,
        batch: int = BATCH,
        window: int = WINDOW,
        interval: float = INTERVAL,
        retry: float = RETRY,
        publish_timeout: float = PUBLISH_TIMEOUT,
        claim: float = CLAIM,
        holder: str | None = None,
    ) -> None:
        self.catalogue = catalogue
        # Who claims rows: this daemon's instance, or an id of this relay's own (host and pid).
        self.claimant = holder or f"relay@{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.claim = claim
        self.publisher = publisher
        self.batch = batch
        self.window = window
        self.interval = interval
        self.retry = retry
        self.publish_timeout = publish_timeout
        self.published = 0  # confirmed by the broker, since start
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one flush at a time: a row is never in flight twice
        self._outage_since: float | None = None
        self._attempts = 0  # failed flushes during the current outage
        self._pruned_at = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def outage(self) -> bool:
        return self._outage_since is not None

    async def start(self) -> None:
        """Start publishing in the background, beginning with what a predecessor left unsent
        (the oldest rows go first). Does not wait for it: a large backlog, or a broker that is
        away, must not hold up the daemon's start."""
        self._wake.set()
        self._task = asyncio.create_task(self._run(), name="outbox-relay")

    def kick(self) -> None:
        """Something was committed to the outbox: publish it now (not at the next interval)."""
        self._wake.set()

    async def send_now(self) -> None:
        """Publish what the caller just committed before returning (the broker willing), so its
        event is out as the caller goes on; during an outage only kick the loop: never wait."""
        if self.outage:
            self.kick()
            return
        try:
            await self.flush()
        except Exception as exc:  # the catalogue hiccuped: the loop tries again
            log.error("outbox_flush_failed", error=repr(exc))
            self.kick()

    async def close(self, grace: float = 5.0) -> None:
        """Stop the loop and try once more, within ``grace`` seconds, to send what is waiting;
        what is still unsent then goes out at the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self.outage:
            with contextlib.suppress(Exception, TimeoutError):
                await asyncio.wait_for(self.flush(), timeout=grace)
        with contextlib.suppress(Exception):  # else they are free once this instance is dead
            await self.catalogue.outbox.release_claims(self.claimant)

    async def _run(self) -> None:
        while True:
            if self.outage:  # kicks do not hurry a retry: no hot loop against a dead broker
                await asyncio.sleep(self.retry)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
            self._wake.clear()
            try:
                await self.flush()
                await self._maybe_prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the catalogue hiccuped: next round
                log.error("outbox_flush_failed", error=repr(exc))

    async def flush(self) -> int:
        """Publish unsent rows until none is left or the broker refuses; returns how many were
        confirmed."""
        async with self._lock:
            total = 0
            while True:
                now = utcnow()
                rows = await self.catalogue.outbox.claim_unsent(
                    self.batch, self.claimant, now, now + timedelta(seconds=self.claim)
                )
                if not rows:
                    break
                sent, error = await self._publish(rows)
                if sent:
                    await self.catalogue.outbox.mark_sent(sent)
                    total += len(sent)
                    self.published += len(sent)
                if error is not None:
                    await self._postponed(error)
                    return total
                if len(rows) < self.batch:
                    break
            self._resumed(total)
            return total

    async def _publish(self, rows: list[db.Pending]) -> tuple[list[int], SpoolError | None]:
        """Publish in windows; returns the seqs settled (confirmed, or given up) and the error that
        stopped it (the broker is away: what follows is left for the next attempt)."""
        done: list[int] = []
        unroutable: list[str] = []
        error: SpoolError | None = None
        for i in range(0, len(rows), self.window):
            part = rows[i : i + self.window]
            results = await asyncio.gather(*(self._one(row) for row in part), return_exceptions=True)
            for row, result in zip(part, results, strict=True):
                if isinstance(result, SpoolError):
                    error = error or result
                elif isinstance(result, BaseException):
                    raise result  # cancelled
                else:
                    done.append(row.seq)
                    if result == "unroutable":
                        unroutable.append(row.routing_key)
            if error is not None:
                break
        if unroutable:
            # Every process declares the monitor's queue, bound to every key: someone deleted it.
            # The event reached the broker and nobody listens; keeping it would block the outbox.
            log.warning("outbox_events_unroutable", events=len(unroutable), types=sorted(set(unroutable)))
        return done, error

    async def _one(self, row: db.Pending) -> str:
        """Publish one row: ``sent``, ``unroutable`` or ``undecodable`` (both given up), or raise
        a ``SpoolError`` when the broker is not there."""
        try:
            msg = codec.decode(row.body, codec.MSGPACK, row.routing_key)
        except InvalidMessage as exc:
            # Written by an older Spool whose model no longer validates: it would block every row
            # behind it. Said loudly, and given up.
            log.error("outbox_row_undecodable", message_id=row.id, type=row.routing_key, error=exc.message)
            return "undecodable"
        try:
            await asyncio.wait_for(
                self.publisher.publish(msg, correlation_id=row.correlation_id), self.publish_timeout
            )
        except SpoolError as exc:
            if exc.reason == "unroutable":
                return "unroutable"
            raise
        except TimeoutError:
            raise Retryable(
                "broker_unavailable", f"no confirm for {row.routing_key!r} within {self.publish_timeout}s"
            ) from None
        except Exception as exc:  # whatever the client library raised: the broker is not there
            raise Retryable("broker_unavailable", f"publish of {row.routing_key!r} failed: {exc!r}") from None
        return "sent"

    async def _postponed(self, error: SpoolError) -> None:
        self._attempts += 1
        if self._outage_since is not None:
            return
        self._outage_since = time.monotonic()
        waiting = await self.catalogue.outbox.backlog()
        log.warning("outbox_publish_postponed", reason=error.reason, error=error.message, waiting=waiting)

    def _resumed(self, published: int) -> None:
        if self._outage_since is None:
            return
        log.info(
            "outbox_publish_resumed", published=published, attempts=self._attempts,
            postponed_seconds=round(time.monotonic() - self._outage_since, 1),
        )  # fmt: skip
        self._outage_since = None
        self._attempts = 0

    async def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._pruned_at < PRUNE_EVERY:
            return
        self._pruned_at = now
        await self.catalogue.outbox.prune()
