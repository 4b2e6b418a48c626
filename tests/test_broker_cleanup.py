"""The test suite's own clean-up of the shared broker (``tests/broker_cleanup.py``) deletes what
tests declared and nothing a site's Spool declares."""

from __future__ import annotations

import uuid

import aio_pika
import pytest

from tests.broker_cleanup import LEFTOVER_EXCHANGE, LEFTOVER_QUEUE, remove_tags
from tests.conftest import AMQP_URL


@pytest.mark.parametrize(
    ("name", "picked"),
    [
        ("t0123456789.ingest", True),
        ("tabcdef0123.replicator.retry.2", True),
        ("tall.monitor", True),
        ("demo3a407fc933.ingest.dead", True),
        ("n86437f288d.tape", True),  # a night bench killed before its clean-up
        ("night.ingest", False),
        ("spool.ingest", False),  # a site's own queue prefix
        ("t0123.ingest", False),
        ("tests.ingest", False),
        ("t0123456789", False),
    ],
)
def test_only_test_and_demo_queue_names_are_leftovers(name: str, picked: bool) -> None:
    assert bool(LEFTOVER_QUEUE.match(name)) is picked


@pytest.mark.parametrize(
    ("name", "picked"),
    [
        ("spool-test-5e27b7eded", True),
        ("spool-demo-3a407fc933", True),
        ("spool-night-86437f288d", True),
        ("spool", False),
        ("amq.topic", False),
    ],
)
def test_only_test_and_demo_exchanges_are_leftovers(name: str, picked: bool) -> None:
    assert bool(LEFTOVER_EXCHANGE.match(name)) is picked


@pytest.mark.integration
async def test_a_sessions_tags_are_removed_and_nothing_else() -> None:
    mine, other = uuid.uuid4().hex[:10], uuid.uuid4().hex[:10]
    connection = await aio_pika.connect(AMQP_URL, timeout=30)
    try:
        channel = await connection.channel()
        for tag in (mine, other):
            await channel.declare_queue(f"t{tag}.ingest", durable=True)
            await channel.declare_exchange(f"spool-test-{tag}", aio_pika.ExchangeType.TOPIC, durable=True)
        assert remove_tags(AMQP_URL, [mine]) == (1, 1)
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await (await connection.channel()).declare_queue(f"t{mine}.ingest", passive=True)
        await (await connection.channel()).declare_queue(f"t{other}.ingest", passive=True)  # still there
    finally:
        channel = await connection.channel()
        await channel.queue_delete(f"t{other}.ingest")
        await channel.exchange_delete(f"spool-test-{other}")
        await connection.close()
