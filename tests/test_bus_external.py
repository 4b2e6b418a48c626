"""``publish_cloudevents`` (``spool ingest``, the demo, the benchmarks) against the real broker."""

from __future__ import annotations

import json
import uuid

import aio_pika
import pytest

from common.bus.external import publish_cloudevents
from common.errors import Retryable
from tests.conftest import queue_depth, wait_for

pytestmark = pytest.mark.integration


def events(n: int, type_: str = "file.ready") -> list[dict[str, object]]:
    return [
        {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "test-daq", "type": type_,
         "data": {"path": f"/landing/f{i}", "dataset": "d"}}
        for i in range(n)
    ]  # fmt: skip


async def test_every_event_is_confirmed_and_queued_in_order_with_a_sliding_window(settings, broker, topology):
    batch = events(700)
    counts: list[int] = []
    sent = await publish_cloudevents(broker, settings.bus.exchange, batch, window=64, on_sent=counts.append)
    assert sent == 700
    assert counts[-1] == 700 and counts[:-1] == list(range(64, 700, 64))
    queue = settings.queue("ingest")

    async def all_queued() -> bool:
        return await queue_depth(broker, queue) == 700

    await wait_for(all_queued, timeout=30)
    channel = await broker.channel()
    q = await channel.get_queue(queue)
    first = await q.get(no_ack=True)
    assert first is not None
    assert first.content_type == "application/cloudevents+json"
    assert first.message_id == batch[0]["id"]
    assert first.delivery_mode == 2  # persistent
    assert json.loads(first.body) == batch[0]
    await channel.close()


async def test_an_unroutable_event_stops_the_publishing_with_a_reason(settings, broker):
    # An exchange of its own with one binding (the test topology's monitor queue binds "#").
    name = f"{settings.bus.exchange}-narrow"
    channel = await broker.channel()
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "file.ready")
    try:
        batch = events(50) + events(1, type_="nobody.listens") + events(2000)
        with pytest.raises(Retryable) as err:
            await publish_cloudevents(broker, name, batch, window=16)
        assert err.value.reason == "publish_failed"
        assert "NO_ROUTE" in err.value.message
        # It stopped soon after: at most a window beyond the bad event went out.
        depth = await queue_depth(broker, queue.name)
        assert 50 <= depth <= 50 + 16
    finally:
        await channel.close()


async def test_a_missing_exchange_is_an_error_before_anything_is_sent(settings, broker):
    with pytest.raises(Exception, match="NOT_FOUND"):
        await publish_cloudevents(broker, f"no-such-exchange-{uuid.uuid4().hex}", events(3))
