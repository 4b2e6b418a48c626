"""The outbox and its relay against the real RabbitMQ, on SQLite and PostgreSQL: events committed
while the broker is unreachable stay unsent and go out, with their ids, once it is back; events a
killed process committed go out at the next start; a duplicate carries the same message id."""

# Fixtures imported from catalogue_fixtures (not conftest) reappear as test parameters:
# ruff: noqa: F811

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, update
from structlog.testing import capture_logs

from common.catalogue import schema as s
from common.catalogue.sql import utcnow
from common.messages import FileFailed, TapeMounted
from daemons.recall.announce import Announcer
from daemons.relay import OutboxRelay
from tests.catalogue_fixtures import catalogue_url  # noqa: F401
from tests.outbox_fixtures import archived, cat, dead, listener, live, nothing_more, received  # noqa: F401

pytestmark = pytest.mark.integration


def _unsent_again(conn: Connection) -> None:
    conn.execute(update(s.outbox).values(sent=None))


async def test_events_committed_while_the_broker_is_unreachable_go_out_with_their_ids_once_it_is_back(
    cat, dead, live, listener
):
    events = [archived(i) for i in range(1, 8)]
    await cat.outbox.add(events)
    relay = OutboxRelay(cat, dead, batch=3, window=2)
    with capture_logs() as logs:
        for _ in range(3):  # three attempts during the outage
            assert await relay.flush() == 0
    assert relay.outage
    assert await cat.outbox.backlog() == 7  # nothing dropped
    postponed = [e for e in logs if e["event"] == "outbox_publish_postponed"]
    assert len(postponed) == 1 and postponed[0]["waiting"] == 7  # one line, not one per event
    assert postponed[0]["reason"] == "broker_unavailable"

    relay.publisher = live  # the broker is back
    with capture_logs() as logs:
        assert await relay.flush() == 7
    assert not relay.outage
    assert [e["event"] for e in logs] == ["outbox_publish_resumed"]
    assert await received(listener, 7) == [("file.archived", e.id) for e in events]  # in order
    assert await cat.outbox.backlog() == 0
    assert await relay.flush() == 0 and await nothing_more(listener)  # sent once


async def test_a_publish_that_never_gets_a_confirm_counts_as_an_outage_and_the_row_stays(cat, live, listener):
    class Hanging:
        async def publish(self, msg: Any, *, correlation_id: str | None = None) -> None:
            await asyncio.sleep(3600)

    await cat.outbox.add([archived(1)])
    relay = OutboxRelay(cat, Hanging(), publish_timeout=0.2)
    assert await relay.flush() == 0 and relay.outage
    assert await cat.outbox.backlog() == 1
    relay.publisher = live
    assert await relay.flush() == 1
    assert await received(listener, 1) == [("file.archived", archived(1).id)]


async def test_events_a_killed_process_committed_are_published_at_the_next_start(cat, live, listener):
    # The process recorded the facts and their events, then died before publishing them.
    events = [archived(i) for i in range(1, 4)]
    failure = FileFailed(daemon="tape", reason="no_source", error="tape1: none", attempts=1, name="run1/x")
    await cat.outbox.add([*events, failure])

    relay = OutboxRelay(cat, live)
    await relay.start()
    try:
        got = await received(listener, 4)
    finally:
        await relay.close()
    assert got == [*(("file.archived", e.id) for e in events), ("file.failed", failure.id)]
    assert await cat.outbox.backlog() == 0


async def test_a_duplicate_carries_the_same_message_id(cat, live, listener):
    events = [archived(i) for i in range(1, 3)]
    await cat.outbox.add(events)
    await cat.outbox.add(events)  # the same facts recorded again: one row each
    assert await cat.outbox.backlog() == 2
    relay = OutboxRelay(cat, live)
    assert await relay.flush() == 2
    first = await received(listener, 2)
    # Killed after the publish and before ``sent`` was committed: the next start sends them again.
    await cat.write(_unsent_again)
    assert await relay.flush() == 2
    again = await received(listener, 2)
    assert again == first == [("file.archived", e.id) for e in events]
    # Added again once sent (within the retention): not queued a second time.
    await cat.outbox.add(events)
    assert await cat.outbox.backlog() == 0


async def test_the_relay_loop_publishes_what_is_kicked_and_what_it_finds_periodically(cat, live, listener):
    relay = OutboxRelay(cat, live, interval=0.3)
    await relay.start()
    try:
        await cat.outbox.add([archived(1)])
        relay.kick()  # the committing writer tells the relay
        assert await received(listener, 1) == [("file.archived", archived(1).id)]
        await cat.outbox.add([archived(2)])  # e.g. another process of this daemon
        assert await received(listener, 1) == [("file.archived", archived(2).id)]
    finally:
        await relay.close()


async def test_sent_rows_are_pruned_after_the_retention_unsent_ones_never(cat):
    await cat.outbox.add([archived(1), archived(2), archived(3)])
    rows = await cat.outbox.unsent(10)
    await cat.outbox.mark_sent([rows[0].seq])
    assert await cat.outbox.prune() == 0  # sent just now: kept for the retention
    assert await cat.outbox.prune(utcnow() + timedelta(seconds=1)) == 1
    assert [r.id for r in await cat.outbox.unsent(10)] == [archived(2).id, archived(3).id]


async def test_a_recall_mount_while_the_broker_is_away_is_announced_when_recall_catches_up(
    cat, dead, live, listener
):
    announcer = Announcer(cat, dead)
    mounted = TapeMounted(library="default", drive="DR01", cartridge="A00001", purpose="recall")
    await announcer.mounted(mounted)  # the broker is away: recorded, not lost, and no error
    assert announcer.behind and await cat.outbox.backlog() == 1
    announcer.publisher = announcer.relay.publisher = live
    await announcer.flush()  # what the recall scheduler does on its next pass when behind
    assert not announcer.behind
    assert await received(listener, 1) == [("tape.mounted", mounted.id)]
