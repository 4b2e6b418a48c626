"""Several outbox relays over one catalogue (every process of a daemon runs one; several
instances, several relays): each row is published by one of them, a stopping relay releases its
claims, and the rows a killed instance's relay had claimed go out through another once that
instance is dead (SQLite and PostgreSQL)."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.instance import InstanceLease
from common.messages import Message
from daemons.relay import OutboxRelay
from tests.catalogue_fixtures import catalogue_url  # noqa: F401
from tests.outbox_fixtures import archived

ROWS = 300


class SlowBroker(RecordingPublisher):
    """Confirms each publish after a pause, so that two relays' flushes overlap."""

    async def publish(self, msg: Message, *, correlation_id: str | None = None) -> None:
        await asyncio.sleep(0.001)
        await super().publish(msg, correlation_id=correlation_id)


async def test_two_relays_publish_each_row_once_and_a_dead_relays_claims_run_out(catalogue_url: str) -> None:
    first, second = await Catalogue.open(catalogue_url), await Catalogue.open(catalogue_url)
    try:
        await first.outbox.add([archived(i) for i in range(ROWS)])
        a, b = SlowBroker(), SlowBroker()
        # Two daemon instances, live (their leases held), each with its relay.
        la, lb = InstanceLease(first, "tape", "node-a", 30), InstanceLease(second, "tape", "node-b", 30)
        await la.start()
        await lb.start()
        relays = [
            OutboxRelay(first, a, batch=50, window=10, holder=la.id),
            OutboxRelay(second, b, batch=50, window=10, holder=lb.id),
        ]
        sent = await asyncio.gather(*(r.flush() for r in relays))
        assert sum(sent) == ROWS and await first.outbox.backlog() == 0
        ids = Counter(m.id for m in a.published + b.published)
        assert len(ids) == ROWS and set(ids.values()) == {1}  # each event once, none lost

        # A relay stopping releases what it claimed and did not send.
        await first.outbox.add([archived(i) for i in range(ROWS, ROWS + 10)])
        now = utcnow()
        assert len(await first.outbox.claim_unsent(100, la.id, now, now + timedelta(seconds=60))) == 10
        assert await relays[1].flush() == 0  # a's, while a lives
        await OutboxRelay(first, RecordingPublisher(), holder=la.id, publish_timeout=0.01).close(grace=0)
        assert await relays[1].flush() == 10

        # A live instance killed after claiming rows: the others leave them while its lease
        # stands, and publish them once it is dead.
        await first.outbox.add([archived(i) for i in range(ROWS + 10, ROWS + 30)])
        now = utcnow()
        assert len(await first.outbox.claim_unsent(100, la.id, now, now + timedelta(seconds=60))) == 20
        survivor = SlowBroker()
        relay = OutboxRelay(second, survivor, holder=lb.id)
        assert await relay.flush() == 0
        await la.stop()  # its lease gone: as a restarted daemon forgets its killed predecessor
        assert await relay.flush() == 20
        assert sorted(m.fseq for m in survivor.published) == list(range(ROWS + 10, ROWS + 30))
        await lb.stop()
    finally:
        await first.close()
        await second.close()
