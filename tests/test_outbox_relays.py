"""Several outbox relays over one catalogue (every process of a daemon runs one; several
instances, several relays): each row is published by one of them, and the rows a killed relay
had claimed go out through another once its claim runs out (SQLite and PostgreSQL)."""

# ruff: noqa: F811

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

from common.bus.publisher import RecordingPublisher
from common.catalogue import Catalogue
from common.catalogue.sql import utcnow
from common.messages import FileArchived, Message, fact_id
from daemons.relay import OutboxRelay
from tests.catalogue_fixtures import catalogue_url  # noqa: F401

ROWS = 300


def archived(i: int) -> FileArchived:
    name = f"run1/f{i:04d}.fits"
    return FileArchived(
        id=fact_id("file.archived", "tape1", name, "A00001", str(i)),
        name=name, storage="tape1", cartridge="A00001", fseq=i,
    )  # fmt: skip


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
        relays = [OutboxRelay(first, a, batch=50, window=10), OutboxRelay(second, b, batch=50, window=10)]
        sent = await asyncio.gather(*(r.flush() for r in relays))
        assert sum(sent) == ROWS and await first.outbox.backlog() == 0
        ids = Counter(m.id for m in a.published + b.published)
        assert len(ids) == ROWS and set(ids.values()) == {1}  # each event once, none lost

        # A relay killed after claiming rows: another leaves them while the claim stands ...
        await first.outbox.add([archived(i) for i in range(ROWS, ROWS + 20)])
        now = utcnow()
        taken = await first.outbox.claim_unsent(100, "relay@dead:1:x", now, now + timedelta(seconds=1))
        assert len(taken) == 20
        survivor = SlowBroker()
        relay = OutboxRelay(second, survivor)
        assert await relay.flush() == 0
        await asyncio.sleep(1.1)  # ... and publishes them once it has run out.
        assert await relay.flush() == 20
        assert sorted(m.fseq for m in survivor.published) == list(range(ROWS, ROWS + 20))
    finally:
        await first.close()
        await second.close()
